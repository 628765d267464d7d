"""When the spool cannot store a message the client hears 451 4.3.0 or 452 4.3.1 — never 250,
never 5xx — the session goes on, and mail accepted before the failure is still delivered.

The tests run as root, so file modes do not stop writes: the real daemon is broken by putting
a regular file where a queue directory must be; a full disk (ENOSPC) is simulated in-process.
"""

from __future__ import annotations

import errno
import os
import smtplib
from functools import partial
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailplat.spool
from tests.daemon import HOST, Daemon, delivered_body, wait_for_files, wait_until


def sync_failing_message_2(code: int, path: str, dirs: list[str]) -> None:
    """``spool.sync_file``, failing with ``code`` for message 2 only. It runs in the disk
    helper process, which cannot see the test's state: the file says which message it is."""
    with open(path, "rb") as data:
        if b"Message-Id: <spool-2@localhost>" in data.read():
            raise OSError(code, os.strerror(code))
    mailplat.spool.sync_file(path, dirs)


def message(n: int) -> bytes:
    """A message of about 2 KB: larger than the room FullDisk leaves for the body."""
    body = "".join(f"line {i} of message {n}".ljust(50, ".") + "\r\n" for i in range(40))
    return f"Subject: spool {n}\r\nMessage-Id: <spool-{n}@localhost>\r\n\r\n{body}".encode()


def replace_with_file(path: str) -> str:
    """Move a directory aside and put a regular file in its place; returns where it went."""
    aside = path + ".aside"
    os.rename(path, aside)
    with open(path, "w") as f:
        f.write("not a directory\n")
    return aside


def restore(path: str) -> None:
    os.unlink(path)
    os.rename(path + ".aside", path)


def transaction(smtp: smtplib.SMTP, to: str) -> None:
    smtp.ehlo_or_helo_if_needed()
    assert smtp.mail("alice@localhost")[0] == 250
    assert smtp.rcpt(to)[0] == 250


class BrokenQueueDirectoryTests(SynchronousTestCase):
    def test_unusable_spool_gets_451_and_earlier_mail_survives(self) -> None:
        """data/ unusable: DATA gets 451 4.3.0 and NOOP works after it; incoming/ unusable
        changes nothing for a new message (the commit is its data file alone); a message
        deferred before the failure, the one sent meanwhile and one sent after the repair
        are each delivered once, the refused one never."""
        daemon = Daemon.started(self, config={"queue": {"retry_delay": "1s"}})
        domain_dir = os.path.join(daemon.maildir_root, "localhost")
        os.makedirs(domain_dir)
        replace_with_file(domain_dir)  # message 1 waits in the queue meanwhile
        smtp = smtplib.SMTP(HOST, daemon.port, local_hostname="client.test", timeout=10)
        self.addCleanup(smtp.close)
        self.assertEqual(smtp.sendmail("alice@localhost", ["quinn@localhost"], message(1)), {})
        wait_for_files(os.path.join(daemon.queue_dir, "deferred"), 1)

        data_dir = os.path.join(daemon.queue_dir, "data")
        replace_with_file(data_dir)
        transaction(smtp, "quinn@localhost")
        self.assertEqual(smtp.docmd("DATA"), (451, b"4.3.0 Local error in processing, try again later"))
        self.assertEqual(smtp.noop()[0], 250)
        self.assertEqual(smtp.rset()[0], 250)
        restore(data_dir)

        incoming = os.path.join(daemon.queue_dir, "incoming")
        replace_with_file(incoming)
        transaction(smtp, "quinn@localhost")
        self.assertEqual(smtp.data(message(2))[0], 250)
        self.assertEqual(smtp.noop()[0], 250)
        restore(incoming)
        restore(domain_dir)

        self.assertEqual(smtp.sendmail("alice@localhost", ["quinn@localhost"], message(3)), {})
        daemon.wait_queue_empty()
        paths = wait_for_files(daemon.maildir("quinn"), 3)
        self.assertEqual(sorted(delivered_body(p) for p in paths),
                         [message(1), message(2), message(3)])
        self.assertEqual(smtp.quit()[0], 221)
        self.assertNotIn("internal error", daemon.log())


class FullDisk:
    """Stands in for a data file on a disk that fills up after ``room`` bytes."""

    def __init__(self, real: IO[bytes], room: int) -> None:
        self.real = real
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class DiskFullTests(TestCase):
    """In-process: the same server code, with the disk's answers replaced."""

    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp())
        self.server = self.daemon.in_process(self)
        # Every data file is made when its message starts, while the test says the disk is
        # full (files made ahead have their own test, tests/test_datafiles.py).
        self.server.spool.data_files = None
        self.full = False  # flipped by the client thread between messages

    def fill_disk_after(self, room: int) -> None:
        """From now on, new data files take ``room`` bytes while ``self.full`` is set."""
        store = self.server.store
        real_open = store.open_data_for_write

        def open_data(qid: str) -> IO[bytes]:
            data = real_open(qid)
            return FullDisk(data, room) if self.full else data  # type: ignore[return-value]

        self.patch(store, "open_data_for_write", open_data)

    def session(self, refused: tuple[int, bytes], at_data: bool) -> "Deferred[None]":
        """Message 1 accepted, message 2 refused with ``refused`` (at DATA or at the end of
        data), NOOP still fine, message 3 accepted; then 1 and 3 delivered, 2 not."""

        def client() -> None:
            with smtplib.SMTP(HOST, self.daemon.port, local_hostname="c.test", timeout=10) as smtp:
                self.assertEqual(smtp.sendmail("alice@localhost", ["rose@localhost"], message(1)), {})
                self.full = True
                transaction(smtp, "rose@localhost")
                if at_data:
                    self.assertEqual(smtp.docmd("DATA"), refused)
                    smtp.rset()
                else:
                    self.assertEqual(smtp.data(message(2)), refused)
                self.assertEqual(smtp.noop()[0], 250)
                self.full = False
                self.assertEqual(smtp.sendmail("alice@localhost", ["rose@localhost"], message(3)), {})
            paths = wait_for_files(self.daemon.maildir("rose"), 2)
            self.assertEqual(sorted(delivered_body(p) for p in paths), [message(1), message(3)])
            wait_until(lambda: not self.daemon.queue_files(), 10, "the queue to empty")

        return deferToThread(client)

    def test_disk_full_before_data(self) -> None:
        """No room even for the Received: field: DATA itself is answered 452 4.3.1."""
        self.fill_disk_after(0)
        return self.session((452, b"4.3.1 Insufficient system storage, try again later"), True)

    def test_disk_full_during_data(self) -> None:
        """The disk fills up in the middle of the body: the end of data gets 452 4.3.1."""
        self.fill_disk_after(300)
        return self.session((452, b"4.3.1 Insufficient system storage, try again later"), False)

    def test_disk_full_at_commit(self) -> None:
        """fsync of the data file fails with ENOSPC: the end of data gets 452 4.3.1."""
        self.fail_commit_of_message_2(errno.ENOSPC)
        d = self.session((452, b"4.3.1 Insufficient system storage, try again later"), False)
        return d.addCallback(self.commit_failure_logged)

    def test_io_error_at_commit(self) -> None:
        """fsync fails with EIO: the end of data gets 451 4.3.0 (not 5xx: the client retries)."""
        self.fail_commit_of_message_2(errno.EIO)
        d = self.session((451, b"4.3.0 Local error in processing, try again later"), False)
        return d.addCallback(self.commit_failure_logged)

    def commit_failure_logged(self, _: object) -> None:
        """The spool logs the failed commit (with its traceback) exactly once."""
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def fail_commit_of_message_2(self, code: int) -> None:
        """The daemon's commits fsync in its disk helper process: the failing stand-in must
        be a function that process can import, and it reads which message it has."""
        self.assertTrue(self.server.disk.running)
        self.patch(mailplat.spool, "sync_file", partial(sync_failing_message_2, code))

"""Crashes and restarts of the real daemon: a 250 is a promise that survives SIGKILL, and mail
waiting in the queue is delivered (once) after a restart."""

from __future__ import annotations

import os
import re
import smtplib
import threading

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import HOST, Daemon, delivered_body, wait_for_files, wait_until

THREADS = 4
PER_THREAD = 25
KILL_AFTER = 30  # acknowledged messages before the SIGKILL
BODY_LINES = 1500  # about 100 KB per message, so the kill finds some mid-transfer
QUEUED_AS = re.compile(rb"queued as ([0-9A-F]+)")
MESSAGE_ID = re.compile(rb"^Message-Id: <([^>]+)>\r$", re.MULTILINE)
RECEIVED_ID = re.compile(rb"\(mailplat\) with \S+ id ([0-9A-F]+)")


def crash_message(message_id: str) -> bytes:
    """The exact bytes sent for ``message_id``; rebuilt at check time, never stored."""
    line = f"{message_id} " + "0123456789" * 6
    body = "".join(f"{n:05d} {line}\r\n" for n in range(BODY_LINES))
    header = f"Subject: crash test\r\nMessage-Id: <{message_id}>\r\n\r\n"
    return (header + body + f"end of {message_id}\r\n").encode()


class Sender(threading.Thread):
    """One client sending its messages over one connection until done or cut off."""

    def __init__(self, port: int, number: int, acknowledged: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.number = number
        self.acknowledged = acknowledged  # message id -> queue id, shared by all senders
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=10) as smtp:
                for n in range(PER_THREAD):
                    self.send_one(smtp, f"crash-{self.number}-{n}@localhost")
        except (OSError, smtplib.SMTPException) as e:
            self.error = e  # expected once the daemon is killed

    def send_one(self, smtp: smtplib.SMTP, message_id: str) -> None:
        smtp.ehlo_or_helo_if_needed()
        if smtp.mail("alice@localhost")[0] != 250:
            raise smtplib.SMTPSenderRefused(0, b"", "alice@localhost")
        if smtp.rcpt(f"crash{self.number}@localhost")[0] != 250:
            raise smtplib.SMTPRecipientsRefused({})
        code, text = smtp.data(crash_message(message_id))
        match = QUEUED_AS.search(text)
        if code == 250 and match:
            self.acknowledged[message_id] = match.group(1).decode()


class CrashTests(SynchronousTestCase):
    def test_sigkill_loses_no_acknowledged_message(self) -> None:
        """SIGKILL while 4 clients send: after a restart every message that got 250 is in a
        Maildir (under the queue id it was given), none is truncated, the queue drains."""
        daemon = Daemon.started(self, config={"queue": {"retry_delay": "1s"}})
        acknowledged: dict[str, str] = {}
        senders = [Sender(daemon.port, n, acknowledged) for n in range(THREADS)]
        for sender in senders:
            sender.start()
        wait_until(lambda: len(acknowledged) >= KILL_AFTER, 30, f"{KILL_AFTER} acknowledgements",
                   interval=0.005)
        daemon.kill()
        for sender in senders:
            sender.join(15)
            self.assertFalse(sender.is_alive(), "a client hung after the daemon died")
        promised = dict(acknowledged)
        self.assertLess(len(promised), THREADS * PER_THREAD, "the kill came after all mail")
        self.assertTrue(any(s.error for s in senders), "no client noticed the crash")

        daemon.start()
        daemon.wait_queue_empty(timeout=30)
        delivered = self.delivered(daemon)
        missing = sorted(set(promised) - set(delivered))
        self.assertEqual(missing, [], "acknowledged but lost")
        for message_id, queue_id in promised.items():
            self.assertIn(queue_id, delivered[message_id])

    def delivered(self, daemon: Daemon) -> dict[str, set[str]]:
        """Message id -> queue ids of its delivered copies; each copy checked to be complete."""
        found: dict[str, set[str]] = {}
        for number in range(THREADS):
            for path in wait_for_files(daemon.maildir(f"crash{number}"), 0):
                with open(path, "rb") as f:
                    raw = f.read()
                body = delivered_body(path)
                match = MESSAGE_ID.search(body)
                self.assertIsNotNone(match, f"{path} has no Message-Id")
                assert match is not None
                message_id = match.group(1).decode()
                self.assertEqual(body, crash_message(message_id), f"{path} is not complete")
                queue_id = RECEIVED_ID.search(raw)
                assert queue_id is not None
                found.setdefault(message_id, set()).add(queue_id.group(1).decode())
        return found


class RestartTests(SynchronousTestCase):
    def test_deferred_mail_is_delivered_once_after_restart(self) -> None:
        """A message deferred because its Maildir cannot be created stays queued across a
        clean restart and, once the problem is fixed, is delivered exactly once."""
        daemon = Daemon.started(self, config={"queue": {"retry_delay": "1s"}})
        blocker = os.path.join(daemon.maildir_root, "localhost")
        os.makedirs(daemon.maildir_root)
        with open(blocker, "w") as f:  # a file where the domain's directory should be
            f.write("not a directory\n")
        message = b"Subject: deferred\r\nMessage-Id: <deferred@localhost>\r\n\r\nlater\r\n"
        with smtplib.SMTP(HOST, daemon.port, local_hostname="client.test", timeout=10) as smtp:
            self.assertEqual(smtp.sendmail("alice@localhost", ["pat@localhost"], message), {})
        deferred_dir = os.path.join(daemon.queue_dir, "deferred")
        wait_for_files(deferred_dir, 1)
        wait_until(lambda: "status=deferred" in daemon.log(), 10, "the deferral to be logged")
        daemon.stop()
        os.unlink(blocker)
        daemon.start()
        daemon.wait_queue_empty()
        [path] = wait_for_files(daemon.maildir("pat"), 1)
        self.assertEqual(delivered_body(path), message)
        pattern = r"to=<pat@localhost>, agent=maildir, delay=\S+ status=sent"
        wait_until(lambda: re.search(pattern, daemon.log()), 10, "the delivery logged")
        self.assertEqual(len(re.findall(pattern, daemon.log())), 1)

"""Maildir delivery: naming, durability, byte-for-byte content, hard links; the plugin."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import threading

from twisted.internet.task import Clock
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import mailplat.maildir
import mailplat.plugins
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import AgentContext, IDeliveryAgent, IDeliveryAgentFactory, Route
from mailplat.maildir import MaildirAgent, deliver_file, deliver_stream, unique_name
from mailplat.replies import Reply
from mailplat.queue import StoredMessage
from mailplat.testing import run_synchronously

# CRLF line ends, 8-bit bytes, a lone CR and more than one copy chunk.
BODY = b"Subject: t\r\n\r\n" + bytes(range(256)) + b"\rx\r\n" + b"line\r\n" * 300_000

NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+)$")


class Helpers:
    def source(self) -> str:
        path = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "wb") as f:
            f.write(BODY)
        return path

    def message(self) -> StoredMessage:
        env = Envelope("Q1", "a@example.org", (Recipient("b@example.com"),), 0.0)
        return StoredMessage(env, self.source())

    def pairs(self, *maildirs: str) -> list[tuple[Recipient, Route]]:
        return [
            (Recipient(f"user{i}@example.com"), Route("maildir", m, f"user{i}"))
            for i, m in enumerate(maildirs)
        ]


class DeliverFileTests(Helpers, SynchronousTestCase):
    def test_unique_name_format(self) -> None:
        """Names follow <sec>.M<usec>P<pid>Q<n>.<host> with '/' and ':' escaped."""
        name = unique_name("mx/1:25.example.com")
        self.assertRegex(name, r"^\d+\.M\d+P\d+Q\d+\.mx\\0571\\07225\.example\.com$")
        self.assertIn(f"P{os.getpid()}Q", name)

    def test_delivers_into_new_with_size(self) -> None:
        """The message lands in new/ under a unique name ending in ,S=<size>; tmp/ is empty."""
        maildir = self.mktemp()
        path = deliver_file(self.source(), maildir, "mx.example.com")
        self.assertEqual(os.path.dirname(path), os.path.join(maildir, "new"))
        match = NAME.match(os.path.basename(path))
        assert match is not None
        self.assertEqual((match.group(5), int(match.group(6))), ("mx.example.com", len(BODY)))
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])

    def test_content_byte_for_byte(self) -> None:
        """The delivered file is exactly the stored bytes, CRLF line ends included."""
        path = deliver_file(self.source(), self.mktemp(), "mx")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), BODY)

    def test_stream_without_file_descriptor(self) -> None:
        """A stream that is no plain file (added header fields) is copied byte for byte."""
        maildir = self.mktemp()
        path = mailplat.maildir.deliver_stream(io.BytesIO(BODY), maildir, "mx")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), BODY)
        self.assertTrue(path.endswith(f",S={len(BODY)}"))

    def test_maildir_removed_after_first_delivery(self) -> None:
        """A maildir deleted behind our back fails one delivery (ENOENT) and is recreated by
        the next attempt."""
        maildir = self.mktemp()
        deliver_file(self.source(), maildir, "mx")
        shutil.rmtree(maildir)
        self.assertRaises(FileNotFoundError, deliver_file, self.source(), maildir, "mx")
        path = deliver_file(self.source(), maildir, "mx")
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), [os.path.basename(path)])

    def test_creates_maildir_private(self) -> None:
        """First delivery creates tmp/, new/ and cur/ with mode 0700."""
        maildir = os.path.join(self.mktemp(), "user", "Maildir")
        deliver_file(self.source(), maildir, "mx")
        for sub in ("tmp", "new", "cur"):
            mode = stat.S_IMODE(os.stat(os.path.join(maildir, sub)).st_mode)
            self.assertEqual(mode, 0o700, sub)

    def test_new_is_synced_after_rename(self) -> None:
        """new/ is fsync'd once the file is in it, so an acknowledged delivery survives."""
        synced: list[tuple[str, list[str]]] = []
        real = mailplat.maildir.fsync_dir

        def record(path: str) -> None:
            synced.append((path, os.listdir(path)))
            real(path)

        self.patch(mailplat.maildir, "fsync_dir", record)
        maildir = self.mktemp()
        with open(self.source(), "rb") as source:
            path = deliver_stream(source, maildir, "mx", sync_directories=True)
        self.assertEqual(synced[-1], (os.path.join(maildir, "new"), [os.path.basename(path)]))

    def test_new_is_not_synced_where_the_filesystem_keeps_the_rename(self) -> None:
        """On a journaling filesystem the rename is committed before the queue's later
        unlink of its copy can be, so new/ needs no fsync of its own (as Postfix's virtual)."""
        maildir = self.mktemp()
        deliver_file(self.source(), maildir, "mx")  # creates the maildir (synced once)
        synced: list[str] = []
        self.patch(mailplat.maildir, "fsync_dir", synced.append)
        with open(self.source(), "rb") as source:
            deliver_stream(source, maildir, "mx", sync_directories=False)
        self.assertEqual(synced, [])
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), 2)

    def test_stops_at_the_given_length(self) -> None:
        """A queue data file goes on with its envelope: only the message is copied, by
        sendfile or by reads."""
        source = self.source()
        with open(source, "ab") as f:
            f.write(b"TRAILER")
        size = os.path.getsize(source) - len(b"TRAILER")
        for stream in (open(source, "rb"), io.BufferedReader(io.BytesIO(open(source, "rb").read()))):
            with stream:
                path = deliver_stream(stream, self.mktemp(), "mx", length=size)
            with open(path, "rb") as f:
                self.assertFalse(f.read().endswith(b"TRAILER"))
            self.assertEqual(os.path.getsize(path), size)

    def test_unique_names_under_concurrency(self) -> None:
        """Many threads delivering at once never collide on a name."""
        maildir = self.mktemp()
        small = self.mktemp()
        with open(small, "wb") as f:
            f.write(b"x\r\n")
        paths: list[str] = []

        def worker() -> None:
            for _ in range(50):
                paths.append(deliver_file(small, maildir, "mx"))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(set(paths)), 400)
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), 400)


class MaildirAgentTests(Helpers, SynchronousTestCase):
    def setUp(self) -> None:
        self.agent = MaildirAgent("mx.example.com", Clock(), runInThread=run_synchronously)

    def deliver(self, message: StoredMessage, *maildirs: str) -> dict[str, Reply]:
        return self.successResultOf(self.agent.deliver(message, self.pairs(*maildirs)))

    def test_provides_interface(self) -> None:
        """The agent is an IDeliveryAgent named maildir."""
        verifyObject(IDeliveryAgent, self.agent)
        self.assertEqual(self.agent.name, "maildir")

    def test_several_recipients_share_one_file_by_hard_link(self) -> None:
        """Further recipients get a hard link to the file already delivered."""
        a, b = self.mktemp(), self.mktemp()
        replies = self.deliver(self.message(), a, b)
        self.assertEqual({str(r) for r in replies.values()}, {"250 2.0.0 delivered to maildir"})
        [fa] = os.listdir(os.path.join(a, "new"))
        [fb] = os.listdir(os.path.join(b, "new"))
        self.assertNotEqual(fa, fb)
        sa, sb = os.stat(os.path.join(a, "new", fa)), os.stat(os.path.join(b, "new", fb))
        self.assertEqual((sa.st_ino, sa.st_nlink), (sb.st_ino, 2))
        self.assertEqual(os.listdir(os.path.join(b, "tmp")), [])

    def test_copy_when_link_fails(self) -> None:
        """When a link is impossible (another filesystem), the message is copied instead."""

        def no_link(src: str, dst: str) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "link", no_link)
        a, b = self.mktemp(), self.mktemp()
        self.deliver(self.message(), a, b)
        [fb] = os.listdir(os.path.join(b, "new"))
        with open(os.path.join(b, "new", fb), "rb") as f:
            self.assertEqual(f.read(), BODY)

    def test_same_maildir_twice_delivers_once(self) -> None:
        """Two recipients routed to one maildir get a single copy."""
        a = self.mktemp()
        replies = self.deliver(self.message(), a, a)
        self.assertEqual(len(replies), 2)
        self.assertEqual(len(os.listdir(os.path.join(a, "new"))), 1)

    def test_error_is_451_for_that_recipient_only(self) -> None:
        """A maildir that cannot be created answers 451 4.3.0; other recipients still get it."""
        broken = self.mktemp()
        open(broken, "w").close()
        good = self.mktemp()
        replies = self.deliver(self.message(), broken, good)
        self.assertTrue(str(replies["user0@example.com"]).startswith("451 4.3.0 "))
        self.assertTrue(str(replies["user1@example.com"]).startswith("250 "))

    def test_quota_is_452_mailbox_full(self) -> None:
        """Out of quota or space answers 452 4.2.2 mailbox full, so the queue retries."""

        def full(*args: object) -> str:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        self.patch(mailplat.maildir, "deliver_stream", full)
        replies = self.deliver(self.message(), self.mktemp())
        self.assertEqual(str(replies["user0@example.com"]), "452 4.2.2 mailbox full")


class ThreadedAgentTests(Helpers, TestCase):
    async def test_default_runs_in_a_thread(self) -> None:
        """With the real reactor the delivery runs in its thread pool and fires a Deferred."""
        from twisted.internet import reactor

        agent = MaildirAgent("mx", reactor)
        maildir = self.mktemp()
        replies = await agent.deliver(self.message(), self.pairs(maildir))
        self.assertEqual(replies["user0@example.com"].code, 250)


class PluginTests(SynchronousTestCase):
    def test_maildir_factory_is_found(self) -> None:
        """getPlugins finds the maildir agent factory, which builds a MaildirAgent."""
        factories = {f.name: f for f in getPlugins(IDeliveryAgentFactory, mailplat.plugins)}
        factory = factories["maildir"]
        verifyObject(IPlugin, factory)
        verifyObject(IDeliveryAgentFactory, factory)
        clock = Clock()
        agent = factory.makeAgent({}, AgentContext(reactor=clock, hostname="mx.example.com"))
        self.assertIsInstance(agent, MaildirAgent)
        self.assertEqual((agent.hostname, agent.reactor), ("mx.example.com", clock))

"""The spool writer: streaming into data/, durable commit before 250, 4xx on any failure."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import mailplat.spool
from mailplat.envelope import Envelope, Recipient, SessionInfo, Transaction
from mailplat.groupsync import GroupSyncer
from mailplat.interfaces import IIncomingMessage, IMessageSink, SpoolError
from mailplat.replies import LOCAL_ERROR, SPOOL_FULL
from mailplat.spool import Spool
from mailplat.store import INCOMING, QueueStore, open_data, read_trailer
from mailplat.testing import ManualThreads, run_synchronously

SESSION = SessionInfo(peer_host="192.0.2.1", peer_port=4321, helo="client.example.org")


def transaction() -> Transaction:
    return Transaction(
        sender="alice@example.org",
        recipients=[
            Recipient("bob@example.com"),
            Recipient("carol@example.com", notify=("NEVER",)),
        ],
        body="8BITMIME",
        envid="ENV1",
        ret="HDRS",
    )


class FailingFile:
    """A data file whose writes fail like a full disk."""

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


class SpoolTestMixin:
    def make_spool(
        self, runInThread: Any = run_synchronously, sync_directories: bool = True
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.root = self.mktemp()  # type: ignore[attr-defined]
        self.syncer = GroupSyncer(runInThread=runInThread)
        self.store = QueueStore(self.root, syncer=self.syncer, runInThread=runInThread,
                                sync_directories=sync_directories)
        self.committed: list[Envelope] = []
        self.spool = Spool(self.store, self.syncer, self.committed.append, self.clock, runInThread)


class CommitTests(SpoolTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.make_spool(self.threads)

    def test_provides_interfaces(self) -> None:
        """The spool is an IMessageSink and its messages are IIncomingMessage."""
        verifyObject(IMessageSink, self.spool)
        verifyObject(IIncomingMessage, self.spool.begin(SESSION, transaction()))

    def test_bytes_go_to_the_data_file_while_they_arrive(self) -> None:
        """Written bytes land in data/<qid> (flushed at the latest when the data is fsync'd),
        followed by the envelope they were committed with."""
        message = self.spool.begin(SESSION, transaction())
        message.write(b"Subject: hi\r\n\r\n")
        message.write(b"body\r\n")
        message.finish(transaction())
        self.threads.run_next()
        path = self.store.data_path(message.queue_id)
        with open(path, "rb") as f:
            self.assertTrue(f.read().startswith(b"Subject: hi\r\n\r\nbody\r\n{"))
        trailer = read_trailer(path)
        assert trailer is not None
        self.assertEqual((trailer.queue_id, trailer.data_length), (message.queue_id, 21))
        with open_data(path, trailer.data_length) as f:
            self.assertEqual(f.read(), b"Subject: hi\r\n\r\nbody\r\n")

    def record_fsyncs(self) -> list[str]:
        """Patch os.fsync to note the path of everything fsync'd, in order."""
        synced: list[str] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        return synced

    def test_250_only_after_data_envelope_and_directories_are_durable(self) -> None:
        """The reply waits for the data fsync (the envelope is its trailer), then the dir
        sync; a lone commit does both in one thread hop. No other file is written."""
        synced = self.record_fsyncs()
        message = self.spool.begin(SESSION, transaction())
        message.write(b"Subject: hi\r\n\r\nbody\r\n")
        d = message.finish(transaction())
        self.assertEqual(self.store.list_ids(INCOMING), [])
        self.assertNoResult(d)
        self.threads.run_next()
        path = os.path.abspath
        self.assertEqual(synced[0], path(self.store.data_path(message.queue_id)))
        self.assertEqual(synced[1:], [path(self.store.data_dir)])
        self.assertEqual(self.store.list_ids(INCOMING), [message.queue_id])
        self.assertEqual(os.listdir(self.store.state_dir(INCOMING)), [])  # unfiled
        [reply] = self.successResultOf(d)
        self.assertEqual((reply.code, reply.status), (250, "2.0.0"))
        self.assertEqual(reply.text, f"Ok: queued as {message.queue_id}")

    def test_commit_beside_another_waits_for_a_shared_round(self) -> None:
        """A commit begun while another is in flight leaves the directory sync to a shared
        round, and gets 250 only once that round is done."""
        first = self.spool.begin(SESSION, transaction()).finish(transaction())
        message = self.spool.begin(SESSION, transaction())
        d = message.finish(transaction())
        self.threads.run_next()  # the first, alone: its own directory sync
        self.successResultOf(first)
        self.threads.run_next()  # the second: its data file only
        self.assertIn(message.queue_id, self.store.list_ids(INCOMING))
        self.assertNoResult(d)
        _, args, _ = self.threads.calls[0]  # the directory sync round
        self.assertEqual(set(args[0]), {self.store.data_dir})
        self.threads.run_next()
        self.assertEqual(self.successResultOf(d)[0].code, 250)

    def test_shared_round_failure_451_and_envelope_removed(self) -> None:
        """If the shared directory round fails, that commit's envelope is withdrawn and 451
        is sent."""

        def broken(paths: object) -> object:
            raise OSError(errno.EIO, "Input/output error")

        self.spool.begin(SESSION, transaction()).finish(transaction())  # in flight: the next is not alone
        self.patch(self.syncer, "sync_dirs", broken)
        message = self.spool.begin(SESSION, transaction())
        d = message.finish(transaction())
        self.threads.run_all()
        self.assertEqual(self.successResultOf(d), [LOCAL_ERROR])
        self.assertNotIn(message.queue_id, self.store.list_ids(INCOMING))
        self.assertFalse(os.path.exists(self.store.data_path(message.queue_id)))
        self.flushLoggedErrors(OSError)

    def test_on_commit_after_the_reply(self) -> None:
        """The queue gets the envelope once, after the client's 250 has fired."""
        message = self.spool.begin(SESSION, transaction())
        d = message.finish(transaction())
        self.threads.run_all()
        self.successResultOf(d)
        self.assertEqual(self.committed, [])
        self.clock.advance(0)
        self.assertEqual([e.queue_id for e in self.committed], [message.queue_id])

    def test_concurrent_commits_share_directory_syncs(self) -> None:
        """Five sessions finishing together: the first, alone when it began, syncs in its own
        hop; the other four need two shared rounds (the first to ask starts one, the three
        that asked while it ran share the next)."""
        messages = [self.spool.begin(SESSION, transaction()) for _ in range(5)]
        ds = [m.finish(transaction()) for m in messages]
        self.threads.run_all()
        for d in ds:
            self.assertEqual(self.successResultOf(d)[0].code, 250)
        self.assertEqual(self.syncer.rounds, 2)

    def test_envelope_from_session_and_transaction(self) -> None:
        """The committed envelope carries the transaction, the size and the arrival time."""
        message = self.spool.begin(SESSION, transaction())
        message.write(b"12345")
        message.write(b"678")
        message.finish(transaction())
        self.threads.run_all()
        _, env = self.store.read_envelope(message.queue_id)
        self.assertEqual(env.queue_id, message.queue_id)
        self.assertEqual(env.sender, "alice@example.org")
        self.assertEqual(env.recipients, tuple(transaction().recipients))
        self.assertEqual((env.size, env.body, env.envid, env.ret), (8, "8BITMIME", "ENV1", "HDRS"))
        self.assertEqual((env.received_at, env.session), (1000.0, SESSION))


class OneFsyncCommitTests(SpoolTestMixin, SynchronousTestCase):
    """Where the filesystem keeps a new file's name with its fsync (ext4, XFS, btrfs): the
    commit is one fsync of the data file, as Postfix's of its queue file."""

    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.make_spool(self.threads, sync_directories=False)

    def test_250_after_one_fsync_of_the_data_file(self) -> None:
        synced = CommitTests.record_fsyncs(self)  # type: ignore[arg-type]
        message = self.spool.begin(SESSION, transaction())
        message.write(b"Subject: hi\r\n\r\nbody\r\n")
        d = message.finish(transaction())
        self.assertNoResult(d)
        self.threads.run_next()
        self.assertEqual(synced, [os.path.abspath(self.store.data_path(message.queue_id))])
        self.assertEqual(self.syncer.rounds, 0)
        self.assertEqual(self.store.list_ids(INCOMING), [message.queue_id])
        [reply] = self.successResultOf(d)
        self.assertEqual((reply.code, reply.status), (250, "2.0.0"))

    def test_concurrent_commits_need_no_shared_round(self) -> None:
        first = self.spool.begin(SESSION, transaction()).finish(transaction())
        second = self.spool.begin(SESSION, transaction()).finish(transaction())
        self.threads.run_next()
        self.threads.run_next()
        self.assertEqual([r.code for r in self.successResultOf(first)], [250])
        self.assertEqual([r.code for r in self.successResultOf(second)], [250])
        self.assertEqual(self.syncer.rounds, 0)
        self.clock.advance(0)
        self.assertEqual(len(self.committed), 2)


class FailureTests(SpoolTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.make_spool()

    def assertNothingQueued(self) -> None:
        self.assertEqual(os.listdir(self.store.data_dir), [])
        self.assertEqual(self.store.list_ids(INCOMING), [])
        self.assertEqual(self.committed, [])

    def test_cannot_create_data_file_451(self) -> None:
        """An unusable data directory refuses the message with 451 4.3.0."""
        shutil.rmtree(self.store.data_dir)
        open(self.store.data_dir, "w").close()  # works even as root, unlike chmod
        error = self.assertRaises(SpoolError, self.spool.begin, SESSION, transaction())
        self.assertEqual(error.reply, LOCAL_ERROR)

    def test_disk_full_at_begin_452(self) -> None:
        """A full disk refuses the message with 452 4.3.1."""

        def full(qid: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(self.store, "open_data_for_write", full)
        error = self.assertRaises(SpoolError, self.spool.begin, SESSION, transaction())
        self.assertEqual(error.reply, SPOOL_FULL)

    def test_write_failure_452_and_cleanup(self) -> None:
        """A write hitting a full disk raises 452 4.3.1, and so does finish; nothing stays."""
        message = self.spool.begin(SESSION, transaction())
        self.patch(message, "_data", FailingFile())
        error = self.assertRaises(SpoolError, message.write, b"x" * 100)
        self.assertEqual(error.reply, SPOOL_FULL)
        self.assertRaises(SpoolError, message.write, b"more")
        self.assertEqual(self.successResultOf(message.finish(transaction())), [SPOOL_FULL])
        self.assertNothingQueued()

    def test_fsync_failure_451(self) -> None:
        """If the data cannot be fsync'd, the client gets 451 and the data file is removed."""

        def broken_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        message = self.spool.begin(SESSION, transaction())
        message.write(b"data\r\n")
        self.patch(os, "fsync", broken_fsync)
        self.assertEqual(self.successResultOf(message.finish(transaction())), [LOCAL_ERROR])
        self.assertNothingQueued()
        self.flushLoggedErrors(OSError)

    def test_envelope_write_failure_451(self) -> None:
        """If the envelope (the trailer) cannot be written, the client gets 451, never 250."""
        def broken(envelope: Envelope) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        message = self.spool.begin(SESSION, transaction())
        self.patch(mailplat.spool, "envelope_trailer", broken)
        self.assertEqual(self.successResultOf(message.finish(transaction())), [LOCAL_ERROR])
        self.assertNothingQueued()
        self.flushLoggedErrors(OSError)

    def test_directory_sync_failure_451_and_envelope_removed(self) -> None:
        """If the directories cannot be synced, the envelope is withdrawn and 451 is sent."""

        def broken(paths: object) -> object:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(mailplat.spool, "fsync_dirs", broken)
        message = self.spool.begin(SESSION, transaction())
        self.assertEqual(self.successResultOf(message.finish(transaction())), [LOCAL_ERROR])
        self.assertNothingQueued()
        self.flushLoggedErrors(OSError)

    def test_commit_failure_with_failing_cleanup_still_451(self) -> None:
        """When removing the failed message fails too, the client still gets 451 4.3.0 and
        both errors are logged; nothing is raised into the session."""

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, "Input/output error")

        message = self.spool.begin(SESSION, transaction())
        self.patch(mailplat.spool, "envelope_trailer", broken)
        self.patch(self.store, "remove", broken)
        self.assertEqual(self.successResultOf(message.finish(transaction())), [LOCAL_ERROR])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_abort_removes_data(self) -> None:
        """An abandoned transaction leaves no file behind."""
        message = self.spool.begin(SESSION, transaction())
        message.write(b"partial")
        message.abort()
        self.assertNothingQueued()

    def test_second_finish_does_not_undo_the_commit(self) -> None:
        """Calling finish again answers 451 and leaves the committed message alone."""
        message = self.spool.begin(SESSION, transaction())
        self.assertEqual(self.successResultOf(message.finish(transaction()))[0].code, 250)
        self.assertEqual(self.successResultOf(message.finish(transaction())), [LOCAL_ERROR])
        message.abort()
        self.assertEqual(self.store.list_ids(INCOMING), [message.queue_id])

    def test_lmtp_gets_one_reply_per_recipient(self) -> None:
        """An LMTP session gets one reply per recipient after the data."""
        session = SessionInfo(protocol="LMTP")
        message = self.spool.begin(session, transaction())
        replies = self.successResultOf(message.finish(transaction()))
        self.assertEqual([r.code for r in replies], [250, 250])

"""Data files created ahead (mailplat.datafiles): empty and closed where they are made (the
daemon's disk helper), opened when a message takes one."""

from __future__ import annotations

import errno
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import mailplat.datafiles
from mailplat.datafiles import DataFilePool
from mailplat.store import QueueStore, recycle_files
from mailplat.testing import ManualThreads


class DataFilePoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = ManualThreads()
        self.store = QueueStore(self.mktemp())
        self.pool = DataFilePool(self.store, self.threads, self.clock, batch=4, max_age=2.0)

    def test_quiet_server_creates_nothing_ahead(self) -> None:
        """The first message after a quiet spell gets None (its session creates its own
        file) and nothing is made ahead for a server that sees one message a minute."""
        self.assertIsNone(self.pool.take())
        self.clock.advance(60)
        self.assertIsNone(self.pool.take())
        self.assertEqual(os.listdir(self.store.data_dir), [])

    def test_busy_server_takes_files_made_ahead(self) -> None:
        self.assertIsNone(self.pool.take())
        self.assertIsNone(self.pool.take())  # busy now: a refill is under way
        self.threads.run_next()
        self.assertEqual(len(os.listdir(self.store.data_dir)), 4)
        taken = self.pool.take()
        assert taken is not None
        qid, data = taken
        data.write(b"x")
        data.close()
        self.assertEqual(os.path.getsize(self.store.data_path(qid)), 1)

    def test_stale_files_are_deleted_not_used(self) -> None:
        """A file older than max_age would carry a queue id from before the message came."""
        self.pool.take()
        self.pool.take()
        self.threads.run_next()
        self.clock.advance(3)
        self.assertIsNone(self.pool.take())
        self.threads.run_next()  # the discard
        self.assertEqual(os.listdir(self.store.data_dir), [])

    def test_close_deletes_what_nobody_took(self) -> None:
        self.pool.take()
        self.pool.take()
        self.threads.run_next()
        self.pool.close()
        self.assertEqual(os.listdir(self.store.data_dir), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refill_failure_leaves_sessions_to_create_their_own(self) -> None:
        """A full disk while creating ahead is only logged: each session then creates its
        file itself and gets the precise 452 from that."""

        def full(paths: list[str]) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(mailplat.datafiles, "create_files", full)
        self.pool.take()
        self.pool.take()
        self.threads.run_next()
        self.assertIsNone(self.pool.take())
        self.assertEqual(self.threads.pending, 1)  # tried again, since mail keeps coming

    def test_spares_deleted_once_mail_stops(self) -> None:
        """No file is left lying in the queue a few seconds after the last message."""
        self.pool.take()
        self.pool.take()
        self.threads.run_next()
        self.assertEqual(len(os.listdir(self.store.data_dir)), 4)
        self.clock.advance(2.0)
        self.threads.run_all()
        self.assertEqual(os.listdir(self.store.data_dir), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_made_closed_and_private(self) -> None:
        self.pool.take()
        self.pool.take()
        opened_before = len(os.listdir("/proc/self/fd"))
        self.threads.run_next()
        self.assertEqual(len(os.listdir("/proc/self/fd")), opened_before)  # none held open
        modes = {os.stat(os.path.join(self.store.data_dir, n)).st_mode & 0o777
                 for n in os.listdir(self.store.data_dir)}
        self.assertEqual(modes, {0o600})

    def test_file_gone_meanwhile_is_skipped(self) -> None:
        """A made-ahead file removed behind our back: that message creates its own."""
        self.pool.take()
        self.pool.take()
        self.threads.run_next()
        for name in os.listdir(self.store.data_dir):
            os.unlink(os.path.join(self.store.data_dir, name))
        self.assertIsNone(self.pool.take())
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class RecycledFileTests(SynchronousTestCase):
    """Delivered messages' data files come back to the pool, emptied and renamed, instead
    of being unlinked (store.recycle_files)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = ManualThreads()
        self.store = QueueStore(self.mktemp())
        self.pool = DataFilePool(self.store, self.threads, self.clock, batch=2, max_age=2.0)

    def delivered_file(self, body: bytes = b"old message\r\n") -> str:
        qid = self.store.new_queue_id()
        with self.store.open_data_for_write(qid) as f:
            f.write(body)
        return qid

    def test_quiet_pool_wants_nothing_back(self) -> None:
        """Without mail arriving the file would only wait for expiry: unlink it now."""
        self.assertIsNone(self.pool.spare())

    def test_returned_file_is_taken_empty_under_its_new_id(self) -> None:
        self.pool.take()  # mail is arriving
        old = self.delivered_file()
        spare = self.pool.spare()
        assert spare is not None
        self.assertNotEqual(spare, old)
        self.assertTrue(recycle_files(None, [], self.store.data_path(old),
                                      self.store.data_path(spare)))
        self.pool.returned(spare, True)
        self.assertFalse(os.path.exists(self.store.data_path(old)))
        inode = os.stat(self.store.data_path(spare)).st_ino
        taken = self.pool.take()
        assert taken is not None
        qid, data = taken
        self.assertEqual(qid, spare)
        data.write(b"new")
        data.close()
        with open(self.store.data_path(qid), "rb") as f:
            self.assertEqual(f.read(), b"new")  # nothing of the old message is left
        self.assertEqual(os.stat(self.store.data_path(qid)).st_ino, inode)

    def test_pool_takes_back_no_more_than_its_capacity(self) -> None:
        self.pool.take()
        promised = [self.pool.spare() for _ in range(self.pool.capacity)]
        self.assertNotIn(None, promised)
        self.assertIsNone(self.pool.spare())
        self.pool.returned(promised[0], False)  # that one was unlinked after all
        self.assertIsNotNone(self.pool.spare())

    def test_returned_files_expire_like_made_ones(self) -> None:
        self.pool.take()
        old = self.delivered_file()
        spare = self.pool.spare()
        assert spare is not None
        recycle_files(None, [], self.store.data_path(old), self.store.data_path(spare))
        self.pool.returned(spare, True)
        self.clock.advance(2.0)
        self.threads.run_all()
        self.assertEqual(os.listdir(self.store.data_dir), [])


class RecycleFilesTests(SynchronousTestCase):
    """store.recycle_files, as the disk helper runs it."""

    def setUp(self) -> None:
        self.store = QueueStore(self.mktemp())

    def test_envelope_goes_data_is_emptied_and_renamed(self) -> None:
        envelope = os.path.join(self.store.root, "active-envelope")
        with open(envelope, "wb") as f:
            f.write(b"{}")
        data, spare = self.store.data_path("OLD"), self.store.data_path("NEW")
        with open(data, "wb") as f:
            f.write(b"message and trailer")
        self.assertTrue(recycle_files(envelope, [], data, spare))
        self.assertFalse(os.path.exists(envelope))
        self.assertFalse(os.path.exists(data))
        self.assertEqual(os.path.getsize(spare), 0)

    def test_run_again_after_success_says_done(self) -> None:
        """The helper died after the rename: its rerun on a thread must not report a loss."""
        data, spare = self.store.data_path("OLD"), self.store.data_path("NEW")
        open(data, "wb").close()
        recycle_files(None, [], data, spare)
        self.assertTrue(recycle_files(None, [], data, spare))

    def test_data_already_gone(self) -> None:
        self.assertFalse(recycle_files(None, [], self.store.data_path("OLD"),
                                       self.store.data_path("NEW")))

    def test_rename_refused_unlinks_the_data(self) -> None:
        """A failed recycling leaves no delivered message behind: the file is unlinked."""
        data = self.store.data_path("OLD")
        with open(data, "wb") as f:
            f.write(b"message")
        spare = os.path.join(self.store.root, "no-such-dir", "NEW")
        self.assertFalse(recycle_files(None, [], data, spare))
        self.assertFalse(os.path.exists(data))

    def test_empty_recycled_file_is_not_mail_after_a_crash(self) -> None:
        """Recovery deletes a waiting spare like any data file never committed."""
        data, spare = self.store.data_path("OLD"), self.store.data_path("NEW")
        with open(data, "wb") as f:
            f.write(b"message")
        recycle_files(None, [], data, spare)
        recovered = QueueStore(self.store.root).recover()
        self.assertNotIn("NEW", [qid for ids in recovered.values() for qid in ids])
        self.assertFalse(os.path.exists(spare))

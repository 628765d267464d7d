"""Data files created ahead (mailplat.datafiles): empty and closed where they are made (the
daemon's disk helper), opened when a message takes one."""

from __future__ import annotations

import errno
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import mailplat.datafiles
from mailplat.datafiles import DataFilePool
from mailplat.store import QueueStore
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

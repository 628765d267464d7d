"""Disk worker threads and the Batcher: results, failures, order, and sharing of thread hops."""

from __future__ import annotations

import errno
import threading

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.testing import ManualThreads
from mailplat.workers import Batcher, thread_runner


def fail(code: int) -> None:
    raise OSError(code, "boom")


class BatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.batcher = Batcher(self.threads)

    def test_jobs_queued_meanwhile_share_one_hop(self) -> None:
        """While one batch runs, new jobs wait and then go together in the next single hop."""
        log: list[int] = []
        first = self.batcher.run(log.append, 1)
        later = [self.batcher.run(log.append, n) for n in (2, 3, 4)]
        self.assertEqual(self.threads.pending, 1)
        self.threads.run_next()
        self.successResultOf(first)
        self.assertEqual(self.threads.pending, 1)  # 2, 3 and 4 in one hop
        self.threads.run_next()
        for d in later:
            self.successResultOf(d)
        self.assertEqual((log, self.batcher.batches), ([1, 2, 3, 4], 2))

    def test_results_go_to_their_callers(self) -> None:
        """Each caller gets its own job's return value."""
        ds = [self.batcher.run(lambda n=n: n * 10) for n in range(3)]
        self.threads.run_all()
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20])

    def test_one_failing_job_fails_only_its_caller(self) -> None:
        """An exception reaches the caller of that job; the other jobs of the batch still run."""
        self.batcher.run(lambda: None)
        bad = self.batcher.run(fail, errno.EIO)
        good = self.batcher.run(lambda: "ok")
        self.threads.run_all()
        self.assertEqual(self.failureResultOf(bad, OSError).value.errno, errno.EIO)
        self.assertEqual(self.successResultOf(good), "ok")


class GatheringBatcherTests(SynchronousTestCase):
    """With ``gather``, a job that finds nothing running waits for company."""

    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.clock = Clock()
        self.batcher = Batcher(self.threads, self.clock, gather=0.005, most=3)

    def test_jobs_within_the_window_share_one_hop(self) -> None:
        log: list[int] = []
        ds = [self.batcher.run(log.append, n) for n in (1, 2)]
        self.clock.advance(0.004)
        self.assertEqual(self.threads.pending, 0)
        self.clock.advance(0.001)
        self.assertEqual(self.threads.pending, 1)
        self.threads.run_next()
        for d in ds:
            self.successResultOf(d)
        self.assertEqual((log, self.batcher.batches), ([1, 2], 1))

    def test_enough_jobs_go_at_once(self) -> None:
        """``most`` jobs waiting do not wait for the timer, which is cancelled."""
        for n in range(3):
            self.batcher.run(lambda: None)
        self.assertEqual(self.threads.pending, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_jobs_behind_a_running_batch_follow_it_at_once(self) -> None:
        self.batcher.run(lambda: None)
        self.clock.advance(0.005)
        later = self.batcher.run(lambda: "later")
        self.threads.run_next()
        self.assertEqual(self.threads.pending, 1)  # no second wait
        self.threads.run_next()
        self.assertEqual(self.successResultOf(later), "later")

    def test_flush_sends_what_waits(self) -> None:
        d = self.batcher.run(lambda: "now")
        self.batcher.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.threads.run_next()
        self.assertEqual(self.successResultOf(d), "now")
        self.batcher.flush()  # nothing waits: nothing happens
        self.assertEqual((self.threads.pending, self.batcher.batches), (0, 1))


class ThreadRunnerTests(TestCase):
    async def test_runs_off_the_reactor_thread(self) -> None:
        """The default runner computes the call in another thread and fires in the reactor's."""
        from twisted.internet import reactor

        run = thread_runner(reactor)
        name = await run(lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)

    async def test_exception_becomes_failure(self) -> None:
        """An exception in the worker fails the Deferred with that exception."""
        from twisted.internet import reactor

        run = thread_runner(reactor)
        with self.assertRaises(OSError) as caught:
            await run(fail, errno.ENOSPC)
        self.assertEqual(caught.exception.errno, errno.ENOSPC)


class PoolGrowthTests(SynchronousTestCase):
    """Threads are added only while jobs wait for every thread there is."""

    class Reactor:
        def callFromThread(self, f: object, *args: object) -> None:
            pass  # results are not looked at here

    def test_one_job_at_a_time_keeps_one_thread(self) -> None:
        from twisted.internet.defer import Deferred

        from mailplat.workers import _Workers

        workers = _Workers("test-light", 4)
        for _ in range(20):
            done = threading.Event()
            workers.submit((done.set, (), Deferred(), self.Reactor()))
            self.assertTrue(done.wait(5))
            for _ in range(500):  # the worker counts the job as taken just after get()
                if workers._waiting == 0:
                    break
                threading.Event().wait(0.001)
        self.assertEqual(len(workers._threads), 1)

    def test_a_backlog_grows_the_pool_to_its_size(self) -> None:
        from twisted.internet.defer import Deferred

        from mailplat.workers import _Workers

        workers = _Workers("test-backlog", 4)
        release = threading.Event()
        self.addCleanup(release.set)
        for _ in range(10):
            workers.submit((release.wait, (5,), Deferred(), self.Reactor()))
        self.assertEqual(len(workers._threads), 4)

"""Worker threads for blocking disk work (fsync, rename, Maildir copies), and batching of it.

Twisted's reactor pool hands every job to an idle, sleeping worker, so each thread hop pays a
wake-up (a futex and a context switch, tens of microseconds on a virtual machine) while the
reactor holds the GIL. Here the workers take jobs from one shared queue (``queue.SimpleQueue``,
no per-job Future): under load a worker that finishes a job picks up the next one without
anybody being woken. ``Batcher`` goes one
step further for cheap metadata calls: one hop for everything queued meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

# A job's exception travels as a plain exception (Failed), since the Batcher's hop runs in the
# disk helper, which imports no Twisted; it becomes a Failure in the reactor's thread.
from mailplat.diskhelper import Failed, run_batch

T = TypeVar("T")

# runInThread(f, *args) -> Deferred firing with f(*args) computed off the reactor thread.
RunInThread = Callable[..., "Deferred[Any]"]

# Two for the sessions' commits: enough fsyncs in flight to share journal commits; with four,
# the threads' GIL hand-offs (futex wakes, context switches) cost more than the overlap gained.
# Four for deliveries, whose Maildir fsyncs wait behind the commits' journal work: with two,
# delivery fell behind acceptance under 50 sessions (docs/performance.rst).
POOL_SIZE = 2
POOL_SIZES = {"delivery": 4}


class _Workers:
    """Threads that take jobs from one queue. Lighter than concurrent.futures (no Future,
    lock and condition made per job): the reactor pays for a job only a queue put, and a
    busy worker takes the next job without being woken."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._waiting = 0  # jobs put and not yet taken by a worker

    def submit(self, job: tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any], Any]) -> None:
        # A thread more only when jobs wait for every thread there is: a light load keeps
        # one or two threads (fewer GIL hand-offs), a backlog grows the pool to its size.
        with self._lock:
            self._waiting += 1
            grow = self._waiting > len(self._threads) and len(self._threads) < self.size
        if grow:
            self._start_thread()
        self._jobs.put(job)

    def _start_thread(self) -> None:
        with self._lock:
            if len(self._threads) >= self.size:
                return
            thread = threading.Thread(
                target=self._work, name=f"mailplat-{self.name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        for _ in iter(int, 1):  # for the life of the process
            f, args, d, reactor = self._jobs.get()
            with self._lock:
                self._waiting -= 1
            result = _capture(f, args)
            reactor.callFromThread(_fire, d, result)


_pools: dict[str, _Workers] = {}


def _shared_pool(name: str) -> _Workers:
    if name not in _pools:
        _pools[name] = _Workers(name, POOL_SIZES.get(name, POOL_SIZE))
    return _pools[name]


def thread_runner(reactor: Any = None, pool: str = "spool") -> RunInThread:
    """The default ``runInThread``: shared disk workers, so fsync never blocks the reactor.

    ``pool`` names a set of workers: deliveries get their own ("delivery"), so that under a
    burst of incoming mail they do not queue behind every session's commit.
    """

    def run(f: Callable[..., T], *args: Any) -> "Deferred[T]":
        nonlocal reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        d: Deferred[T] = Deferred()
        _shared_pool(pool).submit((f, args, d, reactor))
        return d

    return run


def _capture(f: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Runs in the worker: the result, or ``Failed`` with the exception (which keeps its
    traceback for the Failure made of it in the reactor's thread)."""
    try:
        return f(*args)
    except BaseException as e:
        return Failed(e)


def _fire(d: Deferred[Any], result: Any) -> None:
    if isinstance(result, Failed):
        d.errback(Failure(result.error))
    else:
        d.callback(result)


class Batcher:
    """Runs small blocking jobs (renames, unlinks) off the reactor thread, many per hop.

    A metadata call on a busy filesystem can wait for a journal commit, so the reactor must
    not make it; but a thread hop per rename costs more than the rename. Jobs queued while a
    batch runs go together in the next one. Jobs run one at a time in the order they were
    given, so two jobs on the same queue entry never race.

    With ``gather`` (seconds, and a ``reactor`` for the timer), a job that finds nothing
    running waits that long for company before its hop goes, unless ``most`` jobs are
    waiting by then: for work nobody waits on, such as removing delivered messages, when
    mail comes one message at a time and no batch would otherwise form. ``flush`` sends
    what waits at once (before the helper stops).
    """

    def __init__(self, runInThread: RunInThread, reactor: Any = None, gather: float = 0.0,
                 most: int = 64) -> None:
        self._run = runInThread
        self._jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._running = False
        self._reactor = reactor
        self._gather = gather if reactor is not None else 0.0
        self._most = most
        self._timer: Any = None  # the IDelayedCall of a gathering batch
        self.batches = 0  # how many hops ran; lets tests see the sharing

    def run(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Fire with ``f(*args)``, computed in a thread, or with its exception."""
        waiter: Deferred[T] = Deferred()
        self._jobs.append((f, args, waiter))
        if self._running:
            return waiter
        if not self._gather or len(self._jobs) >= self._most:
            self._start_batch()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self._gather, self._start_batch)
        return waiter

    def flush(self) -> None:
        """Start the gathering batch now (nothing happens if one is running or none waits)."""
        if self._timer is not None:
            self._start_batch()

    def _start_batch(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        jobs, self._jobs = self._jobs, []
        self._running = True
        self.batches += 1
        d = self._run(run_batch, [(f, args) for f, args, _ in jobs])
        d.addBoth(self._batch_done, [waiter for _, _, waiter in jobs])

    def _batch_done(self, results: Any, waiters: list[Deferred[Any]]) -> None:
        self._running = False
        for index, waiter in enumerate(waiters):
            if isinstance(results, Failure):
                waiter.errback(results)
            elif isinstance(results[index], Failed):
                waiter.errback(Failure(results[index].error))
            else:
                waiter.callback(results[index])
        if self._jobs and not self._running:
            self._start_batch()  # they have waited for a whole batch already

"""Group commit: many writers share one round of directory fsyncs.

A rename is only durable once its directory is fsync'd. Each SMTP session needs that before it
may say 250, but an fsync costs milliseconds; so concurrent sessions wait for one shared round.
A caller's Deferred fires only after a round that *started after* its request, which is what
makes its own rename durable (a round already running may have missed it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

# The fsync calls live in mailplat.fsyncs (no Twisted, for the disk helper), the thread
# runner in mailplat.workers.
from mailplat.fsyncs import fsync_dirs
from mailplat.workers import RunInThread, thread_runner


class GroupSyncer:
    """Batches ``sync_dirs`` requests into rounds; at most one round runs at a time."""

    def __init__(self, reactor: Any = None, runInThread: RunInThread | None = None) -> None:
        self._run = runInThread or thread_runner(reactor)
        self._paths: set[str] = set()
        self._waiters: list[Deferred[None]] = []
        self._running = False
        self.rounds = 0  # how many fsync rounds ran; lets tests and metrics see the sharing

    def sync_dirs(self, paths: Iterable[str]) -> "Deferred[None]":
        """Fire once every directory in ``paths`` was fsync'd by a round begun after this call."""
        waiter: Deferred[None] = Deferred()
        self._paths.update(paths)
        self._waiters.append(waiter)
        if not self._running:
            self._start_round()
        return waiter

    def _start_round(self) -> None:
        """Take every request queued so far into one round."""
        paths, waiters = sorted(self._paths), self._waiters
        self._paths, self._waiters = set(), []
        self._running = True
        self.rounds += 1
        d = self._run(fsync_dirs, paths)
        d.addBoth(self._round_done, waiters)

    def _round_done(self, result: object, waiters: list[Deferred[None]]) -> None:
        """Wake this round's callers, then start a round for those who came meanwhile."""
        self._running = False
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
        if self._waiters and not self._running:
            self._start_round()



__all__ = ["GroupSyncer", "RunInThread", "thread_runner"]

"""When the queue tries a message again: the retry schedule, and one timer for the whole queue.

``RetrySchedule`` is pure arithmetic (RFC 5321 §4.5.4.1: retry soon, then back off, give up after
days). ``DueQueue`` keeps the due time of every waiting queue id in a heap behind a single
reactor timer, so tens of thousands of deferred messages cost one ``IDelayedCall`` and a few
hundred bytes each, never their envelopes or data.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall


@dataclass(frozen=True)
class RetrySchedule:
    """How often and for how long a temporarily failing recipient is tried again.

    The n-th retry waits ``first * factor**(n-1)``, at most ``cap``, stretched by up to
    ``jitter`` (a fraction) so a backlog does not retry in lockstep. Jitter only ever makes a
    wait longer: nobody is retried sooner than the schedule promises. The last attempt happens
    exactly when ``max_lifetime`` ends; a temporary failure then is final.
    """

    first: float = 300.0
    factor: float = 2.0
    cap: float = 3600.0
    jitter: float = 0.1
    max_lifetime: float = 5 * 86400.0
    delay_warning: float | None = 4 * 3600.0  # None: never send a "delayed" DSN

    def interval(self, attempts: int) -> float:
        """The nominal wait after ``attempts`` failed attempts (1 for the first failure)."""
        exponent = min(max(0, attempts - 1), 64)  # 2**64 already exceeds any sane cap
        return min(self.cap, self.first * self.factor**exponent)

    def expires(self, received_at: float) -> float:
        return received_at + self.max_lifetime

    def expired(self, received_at: float, now: float) -> bool:
        return now >= self.expires(received_at)

    def next_attempt(
        self, received_at: float, attempts: int, now: float, rng: random.Random
    ) -> float:
        """When to try again after a temporary failure at ``now``."""
        wait = self.interval(attempts) * (1.0 + self.jitter * rng.random())
        return min(now + wait, self.expires(received_at))

    def delay_due(self, received_at: float, now: float) -> bool:
        """Has the message waited long enough for a "delayed" DSN?"""
        return self.delay_warning is not None and now - received_at >= self.delay_warning


class DueQueue:
    """Due times of queue ids behind one timer; ``start`` is called for each id that is due.

    Nothing is started while ``can_start()`` is false (the queue is at its concurrency limit);
    the owner calls ``wake()`` when that changes. Entries are replaced lazily: rescheduling
    pushes a new heap entry and the old one is skipped when it surfaces.
    """

    def __init__(
        self, clock: Any, start: Callable[[str], None], can_start: Callable[[], bool]
    ) -> None:
        self.clock = clock
        self._start = start
        self._can_start = can_start
        self._when: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._stopped = False

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, qid: object) -> bool:
        return qid in self._when

    def when(self, qid: str) -> float | None:
        return self._when.get(qid)

    def ids(self) -> list[str]:
        return list(self._when)

    def schedule(self, qid: str, when: float) -> None:
        """Make ``qid`` due at ``when``, replacing any earlier schedule for it."""
        self._when[qid] = when
        heapq.heappush(self._heap, (when, qid))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._compact()
        self.wake()

    def unschedule(self, qid: str) -> None:
        self._when.pop(qid, None)

    def _compact(self) -> None:
        self._heap = [(when, qid) for qid, when in self._when.items()]
        heapq.heapify(self._heap)

    def _peek(self) -> float | None:
        """The earliest live due time, dropping stale entries on the way."""
        while self._heap:
            when, qid = self._heap[0]
            if self._when.get(qid) == when:
                return when
            heapq.heappop(self._heap)
        return None

    def wake(self) -> None:
        """(Re)arm the one timer for the earliest due time, if anything may start."""
        when = self._peek()
        if self._stopped or when is None or not self._can_start():
            self._cancel()
            return
        if self._timer is not None and self._timer.active() and self._timer_at <= when:
            return
        self._cancel()
        self._timer_at = when
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        """Start everything due, as far as the concurrency limits allow, then re-arm."""
        self._timer = None
        now = self.clock.seconds()
        while self._can_start():
            when = self._peek()
            if when is None or when > now:
                break
            _, qid = heapq.heappop(self._heap)
            del self._when[qid]
            self._start(qid)
        self.wake()

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def stop(self) -> None:
        """Forget the timer (the service stops); due times are kept for a later start."""
        self._stopped = True
        self._cancel()

    def resume(self) -> None:
        self._stopped = False
        self.wake()


__all__ = ["DueQueue", "RetrySchedule"]

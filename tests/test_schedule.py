"""The retry schedule (RFC 5321 §4.5.4.1 in spirit) and the one-timer due queue."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailplat.schedule import DueQueue, RetrySchedule

DAY = 86400.0


class RetryScheduleTests(SynchronousTestCase):
    def test_default_backoff(self) -> None:
        """By default retries wait 5, 10, 20, 40 minutes and then every hour."""
        schedule = RetrySchedule()
        waits = [schedule.interval(n) for n in range(1, 8)]
        self.assertEqual(waits, [300, 600, 1200, 2400, 3600, 3600, 3600])

    def test_defaults_lifetime_and_warning(self) -> None:
        """Mail is kept for 5 days and a delay warning is due after 4 hours."""
        schedule = RetrySchedule()
        self.assertEqual(schedule.max_lifetime, 5 * DAY)
        self.assertFalse(schedule.delay_due(1000.0, 1000.0 + 4 * 3600 - 1))
        self.assertTrue(schedule.delay_due(1000.0, 1000.0 + 4 * 3600))
        self.assertFalse(RetrySchedule(delay_warning=None).delay_due(0.0, 10 * DAY))

    def test_no_jitter_exact(self) -> None:
        """Without jitter the next attempt is exactly now plus the interval."""
        schedule = RetrySchedule(jitter=0.0)
        self.assertEqual(schedule.next_attempt(0.0, 3, 5000.0, random.Random(1)), 6200.0)

    @given(st.integers(1, 200), st.floats(0.0, 1.0), st.integers(0, 2**32))
    def test_jitter_never_sooner(self, attempts: int, jitter: float, seed: int) -> None:
        """Jitter stretches a wait by at most its fraction and never shortens it."""
        schedule = RetrySchedule(jitter=jitter, max_lifetime=1e12)
        nominal = schedule.interval(attempts)
        when = schedule.next_attempt(0.0, attempts, 100.0, random.Random(seed))
        self.assertGreaterEqual(when - 100.0, nominal)
        self.assertLessEqual(when - 100.0, nominal * (1 + jitter) + 1e-6)

    def test_jitter_spreads_a_backlog(self) -> None:
        """Messages failing at the same moment do not all come back at the same moment."""
        schedule, rng = RetrySchedule(jitter=0.1), random.Random(7)
        times = {schedule.next_attempt(0.0, 5, 0.0, rng) for _ in range(100)}
        self.assertGreater(len(times), 90)
        self.assertGreater(max(times) - min(times), 300)

    def test_last_attempt_at_lifetime(self) -> None:
        """A retry that would fall after the lifetime is moved to the moment it ends."""
        schedule = RetrySchedule(jitter=0.0)
        received = 1000.0
        when = schedule.next_attempt(received, 50, received + 5 * DAY - 60, random.Random())
        self.assertEqual(when, received + 5 * DAY)
        self.assertTrue(schedule.expired(received, when))
        self.assertFalse(schedule.expired(received, when - 1))

    def test_factor_one_is_constant(self) -> None:
        """A backoff factor of 1 retries at a constant interval."""
        schedule = RetrySchedule(first=1800.0, factor=1.0)
        self.assertEqual({schedule.interval(n) for n in range(1, 50)}, {1800.0})


class DueQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.started: list[str] = []
        self.room = True
        self.due = DueQueue(self.clock, self.started.append, lambda: self.room)

    def test_one_timer_for_many(self) -> None:
        """Ten thousand waiting ids cost one reactor timer, and start in due order."""
        for n in range(10_000):
            self.due.schedule(f"Q{n}", 1000.0 + (n * 7919) % 10_000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1000.0 + 10_000)
        self.assertEqual(len(self.started), 10_000)
        whens = [1000.0 + (int(q[1:]) * 7919) % 10_000 for q in self.started]
        self.assertEqual(whens, sorted(whens))
        self.assertEqual(len(self.due), 0)

    def test_reschedule_replaces(self) -> None:
        """Scheduling an id again moves it; it starts once, at the new time."""
        self.due.schedule("A", 100.0)
        self.due.schedule("A", 50.0)
        self.due.schedule("A", 200.0)
        self.clock.advance(199)
        self.assertEqual(self.started, [])
        self.clock.advance(1)
        self.assertEqual(self.started, ["A"])
        self.clock.advance(1000)
        self.assertEqual(self.started, ["A"])

    def test_unschedule(self) -> None:
        """An unscheduled id never starts."""
        self.due.schedule("A", 10.0)
        self.due.schedule("B", 20.0)
        self.due.unschedule("A")
        self.assertNotIn("A", self.due)
        self.clock.advance(30)
        self.assertEqual(self.started, ["B"])

    def test_no_room_no_timer(self) -> None:
        """While nothing may start there is no timer at all (no busy loop); wake() resumes."""
        self.room = False
        self.due.schedule("A", 0.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.room = True
        self.due.wake()
        self.clock.advance(0)
        self.assertEqual(self.started, ["A"])

    def test_stops_when_full(self) -> None:
        """Starting stops as soon as there is no room, and the rest waits in order."""

        def start(qid: str) -> None:
            self.started.append(qid)
            self.room = len(self.started) < 2

        self.due = DueQueue(self.clock, start, lambda: self.room)
        for qid in "ABC":
            self.due.schedule(qid, 5.0)
        self.clock.advance(5)
        self.assertEqual(self.started, ["A", "B"])
        self.assertEqual(self.due.ids(), ["C"])

    def test_stop_and_resume(self) -> None:
        """A stopped queue keeps its due times and starts them after resume."""
        self.due.schedule("A", 10.0)
        self.due.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual(self.started, [])
        self.due.resume()
        self.clock.advance(0)
        self.assertEqual(self.started, ["A"])

    def test_heap_is_compacted(self) -> None:
        """Rescheduling the same id many times does not grow memory without bound."""
        for n in range(5000):
            self.due.schedule("A", float(n))
        self.assertLess(len(self.due._heap), 200)
        self.assertEqual(self.due.when("A"), 4999.0)

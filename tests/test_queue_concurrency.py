"""Concurrency limits: per delivery agent, per destination, and messages in flight."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailplat.concurrency import ConcurrencyLimits, Limiter, Slots
from mailplat.envelope import Recipient
from mailplat.interfaces import IDeliveryAgent, IStoredMessage, Route
from mailplat.queue import QueueManager
from mailplat.replies import Reply
from mailplat.store import INCOMING
from tests.queuefixtures import OK, QueueTestCase, route


class ScanningLimiter:
    """The admission rule written as a plain scan of every waiting call (what Limiter did
    before it kept per-destination queues); the property test holds Limiter to it."""

    def __init__(self, limits: ConcurrencyLimits) -> None:
        self.limiter = Limiter(limits)  # for capacity() and keys_for() only
        self.in_use: dict[Any, int] = {}
        self.waiting: list[tuple[int, tuple[Any, ...]]] = []

    def fits(self, keys: tuple[Any, ...]) -> bool:
        return all(self.in_use.get(k, 0) < self.limiter.capacity(k) for k in keys)

    def take(self, keys: tuple[Any, ...]) -> None:
        for k in keys:
            self.in_use[k] = self.in_use.get(k, 0) + 1

    def acquire(self, call: int, agent: str, dests: tuple[str, ...]) -> list[int]:
        keys = self.limiter.keys_for(agent, dests)
        if not self.waiting and self.fits(keys):
            self.take(keys)
            return [call]
        self.waiting.append((call, keys))
        return self.admit()

    def release(self, keys: tuple[Any, ...]) -> list[int]:
        for k in keys:
            self.in_use[k] -= 1
        return self.admit()

    def admit(self) -> list[int]:
        blocked: set[Any] = set()
        still, started = [], []
        for call, keys in self.waiting:
            if blocked.isdisjoint(keys[1:]) and self.fits(keys):
                self.take(keys)
                started.append(call)
            else:
                blocked.update(keys[1:])
                still.append((call, keys))
        self.waiting = still
        return started


class LimiterOrderTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.sampled_from(["smtp", "maildir"]),
                              st.lists(st.sampled_from("abcd"), max_size=3), st.integers(0, 50)),
                    max_size=60))
    def test_same_calls_start_as_a_full_scan(self, ops: list[Any]) -> None:
        """Whatever the mix of acquires and releases, the same calls start, in the same
        order, as with a scan of every waiting call in arrival order."""
        limits = ConcurrencyLimits(agent=3, destination=1, agents={"maildir": 2})
        limiter, reference = Limiter(limits), ScanningLimiter(limits)
        started: list[int] = []
        running: dict[int, Slots] = {}
        for call, (acquire, agent, dests, pick) in enumerate(ops):
            before = len(started)
            if acquire or not running:
                d = limiter.acquire(agent, dests)
                d.addCallback(lambda slots, c=call: (started.append(c), running.update({c: slots})))
                expected = reference.acquire(call, agent, tuple(dests))
            else:
                slots = running.pop(sorted(running)[pick % len(running)])
                limiter.release(slots)
                expected = reference.release(slots.keys)
            self.assertEqual(started[before:], expected)
        self.assertEqual(limiter.waiting, len(reference.waiting))


class LimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limiter = Limiter(ConcurrencyLimits(agent=3, destination=1, agents={"big": 10}))

    def take(self, agent: str, *destinations: str) -> Deferred[Slots]:
        return self.limiter.acquire(agent, destinations)

    def test_agent_limit(self) -> None:
        """An agent never has more calls running than its limit; a release admits the next."""
        held = [self.successResultOf(self.take("smtp", f"d{n}")) for n in range(3)]
        waiting = self.take("smtp", "d9")
        self.assertNoResult(waiting)
        self.limiter.release(held[0])
        self.successResultOf(waiting)

    def test_per_agent_override(self) -> None:
        """An agent with its own limit is not held to the default."""
        for n in range(10):
            self.successResultOf(self.take("big", f"d{n}"))
        self.assertNoResult(self.take("big", "d99"))

    def test_destination_limit(self) -> None:
        """One destination gets no more than its limit, while others proceed."""
        first = self.successResultOf(self.take("smtp", "Example.COM"))
        same = self.take("smtp", "example.com")
        self.assertNoResult(same)
        self.successResultOf(self.take("smtp", "other.test"))
        self.limiter.release(first)
        self.successResultOf(same)

    def test_all_or_nothing(self) -> None:
        """A call needing a busy destination holds none of its other destinations."""
        busy = self.successResultOf(self.take("smtp", "a.test"))
        both = self.take("smtp", "a.test", "b.test")
        self.assertNoResult(both)
        self.assertNotIn(("destination", "smtp", "b.test"), self.limiter.in_use)
        self.limiter.release(busy)
        self.successResultOf(both)

    def test_no_starvation(self) -> None:
        """A waiting call is not overtaken by later calls for one of its destinations."""
        a = self.successResultOf(self.take("smtp", "a.test"))
        b = self.successResultOf(self.take("smtp", "b.test"))
        both = self.take("smtp", "a.test", "b.test")
        later = self.take("smtp", "b.test")
        self.limiter.release(b)
        self.assertNoResult(later)
        self.limiter.release(a)
        self.successResultOf(both)
        self.assertNoResult(later)

    def test_release_twice_is_harmless(self) -> None:
        """Releasing the same slots twice frees them once."""
        slots = self.successResultOf(self.take("smtp", "a.test"))
        self.limiter.release(slots)
        self.limiter.release(slots)
        self.assertEqual(self.limiter.in_use, {})


@implementer(IDeliveryAgent)
class SlowAgent:
    """Every delivery waits until the test fires it."""

    name = "slow"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Deferred[dict[str, Reply]]]] = []

    def deliver(self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]) -> Any:
        d: Deferred[dict[str, Reply]] = Deferred()
        self.calls.append(([r.address for r, _ in recipients], d))
        return d

    def finish(self, index: int = 0) -> None:
        addresses, d = self.calls.pop(index)
        d.callback({a: OK for a in addresses})


class QueueLimitTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.slow = SlowAgent()
        self.router.routes.update({
            "@a.test": route("slow", "a.test"), "@b.test": route("slow", "b.test"),
        })

    def make(self, limits: ConcurrencyLimits) -> None:
        self.queue = QueueManager(self.store, self.router, {"slow": self.slow}, self.clock,
                                  schedule=self.schedule, limits=limits)
        self.queue.startService()
        self.addCleanup(self.drain)

    def drain(self) -> None:
        """Let every delivery still held by the test finish, so no attempt is left suspended
        (a suspended coroutine collected later would report errors into another test)."""
        for _ in range(100):
            if not self.slow.calls:
                break
            self.slow.finish(0)
        self.queue.stopService()

    def send(self, count: int, address: str) -> None:
        for _ in range(count):
            self.queue.submit(self.put(INCOMING, address))

    def test_per_destination(self) -> None:
        """Mail for one busy destination waits for a slot; other destinations go ahead."""
        self.make(ConcurrencyLimits(agent=10, destination=2))
        self.send(5, "x@a.test")
        self.send(1, "y@b.test")
        self.assertEqual(sorted(c[0][0] for c in self.slow.calls),
                         ["x@a.test", "x@a.test", "y@b.test"])
        for _ in range(3):
            self.slow.finish(0)
        self.assertEqual(len(self.slow.calls), 2)
        self.assertEqual(self.queue.limiter.waiting, 1)

    def test_per_agent(self) -> None:
        """An agent's limit holds across destinations."""
        self.make(ConcurrencyLimits(agent=3, destination=10))
        self.send(3, "x@a.test")
        self.send(3, "y@b.test")
        self.assertEqual(len(self.slow.calls), 3)
        for _ in range(3):
            self.slow.finish(0)
        self.assertEqual(len(self.slow.calls), 3)
        for _ in range(3):
            self.slow.finish(0)
        self.assertEqual(self.store.list_ids("active"), [])

    def test_messages_in_flight(self) -> None:
        """Beyond the active limit, messages wait in the due queue without being read, and
        start as soon as earlier ones finish."""
        self.make(ConcurrencyLimits(agent=100, destination=100, active=2))
        reads: list[str] = []
        original = self.store.read_envelope
        self.patch(self.store, "read_envelope", lambda qid: reads.append(qid) or original(qid))
        self.send(5, "x@a.test")
        self.assertEqual(len(self.slow.calls), 2)
        self.assertEqual(len(self.queue.due), 3)
        self.assertEqual(reads, [])
        self.slow.finish(0)
        self.clock.advance(0)
        self.assertEqual(len(self.slow.calls), 2)
        self.assertEqual(len(reads), 1)
        for _ in range(4):
            self.slow.finish(0)
            self.clock.advance(0)
        self.assertEqual(self.slow.calls, [])
        self.assertEqual(self.store.list_ids("active"), [])

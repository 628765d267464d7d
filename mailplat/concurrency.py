"""How many deliveries may run at once: per delivery agent and per destination.

A destination is what a route names (a next-hop domain for ``smtp``, a Maildir for ``maildir``,
an LMTP server for ``lmtp``), so a slow or broken remote site cannot take every delivery slot,
and a local disk is not hit by a hundred writers at once. One agent call takes one slot of its
agent and one slot of every destination it touches, all at once or none (so two calls can
never hold half of each other's slots).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed

Key = tuple[str, ...]


@dataclass(frozen=True)
class ConcurrencyLimits:
    """Configured limits; ``agents`` and ``destinations`` override the defaults per agent."""

    agent: int = 20
    destination: int = 5
    agents: Mapping[str, int] = field(default_factory=dict, hash=False)
    destinations: Mapping[str, int] = field(default_factory=dict, hash=False)
    active: int = 1000  # messages with an attempt in flight (bounds envelopes in memory)

    def for_agent(self, name: str) -> int:
        return self.agents.get(name, self.agent)

    def for_destination(self, agent: str) -> int:
        return self.destinations.get(agent, self.destination)


class Slots:
    """What one agent call holds; give it back with ``Limiter.release``."""

    def __init__(self, keys: tuple[Key, ...]) -> None:
        self.keys = keys
        self.released = False


class Limiter:
    """Counts slots in use and queues the calls that must wait, first come first served.

    A waiting call blocks later calls that need any of its destinations, so a call needing
    several busy destinations is not starved by a stream of calls needing one of them.
    """

    def __init__(self, limits: ConcurrencyLimits) -> None:
        self.limits = limits
        self.in_use: dict[Key, int] = {}
        # One FIFO per destination of the calls waiting for it (a call with several is in
        # each); only a call at the head of all its queues may start. So admitting looks at
        # the heads, not at every waiting call: thousands of messages waiting for one busy
        # Maildir cost nothing per release.
        self._queues: dict[Key, deque[_Waiter]] = {}
        self._count = 0
        self._arrivals = itertools.count()

    @staticmethod
    def keys_for(agent: str, destinations: Iterable[str]) -> tuple[Key, ...]:
        dests = sorted({("destination", agent, d.lower()) for d in destinations})
        return (("agent", agent), *dests)

    def capacity(self, key: Key) -> int:
        if key[0] == "agent":
            return self.limits.for_agent(key[1])
        return self.limits.for_destination(key[1])

    def acquire(self, agent: str, destinations: Iterable[str]) -> "Deferred[Slots]":
        """Fires with the slots once the agent and every destination have room."""
        keys = self.keys_for(agent, destinations)
        if not self._count and self._fits(keys):
            return succeed(self._take(keys))
        waiter = _Waiter(next(self._arrivals), keys)
        for queue_key in waiter.queue_keys:
            self._queues.setdefault(queue_key, deque()).append(waiter)
        self._count += 1
        self._admit()
        return waiter.d

    def release(self, slots: Slots) -> None:
        if slots.released:
            return
        slots.released = True
        for key in slots.keys:
            self.in_use[key] -= 1
            if not self.in_use[key]:
                del self.in_use[key]
        self._admit()

    @property
    def waiting(self) -> int:
        return self._count

    def _fits(self, keys: tuple[Key, ...]) -> bool:
        return all(self.in_use.get(key, 0) < self.capacity(key) for key in keys)

    def _take(self, keys: tuple[Key, ...]) -> Slots:
        for key in keys:
            self.in_use[key] = self.in_use.get(key, 0) + 1
        return Slots(keys)

    def _admit(self) -> None:
        """Start every waiting call that fits, in arrival order; a call that does not fit
        keeps its place at the head of its destinations' queues, blocking later ones there."""
        heads = [(q[0].arrival, q[0]) for q in self._queues.values() if self._is_head(q[0])]
        heapq.heapify(heads)
        ready: list[tuple[Slots, Deferred[Slots]]] = []
        while heads:
            _, waiter = heapq.heappop(heads)
            if waiter.started or not self._fits(waiter.keys):
                continue
            waiter.started = True
            self._count -= 1
            ready.append((self._take(waiter.keys), waiter.d))
            for queue_key in waiter.queue_keys:
                queue = self._queues[queue_key]
                queue.popleft()
                if not queue:
                    del self._queues[queue_key]
                elif self._is_head(queue[0]):
                    heapq.heappush(heads, (queue[0].arrival, queue[0]))
        for slots, d in ready:  # after the bookkeeping: callbacks may acquire or release
            d.callback(slots)

    def _is_head(self, waiter: _Waiter) -> bool:
        return all(self._queues[key][0] is waiter for key in waiter.queue_keys)


class _Waiter:
    """One waiting call; calls without a destination queue on their agent instead."""

    def __init__(self, arrival: int, keys: tuple[Key, ...]) -> None:
        self.arrival = arrival
        self.keys = keys
        self.queue_keys = keys[1:] or keys[:1]
        self.d: Deferred[Slots] = Deferred()
        self.started = False

    def __lt__(self, other: _Waiter) -> bool:  # heap ties never happen: arrivals are unique
        return self.arrival < other.arrival

__all__ = ["ConcurrencyLimits", "Limiter", "Slots"]

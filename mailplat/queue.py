"""The QueueManager: the one shared queue that takes committed messages to their agents.

A message's lifecycle is the state machine of the store's directories::

    incoming --submit--> active --all finished--> (removed)
                           |  \\--some 4xx-----> deferred --due--> active
                           \\----hold----------> hold --release--> deferred

and each recipient has its own state (PENDING, DEFERRED, DELIVERED, BOUNCED) in the envelope,
so a retry only goes to the recipients that still need it. Between attempts only queue ids and
due times are kept in memory (``DueQueue``: one heap, one timer); the envelope is read back
from disk when it is due. How many attempts run at once is bounded per message count, per
agent and per destination (``Limiter``). Operator commands live in ``QueueCommands``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplat import dsn
from mailplat.concurrency import ConcurrencyLimits, Limiter
from mailplat.datafiles import DataFilePool
from mailplat.envelope import BOUNCED, DELIVERED, HELD, PENDING, Envelope, Recipient
from mailplat.envelope import DEFERRED as RCPT_DEFERRED
from mailplat.interfaces import IDeliveryAgent, IRouter, Route
from mailplat.queuecommands import QueueCommands
# Defined there, without Twisted, for the disk helper's sake.
from mailplat.queuefiles import StoredMessage, recycle_files, remove_files
from mailplat.queuenotices import QueueNotices, owes_notice
from mailplat.dispatch import NO_AGENT, call_agent, route_address
from mailplat.replies import Reply
from mailplat.schedule import DueQueue, RetrySchedule
from mailplat.store import ACTIVE, DEFERRED, HOLD, INCOMING, QueueStore
from mailplat.workers import Batcher

log = Logger()

WAITING = (PENDING, RCPT_DEFERRED, HELD)
# How long the daemon lets a delivered message's removal wait for others to share its hop to
# the disk helper: with mail arriving one message at a time (a lone session), each removal
# would otherwise pay a hop of its own (docs/performance.rst, "Sixth round"). Nobody waits
# for a removal; a crash before it only means the message is delivered again.
REMOVAL_GATHER = 0.005


@dataclass(frozen=True)
class Held(Reply):
    """A 4xx an agent returns to park a recipient as HELD instead of retrying it on the
    schedule (the odmr agent: its site collects the mail). The queue looks at a held
    recipient again only for the delay warning and at the end of its lifetime, or when
    ``deliver_now`` forces it."""


class Outcome(NamedTuple):
    """One recipient's result of one attempt."""

    agent: str
    reply: Reply
    relay: bool = False  # the route left our domains ("relayed" rather than "delivered")


Outcomes = dict[int, Outcome]


def next_due(envelope: Envelope) -> float | None:
    """When the earliest unfinished recipient wants its next attempt (None: nothing to do)."""
    times = [
        r.next_attempt or 0.0 for r in envelope.recipients if r.state in WAITING
    ]
    return min(times) if times else None


class QueueManager(QueueCommands, QueueNotices, Service):
    """Delivers committed messages, retries 4xx recipients and gives up on 5xx ones."""

    name = "queue"

    def __init__(
        self,
        store: QueueStore,
        router: IRouter,
        agents: Mapping[str, IDeliveryAgent],
        reactor: IReactorTime,
        retry_delay: float | None = None,
        max_lifetime: float | None = None,
        recovery_window: float | None = None,
        schedule: RetrySchedule | None = None,
        limits: ConcurrencyLimits | None = None,
        notifier: dsn.Notifier | None = None,
        run_blocking: Any = None,
        removal_gather: float = 0.0,
    ) -> None:
        self.store = store
        self.router = router
        self.agents = dict(agents)
        self.reactor = reactor
        schedule = schedule or RetrySchedule()
        if retry_delay is not None:
            schedule = replace(schedule, first=retry_delay)
        if max_lifetime is not None:
            schedule = replace(schedule, max_lifetime=max_lifetime)
        self.schedule = schedule
        # Overdue mail found at start is spread over this, not tried all at once.
        self.recovery_window = min(60.0, schedule.first) if recovery_window is None else recovery_window
        self.limiter = Limiter(limits or ConcurrencyLimits())
        self.notifier = notifier  # None: DSNs are logged as not sent (unit tests, tools)
        self.random = random.Random()
        self.due = DueQueue(reactor, self._start, self._has_room)
        self._busy: set[str] = set()  # queue ids with an attempt in flight
        # Unlinks of the data path, off the reactor thread and many per hop (in the disk
        # helper process when the daemon has one: ``run_blocking``). ``removal_gather``: how
        # long a removal waits for others to share its hop (see REMOVAL_GATHER).
        self._files = Batcher(run_blocking or store.in_thread, reactor, gather=removal_gather)
        # The spool's DataFilePool, if it takes data files back (server.py): a delivered
        # message's file is emptied and reused for a new one instead of unlinked.
        self.data_files: DataFilePool | None = None
        self._forced: dict[str, frozenset[str]] = {}  # flushed ids -> domains (empty: all)
        self._idle_waiters: dict[str, list[Deferred[None]]] = {}
        self.observers: list[Any] = []  # IQueueObservers (plugins), told about every event

    @property
    def max_lifetime(self) -> float:
        return self.schedule.max_lifetime

    # -- service lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        """Recover the queue from disk: unfinished deliveries again, deferred ones on time."""
        super().startService()  # type: ignore[no-untyped-call]
        self.due.resume()
        found = self.store.recover()
        now = self.reactor.seconds()
        for qid in found[INCOMING] + found[ACTIVE]:
            self._schedule(qid, now)  # at-least-once: the crash may have hidden a delivery
        for qid in found[DEFERRED]:
            self._reschedule_recovered(qid, now)
        log.info(
            "queue recovered: {incoming} incoming, {active} active, {deferred} deferred, "
            "{hold} on hold",
            **{state: len(ids) for state, ids in found.items()},
        )

    def _reschedule_recovered(self, qid: str, now: float) -> None:
        """Keep a deferred message's due time; overdue ones are spread out, not stampeded."""
        try:
            _, envelope = self.store.read_envelope(qid)
        except (OSError, ValueError, TypeError, KeyError):
            log.failure("{qid}: unreadable envelope, putting it on hold", qid=qid)
            self.store.move(qid, DEFERRED, HOLD)
            return
        due = next_due(envelope)
        if due is None or due <= now:
            due = now + self.random.uniform(0, self.recovery_window)
        self._schedule(qid, due)

    def stopService(self) -> None:
        """Stop the clock; in-flight attempts finish, their messages are persisted as usual."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.due.stop()
        self._files.flush()  # gathered removals go before the disk helper stops

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, qid: str, when: float) -> None:
        self.due.schedule(qid, when)

    def _unschedule(self, qid: str) -> None:
        self.due.unschedule(qid)

    def _has_room(self) -> bool:
        return len(self._busy) < self.limiter.limits.active

    def _start(self, qid: str) -> None:
        """A message's time has come: read it back from disk and attempt it."""
        if qid in self._busy:
            return  # the attempt in flight reschedules it when it settles
        try:
            state, envelope = self.store.read_envelope(qid)
            if state == HOLD:
                return
            if state == DEFERRED and not self._needs_attempt(envelope):
                self._schedule(qid, next_due(envelope) or self.reactor.seconds())
                return
            if state != ACTIVE:
                self.store.move(qid, state, ACTIVE)
        except FileNotFoundError:
            return  # deleted meanwhile, e.g. by the operator
        except Exception:
            log.failure("{qid}: cannot start delivery", qid=qid)
            self._schedule(qid, self.reactor.seconds() + self.schedule.first)
            return
        self._attempt(envelope)

    def _needs_attempt(self, envelope: Envelope) -> bool:
        """Woken early (a release, a restart): is anything actually due?"""
        due = next_due(envelope)
        if envelope.queue_id in self._forced or owes_notice(envelope) or due is None:
            return True
        return due <= self.reactor.seconds()

    # -- the public queue API ---------------------------------------------------------------

    def knows(self, qid: str) -> bool:
        """Is the message in flight or waiting for its time here?"""
        return qid in self._busy or qid in self.due

    def submit(self, envelope: Envelope) -> "Deferred[None]":
        """A message was just committed, unfiled (the spool's on_commit): deliver it now, or
        as soon as the number of messages in flight allows. Its first attempt starts from
        its data file alone; only a message that is not finished by it gets a file of its
        own (``_settle``)."""
        qid = envelope.queue_id
        if self.knows(qid):
            return succeed(None)  # announced twice (a receiver's sweep): one is enough
        self._notify("queued", envelope)
        if not self._has_room():
            self._schedule(qid, self.reactor.seconds())  # _start files it into active/
            return succeed(None)
        return self._attempt(envelope, state=INCOMING)

    # -- one delivery attempt ---------------------------------------------------------------

    def _attempt(
        self, envelope: Envelope, returned: Reply | None = None, state: str = ACTIVE
    ) -> "Deferred[None]":
        """Run one attempt; whatever goes wrong, the message stays queued for a later one.
        With ``returned``, nothing is delivered: every unfinished recipient fails with it.
        ``state`` is where its envelope is: active/, or unfiled (INCOMING)."""
        qid = envelope.queue_id
        self._busy.add(qid)
        d = Deferred.fromCoroutine(self._attempt_steps(envelope, returned, state))
        d.addErrback(self._attempt_failed, qid)
        d.addBoth(_passthrough_after, self._attempt_done, qid)
        return d

    def _attempt_failed(self, failure: Failure, qid: str) -> None:
        log.failure("{qid}: delivery attempt failed", failure, qid=qid)
        if self.running:
            self._schedule(qid, self.reactor.seconds() + self.schedule.first)

    def _attempt_done(self, qid: str) -> None:
        """Let operator commands waiting for this message go first, then start more mail."""
        self._busy.discard(qid)
        for waiter in self._idle_waiters.pop(qid, []):
            waiter.callback(None)
        self.due.wake()

    def stored_message(self, envelope: Envelope) -> StoredMessage:
        return StoredMessage(envelope, self.store.data_path(envelope.queue_id))

    def when_idle(self, qid: str) -> "Deferred[None]":
        """Fires when ``qid`` has no attempt in flight, before anything else may start one."""
        if qid not in self._busy:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.setdefault(qid, []).append(waiter)
        return waiter

    async def _attempt_steps(self, envelope: Envelope, returned: Reply | None, state: str) -> None:
        """Deliver the due recipients, record outcomes, send owed DSNs, settle."""
        forced = self._forced.pop(envelope.queue_id, None)
        if returned is None:
            now = self.reactor.seconds()
            due = [i for i, r in enumerate(envelope.recipients) if _is_due(r, now, forced)]
            outcomes = await self._deliver(envelope, due)
        else:
            outcomes = {
                i: Outcome("operator", returned)
                for i, r in enumerate(envelope.recipients) if not r.finished
            }
        envelope = self._apply(envelope, outcomes)
        envelope = await self._send_owed(envelope)
        envelope = await self._warn_delay(envelope)
        await self._settle(envelope, state)

    async def _deliver(self, envelope: Envelope, indexes: list[int]) -> Outcomes:
        """Route the recipients, then one call per agent, all agents at once."""
        routes = await self._route_all(envelope, indexes)
        outcomes: Outcomes = {}
        groups: dict[str, list[tuple[int, Route]]] = {}
        for index, route in routes.items():
            if isinstance(route, Reply):
                outcomes[index] = Outcome("none", route)
            else:
                groups.setdefault(route.agent, []).append((index, route))
        if len(groups) == 1:  # the usual case: one agent, awaited without a gather
            [(name, pairs)] = groups.items()
            outcomes.update(await self._run_agent(envelope, name, pairs))
            return outcomes
        calls = [
            Deferred.fromCoroutine(self._run_agent(envelope, name, pairs))
            for name, pairs in groups.items()
        ]
        for result in await gatherResults(calls):
            outcomes.update(result)
        return outcomes

    async def _route_all(self, envelope: Envelope, indexes: list[int]) -> dict[int, Route | Reply]:
        """Ask the router about every due recipient at once."""
        if len(indexes) == 1:  # one recipient: no gather needed
            return {indexes[0]: await self._route_one(envelope, indexes[0])}
        answers = [Deferred.fromCoroutine(self._route_one(envelope, i)) for i in indexes]
        return dict(zip(indexes, await gatherResults(answers)))

    async def _route_one(self, envelope: Envelope, index: int) -> Route | Reply:
        """A Route, or the Reply refusing the recipient; a router error defers it."""
        address = envelope.recipients[index].address
        return await route_address(self.router, address, envelope.queue_id)

    async def _run_agent(
        self, envelope: Envelope, name: str, pairs: list[tuple[int, Route]]
    ) -> Outcomes:
        """One agent call for all recipients routed to it, once the agent and every
        destination have a free slot; an exception defers them all."""
        agent = self.agents.get(name)
        if agent is None:
            return {i: Outcome(name, NO_AGENT) for i, _ in pairs}
        slots = await self.limiter.acquire(name, {route.destination for _, route in pairs})
        handed = [(envelope.recipients[i], route) for i, route in pairs]
        try:
            replies = await call_agent(agent, self.stored_message(envelope), handed)
        finally:
            self.limiter.release(slots)
        return {i: Outcome(name, replies[r.address], route.relay)
                for (i, route), (r, _) in zip(pairs, handed)}

    def _apply(self, envelope: Envelope, outcomes: Outcomes) -> Envelope:
        """Record each recipient's outcome in the envelope, log it, note the DSNs owed."""
        now = self.reactor.seconds()
        expired = self.schedule.expired(envelope.received_at, now)
        for index, (agent, reply, relay) in sorted(outcomes.items()):
            recipient = envelope.recipients[index]
            state, status = _outcome(reply, expired)
            attempts = recipient.attempts + 1
            envelope = envelope.with_recipient(
                index,
                state=state,
                attempts=attempts,
                next_attempt=self._retry_time(envelope, attempts, now, state),
                last_reply=str(reply),
                agent=agent,
                history=recipient.history + (f"{now:.3f} {agent} {reply}",),
                dsn=self._owed(envelope, recipient, state, relay, reply) or recipient.dsn,
            )
            self._notify(_EVENTS[status], envelope, envelope.recipients[index], reply)
            log.info(
                "{qid}: to=<{addr}>, agent={agent}, delay={delay:.2f}, status={status} ({reply})",
                qid=envelope.queue_id, addr=recipient.address, agent=agent,
                delay=now - envelope.received_at, status=status, reply=str(reply),
            )
        return envelope

    def _retry_time(self, envelope: Envelope, attempts: int, now: float, state: str) -> float | None:
        if state == HELD:
            return self._hold_until(envelope, now)
        if state != RCPT_DEFERRED:
            return None
        return self.schedule.next_attempt(envelope.received_at, attempts, now, self.random)

    def _hold_until(self, envelope: Envelope, now: float) -> float:
        """A held recipient is only looked at again to warn of the delay, then to expire."""
        expires = self.schedule.expires(envelope.received_at)
        warning = self.schedule.delay_warning
        if warning is not None and not envelope.delay_notified:
            if envelope.received_at + warning > now:
                return min(envelope.received_at + warning, expires)
        return expires

    async def _remove(self, qid: str, state: str, unfiled: bool) -> None:
        """Envelope and data file go; the data file to the spool's pool when it wants one."""
        removal = self.store.removal(qid, state, not unfiled)
        pool = self.data_files
        spare = pool.spare() if pool is not None else None
        if pool is None or spare is None:
            await self._files.run(remove_files, *removal)
            return
        kept = False
        try:
            kept = await self._files.run(recycle_files, *removal, self.store.data_path(spare))
        finally:
            pool.returned(spare, kept)

    def _notify(self, event: str, *args: Any) -> None:
        """Tell observers; they cannot change the outcome, and their failures are only logged."""
        for observer in self.observers:
            d = maybeDeferred(getattr(observer, event), *args)
            d.addErrback(_observer_failed, observer, event)

    async def _settle(self, envelope: Envelope, state: str = ACTIVE) -> None:
        """Finished messages leave the queue; others wait in deferred/ for their next turn."""
        qid = envelope.queue_id
        owes = owes_notice(envelope)
        unfiled = state == INCOMING
        if envelope.finished and not owes:
            await self._remove(qid, state, unfiled)
            log.info("{qid}: removed", qid=qid)
            return
        if unfiled:
            # Filed now, whole and synced; until then its trailer was its envelope.
            await self.store.write_envelope(envelope, DEFERRED)
        else:
            # Replace the envelope in place, then one rename: never two copies in two
            # states. If this fails, _attempt_failed retries from the envelope on disk.
            await self.store.write_envelope(envelope, ACTIVE)
            self.store.move(qid, ACTIVE, DEFERRED)
        due = next_due(envelope)
        if owes:
            retry = self.reactor.seconds() + self.schedule.first
            due = retry if due is None else min(due, retry)
        if self.running and due is not None:
            self._schedule(qid, due)


def _observer_failed(failure: Failure, observer: object, event: str) -> None:
    log.failure("{o!r}.{e} failed", failure, o=observer, e=event)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _is_due(recipient: Recipient, now: float, forced: frozenset[str] | None) -> bool:
    """Pending recipients always; deferred and held ones when their time came or a flush
    (or a site collecting its mail) says so."""
    if recipient.state == PENDING:
        return True
    if recipient.state not in WAITING:
        return False
    if forced is not None and (not forced or domain_of(recipient.address) in forced):
        return True
    return (recipient.next_attempt or 0.0) <= now


_EVENTS = {"sent": "delivered", "deferred": "deferred", "held": "deferred", "bounced": "bounced"}


def _outcome(reply: Reply, expired: bool) -> tuple[str, str]:
    """(recipient state, log status) for a reply; 4xx past the lifetime bounces."""
    if reply.positive:
        return DELIVERED, "sent"
    if reply.transient and not expired:
        return (HELD, "held") if isinstance(reply, Held) else (RCPT_DEFERRED, "deferred")
    return BOUNCED, "bounced"


def _passthrough_after(result: object, f: Any, *args: Any) -> object:
    f(*args)
    return result


__all__ = [
    "Held", "Outcome", "QueueManager", "StoredMessage", "domain_of", "next_due",
]

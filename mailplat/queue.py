"""The QueueManager: the one shared queue that takes committed messages to their agents.

A message's lifecycle is the state machine of the store's directories::

    incoming --submit--> active --all finished--> (removed)
                           |  \\--some 4xx-----> deferred --due--> active
                           \\----hold----------> hold --release--> deferred

and each recipient has its own state (PENDING, DEFERRED, DELIVERED, BOUNCED) in the envelope,
so a retry only goes to the recipients that still need it. Only queue ids and due times are
kept in memory between attempts; the envelope is read back from disk when it is due.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.addheaders import prefixed
from mailplat.envelope import BOUNCED, DELIVERED, Envelope, Recipient
from mailplat.envelope import DEFERRED as RCPT_DEFERRED
from mailplat.envelope import PENDING
from mailplat.interfaces import IDeliveryAgent, IRouter, IStoredMessage, Route
from mailplat.replies import LOCAL_ERROR, Reply
from mailplat.store import ACTIVE, DEFERRED, HOLD, INCOMING, QueueStore

log = Logger()

NO_AGENT = Reply(451, "4.3.5", "Mail system configuration error: no such delivery agent")
NO_OUTCOME = Reply(451, "4.3.0", "Delivery agent gave no outcome for this recipient")

# One attempt's result per recipient index: (agent name, reply).
Outcomes = dict[int, tuple[str, Reply]]


@implementer(IStoredMessage)
class StoredMessage:
    """A queued message as agents see it: its envelope and a way to read its bytes."""

    def __init__(self, envelope: Envelope, path: str) -> None:
        self.envelope = envelope
        # Not in IStoredMessage: the stored bytes only, without envelope.add_headers, so an
        # agent may link or sendfile it only when that tuple is empty.
        self.path = path

    def open(self) -> IO[bytes]:
        """The message as delivered: fields added by hooks, then the stored bytes."""
        return prefixed(self.envelope.add_headers, open(self.path, "rb"))


def mailbox_of(address: str) -> Any:
    """The Mailbox the router wants, from an address as stored in the envelope."""
    from mailplat.address import Mailbox

    local, at, domain = address.rpartition("@")
    return Mailbox(local, domain) if at else Mailbox(address, "")


def next_due(envelope: Envelope) -> float | None:
    """When the earliest unfinished recipient wants its next attempt (None: nothing to do)."""
    times = [
        r.next_attempt or 0.0 for r in envelope.recipients if r.state in (PENDING, RCPT_DEFERRED)
    ]
    return min(times) if times else None


class QueueManager(Service):
    """Delivers committed messages, retries 4xx recipients and gives up on 5xx ones."""

    name = "queue"

    def __init__(
        self,
        store: QueueStore,
        router: IRouter,
        agents: Mapping[str, IDeliveryAgent],
        reactor: Any,
        retry_delay: float = 300.0,
        max_lifetime: float = 5 * 86400,
        recovery_window: float = 60.0,
    ) -> None:
        self.store = store
        self.router = router
        self.agents = dict(agents)
        self.reactor = reactor
        self.retry_delay = retry_delay
        self.max_lifetime = max_lifetime
        self.recovery_window = recovery_window  # overdue mail after a restart spreads over this
        self.random = random.Random()
        self._timers: dict[str, IDelayedCall] = {}
        self._busy: set[str] = set()  # queue ids with an attempt in flight
        self.observers: list[Any] = []  # IQueueObservers (plugins), told about every event

    # -- service lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        """Recover the queue from disk: unfinished deliveries again, deferred ones on time."""
        super().startService()
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
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # -- scheduling: one timer per message, behind two methods so a heap can replace it ------

    def _schedule(self, qid: str, when: float) -> None:
        self._unschedule(qid)
        delay = max(0.0, when - self.reactor.seconds())
        self._timers[qid] = self.reactor.callLater(delay, self._due, qid)

    def _unschedule(self, qid: str) -> None:
        timer = self._timers.pop(qid, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _due(self, qid: str) -> None:
        """A message's time has come: read it back from disk and attempt it."""
        self._timers.pop(qid, None)
        if qid in self._busy:
            return
        try:
            state, envelope = self.store.read_envelope(qid)
            if state == HOLD:
                return
            if state != ACTIVE:
                self.store.move(qid, state, ACTIVE)
        except FileNotFoundError:
            return  # deleted meanwhile, e.g. by the operator
        except Exception:
            log.failure("{qid}: cannot start delivery", qid=qid)
            self._schedule(qid, self.reactor.seconds() + self.retry_delay)
            return
        self._attempt(envelope)

    # -- the public queue API ---------------------------------------------------------------

    def submit(self, envelope: Envelope) -> "Deferred[None]":
        """A message was just committed to incoming/ (the spool's on_commit): deliver it now."""
        try:
            self.store.move(envelope.queue_id, INCOMING, ACTIVE)
        except OSError:
            log.failure("{qid}: cannot activate", qid=envelope.queue_id)
            self._schedule(envelope.queue_id, self.reactor.seconds() + self.retry_delay)
            return succeed(None)
        self._notify("queued", envelope)
        return self._attempt(envelope)

    def hold(self, qid: str) -> bool:
        """Park a waiting message until released; False if it is being delivered or gone."""
        if qid in self._busy:
            return False
        try:
            state, _ = self.store.read_envelope(qid)
            if state != HOLD:
                self.store.move(qid, state, HOLD)
        except FileNotFoundError:
            return False
        self._unschedule(qid)
        return True

    def release(self, qid: str) -> bool:
        """Put a held message back into the deferred queue, due now."""
        try:
            self.store.move(qid, HOLD, DEFERRED)
        except FileNotFoundError:
            return False
        self._schedule(qid, self.reactor.seconds())
        return True

    def flush(self) -> None:
        """Attempt every waiting message now (postqueue -f)."""
        now = self.reactor.seconds()
        for qid in list(self._timers):
            self._schedule(qid, now)

    # -- one delivery attempt ---------------------------------------------------------------

    def _attempt(self, envelope: Envelope) -> "Deferred[None]":
        """Run one attempt; whatever goes wrong, the message stays queued for a later one."""
        qid = envelope.queue_id
        self._busy.add(qid)
        d = Deferred.fromCoroutine(self._attempt_steps(envelope))
        d.addErrback(self._attempt_failed, qid)
        d.addBoth(_passthrough_after, self._busy.discard, qid)
        return d

    def _attempt_failed(self, failure: Failure, qid: str) -> None:
        log.failure("{qid}: delivery attempt failed", failure, qid=qid)
        if self.running:
            self._schedule(qid, self.reactor.seconds() + self.retry_delay)

    async def _attempt_steps(self, envelope: Envelope) -> None:
        """Route the due recipients, call each agent once, record outcomes, settle."""
        now = self.reactor.seconds()
        due = [i for i, r in enumerate(envelope.recipients) if _is_due(r, now)]
        routes = await self._route_all(envelope, due)
        outcomes: Outcomes = {}
        groups: dict[str, list[tuple[int, Route]]] = {}
        for index, route in routes.items():
            if isinstance(route, Reply):
                outcomes[index] = ("none", route)
            else:
                groups.setdefault(route.agent, []).append((index, route))
        calls = [
            Deferred.fromCoroutine(self._run_agent(envelope, name, pairs))
            for name, pairs in groups.items()
        ]
        for result in await gatherResults(calls):
            outcomes.update(result)
        envelope, bounced = self._apply(envelope, outcomes)
        if bounced:
            await maybeDeferred(self._bounced, envelope, bounced)
        await self._settle(envelope)

    async def _route_all(self, envelope: Envelope, indexes: list[int]) -> dict[int, Route | Reply]:
        """Ask the router about every due recipient at once."""
        answers = [Deferred.fromCoroutine(self._route_one(envelope, i)) for i in indexes]
        return dict(zip(indexes, await gatherResults(answers)))

    async def _route_one(self, envelope: Envelope, index: int) -> Route | Reply:
        """A Route, or the Reply refusing the recipient; a router error defers it."""
        address = envelope.recipients[index].address
        try:
            answer = await maybeDeferred(self.router.route, mailbox_of(address))
            if not isinstance(answer, (Route, Reply)):
                raise TypeError(f"router answered {answer!r}")
            return answer
        except Exception:
            log.failure("{qid}: routing <{addr}> failed", qid=envelope.queue_id, addr=address)
            return LOCAL_ERROR

    async def _run_agent(
        self, envelope: Envelope, name: str, pairs: list[tuple[int, Route]]
    ) -> Outcomes:
        """One agent call for all recipients routed to it; an exception defers them all."""
        agent = self.agents.get(name)
        if agent is None:
            return {i: (name, NO_AGENT) for i, _ in pairs}
        message = StoredMessage(envelope, self.store.data_path(envelope.queue_id))
        handed = [(envelope.recipients[i], route) for i, route in pairs]
        try:
            replies = await maybeDeferred(agent.deliver, message, handed)
            return {
                i: (name, replies.get(r.address, NO_OUTCOME))
                for (i, _), (r, _) in zip(pairs, handed)
            }
        except Exception:
            log.failure("{qid}: agent {agent} failed", qid=envelope.queue_id, agent=name)
            return {i: (name, LOCAL_ERROR) for i, _ in pairs}

    def _apply(self, envelope: Envelope, outcomes: Outcomes) -> tuple[Envelope, list[Recipient]]:
        """Record each recipient's outcome in the envelope and log it; returns the new bounces."""
        now = self.reactor.seconds()
        expired = now - envelope.received_at >= self.max_lifetime
        bounced: list[Recipient] = []
        for index, (agent, reply) in sorted(outcomes.items()):
            recipient = envelope.recipients[index]
            state, status = _outcome(reply, expired)
            envelope = envelope.with_recipient(
                index,
                state=state,
                attempts=recipient.attempts + 1,
                next_attempt=now + self.retry_delay if state == RCPT_DEFERRED else None,
                last_reply=str(reply),
                agent=agent,
                history=recipient.history + (f"{now:.3f} {agent} {reply}",),
            )
            if state == BOUNCED:
                bounced.append(envelope.recipients[index])
            self._notify(_EVENTS[status], envelope, envelope.recipients[index], reply)
            log.info(
                "{qid}: to=<{addr}>, agent={agent}, delay={delay:.2f}, status={status} ({reply})",
                qid=envelope.queue_id, addr=recipient.address, agent=agent,
                delay=now - envelope.received_at, status=status, reply=str(reply),
            )
        return envelope, bounced

    def _notify(self, event: str, *args: Any) -> None:
        """Tell observers; they cannot change the outcome, and their failures are only logged."""
        for observer in self.observers:
            d = maybeDeferred(getattr(observer, event), *args)
            d.addErrback(lambda f, o=observer: log.failure("{o!r}.{e} failed", f, o=o, e=event))

    def _bounced(self, envelope: Envelope, recipients: list[Recipient]) -> "Deferred[None] | None":
        """The one place where permanent failures turn into DSNs (delivered later); the
        message is not removed before what this returns has fired."""
        for recipient in recipients:
            log.info("{qid}: bounce for <{addr}> not sent (no DSN support yet)",
                     qid=envelope.queue_id, addr=recipient.address)
        return None

    async def _settle(self, envelope: Envelope) -> None:
        """Finished messages leave the queue; others wait in deferred/ for their next turn."""
        qid = envelope.queue_id
        if envelope.finished:
            self.store.remove(qid)
            log.info("{qid}: removed", qid=qid)
            return
        # Replace the envelope in place, then one rename: never two copies in two states.
        # If this fails, _attempt_failed retries from the envelope left on disk.
        await self.store.write_envelope(envelope, ACTIVE)
        self.store.move(qid, ACTIVE, DEFERRED)
        due = next_due(envelope)
        if self.running and due is not None:
            self._schedule(qid, due)


def _is_due(recipient: Recipient, now: float) -> bool:
    if recipient.state == PENDING:
        return True
    return recipient.state == RCPT_DEFERRED and (recipient.next_attempt or 0.0) <= now


_EVENTS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}


def _outcome(reply: Reply, expired: bool) -> tuple[str, str]:
    """(recipient state, log status) for a reply; 4xx past the lifetime bounces."""
    if reply.positive:
        return DELIVERED, "sent"
    if reply.transient and not expired:
        return RCPT_DEFERRED, "deferred"
    return BOUNCED, "bounced"


def _passthrough_after(result: object, f: Any, *args: Any) -> object:
    f(*args)
    return result


__all__ = ["QueueManager", "StoredMessage", "mailbox_of", "next_due"]

"""The LMTP sink (RFC 2033): deliver at the end of data and answer once per recipient.

LMTP does not queue. The message streams into a data file of the one queue store (the same
``data/<qid>`` the spool writes, but no envelope is ever committed, so a crash leaves only an
orphan that queue recovery deletes). At the end of data every recipient is routed and handed to
its delivery agent (the Maildir agent for local mailboxes) right away; each recipient's reply
is that agent's verdict, so a 250 means its copy is already fsync'd in its Maildir, and one full
mailbox costs only that recipient a 452.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.envelope import Envelope, Recipient, SessionInfo, Transaction
from mailplat.groupsync import RunInThread, thread_runner
from mailplat.dispatch import NO_OUTCOME, call_agent, route_address
from mailplat.interfaces import IDeliveryAgent, IMessageSink, IRouter, Route
from mailplat.queue import StoredMessage
from mailplat.replies import LOCAL_ERROR, Reply
from mailplat.session import ESMTPFactory, ESMTPSession
from mailplat.spool import SpooledMessage, open_data_file
from mailplat.store import QueueStore

if TYPE_CHECKING:
    from twisted.internet.protocol import Factory

    from mailplat.config import ListenerConfig
    from mailplat.server import MailServer

log = Logger()



@implementer(IMessageSink)
class LMTPSink:
    """Where LMTP sessions put messages: straight to the delivery agents, never the queue."""

    def __init__(
        self,
        store: QueueStore,
        router: IRouter,
        agents: Mapping[str, IDeliveryAgent],
        reactor: Any,
        runInThread: RunInThread | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.agents = agents  # the server's own dict: agents loaded later are seen too
        self.reactor = reactor
        self.runInThread = runInThread or thread_runner(reactor)

    def begin(self, session: SessionInfo, transaction: Transaction) -> LMTPMessage:
        """Open the data file; SpoolError (451/452) when the disk refuses."""
        qid, data = open_data_file(self.store)
        return LMTPMessage(self, qid, data, session, transaction)


class LMTPMessage(SpooledMessage):
    """One message arriving over LMTP; ``complete`` delivers it and says how it went, each."""

    def __init__(
        self, sink: LMTPSink, queue_id: str, data: IO[bytes], session: SessionInfo,
        transaction: Transaction,
    ) -> None:
        super().__init__(sink.store, queue_id, data, session, transaction, sink.reactor)
        self._sink = sink

    def reply_count(self) -> int:
        return max(1, len(self._transaction.recipients))

    def complete(self) -> Deferred[list[Reply]]:
        """Deliver to every recipient now; one Reply each, in RCPT order."""
        d = Deferred.fromCoroutine(self._deliver())
        d.addErrback(self._failed, self.reply_count())
        return d.addBoth(_after, self._discard)

    async def _deliver(self) -> list[Reply]:
        await self._sink.runInThread(_close, self._data)
        envelope = self.envelope()
        message = StoredMessage(envelope, self._sink.store.data_path(self.queue_id))
        replies = await deliver_now(message, self._sink.router, self._sink.agents)
        self._log(envelope, replies)
        return replies

    def _log(self, envelope: Envelope, replies: list[Reply]) -> None:
        for recipient, reply in zip(envelope.recipients, replies):
            status = "sent" if reply.positive else ("deferred" if reply.transient else "bounced")
            log.info("{qid}: to=<{addr}>, via=lmtp, status={status} ({reply})",
                     qid=self.queue_id, addr=recipient.address, status=status, reply=str(reply))

    def _failed(self, failure: Any, count: int) -> list[Reply]:
        log.failure("{qid}: LMTP delivery failed", failure, qid=self.queue_id)
        return [LOCAL_ERROR] * count


async def deliver_now(
    message: StoredMessage, router: IRouter, agents: Mapping[str, IDeliveryAgent]
) -> list[Reply]:
    """Route and deliver every recipient of ``message`` now: one Reply per recipient, in
    envelope order. Refused routes answer for themselves; each agent is called once. An alias
    delivers to each of its final addresses and answers 250 only if all of them got it."""
    recipients = message.envelope.recipients
    resolved = await gatherResults(
        [Deferred.fromCoroutine(_resolve(router, r)) for r in recipients]
    )
    flat = [(index, final, route) for index, finals in enumerate(resolved)
            for final, route in finals]
    groups: dict[str, list[tuple[Recipient, Route]]] = {}
    for _, final, route in flat:
        if isinstance(route, Route):
            groups.setdefault(route.agent, []).append((final, route))
    calls = [Deferred.fromCoroutine(call_agent(agents.get(name), message, pairs))
             for name, pairs in groups.items()]
    answers = dict(zip(groups, await gatherResults(calls)))
    per_recipient: list[list[Reply]] = [[] for _ in recipients]
    for index, final, route in flat:
        if isinstance(route, Reply):
            per_recipient[index].append(route)
        else:
            per_recipient[index].append(answers[route.agent].get(final.address, NO_OUTCOME))
    return [_combined(replies) for replies in per_recipient]


async def _resolve(router: IRouter, recipient: Recipient) -> list[tuple[Recipient, Route | Reply]]:
    """The recipient's route, or for an alias the routes of its final addresses."""
    route = await route_address(router, recipient.address)
    if not isinstance(route, Route) or not route.expansion:
        return [(recipient, route)]
    finals: list[tuple[Recipient, Route | Reply]] = []
    for address in route.expansion:
        final = route if address == recipient.address else await route_address(router, address)
        if isinstance(final, Route) and final.expansion:
            final = replace(final, expansion=())  # finals are final: no second round
        finals.append((replace(recipient, address=address), final))
    return finals


def _combined(replies: list[Reply]) -> Reply:
    """One RCPT's answer from its final addresses' outcomes: a 4xx if any (so the client
    retries), else a 5xx if any, else the first 250."""
    for reply in replies:
        if reply.transient:
            return reply
    for reply in replies:
        if reply.permanent:
            return reply
    return replies[0] if replies else NO_OUTCOME


def _close(data: IO[bytes]) -> None:
    """Blocking: flush the buffered tail so the agents read the whole message. No fsync: the
    copy each agent makes is what must be durable, not this file."""
    try:
        data.flush()
    finally:
        data.close()


def _after(result: object, f: Any) -> object:
    f()
    return result


def lmtp_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """The ``lmtp`` listener profile: LHLO only, each recipient delivered before its reply."""
    from mailplat.listeners import session_settings  # listeners imports this module

    settings = session_settings(server.config, listener, lmtp=True)
    sink = LMTPSink(server.store, server.router, server.agents, reactor)
    return ESMTPFactory(settings, server.policy, sink, reactor, ESMTPSession)


__all__ = ["LMTPSink", "LMTPMessage", "deliver_now", "lmtp_profile"]

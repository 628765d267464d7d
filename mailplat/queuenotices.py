"""The queue's side of delivery status notifications: which outcomes owe the sender a DSN,
queuing them, and the one "delayed" warning per message.

A DSN owed is first recorded in the envelope (``Recipient.dsn``) together with the outcome, and
only cleared once the DSN itself is durably queued; so a full disk or a crash can delay a
notification but never lose it (at worst it is sent twice, like any at-least-once delivery).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailplat import dsn
from mailplat.envelope import BOUNCED, DELIVERED, HELD, Envelope, Recipient
from mailplat.envelope import DEFERRED as RCPT_DEFERRED
from mailplat.interfaces import IStoredMessage
from mailplat.replies import Reply
from mailplat.schedule import RetrySchedule


class QueueParts(Protocol):
    """What QueueManager provides to the notices mixed into it. (QueueManager itself cannot
    be their base for the type checker: it inherits from them.)"""

    reactor: IReactorTime
    schedule: RetrySchedule
    notifier: dsn.Notifier | None

    def stored_message(self, envelope: Envelope) -> IStoredMessage: ...


if TYPE_CHECKING:
    _Base = QueueParts
else:
    _Base = object

log = Logger()


class QueueNotices(_Base):
    """Mixed into QueueManager."""

    def _owed(
        self, envelope: Envelope, recipient: Recipient, state: str, relay: bool, reply: Reply
    ) -> str | None:
        """The DSN action this outcome owes the sender, if NOTIFY asks for one."""
        action = {BOUNCED: dsn.FAILED, DELIVERED: dsn.RELAYED if relay else dsn.DELIVERED}.get(state)
        if action == dsn.RELAYED and isinstance(reply, dsn.PassedOn):
            return None  # the next hop took over the reporting
        if action is None or not dsn.wants(recipient, action):
            return None
        if not envelope.sender:
            if action == dsn.FAILED:
                log.info("{qid}: to=<{addr}>: no bounce: the sender is <> (never bounce a bounce)",
                         qid=envelope.queue_id, addr=recipient.address)
            return None
        return action

    async def _send_owed(self, envelope: Envelope) -> Envelope:
        """Queue one DSN per action owed; what could not be queued stays owed."""
        groups: dict[str, list[int]] = {}
        for index, recipient in enumerate(envelope.recipients):
            if recipient.dsn:
                groups.setdefault(recipient.dsn, []).append(index)
        for action, indexes in groups.items():
            recipients = [envelope.recipients[i] for i in indexes]
            if await self._send_dsn(envelope, action, recipients):
                for index in indexes:
                    envelope = envelope.with_recipient(index, dsn=None)
        return envelope

    async def _warn_delay(self, envelope: Envelope) -> Envelope:
        """One "delayed" DSN per message, once it has waited ``delay_warning``."""
        now = self.reactor.seconds()
        waiting = [r for r in envelope.recipients if r.state in (RCPT_DEFERRED, HELD)]
        if envelope.delay_notified or not waiting:
            return envelope
        if not self.schedule.delay_due(envelope.received_at, now):
            return envelope
        wanted = [r for r in waiting if dsn.wants(r, dsn.DELAYED)]
        if wanted and envelope.sender:
            until = self.schedule.expires(envelope.received_at)
            if not await self._send_dsn(envelope, dsn.DELAYED, wanted, until):
                return envelope  # try again after the next attempt
        return replace(envelope, delay_notified=True)

    async def _send_dsn(
        self, envelope: Envelope, action: str, recipients: list[Recipient],
        retry_until: float | None = None,
    ) -> bool:
        """Queue one DSN; False if that failed (it is then tried again later)."""
        qid, kind = envelope.queue_id, dsn.LOG_KINDS[action]
        if self.notifier is None:
            log.warn("{qid}: sender {kind} notification not sent (no notifier)", qid=qid, kind=kind)
            return True
        message = self.stored_message(envelope)
        try:
            new_qid = await self.notifier.send(message, action, recipients, retry_until)
        except Exception:
            log.failure("{qid}: cannot queue the sender {kind} notification", qid=qid, kind=kind)
            return False
        log.info("{qid}: sender {kind} notification: {new_qid}", qid=qid, kind=kind, new_qid=new_qid)
        return True


def owes_notice(envelope: Envelope) -> bool:
    """A DSN is still owed to the sender (queuing it failed so far)."""
    return any(r.dsn for r in envelope.recipients)


__all__ = ["QueueNotices", "owes_notice"]

"""What an operator may do to the running queue: hold, release, flush, delete, bounce.

Every command first waits until the message has no delivery attempt in flight
(``when_idle``) and then changes the queue directory and the in-memory schedule within one
reactor turn. A command and a delivery therefore never act on the same message at once: a
message is never delivered after ``delete`` or ``hold`` answered, and never twice because of
``flush``. The control socket (mailplat.control) calls these for ``mailplat queue``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailplat.envelope import Envelope
from mailplat.replies import Reply
from mailplat.schedule import DueQueue
from mailplat.store import ACTIVE, DEFERRED, HOLD, INCOMING, QueueStore


class QueueParts(Protocol):
    """What QueueManager provides to the commands mixed into it. (QueueManager itself cannot
    be their base for the type checker: it inherits from them.)"""

    store: QueueStore
    reactor: IReactorTime
    due: DueQueue
    _busy: set[str]
    _forced: dict[str, frozenset[str]]

    def when_idle(self, qid: str) -> Deferred[None]: ...

    def _attempt(self, envelope: Envelope, returned: Reply | None = None) -> Deferred[None]: ...


if TYPE_CHECKING:
    _Base = QueueParts
else:
    _Base = object

log = Logger()

RETURNED = Reply(554, "5.0.0", "Message returned to sender by the mail system administrator")


class QueueCommands(_Base):
    """Mixed into QueueManager."""

    def hold(self, qid: str) -> "Deferred[bool]":
        """Park a message until released; False if there is no such message."""
        return self.when_idle(qid).addCallback(lambda _: self._hold_now(qid))

    def _hold_now(self, qid: str) -> bool:
        state = self.store.state_of(qid)
        if state is None:
            return False
        if state != HOLD:
            self.store.move(qid, state, HOLD)
            log.info("{qid}: placed on hold", qid=qid)
        self.due.unschedule(qid)
        self._forced.pop(qid, None)
        return True

    def release(self, qid: str) -> "Deferred[bool]":
        """Put a held message back into the deferred queue; what is overdue is tried now."""
        return self.when_idle(qid).addCallback(lambda _: self._release_now(qid))

    def _release_now(self, qid: str) -> bool:
        if self.store.state_of(qid) != HOLD:
            return False
        self.store.move(qid, HOLD, DEFERRED)
        log.info("{qid}: released from hold", qid=qid)
        self.due.schedule(qid, self.reactor.seconds())
        return True

    def flush(self, qid: str | None = None, domain: str | None = None) -> "Deferred[int]":
        """Retry now (every waiting message, one, or those with recipients at ``domain``),
        ignoring the schedule; returns how many messages will be tried."""
        domain = (domain or "").lower()
        if qid is not None:
            return self.when_idle(qid).addCallback(lambda _: self._flush_now([qid], domain))
        ids = self.due.ids()
        if not domain:
            return succeed(self._flush_now(ids, domain))
        d = self.store.in_thread(self.store.select, ids, _has_recipient_at(domain))
        return d.addCallback(self._flush_now, domain)

    def _flush_now(self, ids: list[str], domain: str) -> int:
        now, count = self.reactor.seconds(), 0
        for qid in ids:
            if qid in self._busy or self.store.state_of(qid) in (None, HOLD):
                continue
            self._forced[qid] = frozenset({domain} if domain else ())
            self.due.schedule(qid, now)
            count += 1
        if count:
            log.info("flush: {count} messages to be tried now", count=count)
        return count

    def deliver_now(self, qid: str, domains: Iterable[str] = ()) -> "Deferred[bool]":
        """Attempt a message now, its waiting recipients at ``domains`` (all when empty) too,
        and fire once that attempt has settled; False if it is gone, on hold or not yet
        queued. ODMR and ETRN use it to release a site's held mail one message at a time."""
        forced = frozenset(domain.lower() for domain in domains)
        return self.when_idle(qid).addCallback(lambda _: self._deliver_now(qid, forced))

    def _deliver_now(self, qid: str, forced: frozenset[str]) -> "Deferred[bool]":
        try:
            state, envelope = self.store.read_envelope(qid)
            if state in (HOLD, INCOMING):
                return succeed(False)
            if state != ACTIVE:
                self.store.move(qid, state, ACTIVE)
        except OSError:
            return succeed(False)
        self.due.unschedule(qid)
        self._forced[qid] = forced
        return self._attempt(envelope).addCallback(lambda _: True)

    def delete(self, qid: str) -> "Deferred[bool]":
        """Remove a message for good (its delivered recipients stay delivered)."""
        return self.when_idle(qid).addCallback(lambda _: self._delete_now(qid))

    def _delete_now(self, qid: str) -> bool:
        if self.store.state_of(qid) is None:
            return False
        self.due.unschedule(qid)
        self._forced.pop(qid, None)
        self.store.remove(qid)
        log.info("{qid}: removed (deleted by the operator)", qid=qid)
        return True

    def delete_deferred(self) -> "Deferred[int]":
        """Delete every message in the deferred queue; returns how many went."""
        deletions = [self.delete(qid) for qid in self.store.list_ids(DEFERRED)]
        return gatherResults(deletions).addCallback(sum)

    def bounce(self, qid: str) -> "Deferred[bool]":
        """Give up on a message now: its unfinished recipients fail and the sender gets a
        DSN (unless NOTIFY says otherwise). Fires once the message has left the queue."""
        return self.when_idle(qid).addCallback(lambda _: self._bounce_now(qid))

    def _bounce_now(self, qid: str) -> "Deferred[bool]":
        try:
            state, envelope = self.store.read_envelope(qid)
        except FileNotFoundError:
            return succeed(False)
        if state != ACTIVE:
            self.store.move(qid, state, ACTIVE)
        self.due.unschedule(qid)
        self._forced.pop(qid, None)
        log.info("{qid}: returned to sender by the operator", qid=qid)
        return self._attempt(envelope, RETURNED).addCallback(lambda _: True)


def _has_recipient_at(domain: str) -> Any:
    def matches(envelope: Envelope) -> bool:
        return any(
            not r.finished and r.address.rpartition("@")[2].lower() == domain
            for r in envelope.recipients
        )

    return matches


__all__ = ["RETURNED", "QueueCommands"]

"""Test doubles for mailplat and for plugin authors (no disk, no threads, no network).

- ``RecordingAgent``: a delivery agent that records what it was given and answers configured
  replies.
- ``MemorySink``: an IMessageSink that keeps messages in memory, for protocol tests.
- ``StaticRouter``: an IRouter over a dict of routes.
- ``FakeResolver``: a twisted.names resolver over a table, for DNS-using plugins;
  ``session_info`` makes a SessionInfo with its own session id (for hook notes).
- ``run_synchronously`` and ``ManualThreads``: ``runInThread`` stand-ins, so code that would
  fsync in a thread can be tested step by step with a ``Clock``.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailplat.envelope import Envelope, Recipient, SessionInfo, Transaction
from mailplat.interfaces import (
    IDeliveryAgent,
    IIncomingMessage,
    IMessageSink,
    IRouter,
    IStoredMessage,
    Route,
    SpoolError,
)
from mailplat.replies import Reply

DELIVERED_OK = Reply(250, "2.0.0", "Ok")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")

Replies = Callable[[Recipient, Route], Reply] | dict[str, Reply] | None


def run_synchronously(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """A ``runInThread`` that runs ``f`` at once on the calling thread."""
    return maybeDeferred(f, *args)


class ManualThreads:
    """A ``runInThread`` that only runs a call when the test says so, to check ordering."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    @property
    def pending(self) -> int:
        return len(self.calls)

    def run_next(self) -> None:
        """Run the oldest waiting call and fire its Deferred with the outcome."""
        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)

    def run_all(self) -> None:
        """Run waiting calls, including those queued by the calls themselves, until none is left."""
        while self.calls:
            self.run_next()


@dataclass
class Delivery:
    """What one ``deliver`` call received."""

    envelope: Envelope
    recipients: list[tuple[Recipient, Route]]
    data: bytes
    replies: dict[str, Reply] = field(default_factory=dict)


@implementer(IDeliveryAgent)
class RecordingAgent:
    """Records deliveries and answers each recipient from ``replies`` (default 250).

    ``replies`` is a dict from address to Reply (missing addresses get 250), or a callable
    ``(Recipient, Route) -> Reply``; if the callable raises, the whole delivery fails.
    """

    def __init__(self, name: str = "recording", replies: Replies = None) -> None:
        self.name = name
        self.replies = replies
        self.deliveries: list[Delivery] = []

    def deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> "Deferred[dict[str, Reply]]":
        with message.open() as f:
            data = f.read()
        delivery = Delivery(message.envelope, list(recipients), data)
        self.deliveries.append(delivery)
        try:
            delivery.replies = {r.address: self._reply(r, route) for r, route in recipients}
        except Exception:
            return fail()
        return succeed(dict(delivery.replies))

    def _reply(self, recipient: Recipient, route: Route) -> Reply:
        if callable(self.replies):
            return self.replies(recipient, route)
        if self.replies is None:
            return DELIVERED_OK
        return self.replies.get(recipient.address, DELIVERED_OK)

    @property
    def delivered_to(self) -> list[str]:
        """Every address handed to this agent, in order (repeats show retries)."""
        return [r.address for d in self.deliveries for r, _ in d.recipients]


@dataclass
class SinkMessage:
    """A message finished into a MemorySink."""

    session: SessionInfo
    transaction: Transaction
    data: bytes
    queue_id: str


@implementer(IMessageSink)
class MemorySink:
    """An in-memory IMessageSink; set ``fail_on`` to "begin", "write" or "finish" together
    with ``error`` (a SpoolError) to make that step fail."""

    def __init__(self, fail_on: str | None = None, error: SpoolError | None = None) -> None:
        self.fail_on = fail_on
        self.error = error or SpoolError(Reply(451, "4.3.0", "Local error in processing"))
        self.messages: list[SinkMessage] = []
        self.aborted: list[str] = []
        self._ids = itertools.count(1)

    def begin(self, session: SessionInfo, transaction: Transaction) -> "MemoryMessage":
        if self.fail_on == "begin":
            raise self.error
        return MemoryMessage(self, f"MEM{next(self._ids):06d}", session, transaction)

    @property
    def finished(self) -> list[tuple[SessionInfo, Transaction, bytes]]:
        return [(m.session, m.transaction, m.data) for m in self.messages]


@implementer(IIncomingMessage)
class MemoryMessage:
    """One message of a MemorySink."""

    def __init__(
        self, sink: MemorySink, queue_id: str, session: SessionInfo, transaction: Transaction
    ) -> None:
        self.queue_id = queue_id
        self._sink = sink
        self._session = session
        self._transaction = transaction
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self._sink.fail_on == "write":
            raise self._sink.error
        self._chunks.append(data)

    def finish(self, transaction: Transaction | None = None) -> "Deferred[list[Reply]]":
        transaction = transaction or self._transaction
        count = len(transaction.recipients) if self._session.protocol.startswith("LMTP") else 1
        if self._sink.fail_on == "finish":
            return succeed([self._sink.error.reply] * max(1, count))
        data = b"".join(self._chunks)
        self._sink.messages.append(SinkMessage(self._session, transaction, data, self.queue_id))
        return succeed([Reply(250, "2.0.0", f"Ok: queued as {self.queue_id}")] * max(1, count))

    def open(self) -> IO[bytes]:
        """What was written so far, as the data hook may read it back."""
        return io.BytesIO(b"".join(self._chunks))

    def abort(self) -> None:
        self._sink.aborted.append(self.queue_id)


@implementer(IRouter)
class StaticRouter:
    """Routes by exact address (domain case-insensitive), then by ``@domain``, else ``default``
    (None means 550 5.1.1 "No such user here")."""

    def __init__(self, routes: dict[str, Route], default: Reply | None = None) -> None:
        self.routes = {_normalize(k): v for k, v in routes.items()}
        self.default = default or NO_SUCH_USER
        self.asked: list[str] = []

    def route(self, recipient: Any) -> "Deferred[Route | Reply]":
        address = _address_of(recipient)
        self.asked.append(address)
        local, _, domain = address.rpartition("@")
        for key in (_normalize(address), "@" + domain.lower()):
            if key in self.routes:
                return succeed(self.routes[key])
        return succeed(self.default)


def _address_of(mailbox: Any) -> str:
    """``local@domain`` of a Mailbox (or of anything whose str() is the address)."""
    local, domain = getattr(mailbox, "local", None), getattr(mailbox, "domain", None)
    if local is not None and domain is not None:
        return f"{local}@{domain}" if domain else str(local)
    return str(mailbox)


def _normalize(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


_session_ids = itertools.count(1)


def session_info(**fields: Any) -> SessionInfo:
    """A SessionInfo with a fresh session_id (as the engine gives each connection), so that
    policy hooks called directly by a test keep their notes apart."""
    fields.setdefault("session_id", f"T{next(_session_ids)}")
    return SessionInfo(**fields)


class FakeResolver(ResolverBase):
    """A twisted.names resolver answering from a table, for plugin tests without a network.

    Names never added are NXDOMAIN; an added name without records of the asked type answers
    with no data. ``fail(name, type, error)`` makes a lookup fail (a DNSServerError is SERVFAIL,
    a DNSQueryTimeoutError a timeout); with ``hold = True`` answers wait for ``release()``.
    ``queries`` lists every (name, type) asked.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: dict[str, list[dns.RRHeader]] = {}
        self.errors: dict[tuple[str, int], Exception] = {}
        self.queries: list[tuple[str, int]] = []
        self.hold = False
        self.held: list[tuple[Deferred[Any], Callable[[], Deferred[Any]]]] = []

    def add(self, name: str, *payloads: Any, ttl: int = 300) -> None:
        for payload in payloads:
            header = dns.RRHeader(name.encode("idna"), payload.TYPE, dns.IN, ttl, payload)
            self.records.setdefault(_dns_key(name), []).append(header)

    def add_a(self, name: str, *addresses: str) -> None:
        self.add(name, *(dns.Record_A(a) for a in addresses))

    def add_aaaa(self, name: str, *addresses: str) -> None:
        self.add(name, *(dns.Record_AAAA(a) for a in addresses))

    def add_txt(self, name: str, *texts: str | bytes) -> None:
        self.add(name, *(dns.Record_TXT(t.encode() if isinstance(t, str) else t) for t in texts))

    def add_mx(self, name: str, preference: int, exchange: str) -> None:
        self.add(name, dns.Record_MX(preference, exchange.encode("idna")))

    def fail(self, name: str, qtype: int, error: Exception) -> None:
        self.errors[(_dns_key(name), qtype)] = error

    def _lookup(self, name: Any, cls: int, qtype: int, timeout: Any) -> "Deferred[Any]":
        key = _dns_key(name.decode("idna") if isinstance(name, bytes) else str(name))
        self.queries.append((key, qtype))

        def answer() -> "Deferred[Any]":
            if (key, qtype) in self.errors:
                return fail(self.errors[(key, qtype)])
            if key not in self.records:
                return fail(DNSNameError(key))
            return succeed(([r for r in self.records[key] if r.type == qtype], [], []))

        if not self.hold:
            return answer()
        d: Deferred[Any] = Deferred()
        self.held.append((d, answer))
        return d

    def release(self) -> None:
        """Answer every held lookup."""
        held, self.held = self.held, []
        for d, answer in held:
            answer().chainDeferred(d)


def _dns_key(name: str) -> str:
    return name.lower().rstrip(".")

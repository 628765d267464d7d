"""Test doubles for mailplat and for plugin authors (no disk, no threads, no network).

- ``RecordingAgent``: a delivery agent that records what it was given and answers configured
  replies.
- ``MemorySink``: an IMessageSink that keeps messages in memory, for protocol tests.
- ``StaticRouter``: an IRouter over a dict of routes.
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

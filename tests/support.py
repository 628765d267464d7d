"""Shared test fixtures: a session on a StringTransport, a scriptable policy."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailplat.interfaces import CONTINUE, IPolicy, Verdict
from mailplat.session import ESMTPSession, SessionSettings
from mailplat.testing import MemorySink


@implementer(IPolicy)
class ScriptedPolicy:
    """Accepts everything except what a test scripts: ``answers[(stage, value)] = Verdict``
    or a Deferred the test fires later."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Any] = {}
        self.calls: list[tuple[str, str]] = []

    def _answer(self, stage: str, value: str) -> "Deferred[Verdict]":
        self.calls.append((stage, value))
        answer = self.answers.get((stage, value), CONTINUE)
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def connect(self, session: Any) -> "Deferred[Verdict]":
        return self._answer("connect", session.peer_host)

    def helo(self, session: Any, name: str) -> "Deferred[Verdict]":
        return self._answer("helo", name)

    def mail(self, session: Any, sender: Any, params: Any) -> "Deferred[Verdict]":
        return self._answer("mail", str(sender) if sender else "")

    def rcpt(self, session: Any, transaction: Any, recipient: Any, params: Any) -> "Deferred[Verdict]":
        return self._answer("rcpt", str(recipient))

    def data(self, session: Any, transaction: Any, headers: bytes) -> "Deferred[Verdict]":
        return self._answer("data", transaction.sender)


class Client:
    """Drives one session through a StringTransport the way a client would."""

    def __init__(self, session_class: type[ESMTPSession] = ESMTPSession, sink: Any = None,
                 policy: Any = None, **settings: Any) -> None:
        self.clock = Clock()
        self.sink = sink if sink is not None else MemorySink()
        self.policy = policy if policy is not None else ScriptedPolicy()
        settings.setdefault("hostname", "mx.test")
        self.session = session_class(SessionSettings(**settings), self.policy, self.sink, self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.session.makeConnection(self.transport)

    def send(self, data: bytes, chunks: list[int] | None = None) -> list[bytes]:
        """Send bytes (optionally split at the given sizes) and return the reply lines."""
        pieces = _split(data, chunks) if chunks else [data]
        for piece in pieces:
            self.session.dataReceived(piece)
        return self.take()

    def take(self) -> list[bytes]:
        out = self.transport.value()
        self.transport.clear()
        return out.splitlines()

    def codes(self, data: bytes, chunks: list[int] | None = None) -> list[str]:
        """Final reply lines' first words (code + enhanced code) for compact assertions."""
        return [_head(line) for line in self.send(data, chunks) if line[3:4] == b" "]


def _head(line: bytes) -> str:
    parts = line.decode().split(" ")
    return " ".join(parts[:2]) if len(parts) > 1 and parts[1][:1].isdigit() else parts[0]


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        pieces.append(data[at:at + max(1, size)])
        at += max(1, size)
    pieces.append(data[at:])
    return [p for p in pieces if p]

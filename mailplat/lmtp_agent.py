"""The ``lmtp`` delivery agent: queued mail into an LMTP server (Dovecot, Cyrus), as Postfix's
and Exim's lmtp transports do.

The destination is a Twisted client endpoint string ("unix:/run/dovecot/lmtp",
"tcp:host=127.0.0.1:port=24") from the route (``[domains."x"] lmtp = ...``) or, failing that,
``[agent.lmtp] endpoint``. The LMTP server answers each recipient on its own (RFC 2033), and
that reply goes straight back to the queue: 2xx delivered, 4xx deferred, 5xx bounced. Trouble
reaching the server is always a 4xx, so a stopped Dovecot delays mail instead of bouncing it.
Connections are kept for a short while and reused by the next message to the same server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.client import ClientError, SMTPClient, Timeouts, connect
from mailplat.clientwire import envelope_params
from mailplat.envelope import Recipient
from mailplat.interfaces import IDeliveryAgent, IStoredMessage, Route
from mailplat.replies import Reply

log = Logger()

NO_ENDPOINT = Reply(451, "4.3.5", "No LMTP server configured for this recipient")
Connector = Callable[[str], "Deferred[SMTPClient]"]
Pairs = list[tuple[Recipient, Route]]

DEFAULTS: dict[str, Any] = {
    "endpoint": None,
    "connect_timeout": 30.0,
    "idle_timeout": 10.0,
    "max_idle": 4,
}


class ConnectionPool:
    """Idle, greeted clients per destination; each one is closed after ``idle_timeout``."""

    def __init__(
        self, connector: Connector, clock: IReactorTime, idle_timeout: float, max_idle: int
    ) -> None:
        self.connector = connector
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.connections_made = 0  # lets tests and metrics see the reuse
        self._idle: dict[str, list[tuple[SMTPClient, IDelayedCall]]] = {}

    def acquire(self, destination: str) -> Deferred[SMTPClient]:
        """An idle connection to ``destination`` that is still usable, or a new one."""
        idle = self._idle.get(destination, [])
        while idle:
            client, timer = idle.pop()
            if timer.active():
                timer.cancel()
            if client.usable:
                return succeed(client)
        self.connections_made += 1
        return self.connector(destination)

    def release(self, destination: str, client: SMTPClient) -> None:
        """Keep a usable connection for the next message, or let it go."""
        idle = self._idle.setdefault(destination, [])
        if not client.usable or len(idle) >= self.max_idle:
            client.quit()
            return
        timer = self.clock.callLater(self.idle_timeout, self._expire, destination, client)
        idle.append((client, timer))

    def _expire(self, destination: str, client: SMTPClient) -> None:
        idle = self._idle.get(destination, [])
        self._idle[destination] = [(c, t) for c, t in idle if c is not client]
        client.quit()

    def idle(self, destination: str) -> list[SMTPClient]:
        """The connections to ``destination`` waiting for a message."""
        return [client for client, _ in self._idle.get(destination, [])]

    def close(self) -> Deferred[list[Reply]]:
        """QUIT every idle connection (at shutdown); fires when all have answered."""
        quits = []
        for entries in self._idle.values():
            for client, timer in entries:
                if timer.active():
                    timer.cancel()
                quits.append(client.quit())
        self._idle.clear()
        return gatherResults(quits)


@implementer(IDeliveryAgent)
class LMTPAgent:
    """Delivers to LMTP servers, one transaction per message and server, RCPTs pipelined."""

    name = "lmtp"

    def __init__(
        self, hostname: str, reactor: Any, endpoint: str | None = None,
        connect_timeout: float = 30.0, idle_timeout: float = 10.0, max_idle: int = 4,
        connector: Connector | None = None, timeouts: Timeouts | None = None,
    ) -> None:
        self.hostname = hostname
        self.reactor = reactor
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.timeouts = timeouts
        self.pool = ConnectionPool(connector or self._connect, reactor, idle_timeout, max_idle)

    def _connect(self, destination: str) -> Deferred[SMTPClient]:
        endpoint = clientFromString(self.reactor, destination)
        d = connect(endpoint, self.hostname, self.reactor, lmtp=True, timeouts=self.timeouts)
        return d.addTimeout(self.connect_timeout, self.reactor)

    def deliver(self, message: IStoredMessage, recipients: Pairs) -> Deferred[dict[str, Reply]]:
        """Group recipients by LMTP server and deliver to each server once, in parallel."""
        return Deferred.fromCoroutine(self._deliver(message, list(recipients)))

    async def _deliver(self, message: IStoredMessage, recipients: Pairs) -> dict[str, Reply]:
        outcomes: dict[str, Reply] = {}
        groups: dict[str, Pairs] = {}
        for recipient, route in recipients:
            destination = route.destination or self.endpoint
            if destination:
                groups.setdefault(destination, []).append((recipient, route))
            else:
                outcomes[recipient.address] = NO_ENDPOINT
        calls = [Deferred.fromCoroutine(self._deliver_to(d, message, pairs))
                 for d, pairs in groups.items()]
        for result in await gatherResults(calls):
            outcomes.update(result)
        return outcomes

    async def _deliver_to(
        self, destination: str, message: IStoredMessage, pairs: Pairs
    ) -> dict[str, Reply]:
        """One LMTP transaction; each envelope recipient gets its RCPT address's reply."""
        sent_as = {r.address: route.mailbox or r.address for r, route in pairs}
        for _ in range(2):  # a second try only when a reused connection had died unnoticed
            made = self.pool.connections_made
            try:
                client = await self.pool.acquire(destination)
            except Exception as error:  # refused, unreachable, timed out, 5xx greeting...
                reply = _unreachable(destination, error)
                log.warn("LMTP server {dest} unavailable: {reply}", dest=destination,
                         reply=str(reply))
                return {address: reply for address in sent_as}
            seen = client.replies_seen
            replies = await self._send(client, destination, message, sent_as)
            reused = self.pool.connections_made == made
            if not (reused and client.replies_seen == seen and not client.usable):
                break  # the server answered something: these outcomes are real
        return {address: _as_outcome(replies.get(rcpt)) for address, rcpt in sent_as.items()}

    async def _send(self, client: SMTPClient, destination: str, message: IStoredMessage,
                    sent_as: dict[str, str]) -> dict[str, Reply]:
        """One transaction; the connection goes back to the pool whatever happens. A reused
        connection that died before any reply has sent no message data, so a retry on a new
        one cannot duplicate the message."""
        envelope = message.envelope
        try:
            with message.open() as source:
                return await client.send(
                    envelope.sender, list(dict.fromkeys(sent_as.values())), source,
                    envelope_params(envelope, sent_as),
                )
        finally:
            self.pool.release(destination, client)


def _unreachable(destination: str, error: BaseException) -> Reply:
    """Why no session could be had, as a 4xx: the mailbox server is ours to fix, not the
    sender's problem, so even a 5xx greeting defers rather than bounces."""
    if isinstance(error, ClientError):
        said = error.reply
        return Reply(451, "4.4.0", f"LMTP server {destination} said: {said}")
    return Reply(451, "4.4.1", f"Cannot connect to LMTP server {destination}: {error}")


def _as_outcome(reply: Reply | None) -> Reply:
    return reply or Reply(451, "4.3.0", "LMTP server gave no reply for this recipient")


def config_problems(raw: Mapping[str, Any]) -> Iterable[tuple[tuple[str | int, ...], str]]:
    """Check ``[agent.lmtp]``: known keys, a valid endpoint, positive numbers."""
    from mailplat.config import client_endpoint_problem, parse_duration

    section = raw.get("agent", {}).get("lmtp", {}) if isinstance(raw.get("agent"), dict) else {}
    if not isinstance(section, dict):
        yield ("agent", "lmtp"), "must be a table: [agent.lmtp]"
        return
    for key, value in section.items():
        path = ("agent", "lmtp", key)
        if key not in DEFAULTS:
            yield path, f"unknown key (known: {', '.join(sorted(DEFAULTS))})"
        elif key == "endpoint":
            problem = client_endpoint_problem(value) if isinstance(value, str) else "not a string"
            if problem:
                yield path, f"bad endpoint {value!r}: {problem}"
        elif key == "max_idle" and not (type(value) is int and value >= 0):
            yield path, f"{value!r} is not a number of connections (0 or more)"
        elif key != "max_idle":
            try:
                parse_duration(value)
            except ValueError as error:
                yield path, str(error)


def make_agent(section: Mapping[str, Any], hostname: str, reactor: Any) -> LMTPAgent:
    """The agent for a checked ``[agent.lmtp]`` section."""
    from mailplat.config import parse_duration

    settings = {**DEFAULTS, **section}
    return LMTPAgent(
        hostname, reactor, endpoint=settings["endpoint"],
        connect_timeout=parse_duration(settings["connect_timeout"]),
        idle_timeout=parse_duration(settings["idle_timeout"]),
        max_idle=int(settings["max_idle"]),
    )


__all__ = ["ConnectionPool", "LMTPAgent", "config_problems", "make_agent"]

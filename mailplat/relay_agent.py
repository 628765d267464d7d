"""The ``smtp`` delivery agent: mail for other domains, by MX (RFC 5321 §5) or via a smarthost.

For each next hop (``Route.destination``: a domain, ``host:port`` with MX lookup, or
``[host]:port`` without) the agent resolves the mail exchangers (dns.py), then tries their
addresses in order: a refused or timed-out connection, a 4xx greeting or a TLS failure moves on
to the next one. Once a session is up (relay_session.py: STARTTLS per policy, AUTH for the
smarthost), the message goes through the one SMTP client (client.py) and every recipient gets
its own reply back to the queue: 2xx delivered, 4xx retried later, 5xx bounced. DNS trouble
and unreachable hosts are always 4xx; only definite answers bounce. With ``mta_sts`` on, a
domain's enforced MTA-STS policy (mtasts.py) limits the MX hosts and demands verified TLS.

Sessions that end a transaction cleanly wait a few seconds in a small pool, so the next
message to the same host and policy reuses the connection instead of opening another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.client import Timeouts
from mailplat.clientwire import envelope_params
from mailplat.dns import MailResolver, ResolutionError, make_resolver
from mailplat.envelope import Recipient
from mailplat.interfaces import AgentContext, IDeliveryAgent, IStoredMessage, Route
from mailplat.mtasts import MTASTS, PolicyFetcher
from mailplat.relay_session import (
    MAY, NONE, VERIFY, Credentials, RelaySession, SessionFailure, Target, TLSSettings, open_session,
)
from mailplat.replies import Reply
from mailplat.routeconfig import (
    DEFAULT_TLS_POLICY, TLS_POLICIES, OutboundSettings, SettingError, domain_key, is_ip, outbound_settings,
    parse_nexthop,
)

log = Logger()

MAX_TARGETS = 10  # addresses tried per attempt; the queue retries the rest later
BAD_HOP = Reply(451, "4.3.5", "Mail system configuration error: bad next hop")
NO_STS_MX = Reply(451, "4.7.5", "No MX host matches the domain's MTA-STS policy")
NO_PASSWORD = Reply(451, "4.3.5", "Mail system configuration error: smarthost password unreadable")
PoolKey = tuple[Target, str, str | None]


class SessionPool:
    """Idle sessions by (target, TLS policy, login); each says QUIT after ``idle_timeout``."""

    def __init__(self, reactor: Any, idle_timeout: float, max_messages: int) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._idle: dict[PoolKey, list[tuple[RelaySession, IDelayedCall]]] = {}

    def take(self, key: PoolKey) -> RelaySession | None:
        """An idle session still able to start a transaction, or None."""
        waiting = self._idle.get(key, [])
        while waiting:
            session, timer = waiting.pop()
            if timer.active():
                timer.cancel()
            if session.client.usable:
                return session
        return None

    def put(self, key: PoolKey, session: RelaySession) -> None:
        """Keep a session for the next message, or QUIT it when it has done enough."""
        if not session.client.usable:
            return
        if self.idle_timeout <= 0 or session.messages >= self.max_messages:
            session.client.quit()
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, timer))

    def _expire(self, key: PoolKey, session: RelaySession) -> None:
        waiting = self._idle.get(key, [])
        self._idle[key] = [(s, t) for s, t in waiting if s is not session]
        session.client.quit()

    def close(self) -> Deferred[Any]:
        """QUIT every idle session (server shutdown, tests)."""
        quits = []
        for waiting in self._idle.values():
            for session, timer in waiting:
                if timer.active():
                    timer.cancel()
                quits.append(session.client.quit())
        self._idle.clear()
        return gatherResults(quits)

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._idle.values())


@implementer(IDeliveryAgent)
class RelayAgent:
    """Delivers to other mail servers; see the module docstring."""

    name = "smtp"

    def __init__(
        self, resolver: MailResolver, settings: OutboundSettings, reactor: Any, hostname: str,
        credentials: Credentials | None = None, timeouts: Timeouts | None = None,
    ) -> None:
        self.resolver = resolver
        self.settings = settings
        self.reactor = reactor
        self.helo = settings.helo_name or hostname
        self.credentials = credentials
        self.timeouts = timeouts
        self.tls = TLSSettings(settings.ca_file)
        self.pool = SessionPool(reactor, settings.idle_timeout, settings.max_per_connection)
        self.mta_sts: MTASTS | None = None
        if settings.mta_sts:
            fetcher = PolicyFetcher(reactor, resolver, self.tls.trust, settings.mta_sts_port,
                                    settings.connect_timeout)
            self.mta_sts = MTASTS(resolver, fetcher, reactor)

    def deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> Deferred[dict[str, Reply]]:
        return Deferred.fromCoroutine(self._deliver(message, recipients))

    def close(self) -> Deferred[Any]:
        return self.pool.close()

    async def _deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> dict[str, Reply]:
        """One attempt per next hop, all hops at once."""
        by_hop: dict[str, list[str]] = {}
        for recipient, route in recipients:
            by_hop.setdefault(route.destination, []).append(recipient.address)
        results = await gatherResults([
            Deferred.fromCoroutine(self._to_hop(message, hop, addresses))
            for hop, addresses in by_hop.items()
        ])
        return {address: reply for result in results for address, reply in result.items()}

    async def _to_hop(
        self, message: IStoredMessage, destination: str, addresses: list[str]
    ) -> dict[str, Reply]:
        try:
            targets = await self._targets(destination)
        except SettingError:
            log.error("bad next hop {hop!r} in a route", hop=destination)
            return dict.fromkeys(addresses, BAD_HOP)
        except ResolutionError as error:
            return dict.fromkeys(addresses, error.reply)
        credentials = self.credentials if self._is_smarthost(destination) else None
        if credentials is not None and not credentials.password:
            return dict.fromkeys(addresses, NO_PASSWORD)
        policy = self.policy_for(destination, addresses)
        targets, policy = await self._apply_mta_sts(destination, targets, policy)
        if not targets:
            return dict.fromkeys(addresses, NO_STS_MX)
        failures: list[SessionFailure] = []
        for target in targets[:MAX_TARGETS]:
            session = await self._session(target, policy, credentials)
            if isinstance(session, SessionFailure):
                log.info("{qid}: {why}; trying the next host", qid=message.envelope.queue_id,
                         why=str(session.reply))
                failures.append(session)
                continue
            key = (target, policy, credentials.username if credentials else None)
            return await self._send(session, key, message, addresses)
        return dict.fromkeys(addresses, give_up(failures))

    async def _targets(self, destination: str) -> list[Target]:
        """Every address to try, in order: MX preference, then each host's addresses."""
        hop = parse_nexthop(destination)
        port = hop.port or self.settings.port
        if is_ip(hop.host):
            return [Target(hop.host, hop.host, port)]
        if hop.mx:
            exchanges = await self.resolver.exchanges(hop.host)
        else:
            exchanges = await self.resolver.host(hop.host)
        return [Target(e.name, address, port) for e in exchanges for address in e.addresses]

    async def _session(
        self, target: Target, policy: str, credentials: Credentials | None
    ) -> RelaySession | SessionFailure:
        """A pooled session, else a new one; ``may`` falls back to plaintext once when the
        TLS handshake fails (as Postfix does), never for ``encrypt`` or ``verify``."""
        pooled = self.pool.take((target, policy, credentials.username if credentials else None))
        if pooled is not None:
            return pooled
        try:
            return await self._open(target, policy, credentials)
        except SessionFailure as failure:
            if not (failure.plain_retry and policy == MAY):
                return failure
        try:
            return await self._open(target, NONE, credentials)
        except SessionFailure as failure:
            return failure

    async def _open(
        self, target: Target, policy: str, credentials: Credentials | None
    ) -> RelaySession:
        return await open_session(
            target, policy, self.tls, self.reactor, self.helo, self.settings.connect_timeout,
            credentials, self.timeouts,
        )

    async def _send(
        self, session: RelaySession, key: PoolKey, message: IStoredMessage, addresses: list[str]
    ) -> dict[str, Reply]:
        envelope = message.envelope
        with message.open() as source:
            outcomes = await session.client.send(
                envelope.sender, addresses, source, envelope_params(envelope)
            )
        session.messages += 1
        self.pool.put(key, session)
        return outcomes

    async def _apply_mta_sts(
        self, destination: str, targets: list[Target], policy: str
    ) -> tuple[list[Target], str]:
        """Under an enforced MTA-STS policy only matching MX hosts remain, each verified;
        "testing" only logs what enforcement would refuse (RFC 8461 §5)."""
        hop = parse_nexthop(destination)
        if self.mta_sts is None or not hop.mx or is_ip(hop.host):
            return targets, policy
        sts = await self.mta_sts.policy(hop.host)
        if sts is None:
            return targets, policy
        allowed = [t for t in targets if sts.matches(t.name)]
        if sts.mode == "testing":
            for target in set(targets) - set(allowed):
                log.info("MTA-STS (testing) of {domain} would refuse MX {mx}",
                         domain=hop.host, mx=target.name)
            return targets, policy
        return allowed, VERIFY

    def policy_for(self, destination: str, addresses: Sequence[str] = ()) -> str:
        """The TLS policy set for the next hop as routed, its host, or a recipient domain
        (the strictest if several are set), else the "*" entry, else "may"."""
        policies = self.settings.tls_policy
        keys = {destination, _hop_host(destination), *(a.rpartition("@")[2] for a in addresses)}
        found = [str(policies[domain_key(k)]) for k in keys if k and domain_key(k) in policies]
        if found:
            return max(found, key=TLS_POLICIES.index)  # listed from weakest to strictest
        return str(policies.get("*", DEFAULT_TLS_POLICY))

    def _is_smarthost(self, destination: str) -> bool:
        return bool(self.settings.smarthost) and destination == self.settings.smarthost


def _hop_host(destination: str) -> str:
    try:
        return parse_nexthop(destination).host
    except SettingError:
        return ""


def give_up(failures: list[SessionFailure]) -> Reply:
    """Why no host took the message: a bounce only if every host refused us with 5xx
    (RFC 5321 §3.8 "no SMTP service here"), otherwise the last reason, as a deferral."""
    if not failures:
        return Reply(451, "4.4.4", "No mail exchanger address to try")
    last = failures[-1].reply
    if all(failure.refused for failure in failures):
        return last
    transient = [f.reply for f in failures if f.reply.transient]
    if transient:
        return transient[-1]
    return Reply(451, "4.4.1", f"no host accepted a session; last: {last}")


def read_credentials(settings: OutboundSettings) -> Credentials | None:
    """The smarthost login; the password file is read once, at start (before privileges drop)."""
    if not settings.smarthost_username or not settings.smarthost_password_file:
        return None
    try:
        with open(settings.smarthost_password_file, encoding="utf-8") as f:
            password = f.read().strip("\r\n")
    except OSError as error:
        log.error("cannot read smarthost password file: {error}", error=error.strerror)
        password = ""
    return Credentials(settings.smarthost_username, password)


def make_agent(context: AgentContext, overrides: Mapping[str, Any] | None = None) -> RelayAgent:
    """The agent for a server: settings from the whole config (see routeconfig.py)."""
    raw = context.config.raw if context.config is not None else {}
    settings = outbound_settings(raw)
    resolver = context.resolver
    if resolver is None:
        resolver = make_resolver(settings.nameservers, context.reactor, settings.dns_timeout)
    mail_resolver = MailResolver(resolver, settings.families, hostname=context.hostname,
                                 timeout=settings.dns_timeout)
    return RelayAgent(mail_resolver, settings, context.reactor, context.hostname,
                      read_credentials(settings), **(overrides or {}))


__all__ = ["RelayAgent", "SessionPool", "give_up", "make_agent", "read_credentials"]

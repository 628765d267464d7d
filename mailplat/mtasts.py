"""MTA-STS (RFC 8461): a domain's published promise that its MX hosts speak verified TLS.

A recipient domain with a ``_mta-sts`` TXT record ("v=STSv1; id=...") serves a policy at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``: a mode (``enforce``, ``testing``,
``none``), the MX host patterns that may receive its mail, and how long to remember it. Under
``enforce`` the relay agent uses only matching MX hosts, each with a certificate verified
against its name; if none works the mail is deferred, never sent in the clear or elsewhere.

Policies are cached per domain until ``max_age``; a new TXT id triggers a refetch, and a
failed refresh keeps the cached policy (§5.1), so an attacker who blocks the fetch cannot
turn enforcement off for a domain we have seen before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailplat.dns import MailResolver, ResolutionError

log = Logger()

MAX_POLICY = 64 * 1024  # RFC 8461 §3.2: senders may refuse larger policy files
MAX_AGE = 31557600  # one year, the RFC's upper bound
MODES = ("enforce", "testing", "none")
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")


class PolicyError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461."""


@dataclass(frozen=True)
class Policy:
    """One domain's parsed policy, with the TXT id it was fetched for."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def matches(self, host: str) -> bool:
        """Whether MX ``host`` is allowed: exactly, or by a "*." wildcard for one label."""
        host = host.rstrip(".").lower()
        label, _, parent = host.partition(".")
        return any(
            host == pattern or (pattern.startswith("*.") and label and parent == pattern[2:])
            for pattern in self.mx
        )


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT strings, or None: no record, several, or a
    malformed one all mean "no policy" (§3.1)."""
    ours = [r for r in records if r.startswith("v=STSv1")]
    if len(ours) != 1:
        return None
    fields = dict(
        part.strip().partition("=")[::2] for part in ours[0].split(";") if part.strip()
    )
    ident = fields.get("id", "")
    return ident if _TXT_ID.fullmatch(ident) else None


def parse_policy(text: str, ident: str = "") -> Policy:
    """The policy file (§3.2): "key: value" lines; unknown keys are ignored."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            values.setdefault(key.strip().lower(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in MODES:
        raise PolicyError(f"bad mode {mode!r}")
    age = (values.get("max_age") or [""])[0]
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("max_age missing or not a number")
    mx = tuple(p.lower().rstrip(".") for p in values.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return Policy(mode, mx, min(int(age), MAX_AGE), ident)


class _Collect(Protocol):
    """Reads a response body up to MAX_POLICY bytes."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_POLICY:
            cast(Any, self.transport).stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.size > MAX_POLICY:
            self.done.errback(PolicyError("policy file too large"))
        elif reason is None or isinstance(reason.value, ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


@implementer(IStreamClientEndpoint)
class _ResolvedEndpoint:
    """A TCP endpoint whose host is looked up with our resolver, not the system's."""

    def __init__(self, reactor: Any, resolver: MailResolver, host: str, port: int,
                 timeout: float) -> None:
        self.reactor, self.resolver = reactor, resolver
        self.host, self.port, self.timeout = host, port, timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        [exchange] = await self.resolver.host(self.host)
        nothing = f"no address for {self.host}"
        error: Exception = ConnectError(string=nothing)  # type: ignore[no-untyped-call]
        for address in exchange.addresses:
            kind = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
            try:
                return await kind(self.reactor, address, self.port, self.timeout).connect(factory)
            except ConnectError as failed:
                error = failed
        raise error


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, fetcher: "PolicyFetcher") -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        creator = ssl.optionsForClientTLS(host, trustRoot=self.fetcher.trust())
        inner = _ResolvedEndpoint(self.fetcher.reactor, self.fetcher.resolver, host,
                                  uri.port, self.fetcher.timeout)
        return endpoints.wrapClientTLS(creator, inner)


class PolicyFetcher:
    """GET https://mta-sts.<domain>/.well-known/mta-sts.txt with a verified certificate,
    no redirects, text/plain only (§3.3)."""

    def __init__(self, reactor: Any, resolver: MailResolver, trust: Callable[[], Any],
                 port: int = 443, timeout: float = 30.0) -> None:
        self.reactor, self.resolver, self.trust = reactor, resolver, trust
        self.port, self.timeout = port, timeout

    def fetch(self, domain: str) -> Deferred[str]:
        d = Deferred.fromCoroutine(self._fetch(domain))
        return d.addTimeout(self.timeout, self.reactor)

    async def _fetch(self, domain: str) -> str:
        agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            self.reactor, _Endpoints(self)
        )
        url = f"https://mta-sts.{domain}:{self.port}/.well-known/mta-sts.txt"
        response = await agent.request(b"GET", url.encode("ascii"))
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if response.code != 200 or not kind.lower().startswith(b"text/plain"):
            response.deliverBody(_Collect(Deferred()))  # drain and drop
            raise PolicyError(f"HTTP {response.code} {kind.decode('latin-1')!r}")
        body: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(body))
        return (await body).decode("utf-8")


class MTASTS:
    """Policies by recipient domain, fetched when the TXT id changes, cached until expiry."""

    def __init__(self, resolver: MailResolver, fetcher: Any, clock: Any) -> None:
        self.resolver, self.fetcher, self.clock = resolver, fetcher, clock
        self._cache: dict[str, tuple[Policy, float]] = {}

    def policy(self, domain: str) -> Deferred[Policy | None]:
        """The policy to apply to ``domain`` now (None: deliver as usual)."""
        return Deferred.fromCoroutine(self._policy(domain.lower().rstrip(".")))

    async def _policy(self, domain: str) -> Policy | None:
        cached = self._fresh(domain)
        try:
            ident = parse_txt(await self.resolver.texts(f"_mta-sts.{domain}"))
        except ResolutionError:
            return _active(cached)  # §5.1: DNS trouble keeps what we know
        if ident is None or (cached is not None and cached.id == ident):
            return _active(cached)
        try:
            policy = parse_policy(await self.fetcher.fetch(domain), ident)
        except Exception as error:
            log.warn("MTA-STS policy of {domain} not fetched: {error}", domain=domain,
                     error=error)
            return _active(cached)
        self._cache[domain] = (policy, self.clock.seconds() + policy.max_age)
        return _active(policy)

    def _fresh(self, domain: str) -> Policy | None:
        found = self._cache.get(domain)
        if found is None or found[1] <= self.clock.seconds():
            self._cache.pop(domain, None)
            return None
        return found[0]


def _active(policy: Policy | None) -> Policy | None:
    """Mode "none" is how a domain withdraws its policy: deliver as if there were none."""
    return policy if policy is not None and policy.mode != "none" else None


__all__ = ["MTASTS", "Policy", "PolicyError", "PolicyFetcher", "parse_policy", "parse_txt"]

"""Where mail for a domain goes: MX lookup with ``twisted.names`` (RFC 5321 §5.1, RFC 7505).

``MailResolver`` turns a recipient domain into an ordered list of ``Exchange`` (a host name with
its addresses): MX records in preference order with a random order among equal preferences,
the domain itself as implicit MX when it has no MX records, CNAME chains followed, IPv4 and IPv6.
Failures come out as a ``ResolutionError`` carrying the reply the queue should record: a
temporary DNS problem is always a 4xx (the message is retried), only definite answers
(no such domain, null MX, no address) are 5xx.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError

from mailplat.replies import Reply

FAMILIES = {"ipv4": dns.A, "ipv6": dns.AAAA}
DEFAULT_FAMILIES = ("ipv4", "ipv6")
MAX_CNAME_HOPS = 8  # a longer chain is a loop or a misconfiguration
MAX_EXCHANGES = 10  # Postfix tries at most 5 hosts; a few more cost little
DEFAULT_TIMEOUT = 10.0


def temporary(domain: str) -> Reply:
    return Reply(451, "4.4.3", f"DNS lookup for {domain} failed temporarily, will retry")


def no_such_domain(domain: str) -> Reply:
    return Reply(550, "5.1.2", f"Domain {domain} not found")


def null_mx(domain: str) -> Reply:
    return Reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)")


def no_address(domain: str) -> Reply:
    return Reply(550, "5.4.4", f"No address found for any mail exchanger of {domain}")


def loops_back(domain: str) -> Reply:
    return Reply(554, "5.4.6", f"Mail for {domain} loops back to myself")


class ResolutionError(Exception):
    """The domain cannot be resolved to a mail exchanger now; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _NoSuchName(Exception):
    """NXDOMAIN for one query."""


class _Temporary(Exception):
    """SERVFAIL, REFUSED, a timeout, a CNAME loop: asking again later may help."""


@dataclass(frozen=True)
class Exchange:
    """One host to try: its name (for TLS identity and logs) and its addresses in order."""

    name: str
    preference: int
    addresses: tuple[str, ...]


def to_ascii(domain: str) -> str:
    """The A-label form DNS wants; U-labels arrive from SMTPUTF8 recipients."""
    domain = domain.rstrip(".").lower()
    if domain.isascii():
        return domain
    import idna

    return idna.encode(domain, uts46=True).decode("ascii")


def is_nxdomain(error: BaseException) -> bool:
    """NXDOMAIN as seen from a client resolver or straight from an authority.

    DNSNameError and friends subclass DomainError, so only the bare class means "no such name".
    """
    if isinstance(error, (DNSNameError, AuthoritativeDomainError)):
        return True
    return type(error) is DomainError


class MailResolver:
    """MX resolution over any ``twisted.names`` IResolver (a client or, in tests, an authority).

    ``hostname`` is our own name: an MX list that names us drops us and every less preferred
    host (RFC 5321 §5.1), so a backup MX never sends mail back to the primary that is itself.
    """

    def __init__(
        self,
        resolver: Any,
        families: Sequence[str] = DEFAULT_FAMILIES,
        hostname: str = "",
        rng: random.Random | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.types = tuple(FAMILIES[family] for family in families)
        self.hostname = hostname.rstrip(".").lower()
        self.rng = rng or random.Random()
        self.timeout = timeout

    def exchanges(self, domain: str) -> "Deferred[list[Exchange]]":
        """The mail exchangers of ``domain``, most preferred first, addresses resolved."""
        return Deferred.fromCoroutine(self._exchanges(domain))

    def host(self, name: str) -> "Deferred[list[Exchange]]":
        """One named host without MX lookup (a ``[host]`` next hop), as a one-item list."""
        return Deferred.fromCoroutine(self._host(name))

    def texts(self, name: str) -> "Deferred[list[str]]":
        """The TXT strings at ``name`` (each record's pieces joined); [] when there is no
        such name; ResolutionError (4.4.3) when DNS fails temporarily."""
        return Deferred.fromCoroutine(self._texts(name))

    async def _texts(self, name: str) -> list[str]:
        try:
            records = await self._records(to_ascii(name), dns.TXT)
        except _NoSuchName:
            return []
        except _Temporary:
            raise ResolutionError(temporary(name)) from None
        return [b"".join(r.data).decode("utf-8", "replace") for r in records]

    async def _exchanges(self, domain: str) -> list[Exchange]:
        name = to_ascii(domain)
        try:
            records = await self._records(name, dns.MX)
        except _NoSuchName:
            raise ResolutionError(no_such_domain(domain)) from None
        except _Temporary:
            raise ResolutionError(temporary(domain)) from None
        if not records:  # RFC 5321 §5.1: the domain itself is the implicit MX
            return await self._host(name, report_as=domain)
        pairs = self._ordered([(r.preference, r.name.name.decode("ascii").lower()) for r in records])
        if not pairs:
            raise ResolutionError(null_mx(domain))
        pairs = self._without_self(pairs)
        if not pairs:
            raise ResolutionError(loops_back(domain))
        return await self._resolve_all(pairs[:MAX_EXCHANGES], domain)

    async def _host(self, name: str, report_as: str | None = None) -> list[Exchange]:
        return await self._resolve_all([(0, to_ascii(name))], report_as or name)

    def _ordered(self, pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Preference order, shuffled among equals; null MX entries ("." ) removed."""
        real = [(pref, host.rstrip(".")) for pref, host in pairs if host.rstrip(".")]
        self.rng.shuffle(real)
        return sorted(real, key=lambda pair: pair[0])  # sort is stable: shuffle survives ties

    def _without_self(self, pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        mine = [pref for pref, host in pairs if self.hostname and host == self.hostname]
        if not mine:
            return pairs
        return [(pref, host) for pref, host in pairs if pref < min(mine)]

    async def _resolve_all(self, pairs: list[tuple[int, str]], domain: str) -> list[Exchange]:
        """Addresses of every exchanger at once; hosts without any are left out."""
        results = await gatherResults(
            [Deferred.fromCoroutine(self._addresses(host)) for _, host in pairs]
        )
        exchanges = [
            Exchange(host, pref, tuple(found))
            for (pref, host), (found, _) in zip(pairs, results)
            if found
        ]
        if exchanges:
            return exchanges
        if any(trouble for _, trouble in results):
            raise ResolutionError(temporary(domain))
        raise ResolutionError(no_address(domain))

    async def _addresses(self, host: str) -> tuple[list[str], bool]:
        """(addresses in family order, whether a lookup failed temporarily)."""
        answers = await gatherResults(
            [Deferred.fromCoroutine(self._family(host, rtype)) for rtype in self.types]
        )
        found = [address for addresses, _ in answers for address in addresses]
        return _unique(found), any(trouble for _, trouble in answers)

    async def _family(self, host: str, rtype: int) -> tuple[list[str], bool]:
        try:
            records = await self._records(host, rtype)
        except _NoSuchName:
            return [], False
        except _Temporary:
            return [], True
        return [_address_text(record) for record in records], False

    async def _records(self, name: str, rtype: int) -> list[Any]:
        """Record payloads of ``rtype`` for ``name``, following CNAMEs (re-asking if needed)."""
        for _ in range(MAX_CNAME_HOPS):
            answers = await self._query(name, rtype)
            found, target = follow_cnames(answers, name, rtype)
            if found or target is None:
                return found
            name = target
        raise _Temporary(f"CNAME chain too long at {name}")

    async def _query(self, name: str, rtype: int) -> list[Any]:
        query = dns.Query(name.encode("ascii"), rtype, dns.IN)
        try:
            answers, _, _ = await self.resolver.query(query, timeout=(self.timeout,))
        except Exception as error:
            if is_nxdomain(error):
                raise _NoSuchName(name) from None
            raise _Temporary(repr(error)) from None
        return list(answers)


def follow_cnames(answers: Iterable[Any], name: str, rtype: int) -> tuple[list[Any], str | None]:
    """The payloads of ``rtype`` at the end of ``name``'s CNAME chain within ``answers``.

    Returns (payloads, None) when the chain ends inside the answer, or ([], target) when it
    leaves the answer at ``target``, which must then be asked about separately.
    """
    by_owner: dict[str, list[Any]] = {}
    for header in answers:
        by_owner.setdefault(header.name.name.decode("ascii").lower().rstrip("."), []).append(header)
    current = name.lower().rstrip(".")
    for _ in range(MAX_CNAME_HOPS):
        records = by_owner.get(current, [])
        found = [h.payload for h in records if h.type == rtype]
        if found:
            return found, None
        cname = next((h.payload for h in records if h.type == dns.CNAME), None)
        if cname is None:
            return [], (current if current != name.lower().rstrip(".") else None)
        current = cname.name.name.decode("ascii").lower().rstrip(".")
    raise _Temporary(f"CNAME loop at {name}")


def _address_text(record: Any) -> str:
    if isinstance(record, dns.Record_AAAA):
        return socket.inet_ntop(socket.AF_INET6, record.address)
    return str(record.dottedQuad())


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def parse_nameserver(text: str) -> tuple[str, int]:
    """"192.0.2.1", "192.0.2.1:5353", "::1" or "[::1]:5353" as (address, port)."""
    import ipaddress

    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not ADDRESS or [ADDRESS]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # nameservers are addresses: no DNS needed to find DNS
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def make_resolver(
    nameservers: Sequence[str], reactor: Any, timeout: float = DEFAULT_TIMEOUT
) -> Any:
    """A ``twisted.names`` client for the given servers, or the system's resolv.conf ones
    (read once here; Twisted's own re-reading would keep a timer running forever)."""
    from twisted.names import client

    servers = [parse_nameserver(server) for server in nameservers] or system_nameservers()
    return client.Resolver(  # type: ignore[no-untyped-call]
        servers=servers, timeout=(timeout,), reactor=reactor
    )


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf; a local resolver when there are none."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        servers.append(parse_nameserver(fields[1].split("%")[0]))
                    except ValueError:
                        continue
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


__all__ = [
    "Exchange",
    "MailResolver",
    "ResolutionError",
    "follow_cnames",
    "make_resolver",
    "parse_nameserver",
    "to_ascii",
]

"""A DNS zone from a dict, served by ``twisted.names`` on 127.0.0.1 for outbound-mail tests.

``DictAuthority`` answers like an authoritative server (NXDOMAIN for unknown names, CNAME
chains inside the zone, SERVFAIL for names listed in ``servfail``); it can be used directly as
an IResolver in synchronous tests, or behind ``serve_dns`` over real UDP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.names import authority, dns, server

MX = dns.Record_MX
A = dns.Record_A
AAAA = dns.Record_AAAA
CNAME = dns.Record_CNAME


def null_mx() -> dns.Record_MX:
    """RFC 7505: preference 0, exchange "." (the root)."""
    return dns.Record_MX(0, b"")


class ServFail(Exception):
    """Raised by the authority for names that should answer SERVFAIL."""


class DictAuthority(authority.FileAuthority):
    """An authority for every name (the root zone) whose records come from a dict."""

    def __init__(self, zone: dict[str, list[Any]], servfail: set[str] | None = None) -> None:
        self._zone = zone
        self.servfail = {name.lower() for name in servfail or ()}
        self.queries: list[tuple[str, int]] = []
        super().__init__(None)

    def loadFile(self, filename: object) -> None:
        self.soa = (b"", dns.Record_SOA(mname=b"ns.test", rname=b"root.test", minimum=1, expire=1))
        self.records = {
            name.lower().encode("ascii"): list(records) for name, records in self._zone.items()
        }

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        self.queries.append((name.decode("ascii").lower(), type))
        if name.decode("ascii").lower() in self.servfail:
            return fail(ServFail(name))
        return super()._lookup(name, cls, type, timeout)


class _Factory(server.DNSServerFactory):
    """SERVFAIL for ServFail without logging it as an error."""

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(ServFail):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


def serve_dns(authority_: DictAuthority, reactor: Any) -> tuple[Any, int]:
    """Listen on a free UDP port of 127.0.0.1; returns (port object, port number)."""
    factory = _Factory(authorities=[authority_])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(factory)
    protocol.noisy = False
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    return port, port.getHost().port

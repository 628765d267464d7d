"""dnsbl: refuse clients listed in DNS blocklists (RFC 5782), with the list's own reply text.

The client address is looked up once per connection, at its first RCPT, under every configured
zone at once (reversed octets or nibbles, type A, through twisted.names). A listed client gets
554 5.7.1 with the list's TXT record; authenticated clients, allowlisted ones and those in
``allow_clients`` are never looked up. A list that cannot be reached is logged and ignored:
an outage of a blocklist must not stop our mail.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.names import dns

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.replies import Reply

log = Logger()
KEYS = ("zones", "allow_clients", "dns_timeout", "listed_addresses")
LISTED = ipaddress.ip_network("127.0.0.0/8")
# 127.255.255.0/24 are answers about the query itself (refused, rate-limited), not listings.
LIST_ERRORS = ipaddress.ip_network("127.255.255.0/24")


@dataclass(frozen=True)
class Settings:
    zones: tuple[str, ...] = ()
    allow_clients: tuple[common.Network, ...] = ()
    dns_timeout: float = 5.0
    listed_addresses: tuple[str, ...] = ()  # empty: any 127.0.0.0/8 answer


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    result = Settings(
        zones=tuple(z.lower().strip(".") for z in o.get("zones", common.strings, ())),
        allow_clients=o.get("allow_clients", common.networks, ()),
        dns_timeout=o.get("dns_timeout", common.duration, 5.0),
        listed_addresses=o.get("listed_addresses", common.strings, ()),
    )
    if not result.zones:
        o.problems.append(("zones", "list at least one DNSBL zone"))
    return result, o.problems


def is_listing(answer: str, wanted: tuple[str, ...]) -> bool:
    """Whether an A answer means "listed"."""
    if wanted:
        return answer in wanted
    address = ipaddress.ip_address(answer)
    return address in LISTED and address not in LIST_ERRORS


class DNSBLPolicy(hooks.PolicyPlugin):
    """Looks the client up once per session; refuses its recipients if it is listed."""

    def __init__(self, settings: Settings, resolver: Any) -> None:
        self.settings = settings
        self.resolver = resolver

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: Any
    ) -> Deferred[Verdict]:
        if session.auth_user or hooks.is_allowlisted(session):
            return succeed(CONTINUE)
        address = common.client_address(session.peer_host)
        if address is None or common.in_any(address, self.settings.allow_clients):
            return succeed(CONTINUE)
        remembered = hooks.notes(session).session
        if "dnsbl" in remembered:
            return succeed(remembered["dnsbl"])
        d = self.check(address)
        return d.addCallback(_remember, remembered)

    def check(self, address: common.Address) -> Deferred[Verdict]:
        """CONTINUE, or REJECT naming the first listing zone (in configured order)."""
        reverse = common.reverse_name(address)
        queries = [self._listed(f"{reverse}.{zone}") for zone in self.settings.zones]
        d = gatherResults(queries, consumeErrors=True)
        return d.addCallback(self._first_listing, address, reverse)

    def _listed(self, name: str) -> Deferred[bool]:
        d = common.lookup(self.resolver, name, dns.A, self.settings.dns_timeout)
        listed = d.addCallback(lambda answers: any(is_listing(a, self.settings.listed_addresses)
                                                   for a in answers))
        return listed.addErrback(self._unreachable, name)

    def _unreachable(self, failure: Any, name: str) -> bool:
        log.warn("DNSBL query {name} failed: {error}", name=name,
                 error=failure.getErrorMessage())
        return False

    def _first_listing(
        self, listed: list[bool], address: common.Address, reverse: str
    ) -> Deferred[Verdict] | Verdict:
        for zone, hit in zip(self.settings.zones, listed):
            if hit:
                d = common.lookup(self.resolver, f"{reverse}.{zone}", dns.TXT,
                                  self.settings.dns_timeout)
                d.addErrback(lambda _: [])
                return d.addCallback(_refusal, address, zone)
        return CONTINUE


def _refusal(texts: list[list[bytes]], address: common.Address, zone: str) -> Verdict:
    reason = " ".join(common.txt_strings(texts))
    reason = "".join(ch for ch in reason if ch.isprintable())[:200]
    text = f"Service unavailable; client [{address}] blocked using {zone}"
    log.info("client {address} listed in {zone}: {reason}", address=address, zone=zone,
             reason=reason)
    return Verdict(Action.REJECT, Reply(554, "5.7.1", f"{text}; {reason}" if reason else text))


def _remember(verdict: Verdict, remembered: dict[str, Any]) -> Verdict:
    remembered["dnsbl"] = verdict
    return verdict


def make(section: dict[str, Any], context: PluginContext) -> DNSBLPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return DNSBLPolicy(result, context.resolver)

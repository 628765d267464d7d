"""Tests for mailplat.dns: MX order, implicit MX, null MX, CNAMEs, families, DNS failures."""

from __future__ import annotations

import random

from twisted.internet import reactor
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.dns import (
    Exchange,
    MailResolver,
    ResolutionError,
    make_resolver,
    parse_nameserver,
    to_ascii,
)
from tests.dns_support import AAAA, CNAME, MX, A, DictAuthority, null_mx, serve_dns

ZONE = {
    "example.org": [MX(20, "mx2.example.org"), MX(10, "mx1.example.org")],
    "mx1.example.org": [A("127.0.0.2")],
    "mx2.example.org": [A("127.0.0.3"), AAAA("::1")],
    "implicit.example": [A("127.0.0.4"), AAAA("::1")],
    "nullmx.example": [null_mx()],
    "alias.example": [CNAME("example.org")],
    "cnamemx.example": [MX(5, "mxalias.example")],
    "mxalias.example": [CNAME("mx1.example.org")],
    "noaddr.example": [MX(10, "nowhere.example")],
    "partly.example": [MX(10, "nowhere.example"), MX(20, "mx1.example.org")],
    "nothing.example": [dns.Record_TXT(b"v=spf1 -all")],
    "tie.example": [MX(10, f"h{n}.example") for n in range(6)],
    "broken.example": [MX(10, "servfail.example")],
    "loop.example": [CNAME("loop2.example")],
    "loop2.example": [CNAME("loop.example")],
    "self.example": [MX(10, "mx1.example.org"), MX(20, "me.example"), MX(30, "mx2.example.org")],
    "onlyme.example": [MX(10, "me.example")],
    "xn--bcher-kva.example": [MX(10, "mx1.example.org")],
    **{f"h{n}.example": [A(f"127.0.1.{n}")] for n in range(6)},
}


def resolver(zone: dict[str, list[object]] | None = None, **options: object) -> MailResolver:
    """A MailResolver over the dict zone, answered synchronously."""
    authority = DictAuthority(zone or ZONE, servfail={"servfail.example", "down.example"})
    return MailResolver(authority, rng=random.Random(7), hostname="me.example", **options)  # type: ignore[arg-type]


class MXTests(SynchronousTestCase):
    """RFC 5321 §5.1 and RFC 7505 as seen by a sender."""

    def exchanges(self, domain: str, **options: object) -> list[Exchange]:
        return self.successResultOf(resolver(**options).exchanges(domain))

    def error(self, domain: str) -> ResolutionError:
        failure = self.failureResultOf(resolver().exchanges(domain), ResolutionError)
        return failure.value

    def test_preference_order(self) -> None:
        """MX hosts come most preferred (lowest number) first, whatever the record order."""
        found = self.exchanges("example.org")
        self.assertEqual([(e.name, e.preference) for e in found],
                         [("mx1.example.org", 10), ("mx2.example.org", 20)])
        self.assertEqual(found[0].addresses, ("127.0.0.2",))

    def test_ipv4_and_ipv6(self) -> None:
        """A host's IPv4 and IPv6 addresses are both returned, in the configured family order."""
        self.assertEqual(self.exchanges("example.org")[1].addresses, ("127.0.0.3", "::1"))
        v6first = self.exchanges("example.org", families=("ipv6", "ipv4"))
        self.assertEqual(v6first[1].addresses, ("::1", "127.0.0.3"))
        self.assertEqual(self.exchanges("example.org", families=("ipv6",))[0].name,
                         "mx2.example.org")

    def test_random_among_equal_preferences(self) -> None:
        """Hosts of equal preference are tried in a random order, so load spreads."""
        orders = {
            tuple(e.name for e in self.successResultOf(
                MailResolver(DictAuthority(ZONE), rng=random.Random(seed)).exchanges("tie.example")))
            for seed in range(20)
        }
        self.assertGreater(len(orders), 1)
        self.assertTrue(all(sorted(order) == [f"h{n}.example" for n in range(6)] for order in orders))

    def test_implicit_mx(self) -> None:
        """A domain without MX records is its own mail exchanger (its A/AAAA records)."""
        found = self.exchanges("implicit.example")
        self.assertEqual(found, [Exchange("implicit.example", 0, ("127.0.0.4", "::1"))])

    def test_null_mx_bounces(self) -> None:
        """A null MX (RFC 7505) is a permanent 556 5.1.10, with no further lookups."""
        reply = self.error("nullmx.example").reply
        self.assertEqual((reply.code, reply.status), (556, "5.1.10"))

    def test_no_such_domain_bounces(self) -> None:
        """NXDOMAIN for the recipient domain is a permanent 5.1.2."""
        reply = self.error("unknown.example").reply
        self.assertEqual((reply.code, reply.status), (550, "5.1.2"))

    def test_no_mx_and_no_address_bounces(self) -> None:
        """A domain with neither MX nor address records cannot receive mail."""
        reply = self.error("nothing.example").reply
        self.assertEqual((reply.code, reply.status), (550, "5.4.4"))

    def test_mx_host_without_address_bounces(self) -> None:
        """MX hosts that do not exist leave nothing to try: permanent 5.4.4."""
        self.assertEqual(self.error("noaddr.example").reply.status, "5.4.4")

    def test_host_without_address_is_skipped(self) -> None:
        """An MX host that does not resolve is skipped in favour of the next one."""
        self.assertEqual([e.name for e in self.exchanges("partly.example")], ["mx1.example.org"])

    def test_servfail_defers(self) -> None:
        """A temporary DNS failure is a 4xx: the message is retried, never bounced."""
        zone = {"down.example": [MX(10, "mx1.example.org")]}
        failure = self.failureResultOf(resolver(zone).exchanges("down.example"), ResolutionError)
        self.assertEqual((failure.value.reply.code, failure.value.reply.status), (451, "4.4.3"))

    def test_servfail_on_mx_host_defers(self) -> None:
        """When the only MX host's address lookup fails temporarily, delivery is deferred."""
        self.assertEqual(self.error("broken.example").reply.code, 451)

    def test_cname_domain(self) -> None:
        """A CNAME on the recipient domain is followed to the canonical name's MX records."""
        self.assertEqual([e.name for e in self.exchanges("alias.example")],
                         ["mx1.example.org", "mx2.example.org"])

    def test_cname_mx_host(self) -> None:
        """An MX host that is a CNAME still resolves to the target's address."""
        self.assertEqual(self.exchanges("cnamemx.example")[0].addresses, ("127.0.0.2",))

    def test_cname_loop_defers(self) -> None:
        """A CNAME loop is not an answer; it defers rather than bounces."""
        self.assertEqual(self.error("loop.example").reply.code, 451)

    def test_own_name_drops_less_preferred(self) -> None:
        """Our own name in the MX list removes us and all less preferred hosts (§5.1)."""
        self.assertEqual([e.name for e in self.exchanges("self.example")], ["mx1.example.org"])

    def test_own_name_as_best_mx_is_a_loop(self) -> None:
        """When we are the best MX, the mail would loop back to us: 554 5.4.6."""
        self.assertEqual(self.error("onlyme.example").reply.status, "5.4.6")

    def test_idn_domain(self) -> None:
        """A U-label domain is looked up in its A-label form."""
        self.assertEqual(to_ascii("Bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(self.exchanges("bücher.example")[0].name, "mx1.example.org")

    def test_host_lookup_skips_mx(self) -> None:
        """A [host] next hop is resolved by address only, never by MX."""
        found = self.successResultOf(resolver().host("mx2.example.org"))
        self.assertEqual(found, [Exchange("mx2.example.org", 0, ("127.0.0.3", "::1"))])


class NameserverTests(SynchronousTestCase):
    """Parsing the configured nameserver addresses."""

    def test_forms(self) -> None:
        """Addresses with and without port, IPv4 and IPv6, are accepted."""
        self.assertEqual(parse_nameserver("192.0.2.1"), ("192.0.2.1", 53))
        self.assertEqual(parse_nameserver("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_nameserver("::1"), ("::1", 53))
        self.assertEqual(parse_nameserver("[::1]:5353"), ("::1", 5353))

    def test_names_refused(self) -> None:
        """A host name or a bad port is refused: finding DNS must not need DNS."""
        for bad in ("dns.example", "127.0.0.1:0", "[::1]x", "127.0.0.1:99999"):
            self.assertRaises(ValueError, parse_nameserver, bad)


class OverUDPTests(TestCase):
    """The configurable client resolver against a twisted.names server on 127.0.0.1."""

    def setUp(self) -> None:
        self.authority = DictAuthority(ZONE, servfail={"servfail.example"})
        port, number = serve_dns(self.authority, reactor)
        self.addCleanup(port.stopListening)
        self.mail = MailResolver(
            make_resolver([f"127.0.0.1:{number}"], reactor, timeout=2), hostname="me.example"
        )

    async def test_mx_over_udp(self) -> None:
        """MX, CNAME and A/AAAA answers travel over real UDP to the client resolver."""
        found = await self.mail.exchanges("alias.example")
        self.assertEqual([e.name for e in found], ["mx1.example.org", "mx2.example.org"])
        self.assertEqual(found[1].addresses, ("127.0.0.3", "::1"))

    async def test_failures_over_udp(self) -> None:
        """NXDOMAIN bounces, SERVFAIL defers and null MX bounces, over the wire too."""
        codes = []
        for domain in ("unknown.example", "broken.example", "nullmx.example"):
            try:
                await self.mail.exchanges(domain)
            except ResolutionError as error:
                codes.append(error.reply.status)
        self.assertEqual(codes, ["5.1.2", "4.4.3", "5.1.10"])

"""MTA-STS (RFC 8461): parsing, the policy cache, the HTTPS fetch, and enforcement by the
relay agent against receivers on loopback."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server, util

from mailplat.dns import MailResolver
from mailplat.mtasts import MTASTS, Policy, PolicyError, PolicyFetcher, parse_policy, parse_txt
from mailplat.relay_agent import RelayAgent
from mailplat.routeconfig import OutboundSettings
from mailplat.relay_session import TLSSettings
from tests.dns_support import MX, A, DictAuthority
from tests.relay_support import TestCA
from tests.test_relay_agent import AgentTestCase

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx2.example.org\r\nmax_age: 86400\r\n"


def txt(text: str) -> dns.Record_TXT:
    return dns.Record_TXT(text.encode())


class ParseTests(SynchronousTestCase):
    """The TXT record and the policy file (§3.1, §3.2)."""

    def test_txt(self) -> None:
        """One v=STSv1 record gives its id; none, several or a bad id mean no policy."""
        self.assertEqual(parse_txt(["v=STSv1; id=20160831085700Z;", "spf"]), "20160831085700Z")
        self.assertIsNone(parse_txt(["v=spf1 -all"]))
        self.assertIsNone(parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]))
        self.assertIsNone(parse_txt(["v=STSv1; id=not-valid!"]))

    def test_policy(self) -> None:
        """Keys are read case-insensitively, unknown ones ignored, max_age capped."""
        policy = parse_policy("version: STSv1\nMode: testing\nmx: A.example\nmx: *.b.example\n"
                              "max_age: 9999999999\nfuture: x\n", "7")
        self.assertEqual(policy, Policy("testing", ("a.example", "*.b.example"), 31557600, "7"))

    def test_bad_policies(self) -> None:
        """A wrong version, mode, max_age or no mx makes the file unusable."""
        for text in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1",
                     "version: STSv1\nmode: strict\nmx: a\nmax_age: 1",
                     "version: STSv1\nmode: enforce\nmx: a",
                     "version: STSv1\nmode: enforce\nmax_age: 1"):
            self.assertRaises(PolicyError, parse_policy, text)

    def test_patterns(self) -> None:
        """A wildcard matches exactly one leftmost label; other patterns match exactly."""
        policy = Policy("enforce", ("mail.example.com", "*.example.net"), 1)
        self.assertTrue(policy.matches("MAIL.example.com."))
        self.assertTrue(policy.matches("mx1.example.net"))
        self.assertFalse(policy.matches("a.b.example.net"))
        self.assertFalse(policy.matches("example.net"))
        self.assertFalse(policy.matches("other.example.com"))


class FakeFetcher:
    """Answers fetches from a list, counting them."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.count = 0

    def fetch(self, domain: str) -> Any:
        self.count += 1
        answer = self.answers.pop(0)
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


class CacheTests(SynchronousTestCase):
    """Policies are fetched when the TXT id changes and kept until max_age."""

    def setUp(self) -> None:
        self.zone: dict[str, list[Any]] = {"_mta-sts.example.org": [txt("v=STSv1; id=1")]}
        self.clock = Clock()

    def sts(self, *answers: Any) -> tuple[MTASTS, FakeFetcher]:
        fetcher = FakeFetcher(*answers)
        resolver = MailResolver(DictAuthority(self.zone, servfail={"_mta-sts.down.example"}))
        return MTASTS(resolver, fetcher, self.clock), fetcher

    def test_fetched_once_and_cached(self) -> None:
        """The same TXT id reuses the cached policy without fetching again."""
        sts, fetcher = self.sts(POLICY)
        first = self.successResultOf(sts.policy("example.org"))
        second = self.successResultOf(sts.policy("example.org"))
        self.assertEqual((first, fetcher.count), (second, 1))
        assert first is not None
        self.assertEqual((first.mode, first.id), ("enforce", "1"))

    def test_new_id_refetches_and_failure_keeps_cache(self) -> None:
        """A new id triggers a fetch; when that fails the cached policy still applies."""
        sts, fetcher = self.sts(POLICY, PolicyError("boom"))
        cached = self.successResultOf(sts.policy("example.org"))
        self.zone["_mta-sts.example.org"] = [txt("v=STSv1; id=2")]
        sts.resolver = MailResolver(DictAuthority(self.zone))
        self.assertEqual(self.successResultOf(sts.policy("example.org")), cached)
        self.assertEqual(fetcher.count, 2)

    def test_expiry_and_no_record(self) -> None:
        """Without a TXT record a policy applies only while cached; then none."""
        sts, _ = self.sts(POLICY)
        self.successResultOf(sts.policy("example.org"))
        sts.resolver = MailResolver(DictAuthority({}))
        self.assertIsNotNone(self.successResultOf(sts.policy("example.org")))
        self.clock.advance(86401)
        self.assertIsNone(self.successResultOf(sts.policy("example.org")))

    def test_dns_failure_and_mode_none(self) -> None:
        """No policy for a domain whose TXT lookup fails and none is cached; mode none
        withdraws a policy."""
        sts, _ = self.sts(POLICY.replace("enforce", "none"))
        self.assertIsNone(self.successResultOf(sts.policy("down.example")))
        self.assertIsNone(self.successResultOf(sts.policy("example.org")))


def policy_site(text: str, content_type: bytes = b"text/plain") -> server.Site:
    """The well-known policy resource, as a domain would serve it."""
    root = resource.Resource()
    well_known = resource.Resource()
    root.putChild(b".well-known", well_known)
    leaf = util.Redirect(b"https://elsewhere.example/") if text == "redirect" else \
        _Static(text.encode(), content_type)
    well_known.putChild(b"mta-sts.txt", leaf)
    return server.Site(root)


class _Static(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self.body, self.content_type = body, content_type

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        return self.body


class FetchTests(TestCase):
    """The HTTPS fetch against a twisted.web server with a test-CA certificate."""

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.ca = TestCA(directory)
        self.resolver = MailResolver(DictAuthority({"mta-sts.example.org": [A("127.0.0.1")]}))

    def serve(self, site: server.Site, name: str = "mta-sts.example.org") -> int:
        port = reactor.listenSSL(0, site, self.ca.server_tls(name), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        site.noisy = False
        return int(port.getHost().port)

    def fetcher(self, port: int) -> PolicyFetcher:
        return PolicyFetcher(reactor, self.resolver, TLSSettings(self.ca.ca_file).trust, port, 5)

    async def test_fetch(self) -> None:
        """The policy file is fetched over verified HTTPS from mta-sts.<domain>."""
        text = await self.fetcher(self.serve(policy_site(POLICY))).fetch("example.org")
        self.assertEqual(text, POLICY)

    async def test_refusals(self) -> None:
        """A redirect, a wrong media type and a certificate for another name all fail."""
        from twisted.web.client import ResponseNeverReceived

        for site, name, error in (
            (policy_site("redirect"), "mta-sts.example.org", PolicyError),
            (policy_site(POLICY, b"text/html"), "mta-sts.example.org", PolicyError),
            (policy_site(POLICY), "other.example.org", ResponseNeverReceived),
        ):
            fetcher = self.fetcher(self.serve(site, name))
            with self.assertRaises(error):
                await fetcher.fetch("example.org")


class EnforceTests(AgentTestCase):
    """The relay agent obeys an enforced policy served over HTTPS."""

    tls_names = ("mx2.example.org",)

    def sts_agent(self, policy: str) -> RelayAgent:
        site_port = reactor.listenSSL(0, policy_site(policy), self.ca.server_tls(
            "mta-sts.example.org"), interface="127.0.0.1")
        self.addCleanup(site_port.stopListening)
        zone = {
            "example.org": [MX(10, "mx1.example.org"), MX(20, "mx2.example.org")],
            "mx1.example.org": [A("127.0.0.2")], "mx2.example.org": [A("127.0.0.3")],
            "_mta-sts.example.org": [txt("v=STSv1; id=1")],
            "mta-sts.example.org": [A("127.0.0.1")],
        }
        options = OutboundSettings(port=self.rx1.number, ca_file=self.ca.ca_file,
                                   connect_timeout=5, mta_sts=True,
                                   mta_sts_port=site_port.getHost().port)
        agent = RelayAgent(MailResolver(DictAuthority(zone)), options, reactor, "relay.test")
        self.addCleanup(agent.close)
        return agent

    async def test_only_policy_mx_used_and_verified(self) -> None:
        """Only MX hosts named by the policy are used (mx1 is skipped though preferred),
        with TLS verified against the host name."""
        outcome = await self.deliver(self.sts_agent(POLICY), "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        self.assertEqual((len(self.rx1.messages), len(self.rx2.messages)), (0, 1))
        self.assertTrue(self.rx2.messages[0].session.tls)

    async def test_certificate_mismatch_defers(self) -> None:
        """An MX allowed by the policy whose certificate names another host gets nothing:
        the message is deferred with 4.7.5."""
        policy = POLICY.replace("mx2.example.org", "mx1.example.org")
        outcome = await self.deliver(self.sts_agent(policy), "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].status, "4.7.5")
        self.assertEqual(self.rx1.messages + self.rx2.messages, [])

    async def test_testing_mode_only_logs(self) -> None:
        """In testing mode delivery goes on as usual (the preferred MX, opportunistic TLS)."""
        policy = POLICY.replace("enforce", "testing")
        outcome = await self.deliver(self.sts_agent(policy), "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        self.assertEqual(len(self.rx1.messages), 1)

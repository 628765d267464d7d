"""The dnsbl plugin: reverse-name queries, hits and misses, skips, and an unreachable list."""

from __future__ import annotations

from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from mailplat import hooks
from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import common, dnsbl
from mailplat.testing import FakeResolver, session_info
from tests.policyfixtures import box, context


class DNSBLTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = FakeResolver()
        self.resolver.add_a("2.113.0.203.bl.test", "127.0.0.2")
        self.resolver.add_txt("2.113.0.203.bl.test", "Listed: see https://bl.test/?203.0.113.2")
        self.policy = dnsbl.make({"zones": ["other.test", "bl.test"],
                                  "allow_clients": ["203.0.113.128/25"]},
                                 context(resolver=self.resolver))

    def rcpt(self, session: object) -> object:
        return self.successResultOf(
            self.policy.rcpt(session, Transaction(""), box("a@example.org"), {}))

    def test_reverse_names(self) -> None:
        """IPv4 octets and IPv6 nibbles are reversed as RFC 5782 says."""
        self.assertEqual(common.reverse_name(common.client_address("192.0.2.99")), "99.2.0.192")
        name = common.reverse_name(common.client_address("2001:db8::1"))
        self.assertEqual(name, "1." + "0." * 23 + "8.b.d.0.1.0.0.2")

    def test_listed_client_gets_554_with_list_text(self) -> None:
        """A hit refuses the recipient with 554 5.7.1 naming the zone and its TXT text."""
        verdict = self.rcpt(session_info(peer_host="203.0.113.2"))
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual((verdict.reply.code, verdict.reply.status), (554, "5.7.1"))
        self.assertIn("blocked using bl.test; Listed: see https://bl.test/?203.0.113.2",
                      verdict.reply.text)
        self.assertIn(("2.113.0.203.other.test", dns.A), self.resolver.queries)

    def test_unlisted_client_continues(self) -> None:
        """A miss in every zone (NXDOMAIN) lets the recipient through."""
        self.assertEqual(self.rcpt(session_info(peer_host="203.0.113.3")), CONTINUE)

    def test_one_lookup_per_session(self) -> None:
        """The answer is remembered for the session's further recipients."""
        session = session_info(peer_host="203.0.113.2")
        self.rcpt(session)
        asked = len(self.resolver.queries)
        self.assertEqual(self.rcpt(session).action, Action.REJECT)
        self.assertEqual(len(self.resolver.queries), asked)

    def test_skips(self) -> None:
        """Authenticated, allowlisted and allow_clients clients are never looked up."""
        self.resolver.add_a("200.113.0.203.bl.test", "127.0.0.2")
        allowlisted = session_info(peer_host="203.0.113.2")
        hooks.notes(allowlisted).session["allowlisted"] = True
        for session in (session_info(peer_host="203.0.113.2", auth_user="u"), allowlisted,
                        session_info(peer_host="203.0.113.200")):
            self.assertEqual(self.rcpt(session), CONTINUE)
        self.assertEqual(self.resolver.queries, [])

    def test_unreachable_list_is_ignored(self) -> None:
        """A list that answers SERVFAIL does not stop mail."""
        self.resolver.fail("2.113.0.203.bl.test", dns.A, DNSServerError("servfail"))
        self.assertEqual(self.rcpt(session_info(peer_host="203.0.113.2")), CONTINUE)

    def test_error_codes_are_not_listings(self) -> None:
        """127.255.255.x answers (query refused) and non-loopback answers are not hits."""
        self.assertFalse(dnsbl.is_listing("127.255.255.254", ()))
        self.assertFalse(dnsbl.is_listing("192.0.2.1", ()))
        self.assertTrue(dnsbl.is_listing("127.0.0.4", ()))
        self.assertFalse(dnsbl.is_listing("127.0.0.4", ("127.0.0.2",)))

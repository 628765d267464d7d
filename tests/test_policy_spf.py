"""The spf plugin: pyspf fed with records from a fake twisted.names resolver."""

from __future__ import annotations

from twisted.names import dns
from twisted.names.error import DNSQueryTimeoutError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from mailplat import hooks
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import spf
from mailplat.testing import FakeResolver, session_info
from tests.policyfixtures import box, context


class SPFTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = r = FakeResolver()
        r.add_txt("example.net", "v=spf1 mx include:_spf.example.net -all")
        r.add_mx("example.net", 10, "mx.example.net")
        r.add_a("mx.example.net", "192.0.2.10")
        r.add_txt("_spf.example.net", "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8::/32 -all")
        r.add_txt("soft.test", "v=spf1 a ~all")
        r.add_txt("neutral.test", "v=spf1 ?all")
        r.add_txt("broken.test", "v=spf1 include:down.test -all")
        r.fail("down.test", dns.TXT, DNSServerError("SERVFAIL"))
        r.add_txt("slow.test", "v=spf1 a -all")
        r.fail("slow.test", dns.A, DNSQueryTimeoutError("timeout"))
        r.add_txt("bad.test", "v=spf1 ip4:nonsense -all")
        r.add_txt("helo.example.net", "v=spf1 ip4:192.0.2.77 -all")

    def check(self, ip: str, sender: str, **section: object) -> tuple[object, object]:
        policy = spf.make(dict(section), context(resolver=self.resolver))
        session = session_info(peer_host=ip, helo="helo.example.net")
        hooks.notes(session).new_transaction()
        verdict = self.successResultOf(policy.mail(session, box(sender) if sender else None, {}))
        return verdict, hooks.notes(session)

    def result(self, ip: str, sender: str) -> str:
        _, notes = self.check(ip, sender)
        return notes.transaction["spf"].result

    def test_pass(self) -> None:
        """The mx, include, ip4 and ip6 mechanisms authorize their hosts."""
        for ip in ("192.0.2.10", "198.51.100.7", "2001:db8::25"):
            self.assertEqual(self.result(ip, "a@example.net"), "pass", ip)

    def test_fail(self) -> None:
        """An unauthorized host fails under -all."""
        self.assertEqual(self.result("203.0.113.5", "a@example.net"), "fail")

    def test_softfail_neutral_none(self) -> None:
        """~all softfails, ?all is neutral, and a domain without a record has none."""
        self.assertEqual(self.result("203.0.113.5", "a@soft.test"), "softfail")
        self.assertEqual(self.result("203.0.113.5", "a@neutral.test"), "neutral")
        self.assertEqual(self.result("203.0.113.5", "a@nothing.test"), "none")

    def test_temperror(self) -> None:
        """SERVFAIL on an include and a timed-out lookup are temporary errors."""
        self.assertEqual(self.result("203.0.113.5", "a@broken.test"), "temperror")
        self.assertEqual(self.result("203.0.113.5", "a@slow.test"), "temperror")

    def test_permerror(self) -> None:
        """A malformed record is a permanent error."""
        self.assertEqual(self.result("203.0.113.5", "a@bad.test"), "permerror")

    def test_null_sender_checks_helo(self) -> None:
        """For <> the HELO identity is checked (RFC 7208 §2.3)."""
        _, notes = self.check("192.0.2.77", "")
        self.assertEqual((notes.transaction["spf"].result, notes.transaction["spf"].identity),
                         ("pass", "helo"))

    def test_settled_without_dns(self) -> None:
        """A check pyspf settles without any lookup (<> after a malformed HELO name) still
        answers through the Deferred: result none, and the mail goes on."""
        policy = spf.make({}, context(resolver=self.resolver))
        session = session_info(peer_host="203.0.113.5", helo="a..b")
        hooks.notes(session).new_transaction()
        verdict = self.successResultOf(policy.mail(session, None, {}))
        self.assertEqual((verdict, hooks.notes(session).transaction["spf"].result),
                         (CONTINUE, "none"))

    def test_result_is_recorded_and_mail_accepted_by_default(self) -> None:
        """Without reject_fail a fail is only recorded, for Authentication-Results."""
        verdict, notes = self.check("203.0.113.5", "a@example.net")
        self.assertEqual(verdict, CONTINUE)
        [result] = notes.results
        self.assertEqual(str(result), "spf=fail smtp.mailfrom=a@example.net")

    def test_reject_fail(self) -> None:
        """With reject_fail a fail refuses the sender with 550 5.7.23."""
        verdict, _ = self.check("203.0.113.5", "a@example.net", reject_fail=True)
        self.assertEqual((verdict.action, verdict.reply.code, verdict.reply.status),
                         (Action.REJECT, 550, "5.7.23"))
        verdict, _ = self.check("192.0.2.10", "a@example.net", reject_fail=True)
        self.assertEqual(verdict, CONTINUE)

    def test_defer_temperror(self) -> None:
        """With defer_temperror a DNS problem answers 451 4.7.24."""
        verdict, _ = self.check("203.0.113.5", "a@broken.test", defer_temperror=True)
        self.assertEqual((verdict.action, verdict.reply.code), (Action.TEMPFAIL, 451))

    def test_authenticated_not_checked(self) -> None:
        """Authenticated clients are not SPF-checked."""
        policy = spf.make({}, context(resolver=self.resolver))
        session = session_info(peer_host="203.0.113.5", auth_user="u")
        self.assertEqual(self.successResultOf(policy.mail(session, box("a@example.net"), {})),
                         CONTINUE)
        self.assertEqual(self.resolver.queries, [])

    def test_lookups_wait_for_dns_without_blocking(self) -> None:
        """The check waits on Deferreds: nothing is decided until the resolver answers."""
        self.resolver.hold = True
        policy = spf.make({}, context(resolver=self.resolver))
        session = session_info(peer_host="192.0.2.10", helo="h.test")
        d = policy.mail(session, box("a@example.net"), {})
        self.assertNoResult(d)
        for _ in range(10):
            self.resolver.release()
        self.assertEqual(self.successResultOf(d), CONTINUE)
        self.assertEqual(hooks.notes(session).transaction["spf"].result, "pass")

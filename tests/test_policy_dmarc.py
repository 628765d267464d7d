"""The dmarc plugin: policy lookup, SPF/DKIM alignment, enforcement and sampling."""

from __future__ import annotations

from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from mailplat import hooks
from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import dmarc
from mailplat.policies.dkim import DKIMResult
from mailplat.policies.spf import SPFResult
from mailplat.testing import FakeResolver, session_info
from tests.policyfixtures import context

HEADERS = b"From: Alice <alice@mail.example.org>\r\nSubject: x\r\n"


class DMARCTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = FakeResolver()
        self.resolver.add_txt("_dmarc.example.org", "v=DMARC1; p=reject; sp=quarantine")
        self.resolver.add_txt("_dmarc.strict.test", "v=DMARC1; p=reject; aspf=s; adkim=s")
        self.resolver.add_txt("_dmarc.sampled.test", "v=DMARC1; p=reject; pct=10")
        self.resolver.add_txt("_dmarc.mail.example.org", "v=spf1 -all")  # not DMARC: ignored

    def evaluate(self, headers: bytes = HEADERS, spf: SPFResult | None = None,
            dkim: list[DKIMResult] = (), chance: float = 0.0, **section: object) -> object:
        policy = dmarc.make(dict(section), context(resolver=self.resolver))
        policy.chance = lambda: chance
        session = session_info(peer_host="203.0.113.1")
        notes = hooks.notes(session)
        notes.new_transaction()
        if spf is not None:
            notes.transaction["spf"] = spf
        notes.transaction["dkim"] = list(dkim)
        verdict = self.successResultOf(policy.data(session, Transaction(""), headers))
        return verdict, [str(r) for r in notes.results]

    def test_org_domain(self) -> None:
        """The organizational domain comes from the Public Suffix List."""
        self.assertEqual(dmarc.organizational_domain("a.b.example.co.uk"), "example.co.uk")
        self.assertTrue(dmarc.aligned("bounce.example.org", "mail.example.org", strict=False))
        self.assertFalse(dmarc.aligned("bounce.example.org", "mail.example.org", strict=True))

    def test_aligned_spf_passes(self) -> None:
        """An SPF pass for a MAIL FROM domain of the same organization passes DMARC."""
        verdict, results = self.evaluate(spf=SPFResult("pass", "bounce.example.org", "mailfrom"))
        self.assertEqual(verdict, CONTINUE)
        self.assertEqual(results, ["dmarc=pass header.from=mail.example.org policy.dmarc=quarantine"])

    def test_aligned_dkim_passes(self) -> None:
        """A passing DKIM signature of an aligned domain passes DMARC."""
        verdict, results = self.evaluate(dkim=[DKIMResult("fail", "other.test", "s"),
                                          DKIMResult("pass", "example.org", "s")])
        self.assertEqual(verdict, CONTINUE)
        self.assertTrue(results[0].startswith("dmarc=pass"))

    def test_unaligned_pass_fails_and_subdomain_policy_applies(self) -> None:
        """SPF and DKIM passes of other domains do not count; sp= governs subdomains."""
        verdict, results = self.evaluate(spf=SPFResult("pass", "other.test", "mailfrom"),
                                    dkim=[DKIMResult("pass", "other.test", "s")])
        self.assertEqual(verdict, CONTINUE)  # quarantine: recorded, accepted
        self.assertEqual(results, ["dmarc=fail header.from=mail.example.org policy.dmarc=quarantine"])

    def test_reject_policy_enforced(self) -> None:
        """p=reject with no aligned pass refuses the message with 550 5.7.1."""
        verdict, _ = self.evaluate(headers=b"From: a@example.org\r\n")
        self.assertEqual((verdict.action, verdict.reply.code, verdict.reply.status),
                         (Action.REJECT, 550, "5.7.1"))
        verdict, _ = self.evaluate(headers=b"From: a@example.org\r\n", enforce=False)
        self.assertEqual(verdict, CONTINUE)

    def test_strict_alignment(self) -> None:
        """With aspf=s a pass for a subdomain is not aligned."""
        verdict, _ = self.evaluate(headers=b"From: a@strict.test\r\n",
                              spf=SPFResult("pass", "mail.strict.test", "mailfrom"))
        self.assertEqual(verdict.action, Action.REJECT)
        verdict, _ = self.evaluate(headers=b"From: a@strict.test\r\n",
                              spf=SPFResult("pass", "strict.test", "mailfrom"))
        self.assertEqual(verdict, CONTINUE)

    def test_pct_sampling(self) -> None:
        """Outside the pct sample, reject is applied as quarantine."""
        verdict, results = self.evaluate(headers=b"From: a@sampled.test\r\n", chance=0.5)
        self.assertEqual(verdict, CONTINUE)
        self.assertIn("policy.dmarc=quarantine", results[0])
        verdict, _ = self.evaluate(headers=b"From: a@sampled.test\r\n", chance=0.05)
        self.assertEqual(verdict.action, Action.REJECT)

    def test_no_record_and_temperror(self) -> None:
        """No record is dmarc=none; a DNS failure is temperror; neither refuses mail."""
        verdict, results = self.evaluate(headers=b"From: a@nodmarc.test\r\n")
        self.assertEqual((verdict, results), (CONTINUE, ["dmarc=none header.from=nodmarc.test"]))
        self.resolver.fail("_dmarc.broken.test", dns.TXT, DNSServerError("servfail"))
        verdict, results = self.evaluate(headers=b"From: a@broken.test\r\n")
        self.assertEqual((verdict, results), (CONTINUE, ["dmarc=temperror header.from=broken.test"]))

    def test_records(self) -> None:
        """Records without v=DMARC1 or a valid p= are no policy."""
        self.assertIsNone(dmarc.parse_record("v=DMARC1; p=bogus"))
        self.assertEqual(dmarc.parse_record("v=DMARC1; p=none; pct=50").pct, 50)

"""The access plugin: allow and deny lists by network, HELO, sender and recipient."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailplat import hooks
from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import access
from mailplat.testing import session_info
from tests.policyfixtures import box, context

SECTION = {
    "allow_clients": ["192.0.2.0/24"],
    "deny_clients": ["198.51.100.0/24", "2001:db8:bad::/48"],
    "deny_helo": ["*.dynamic.test", "localhost"],
    "deny_senders": ["spam.test", "*.spam.test", "bad@example.net", "mailer-daemon@"],
    "allow_senders": ["good@spam.test"],
    "deny_recipients": ["closed@example.org"],
}


class AccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = access.make(dict(SECTION), context())

    def verdict(self, d: object) -> object:
        return self.successResultOf(d)  # type: ignore[arg-type]

    def test_denied_network_disconnected(self) -> None:
        """A client in deny_clients hears 554 5.7.1 and is disconnected, IPv4 and IPv6."""
        for host in ("198.51.100.9", "2001:db8:bad::1", "::ffff:198.51.100.9"):
            verdict = self.verdict(self.policy.connect(session_info(peer_host=host)))
            self.assertEqual((verdict.action, verdict.reply.code), (Action.DISCONNECT, 554))

    def test_other_network_continues(self) -> None:
        """Clients in no list go on."""
        self.assertEqual(self.verdict(self.policy.connect(session_info(peer_host="203.0.113.1"))),
                         CONTINUE)

    def test_allowed_network_is_allowlisted(self) -> None:
        """allow_clients marks the session allowlisted for other plugins and skips HELO checks."""
        session = session_info(peer_host="192.0.2.44")
        self.assertEqual(self.verdict(self.policy.connect(session)), CONTINUE)
        self.assertTrue(hooks.is_allowlisted(session))
        self.assertEqual(self.verdict(self.policy.helo(session, "localhost")), CONTINUE)

    def test_helo_patterns(self) -> None:
        """HELO names matching a pattern are refused with 550 5.7.1, case-insensitively."""
        session = session_info(peer_host="203.0.113.1")
        for name in ("host1.Dynamic.test", "localhost"):
            verdict = self.verdict(self.policy.helo(session, name))
            self.assertEqual((verdict.action, verdict.reply.status), (Action.REJECT, "5.7.1"))
        self.assertEqual(self.verdict(self.policy.helo(session, "mail.test")), CONTINUE)

    def test_sender_patterns(self) -> None:
        """Domain, subdomain, address and local-part patterns refuse senders; allow wins."""
        session = session_info(peer_host="203.0.113.1")
        for sender in ("x@spam.test", "x@a.spam.test", "Bad@Example.NET", "mailer-daemon@x.test"):
            verdict = self.verdict(self.policy.mail(session, box(sender), {}))
            self.assertEqual(verdict.action, Action.REJECT, sender)
        for sender in ("good@spam.test", "ok@example.net", "x@notspam.test"):
            self.assertEqual(self.verdict(self.policy.mail(session, box(sender), {})), CONTINUE)
        self.assertEqual(self.verdict(self.policy.mail(session, None, {})), CONTINUE)

    def test_recipient_patterns(self) -> None:
        """A denied recipient is refused; others go on."""
        session, t = session_info(peer_host="203.0.113.1"), Transaction("")
        verdict = self.verdict(self.policy.rcpt(session, t, box("closed@example.org"), {}))
        self.assertEqual(verdict.reply.code, 550)
        self.assertEqual(self.verdict(self.policy.rcpt(session, t, box("open@example.org"), {})),
                         CONTINUE)

    def test_config_problems(self) -> None:
        """Bad networks and unknown keys are reported per key."""
        _, problems = access.settings({"deny_clients": ["not-a-net"], "deny_hello": []})
        self.assertEqual(sorted(k for k, _ in problems), ["deny_clients", "deny_hello"])

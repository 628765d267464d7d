"""Tests for mailplat.policy: no open relay, and a chain that survives broken plugins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, IPolicy, IRouter, Route, Verdict
from mailplat.policy import (
    POLICY_TIMEOUT,
    RELAY_DENIED,
    DefaultPolicy,
    PolicyChain,
    in_networks,
)
from mailplat.replies import LOCAL_ERROR, Reply

UNKNOWN = Reply(550, "5.1.1", "User unknown")


@dataclass(frozen=True)
class Mailbox:
    """A stand-in for mailplat.address.Mailbox."""

    local: str
    domain: str


@implementer(IRouter)
class FakeRouter:
    """Routes example.org locally, refuses "nobody" and relays every other domain."""

    def route(self, recipient: Mailbox) -> Deferred[Route | Reply]:
        if recipient.local == "nobody":
            return succeed(UNKNOWN)
        if recipient.domain == "example.org":
            return succeed(Route("maildir", f"/m/{recipient.local}", str(recipient)))
        return succeed(Route("smtp", recipient.domain, str(recipient), relay=True))


@implementer(IPolicy)
class Fixed:
    """Answers every hook with one verdict (or one Deferred) and records the calls."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def _reply(self, hook: str) -> Any:
        self.calls.append(hook)
        if callable(self.answer):
            return self.answer()
        return self.answer if isinstance(self.answer, Deferred) else succeed(self.answer)

    def connect(self, session: Any) -> Any:
        return self._reply("connect")

    def helo(self, session: Any, name: Any) -> Any:
        return self._reply("helo")

    def mail(self, session: Any, sender: Any, params: Any) -> Any:
        return self._reply("mail")

    def rcpt(self, session: Any, transaction: Any, recipient: Any, params: Any) -> Any:
        return self._reply("rcpt")

    def data(self, session: Any, transaction: Any, headers: Any) -> Any:
        return self._reply("data")


TRUSTED = ["192.0.2.0/24", "2001:db8::/32"]


class DefaultPolicyTests(SynchronousTestCase):
    """Local mail is accepted from anyone; relaying needs authentication or trust."""

    def rcpt(self, domain: str, **session: Any) -> Verdict:
        """The default policy's verdict on RCPT TO:<user@domain> in the given session."""
        policy = DefaultPolicy(FakeRouter(), TRUSTED)
        result = policy.rcpt(SessionInfo(**session), Transaction("a@b.example"),
                             Mailbox("user", domain), {})
        verdict: Verdict = self.successResultOf(result)
        return verdict

    def test_provides_ipolicy(self) -> None:
        """DefaultPolicy provides IPolicy."""
        self.assertTrue(verifyObject(IPolicy, DefaultPolicy(FakeRouter())))

    def test_other_stages_continue(self) -> None:
        """Connect, HELO, MAIL and data are left to other policies."""
        policy, session = DefaultPolicy(FakeRouter()), SessionInfo()
        transaction = Transaction("")
        for result in [policy.connect(session), policy.helo(session, "x"),
                       policy.mail(session, None, {}), policy.data(session, transaction, b"")]:
            self.assertEqual(self.successResultOf(result), CONTINUE)

    def test_local_recipient_accepted(self) -> None:
        """Mail for a local mailbox is accepted from any client."""
        self.assertEqual(self.rcpt("example.org", peer_host="203.0.113.9"), Verdict(Action.ACCEPT))

    def test_router_refusal(self) -> None:
        """A Reply from the router rejects the recipient with that reply."""
        policy = DefaultPolicy(FakeRouter())
        result = policy.rcpt(SessionInfo(), Transaction(""), Mailbox("nobody", "example.org"), {})
        self.assertEqual(self.successResultOf(result), Verdict(Action.REJECT, UNKNOWN))

    def test_relay_denied(self) -> None:
        """An unauthenticated stranger may not relay: 554 5.7.1."""
        verdict = self.rcpt("elsewhere.example", peer_host="203.0.113.9")
        self.assertEqual(verdict, Verdict(Action.REJECT, RELAY_DENIED))
        self.assertEqual(RELAY_DENIED, Reply(554, "5.7.1", "Relay access denied"))

    def test_loopback_not_trusted_by_default(self) -> None:
        """Without trusted networks even 127.0.0.1 may not relay."""
        policy = DefaultPolicy(FakeRouter())
        result = policy.rcpt(SessionInfo(peer_host="127.0.0.1"), Transaction(""),
                             Mailbox("u", "elsewhere.example"), {})
        self.assertEqual(self.successResultOf(result).action, Action.REJECT)

    def test_authenticated_may_relay(self) -> None:
        """An authenticated client may relay from anywhere."""
        verdict = self.rcpt("elsewhere.example", peer_host="203.0.113.9", auth_user="alice")
        self.assertEqual(verdict, Verdict(Action.ACCEPT))

    def test_trusted_ipv4_may_relay(self) -> None:
        """A client in a trusted IPv4 network may relay."""
        self.assertEqual(self.rcpt("elsewhere.example", peer_host="192.0.2.77"),
                         Verdict(Action.ACCEPT))

    def test_trusted_ipv6_may_relay(self) -> None:
        """A client in a trusted IPv6 network may relay."""
        self.assertEqual(self.rcpt("elsewhere.example", peer_host="2001:db8::25"),
                         Verdict(Action.ACCEPT))

    def test_ipv4_mapped_address(self) -> None:
        """An IPv4 client seen on an IPv6 socket is matched as IPv4."""
        self.assertEqual(self.rcpt("elsewhere.example", peer_host="::ffff:192.0.2.1"),
                         Verdict(Action.ACCEPT))

    def test_untrusted_neighbours(self) -> None:
        """Addresses just outside the trusted networks, or no address at all, may not relay."""
        for host in ["192.0.3.1", "2001:db9::1", "", "mail.example", "/run/sock"]:
            self.assertEqual(self.rcpt("elsewhere.example", peer_host=host).action,
                             Action.REJECT, host)

    def test_in_networks_scoped_address(self) -> None:
        """A link-local address with a zone index still matches its network."""
        from ipaddress import ip_network

        self.assertTrue(in_networks("fe80::1%eth0", [ip_network("fe80::/10")]))


class PolicyChainTests(SynchronousTestCase):
    """The first verdict that is not CONTINUE answers; failures become TEMPFAIL."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = SessionInfo()

    def chain(self, *policies: Any, timeout: float = 10) -> PolicyChain:
        return PolicyChain(policies, timeout=timeout, clock=self.clock)

    def test_provides_ipolicy(self) -> None:
        """PolicyChain provides IPolicy."""
        self.assertTrue(verifyObject(IPolicy, self.chain()))

    def test_empty_chain_continues(self) -> None:
        """A chain without policies lets everything continue."""
        self.assertEqual(self.successResultOf(self.chain().connect(self.session)), CONTINUE)

    def test_first_decision_wins(self) -> None:
        """Policies run in order until one answers something other than CONTINUE."""
        first, second = Fixed(CONTINUE), Fixed(Verdict(Action.REJECT))
        third = Fixed(Verdict(Action.ACCEPT))
        result = self.chain(first, second, third).helo(self.session, "client.example")
        self.assertEqual(self.successResultOf(result), Verdict(Action.REJECT))
        self.assertEqual((first.calls, second.calls, third.calls), (["helo"], ["helo"], []))

    def test_all_continue(self) -> None:
        """When every policy continues, so does the chain."""
        policies = [Fixed(CONTINUE), Fixed(CONTINUE)]
        result = self.chain(*policies).mail(self.session, None, {})
        self.assertEqual(self.successResultOf(result), CONTINUE)
        self.assertEqual([p.calls for p in policies], [["mail"], ["mail"]])

    def test_every_hook_is_chained(self) -> None:
        """Each IPolicy hook reaches the policies with its own name."""
        policy = Fixed(CONTINUE)
        chain, transaction = self.chain(policy), Transaction("")
        chain.connect(self.session)
        chain.helo(self.session, "x")
        chain.mail(self.session, None, {})
        chain.rcpt(self.session, transaction, Mailbox("u", "d"), {})
        chain.data(self.session, transaction, b"Subject: x\r\n\r\n")
        self.assertEqual(policy.calls, ["connect", "helo", "mail", "rcpt", "data"])

    def test_waits_for_slow_policy(self) -> None:
        """A policy answering later, but in time, is waited for."""
        pending: Deferred[Verdict] = Deferred()
        result = self.chain(Fixed(pending), Fixed(Verdict(Action.ACCEPT))).connect(self.session)
        self.assertNoResult(result)
        self.clock.advance(9)
        pending.callback(CONTINUE)
        self.assertEqual(self.successResultOf(result), Verdict(Action.ACCEPT))

    def test_timeout(self) -> None:
        """A hook that does not answer in time gives TEMPFAIL 451 4.3.0 and stops the chain."""
        later = Fixed(Verdict(Action.ACCEPT))
        result = self.chain(Fixed(Deferred()), later, timeout=5).connect(self.session)
        self.clock.advance(4.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(result), Verdict(Action.TEMPFAIL, POLICY_TIMEOUT))
        self.assertEqual((POLICY_TIMEOUT.code, POLICY_TIMEOUT.status), (451, "4.3.0"))
        self.assertEqual(later.calls, [])

    def test_late_answer_ignored(self) -> None:
        """An answer arriving after the timeout changes nothing and raises nothing."""
        pending: Deferred[Verdict] = Deferred()
        result = self.chain(Fixed(pending), timeout=1).connect(self.session)
        self.clock.advance(1)
        pending.callback(Verdict(Action.ACCEPT))
        self.assertEqual(self.successResultOf(result).action, Action.TEMPFAIL)

    def test_no_pending_calls_after_answer(self) -> None:
        """A prompt answer cancels its timeout."""
        self.chain(Fixed(CONTINUE)).connect(self.session)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_exception_becomes_tempfail(self) -> None:
        """A hook raising an exception gives TEMPFAIL and is logged, never a crash."""
        result = self.chain(Fixed(lambda: 1 / 0)).connect(self.session)
        self.assertEqual(self.successResultOf(result), Verdict(Action.TEMPFAIL, LOCAL_ERROR))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_failed_deferred_becomes_tempfail(self) -> None:
        """A hook whose Deferred fails gives TEMPFAIL."""
        result = self.chain(Fixed(lambda: fail(RuntimeError("db down")))).rcpt(
            self.session, Transaction(""), Mailbox("u", "d"), {})
        self.assertEqual(self.successResultOf(result).action, Action.TEMPFAIL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_non_verdict_becomes_tempfail(self) -> None:
        """A hook answering something other than a Verdict gives TEMPFAIL."""
        result = self.chain(Fixed("yes")).helo(self.session, "x")
        self.assertEqual(self.successResultOf(result).action, Action.TEMPFAIL)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_default_policy_in_chain(self) -> None:
        """A blocklist before the default policy can refuse what the default would accept."""
        block = Fixed(Verdict(Action.REJECT, Reply(550, "5.7.1", "Blocked")))
        chain = self.chain(block, DefaultPolicy(FakeRouter()))
        result = chain.rcpt(self.session, Transaction(""), Mailbox("u", "example.org"), {})
        self.assertEqual(self.successResultOf(result).reply, Reply(550, "5.7.1", "Blocked"))

"""The ratelimit plugin: sliding windows on a Clock, concurrency, per user and per address."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import ratelimit
from mailplat.testing import session_info
from tests.policyfixtures import box, context


class RateLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def policy(self, **section: object) -> ratelimit.RateLimitPolicy:
        return ratelimit.make(dict(section), context(self.clock))

    def connect(self, policy: ratelimit.RateLimitPolicy, host: str = "192.0.2.1") -> object:
        session = session_info(peer_host=host)
        return session, self.successResultOf(policy.connect(session))

    def test_connection_rate_window(self) -> None:
        """The third connection in the window gets 421 4.7.0; after the window it is let in."""
        policy = self.policy(connections=2, window="10s")
        self.assertEqual(self.connect(policy)[1], CONTINUE)
        self.clock.advance(5)
        self.assertEqual(self.connect(policy)[1], CONTINUE)
        _, verdict = self.connect(policy)
        self.assertEqual((verdict.action, verdict.reply.code, verdict.reply.status),
                         (Action.DISCONNECT, 421, "4.7.0"))
        self.assertEqual(self.connect(policy, "192.0.2.2")[1], CONTINUE)  # per address
        self.clock.advance(5)  # the first connection leaves the window
        self.assertEqual(self.connect(policy)[1], CONTINUE)

    def test_concurrent_connections(self) -> None:
        """Over the concurrency limit a client gets 421 until one connection ends."""
        policy = self.policy(concurrent=1)
        first, verdict = self.connect(policy)
        self.assertEqual(verdict, CONTINUE)
        self.assertEqual(self.connect(policy)[1].reply.code, 421)
        policy.disconnect(first)
        self.assertEqual(self.connect(policy)[1], CONTINUE)
        self.assertEqual(policy.open, {"192.0.2.1": 1})

    def test_messages_per_client(self) -> None:
        """Messages over the limit get 450 4.7.1 at MAIL until the window moves on."""
        policy = self.policy(messages=1, window="1m")
        session = session_info(peer_host="192.0.2.1")
        self.assertEqual(self.successResultOf(policy.mail(session, None, {})), CONTINUE)
        verdict = self.successResultOf(policy.mail(session, None, {}))
        self.assertEqual((verdict.action, verdict.reply.code, verdict.reply.status),
                         (Action.TEMPFAIL, 450, "4.7.1"))
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(policy.mail(session, None, {})), CONTINUE)

    def test_recipients_per_user_across_addresses(self) -> None:
        """An authenticated user is counted as one, whichever address it comes from."""
        policy = self.policy(recipients=2)
        t = Transaction("")
        for host in ("192.0.2.1", "198.51.100.1"):
            session = session_info(peer_host=host, auth_user="alice")
            self.assertEqual(
                self.successResultOf(policy.rcpt(session, t, box("a@example.org"), {})), CONTINUE)
        session = session_info(peer_host="203.0.113.1", auth_user="alice")
        verdict = self.successResultOf(policy.rcpt(session, t, box("a@example.org"), {}))
        self.assertEqual(verdict.reply.code, 450)
        other = session_info(peer_host="203.0.113.1", auth_user="bob")
        self.assertEqual(
            self.successResultOf(policy.rcpt(other, t, box("a@example.org"), {})), CONTINUE)

    def test_exempt_clients(self) -> None:
        """Exempt networks are never limited."""
        policy = self.policy(connections=1, exempt_clients=["192.0.2.0/24"])
        for _ in range(3):
            self.assertEqual(self.connect(policy)[1], CONTINUE)

    def test_window_memory_is_pruned(self) -> None:
        """Idle keys are dropped, so many clients do not grow memory forever."""
        window = ratelimit.SlidingWindow(10)
        for n in range(ratelimit._PRUNE_EVERY):
            window.allow(f"k{n}", float(n) * 0.001, 5)
        window.allow("late", 100.0, 5)
        for n in range(ratelimit._PRUNE_EVERY):
            window.allow("late", 100.0, 5000)
        self.assertEqual(list(window.events), ["late"])

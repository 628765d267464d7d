"""The greylist plugin: delay and expiry windows on a Clock, networks, persistence, allowlist."""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE, Action
from mailplat.policies import greylist
from mailplat.testing import session_info
from tests.policyfixtures import box, context

SECTION = {"delay": "5m", "retry_window": "1h", "expiry": "10d", "auto_allowlist_after": 3}


class GreylistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.policy = self.make()

    def make(self, **extra: object) -> greylist.GreylistPolicy:
        return greylist.make({**SECTION, **extra},
                             context(self.clock, data_dir=self.data_dir, trusted=("10.0.0.0/8",)))

    def rcpt(self, host: str = "192.0.2.1", sender: str = "a@example.net",
             recipient: str = "b@example.org", policy: object = None, **session: object) -> object:
        policy = policy or self.policy
        d = policy.rcpt(session_info(peer_host=host, **session), Transaction(sender),
                        box(recipient), {})
        return self.successResultOf(d)

    def test_first_attempt_greylisted(self) -> None:
        """An unknown triplet gets 450 4.7.1 saying how long to wait."""
        verdict = self.rcpt()
        self.assertEqual((verdict.action, verdict.reply.code, verdict.reply.status),
                         (Action.TEMPFAIL, 450, "4.7.1"))
        self.assertIn("300 seconds", verdict.reply.text)

    def test_retry_before_delay_still_greylisted(self) -> None:
        """A retry inside the delay is refused again with the time that is left."""
        self.rcpt()
        self.clock.advance(200)
        verdict = self.rcpt()
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        self.assertIn("100 seconds", verdict.reply.text)

    def test_retry_after_delay_passes_and_stays_passed(self) -> None:
        """After the delay the triplet passes, and later mail passes at once."""
        self.rcpt()
        self.clock.advance(300)
        self.assertEqual(self.rcpt(), CONTINUE)
        self.clock.advance(9 * 86400)
        self.assertEqual(self.rcpt(), CONTINUE)

    def test_neighbour_address_counts_as_same_client(self) -> None:
        """A retry from another address of the same /24 (or /64) is the same triplet."""
        self.rcpt(host="192.0.2.1")
        self.rcpt(host="2001:db8::1")
        self.clock.advance(300)
        self.assertEqual(self.rcpt(host="192.0.2.200"), CONTINUE)
        self.assertEqual(self.rcpt(host="2001:db8::ffff"), CONTINUE)
        self.assertEqual(self.rcpt(host="192.0.3.1").action, Action.TEMPFAIL)

    def test_unretried_triplet_expires(self) -> None:
        """A triplet not retried within retry_window starts over."""
        self.rcpt()
        self.clock.advance(3601)
        self.assertEqual(self.rcpt().action, Action.TEMPFAIL)
        self.clock.advance(300)
        self.assertEqual(self.rcpt(), CONTINUE)

    def test_passed_triplet_expires_when_unused(self) -> None:
        """A passed triplet unused for longer than expiry is greylisted again."""
        self.rcpt()
        self.clock.advance(300)
        self.rcpt()
        self.clock.advance(10 * 86400 + 1)
        self.assertEqual(self.rcpt().action, Action.TEMPFAIL)

    def test_auto_allowlist_after_retries(self) -> None:
        """After auto_allowlist_after retried triplets the client network is not greylisted."""
        for n in range(3):
            self.rcpt(sender=f"s{n}@example.net")
        self.clock.advance(300)
        for n in range(3):
            self.assertEqual(self.rcpt(sender=f"s{n}@example.net"), CONTINUE)
        self.assertEqual(self.rcpt(sender="new@example.net"), CONTINUE)
        self.assertEqual(self.rcpt(host="198.51.100.1", sender="new@example.net").action,
                         Action.TEMPFAIL)

    def test_skips(self) -> None:
        """Authenticated clients, trusted networks and allow_clients are not greylisted."""
        self.assertEqual(self.rcpt(auth_user="alice"), CONTINUE)
        self.assertEqual(self.rcpt(host="10.1.2.3"), CONTINUE)
        policy = self.make(allow_clients=["203.0.113.0/24"])
        self.assertEqual(self.rcpt(host="203.0.113.9", policy=policy), CONTINUE)

    def test_persistent_across_restart(self) -> None:
        """The state file written at stop lets a new instance accept the retry."""
        self.rcpt()
        self.successResultOf(self.policy.stop())
        with open(os.path.join(self.data_dir, "greylist.json")) as f:
            self.assertEqual(len(json.load(f)["triplets"]), 1)
        self.clock.advance(300)
        self.assertEqual(self.rcpt(policy=self.make()), CONTINUE)

    def test_saved_shortly_after_a_change(self) -> None:
        """A change is written after save_interval without waiting for shutdown."""
        self.rcpt()
        path = os.path.join(self.data_dir, "greylist.json")
        self.assertFalse(os.path.exists(path))
        self.clock.advance(5)
        self.assertTrue(os.path.exists(path))

    def test_unreadable_state_file_starts_empty(self) -> None:
        """A corrupt state file is logged and ignored, not fatal."""
        with open(os.path.join(self.data_dir, "greylist.json"), "w") as f:
            f.write("{not json")
        self.assertEqual(self.make().triplets, {})
        self.assertEqual(self.rcpt(policy=self.make()).action, Action.TEMPFAIL)

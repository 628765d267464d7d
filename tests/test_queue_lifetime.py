"""A message's whole life in the queue on a fake clock: retries at the scheduled times, the
delay warning once, the final bounce parsed back field by field, and RFC 3461 NOTIFY."""

from __future__ import annotations

from dataclasses import replace
from email.utils import parsedate_to_datetime

from mailplat.dsn import PassedOn
from mailplat.envelope import DELIVERED, Recipient
from mailplat.interfaces import Route
from mailplat.replies import Reply
from mailplat.store import DEFERRED as DEFERRED_DIR
from tests.queuefixtures import LATER, NO_USER, OK, SENDER, START, QueueTestCase, route

HOUR, DAY = 3600.0, 86400.0
STEP = 300.0


class LifetimeTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.use_real_notifier()
        self.seen: dict[str, list[float]] = {}
        self.agent.replies = self.answer
        self.script: dict[str, list[Reply]] = {}

    def answer(self, recipient: Recipient, route: Route) -> Reply:
        """Replies scripted per address (the last one repeats); DSNs to the sender are OK."""
        self.seen.setdefault(recipient.address, []).append(self.clock.seconds() - START)
        replies = self.script.get(recipient.address, [OK])
        return replies.pop(0) if len(replies) > 1 else replies[0]

    def run_until_empty(self, limit: float = 6 * DAY) -> None:
        """Advance the clock in steps until the queue is empty (bounded by ``limit``)."""
        for _ in range(int(limit / STEP)):
            if not any(self.store.list_ids(s) for s in ("incoming", "active", "deferred")):
                return
            self.clock.advance(STEP)
        self.fail("the queue never emptied")

    def test_whole_lifetime(self) -> None:
        """One recipient always deferred, one delivered, one failing on its second try: the
        deferred one is retried at 5, 15, 35, 75 minutes, then hourly until exactly 5 days,
        the sender gets one bounce per failure and one delay warning, and nothing more."""
        self.script = {"b@example.com": [LATER], "d@example.com": [LATER, NO_USER]}
        env = self.submit("b@example.com", "c@example.com", "d@example.com")
        self.run_until_empty()
        retries = self.seen["b@example.com"]
        self.assertEqual(retries[:6], [0, 300, 900, 2100, 4500, 8100])
        self.assertEqual({b - a for a, b in zip(retries[5:-1], retries[6:-1])}, {HOUR})
        self.assertEqual(retries[-1], 5 * DAY)
        self.assertEqual(self.seen["c@example.com"], [0])
        self.assertEqual(self.seen["d@example.com"], [0, 300])
        self.assertEqual(len(self.seen[SENDER]), 3)
        failed_d, delayed, failed_b = self.dsns()
        self.assertEqual(failed_d["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(delayed["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(failed_b["Subject"], "Undelivered Mail Returned to Sender")
        d_fields = failed_d.get_payload()[1].get_payload()[1]
        self.assertEqual((d_fields["Final-Recipient"], d_fields["Action"], d_fields["Status"]),
                         ("rfc822; d@example.com", "failed", "5.1.1"))
        self.assertEqual(d_fields["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        delay_fields = delayed.get_payload()[1].get_payload()
        self.assertEqual([b["Final-Recipient"] for b in delay_fields[1:]], ["rfc822; b@example.com"])
        self.assertEqual((delay_fields[1]["Action"], delay_fields[1]["Status"]),
                         ("delayed", "4.2.0"))
        until = parsedate_to_datetime(delay_fields[1]["Will-Retry-Until"]).timestamp()
        self.assertEqual(until, START + 5 * DAY)
        b_fields = failed_b.get_payload()[1].get_payload()
        self.assertEqual(parsedate_to_datetime(b_fields[0]["Arrival-Date"]).timestamp(), START)
        self.assertEqual((b_fields[1]["Action"], b_fields[1]["Status"]), ("failed", "5.4.7"))
        self.assertEqual(b_fields[1]["Diagnostic-Code"], "smtp; 451 4.2.0 Try again")
        returned = failed_b.get_payload()[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertEqual(returned.get_payload()[0]["Message-ID"], "<m1@example.org>")
        kinds = [line.split(": sender ")[1].split(" notification")[0]
                 for line in self.all_lines() if ": sender " in line]
        self.assertEqual(kinds, ["non-delivery", "delay", "non-delivery"])
        self.assertTrue(all(env.queue_id in line for line in self.all_lines()
                            if ": sender " in line))

    def test_delay_warning_after_four_hours_once(self) -> None:
        """The delay DSN comes with the first attempt after 4 hours, and never again."""
        self.script = {"b@example.com": [LATER]}
        self.submit("b@example.com")
        for _ in range(int(4 * HOUR / STEP)):
            self.clock.advance(STEP)
        self.assertEqual(self.dsns(), [])
        for _ in range(int(2 * DAY / STEP)):
            self.clock.advance(STEP)
        self.assertEqual([m["Subject"] for m in self.dsns()],
                         ["Delayed Mail (still being retried)"])
        [waiting] = self.store.list_ids(DEFERRED_DIR)
        self.assertTrue(self.state_of(waiting)[1].delay_notified)

    def test_never_bounce_a_bounce(self) -> None:
        """Mail from <> that fails is dropped with a log line: no bounce, no delay warning."""
        self.queue.schedule = replace(self.schedule, max_lifetime=5 * HOUR)  # past the warning
        self.script = {"b@example.com": [LATER], "c@example.com": [NO_USER]}
        env = self.submit("b@example.com", "c@example.com", sender="")
        self.run_until_empty()
        self.assertEqual(self.dsns(), [])
        self.assertNotIn(SENDER, self.seen)
        dropped = [line for line in self.all_lines() if "never bounce a bounce" in line]
        self.assertEqual(dropped, [
            f"{env.queue_id}: to=<c@example.com>: no bounce: the sender is <> "
            "(never bounce a bounce)",
            f"{env.queue_id}: to=<b@example.com>: no bounce: the sender is <> "
            "(never bounce a bounce)",
        ])

    def test_notify_never(self) -> None:
        """NOTIFY=NEVER: a failure and a long delay produce no DSN at all."""
        self.queue.schedule = replace(self.schedule, max_lifetime=5 * HOUR)  # past the warning
        self.script = {"b@example.com": [LATER], "c@example.com": [NO_USER]}
        self.submit("b@example.com", "c@example.com", notify=("NEVER",))
        self.run_until_empty()
        self.assertEqual(self.dsns(), [])

    def test_notify_success(self) -> None:
        """NOTIFY=SUCCESS: a delivered recipient earns a "delivered" DSN, and one relayed
        outside our domains a "relayed" one."""
        self.router.routes["@remote.test"] = route(relay=True)
        env = self.submit("b@example.com", "x@remote.test", notify=("SUCCESS",))
        self.clock.advance(0)
        reports = {m["Subject"]: m.get_payload()[1].get_payload()[1] for m in self.dsns()}
        delivered = reports["Successful Mail Delivery Report"]
        self.assertEqual((delivered["Final-Recipient"], delivered["Action"], delivered["Status"]),
                         ("rfc822; b@example.com", "delivered", "2.0.0"))
        self.assertEqual(reports["Mail Relay Report"]["Action"], "relayed")
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

    def test_no_relayed_report_when_next_hop_took_over(self) -> None:
        """A relay that passed NOTIFY on to a DSN-capable next hop (the agent answers with
        dsn.PassedOn) earns no "relayed" DSN from us: that MTA reports instead."""
        self.router.routes["@remote.test"] = route(relay=True)
        self.script = {"x@remote.test": [PassedOn(250, "2.0.0", "Ok, NOTIFY passed on")]}
        self.submit("x@remote.test", notify=("SUCCESS",))
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [])

    def test_success_is_silent_by_default(self) -> None:
        """Without NOTIFY, successful delivery sends nothing back."""
        self.submit("b@example.com", "c@example.com")
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [])


class OwedNoticeTests(QueueTestCase):
    def test_bounce_survives_notifier_failure_and_restart(self) -> None:
        """If the bounce cannot be queued, the message stays with the DSN owed; after a
        restart the DSN is sent and only then does the message leave the queue."""
        self.agent.replies = {"b@example.com": NO_USER}
        self.notifier.fail = True
        env = self.submit("b@example.com", "c@example.com")
        state, stored = self.state_of(env.queue_id)
        self.assertEqual(state, DEFERRED_DIR)
        self.assertEqual([r.dsn for r in stored.recipients], ["failed", None])
        self.assertEqual(stored.recipients[1].state, DELIVERED)
        self.agent.replies = None
        self.restart()
        self.clock.advance(self.queue.recovery_window)
        self.assertEqual(self.notifier.sent, [(env.queue_id, "failed", ["b@example.com"])])
        self.assertEqual(self.agent.deliveries, [])  # nobody is delivered twice
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

    def test_owed_notice_retried_on_schedule(self) -> None:
        """A DSN that failed to queue is tried again after the first retry interval."""
        self.agent.replies = {"b@example.com": NO_USER}
        self.notifier.fail = True
        env = self.submit("b@example.com")
        self.notifier.fail = False
        self.clock.advance(self.schedule.first - 1)
        self.assertEqual(self.notifier.sent, [])
        self.clock.advance(1)
        self.assertEqual(self.notifier.sent, [(env.queue_id, "failed", ["b@example.com"])])
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

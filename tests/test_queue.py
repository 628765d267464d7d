"""The QueueManager: per-recipient outcomes, retries, recovery and its log lines."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, fail
from zope.interface.verify import verifyObject

from mailplat.datafiles import DataFilePool
from mailplat.envelope import BOUNCED, DEFERRED, DELIVERED, Recipient
from mailplat.interfaces import IDeliveryAgent, IRouter, IStoredMessage, Route
from mailplat.queue import QueueManager, StoredMessage
from mailplat.replies import LOCAL_ERROR, Reply
from mailplat.store import ACTIVE, HOLD, INCOMING
from mailplat.store import DEFERRED as DEFERRED_DIR
from mailplat.testing import RecordingAgent, run_synchronously
from tests.queuefixtures import DATA, LATER, NO_USER, OK, QueueTestCase, route


class DeliveryTests(QueueTestCase):
    def test_interfaces(self) -> None:
        """The stored message, the recording agent and the static router provide their
        interfaces."""
        env = self.put(ACTIVE, "b@example.com")
        message = StoredMessage(env, self.store.data_path(env.queue_id))
        verifyObject(IStoredMessage, message)
        verifyObject(IDeliveryAgent, self.agent)
        verifyObject(IRouter, self.router)
        with message.open() as f:
            self.assertEqual(f.read(), DATA)

    def test_all_delivered_removes_message(self) -> None:
        """When every recipient got 2xx, envelope and data leave the queue."""
        env = self.submit("b@example.com", "c@example.com")
        [delivery] = self.agent.deliveries
        self.assertEqual(delivery.data, DATA)
        addresses = [r.address for r, _ in delivery.recipients]
        self.assertEqual(addresses, ["b@example.com", "c@example.com"])
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)
        self.assertFalse(os.path.exists(self.store.data_path(env.queue_id)))

    def test_delivered_data_file_goes_back_to_a_busy_spool(self) -> None:
        """With mail arriving, the spool's pool takes the delivered message's data file back,
        emptied and under a new queue id; the message itself is gone from the queue."""
        pool = DataFilePool(self.store, run_synchronously, self.clock)
        self.queue.data_files = pool
        pool.take()  # a session began a message: the spool is busy
        pool.take()
        made = set(os.listdir(self.store.data_dir))
        env = self.submit("b@example.com")
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)
        self.assertFalse(os.path.exists(self.store.data_path(env.queue_id)))
        [recycled] = set(os.listdir(self.store.data_dir)) - made
        self.assertEqual(os.path.getsize(self.store.data_path(recycled)), 0)
        taken = []
        for _ in range(len(made) + 1):  # the files made ahead first, then the recycled one
            entry = pool.take()
            assert entry is not None
            taken.append(entry[0])
            entry[1].close()
        self.assertIn(recycled, taken)

    def test_delivered_data_file_is_unlinked_when_spool_is_quiet(self) -> None:
        pool = DataFilePool(self.store, run_synchronously, self.clock)
        self.queue.data_files = pool
        env = self.submit("b@example.com")
        self.assertEqual(os.listdir(self.store.data_dir), [])
        self.assertFalse(os.path.exists(self.store.data_path(env.queue_id)))

    def test_outcomes_per_recipient(self) -> None:
        """2xx is delivered, 4xx deferred with a retry time, 5xx bounced, each on its own."""
        self.agent.replies = {"c@example.com": LATER, "d@example.com": NO_USER}
        env = self.submit("b@example.com", "c@example.com", "d@example.com")
        state, stored = self.state_of(env.queue_id)
        self.assertEqual(state, DEFERRED_DIR)
        b, c, d = stored.recipients
        self.assertEqual((b.state, b.agent, b.attempts), (DELIVERED, "recording", 1))
        self.assertEqual((c.state, c.attempts, c.next_attempt), (DEFERRED, 1, 10_300.0))
        self.assertEqual(c.last_reply, str(LATER))
        self.assertEqual((d.state, d.last_reply), (BOUNCED, str(NO_USER)))
        self.assertEqual(len(c.history), 1)
        self.assertEqual(self.notifier.sent, [(env.queue_id, "failed", ["d@example.com"])])

    def test_first_attempt_needs_no_envelope_file(self) -> None:
        """A committed message is tried from its data file alone: delivered, only that file
        goes; deferred, its envelope is filed into deferred/ and nowhere else."""
        done = self.submit("b@example.com")
        self.assertFalse(os.path.exists(self.store.data_path(done.queue_id)))
        self.agent.replies = {"c@example.com": LATER}
        later = self.submit("c@example.com")
        states = {state: os.listdir(self.store.state_dir(state))
                  for state in (INCOMING, ACTIVE, DEFERRED_DIR, HOLD)}
        self.assertEqual(states, {INCOMING: [], ACTIVE: [], DEFERRED_DIR: [f"{later.queue_id}.json"],
                                  HOLD: []})

    def test_only_deferred_recipient_retried_after_retry_delay(self) -> None:
        """The retry waits retry_delay and goes only to the recipient that got 4xx."""
        self.agent.replies = {"c@example.com": LATER}
        env = self.submit("b@example.com", "c@example.com")
        self.clock.advance(299)
        self.assertEqual(len(self.agent.deliveries), 1)
        self.agent.replies = None
        self.clock.advance(1)
        self.assertEqual(
            self.agent.delivered_to, ["b@example.com", "c@example.com", "c@example.com"]
        )
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

    def test_router_refusal_bounces_without_agent(self) -> None:
        """A recipient the router refuses with 5xx is bounced; the agent never sees it."""
        env = self.submit("b@example.com", "x@elsewhere.test")
        self.assertEqual(self.agent.delivered_to, ["b@example.com"])
        self.assertEqual(self.notifier.sent, [(env.queue_id, "failed", ["x@elsewhere.test"])])

    def test_router_tempfail_defers(self) -> None:
        """A 4xx from the router defers the recipient instead of bouncing it."""
        self.router.default = LATER
        env = self.submit("x@elsewhere.test")
        self.assertEqual(self.state_of(env.queue_id)[1].recipients[0].state, DEFERRED)

    def test_router_exception_defers(self) -> None:
        """A router that fails defers the recipient with 451 4.3.0."""
        self.patch(self.router, "route", lambda mailbox: fail(RuntimeError("dns down")))
        env = self.submit("b@example.com")
        recipient = self.state_of(env.queue_id)[1].recipients[0]
        self.assertEqual((recipient.state, recipient.last_reply), (DEFERRED, str(LOCAL_ERROR)))

    def test_agent_exception_defers_its_recipients(self) -> None:
        """An agent whose Deferred fails counts as 451 4.3.0 for all its recipients."""

        def explode(recipient: Recipient, route: Route) -> Reply:
            raise RuntimeError("agent bug")

        self.agent.replies = explode
        env = self.submit("b@example.com", "c@example.com")
        stored = self.state_of(env.queue_id)[1]
        self.assertEqual({r.last_reply for r in stored.recipients}, {str(LOCAL_ERROR)})
        self.assertTrue(any(e.get("log_failure") for e in self.events))

    def test_unknown_agent_defers(self) -> None:
        """A route naming an agent that is not configured defers with 451 4.3.5."""
        self.router.routes["@example.com"] = route(agent="nope")
        env = self.submit("b@example.com")
        self.assertIn("4.3.5", self.state_of(env.queue_id)[1].recipients[0].last_reply or "")

    def test_recipients_grouped_by_agent(self) -> None:
        """Each agent gets one call with all the recipients routed to it."""
        other = RecordingAgent("other")
        self.queue.agents["other"] = other
        self.router.routes["@other.test"] = route(agent="other")
        self.submit("b@example.com", "x@other.test", "c@example.com", "y@other.test")
        self.assertEqual([len(d.recipients) for d in self.agent.deliveries], [2])
        self.assertEqual(other.delivered_to, ["x@other.test", "y@other.test"])

    def test_expired_tempfail_bounces(self) -> None:
        """A 4xx after max_lifetime bounces instead of deferring again."""
        self.agent.replies = {"b@example.com": LATER}
        env = self.submit("b@example.com")
        self.clock.advance(self.queue.max_lifetime)
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)
        self.assertEqual(self.notifier.sent, [(env.queue_id, "failed", ["b@example.com"])])

    def test_log_line_per_recipient(self) -> None:
        """Each outcome is logged once, keyed by queue id, in the Postfix-like format."""
        self.agent.replies = {"c@example.com": LATER, "d@example.com": NO_USER}
        self.clock.advance(0)
        env = self.put(INCOMING, "b@example.com", "c@example.com", "d@example.com")
        self.queue.startService()
        self.clock.advance(1.5)
        self.successResultOf(self.queue.submit(env))
        q = env.queue_id
        self.assertEqual(
            self.lines(),
            [
                f"{q}: to=<b@example.com>, agent=recording, delay=1.50, status=sent (250 2.0.0 Ok)",
                f"{q}: to=<c@example.com>, agent=recording, delay=1.50, "
                "status=deferred (451 4.2.0 Try again)",
                f"{q}: to=<d@example.com>, agent=recording, delay=1.50, "
                "status=bounced (550 5.1.1 No such user)",
            ],
        )

    def test_stop_service_cancels_timers(self) -> None:
        """Stopping the queue leaves no retry timer behind."""
        self.agent.replies = {"b@example.com": LATER}
        self.submit("b@example.com")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.queue.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_agent_is_not_attempted_twice(self) -> None:
        """A message with an attempt in flight is not started again by a flush."""
        slow: Deferred[dict[str, Reply]] = Deferred()
        calls: list[object] = []

        def deliver(message: object, recipients: object) -> Deferred[dict[str, Reply]]:
            calls.append(message)
            return slow

        self.patch(self.agent, "deliver", deliver)
        env = self.put(INCOMING, "b@example.com")
        self.queue.startService()
        d = self.queue.submit(env)
        self.queue._schedule(env.queue_id, self.clock.seconds())
        self.clock.advance(1)
        slow.callback({"b@example.com": OK})
        self.successResultOf(d)
        self.assertEqual(len(calls), 1)
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

    def test_hold_and_release(self) -> None:
        """A held message is not retried until released."""
        self.agent.replies = {"b@example.com": LATER}
        env = self.submit("b@example.com")
        self.assertTrue(self.successResultOf(self.queue.hold(env.queue_id)))
        self.assertEqual(self.state_of(env.queue_id)[0], HOLD)
        self.clock.advance(1000)
        self.assertEqual(len(self.agent.deliveries), 1)
        self.agent.replies = None
        self.assertTrue(self.successResultOf(self.queue.release(env.queue_id)))
        self.clock.advance(0)
        self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)


class GatheredRemovalTests(QueueTestCase):
    """``removal_gather`` (the daemon's REMOVAL_GATHER): delivered messages' removals wait a
    moment to share one hop to the disk, and a stopping queue sends them at once."""

    def make_queue(self) -> QueueManager:
        self.hops: list[int] = []

        def run_blocking(f: object, *args: object) -> "Deferred[object]":
            self.hops.append(len(args[0]))  # type: ignore[arg-type]  # Batcher's job list
            return run_synchronously(f, *args)  # type: ignore[arg-type]

        return QueueManager(self.store, self.router, {"recording": self.agent}, self.clock,
                            schedule=self.schedule, run_blocking=run_blocking,
                            removal_gather=0.005)

    def test_removals_share_one_hop(self) -> None:
        self.queue.startService()
        envs = [self.put(INCOMING, f"u{n}@example.com") for n in range(3)]
        attempts = [self.queue.submit(env) for env in envs]
        self.assertEqual(len(self.agent.deliveries), 3)  # delivered at once ...
        for env in envs:  # ... removed only when the window closes
            self.assertTrue(os.path.exists(self.store.data_path(env.queue_id)))
            self.assertNoResult(attempts[envs.index(env)])
        self.clock.advance(0.005)
        self.assertEqual(self.hops, [3])
        for env, attempt in zip(envs, attempts):
            self.successResultOf(attempt)
            self.assertFalse(os.path.exists(self.store.data_path(env.queue_id)))
            self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)

    def test_stopping_sends_the_gathered_removals(self) -> None:
        self.queue.startService()
        env = self.put(INCOMING, "b@example.com")
        attempt = self.queue.submit(env)
        self.queue.stopService()
        self.successResultOf(attempt)
        self.assertEqual(self.hops, [1])
        self.assertFalse(os.path.exists(self.store.data_path(env.queue_id)))


class RecoveryTests(QueueTestCase):
    def test_recovery(self) -> None:
        """On start, incoming and active mail is delivered again, deferred mail waits for its
        time, held mail stays, and half-written data and temp files are removed."""
        incoming = self.put(INCOMING, "a@example.com")
        active = self.put(ACTIVE, "b@example.com")
        later = self.put(DEFERRED_DIR, "c@example.com", state=DEFERRED, next_attempt=10_100.0)
        held = self.put(HOLD, "d@example.com")
        with self.store.open_data_for_write("HALF") as f:
            f.write(b"half")
        open(os.path.join(self.store.tmp_dir, "junk"), "w").close()
        self.queue.startService()
        self.assertEqual(os.listdir(self.store.tmp_dir), [])
        self.assertFalse(os.path.exists(self.store.data_path("HALF")))
        self.clock.advance(0)
        self.assertEqual(sorted(self.agent.delivered_to), ["a@example.com", "b@example.com"])
        self.clock.advance(99)
        self.assertEqual(len(self.agent.deliveries), 2)
        self.clock.advance(1)
        self.assertEqual(self.agent.delivered_to[-1], "c@example.com")
        for env in (incoming, active, later):
            self.assertRaises(FileNotFoundError, self.state_of, env.queue_id)
        self.assertEqual(self.state_of(held.queue_id)[0], HOLD)

    def test_overdue_deferred_mail_is_spread_out(self) -> None:
        """Deferred mail overdue after a long downtime is retried spread over the recovery
        window, not all at once."""
        for _ in range(50):
            self.put(DEFERRED_DIR, "c@example.com", state=DEFERRED, next_attempt=5_000.0)
        self.queue.startService()
        self.clock.advance(0)
        self.assertLess(len(self.agent.deliveries), 10)
        self.clock.advance(self.queue.recovery_window)
        self.assertEqual(len(self.agent.deliveries), 50)
        self.assertEqual(self.store.list_ids(DEFERRED_DIR), [])

    def test_unreadable_envelope_goes_to_hold(self) -> None:
        """A corrupt deferred envelope is put on hold for the operator, not retried."""
        env = self.put(DEFERRED_DIR, "c@example.com")
        with open(self.store.envelope_path(env.queue_id, DEFERRED_DIR), "wb") as f:
            f.write(b"{not json")
        self.queue.startService()
        self.assertEqual(self.store.list_ids(HOLD), [env.queue_id])

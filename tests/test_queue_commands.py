"""Operator commands on the running queue, and the AMP control protocol that carries them."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from mailplat import control
from mailplat.envelope import DEFERRED, Recipient
from mailplat.interfaces import Route
from mailplat.replies import Reply
from mailplat.store import ACTIVE, HOLD
from mailplat.store import DEFERRED as DEFERRED_DIR
from tests.queuefixtures import LATER, QueueTestCase, route


class CommandTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.router.routes["@other.test"] = route()
        self.agent.replies = {"b@example.com": LATER, "x@other.test": LATER}

    def deferred_message(self, *addresses: str) -> str:
        return self.submit(*(addresses or ("b@example.com",))).queue_id

    def test_hold_stops_retries_release_resumes(self) -> None:
        """A held message is not retried however long it waits; released, it is tried at
        once if its retry time has passed."""
        qid = self.deferred_message()
        self.assertTrue(self.successResultOf(self.queue.hold(qid)))
        self.assertEqual(self.state_of(qid)[0], HOLD)
        self.clock.advance(10 * 3600)
        self.assertEqual(len(self.agent.deliveries), 1)
        self.assertTrue(self.successResultOf(self.queue.release(qid)))
        self.clock.advance(0)
        self.assertEqual(len(self.agent.deliveries), 2)
        self.assertEqual(self.state_of(qid)[0], DEFERRED_DIR)

    def test_release_needs_hold(self) -> None:
        """Only a held message can be released; unknown ids are refused."""
        qid = self.deferred_message()
        self.assertFalse(self.successResultOf(self.queue.release(qid)))
        self.assertFalse(self.successResultOf(self.queue.hold("NOSUCHID")))

    def test_flush_one(self) -> None:
        """Flushing a message tries its deferred recipients now, ignoring the schedule."""
        qid = self.deferred_message()
        self.assertEqual(self.successResultOf(self.queue.flush(qid)), 1)
        self.clock.advance(0)
        self.assertEqual(self.agent.delivered_to, ["b@example.com"] * 2)
        recipient = self.state_of(qid)[1].recipients[0]
        self.assertEqual((recipient.state, recipient.attempts), (DEFERRED, 2))

    def test_flush_all_and_by_domain(self) -> None:
        """A flush by domain only retries recipients at that domain; a plain flush all."""
        first = self.deferred_message("b@example.com", "x@other.test")
        self.deferred_message("b@example.com")
        self.assertEqual(self.successResultOf(self.queue.flush(domain="OTHER.test")), 1)
        self.clock.advance(0)
        self.assertEqual(self.agent.delivered_to[-1:], ["x@other.test"])
        self.assertEqual(len(self.agent.deliveries), 3)
        self.assertEqual(self.successResultOf(self.queue.flush()), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.agent.deliveries), 5)
        self.assertEqual(self.state_of(first)[1].recipients[1].attempts, 3)

    def test_flush_skips_held(self) -> None:
        """Held mail stays held through a flush."""
        qid = self.deferred_message()
        self.successResultOf(self.queue.hold(qid))
        self.assertEqual(self.successResultOf(self.queue.flush(qid)), 0)
        self.assertEqual(self.successResultOf(self.queue.flush()), 0)

    def test_delete(self) -> None:
        """A deleted message is gone from disk and from the schedule."""
        qid = self.deferred_message()
        self.assertTrue(self.successResultOf(self.queue.delete(qid)))
        self.assertEqual(self.store.state_of(qid), None)
        self.assertEqual(len(self.queue.due), 0)
        self.clock.advance(86400)
        self.assertEqual(len(self.agent.deliveries), 1)
        self.assertFalse(self.successResultOf(self.queue.delete(qid)))

    def test_delete_all_deferred(self) -> None:
        """--all-deferred deletes deferred mail and leaves held mail alone."""
        ids = [self.deferred_message() for _ in range(3)]
        self.successResultOf(self.queue.hold(ids[0]))
        self.assertEqual(self.successResultOf(self.queue.delete_deferred()), 2)
        self.assertEqual(self.store.list_ids(DEFERRED_DIR), [])
        self.assertEqual(self.store.list_ids(HOLD), [ids[0]])

    def test_bounce_returns_to_sender(self) -> None:
        """bounce fails every unfinished recipient, sends one DSN, removes the message."""
        qid = self.deferred_message("b@example.com", "c@example.com")
        self.assertTrue(self.successResultOf(self.queue.bounce(qid)))
        self.assertEqual(self.notifier.sent, [(qid, "failed", ["b@example.com"])])
        self.assertEqual(self.store.state_of(qid), None)
        self.assertIn(f"{qid}: to=<b@example.com>, agent=operator, delay=0.00, status=bounced "
                      "(554 5.0.0 Message returned to sender by the mail system administrator)",
                      self.lines())

    def test_bounce_held_message(self) -> None:
        """A held message can be returned to its sender too."""
        qid = self.deferred_message()
        self.successResultOf(self.queue.hold(qid))
        self.assertTrue(self.successResultOf(self.queue.bounce(qid)))
        self.assertEqual(len(self.notifier.sent), 1)

    def test_commands_wait_for_delivery_in_flight(self) -> None:
        """A command for a message being delivered waits until the attempt settles, so a
        delete never races a delivery and the message is delivered at most once."""
        slow: Deferred[dict[str, Reply]] = Deferred()
        calls: list[object] = []

        def deliver(message: object, recipients: list[tuple[Recipient, Route]]) -> Any:
            calls.append(message)
            return slow

        self.patch(self.agent, "deliver", deliver)
        qid = self.put(ACTIVE, "b@example.com").queue_id
        self.queue.startService()
        self.clock.advance(0)
        held, deleted = self.queue.hold(qid), self.queue.delete(qid)
        self.assertNoResult(held)
        self.assertEqual(self.state_of(qid)[0], ACTIVE)
        slow.callback({"b@example.com": LATER})
        self.assertTrue(self.successResultOf(held))
        self.assertTrue(self.successResultOf(deleted))
        self.assertEqual(self.store.state_of(qid), None)
        self.clock.advance(86400)
        self.assertEqual(len(calls), 1)


class ControlProtocolTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.agent.replies = {"b@example.com": LATER}

    def call(self, command: type[amp.Command], **arguments: Any) -> Any:
        """One AMP round trip between a client and the daemon's ControlProtocol in memory."""
        client, server, pump = connectedServerAndClient(
            lambda: control.ControlProtocol(self.queue), amp.AMP)
        d = client.callRemote(command, **arguments)
        pump.flush()
        return self.successResultOf(d)

    def test_commands_over_amp(self) -> None:
        """Each AMP command runs the queue operation and answers with a count."""
        qid = self.submit("b@example.com").queue_id
        self.assertEqual(self.call(control.Hold, queue_id=qid), {"count": 1})
        self.assertEqual(self.store.state_of(qid), HOLD)
        self.assertEqual(self.call(control.Release, queue_id=qid), {"count": 1})
        self.assertEqual(self.call(control.Flush, queue_id=qid), {"count": 1})
        self.assertEqual(self.call(control.Flush, domain="example.com"), {"count": 1})
        self.assertEqual(self.call(control.Flush), {"count": 1})
        self.assertEqual(self.call(control.Bounce, queue_id=qid), {"count": 1})
        self.assertEqual(self.notifier.sent, [(qid, "failed", ["b@example.com"])])
        self.assertEqual(self.call(control.Delete, queue_id=qid), {"count": 0})
        self.submit("b@example.com")
        self.assertEqual(self.call(control.DeleteDeferred), {"count": 1})
        self.assertEqual(self.store.list_ids(DEFERRED_DIR), [])

    def test_blocking_client_needs_no_reactor(self) -> None:
        """The command line's client reports a missing daemon distinctly."""
        path = self.mktemp()
        with self.assertRaises(control.NoDaemon):
            control.call(path, control.Flush, timeout=1.0)
        self.assertIn("longer than", str(self.assertRaises(
            control.ControlError, control.call, "/" + "x" * 200, control.Flush)))

"""Fixtures shared by the queue tests: a queue on a real store driven by a Clock."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import mailplat.dispatch
import mailplat.queue
import mailplat.queuecommands
import mailplat.queuenotices
from mailplat.dsn import Notifier
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import IStoredMessage, Route
from mailplat.queue import QueueManager
from mailplat.replies import Reply
from mailplat.schedule import RetrySchedule
from mailplat.spool import Spool
from mailplat.store import INCOMING, QueueStore, envelope_trailer
from mailplat.testing import RecordingAgent, StaticRouter, run_synchronously

DATA = b"Subject: test\r\nMessage-ID: <m1@example.org>\r\n\r\nhello\r\n"
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.2.0", "Try again")
NO_USER = Reply(550, "5.1.1", "No such user")
START = 10_000.0
SENDER = "alice@example.org"


def route(agent: str = "recording", destination: str = "/mail", relay: bool = False) -> Route:
    return Route(agent=agent, destination=destination, mailbox="x", relay=relay)


class RecordingNotifier:
    """Stands in for dsn.Notifier: records what would be sent; ``fail`` makes sending fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[str]]] = []
        self.fail = False

    def send(
        self, message: IStoredMessage, action: str, recipients: Sequence[Recipient],
        retry_until: float | None = None,
    ) -> "Deferred[str]":
        if self.fail:
            return fail(OSError("disk full"))
        self.sent.append((message.envelope.queue_id, action, [r.address for r in recipients]))
        return succeed(f"DSN{len(self.sent)}")


class QueueTestCase(SynchronousTestCase):
    """A QueueManager over a real QueueStore (fsyncs run inline) with a RecordingAgent."""

    schedule = RetrySchedule(jitter=0.0)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = QueueStore(self.mktemp(), runInThread=run_synchronously)
        self.agent = RecordingAgent()
        self.router = StaticRouter({"@example.com": route()})
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        for module in (mailplat.queue, mailplat.queuecommands, mailplat.queuenotices,
                       mailplat.dispatch):
            self.patch(module, "log", Logger(observer=observer))
        self.notifier = RecordingNotifier()
        self.queue = self.make_queue()

    def make_queue(self) -> QueueManager:
        return QueueManager(
            self.store, self.router, {"recording": self.agent}, self.clock,
            schedule=self.schedule, notifier=cast(Notifier, self.notifier),
        )

    def restart(self) -> None:
        """A new QueueManager, agent and notifier over the same queue directory, as after a
        daemon restart (the clock goes on)."""
        if self.queue.running:
            self.queue.stopService()
        self.store = QueueStore(self.store.root, runInThread=run_synchronously)
        self.agent = RecordingAgent(replies=self.agent.replies)
        self.notifier = RecordingNotifier()
        self.queue = self.make_queue()
        self.queue.startService()

    def use_real_notifier(self) -> Spool:
        """Send real DSNs through a Spool into this queue; mail to example.org is delivered
        by the recording agent, so the DSNs can be read back from ``self.agent``."""
        spool = Spool(self.store, None, self.queue.submit, self.clock, run_synchronously)
        self.queue.notifier = Notifier(spool, "mx.test", run_synchronously)
        self.router.routes["@example.org"] = route()
        return spool

    def put(self, where: str, *addresses: str, sender: str = SENDER, data: bytes = DATA,
            envelope_fields: dict[str, Any] | None = None, **recipient_fields: Any) -> Envelope:
        """Store a message with data in queue state ``where``, as the spool (or a crash)
        left it: INCOMING is an unfiled message (data and trailer, as committed), the other
        states have their envelope file."""
        qid = self.store.new_queue_id()
        recipients = tuple(Recipient(a, **recipient_fields) for a in addresses)
        fields = {"data_length": len(data), **(envelope_fields or {})}
        env = Envelope(qid, sender, recipients, received_at=self.clock.seconds(),
                       size=len(data), **fields)
        with self.store.open_data_for_write(qid) as f:
            f.write(data + envelope_trailer(env) if where == INCOMING else data)
        if where != INCOMING:
            self.successResultOf(self.store.write_envelope(env, where))
        return env

    def submit(self, *addresses: str, **kwargs: Any) -> Envelope:
        if not self.queue.running:
            self.queue.startService()  # first: its recovery would take the message itself
        env = self.put(INCOMING, *addresses, **kwargs)
        self.successResultOf(self.queue.submit(env))
        return env

    def state_of(self, qid: str) -> tuple[str, Envelope]:
        return self.store.read_envelope(qid)

    def lines(self, key: str = "status") -> list[str]:
        return [formatEvent(e) for e in self.events if key in e]

    def all_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def dsns(self) -> list[EmailMessage]:
        """Every DSN the recording agent received, parsed with the stdlib email package."""
        return [
            cast(EmailMessage, email.message_from_bytes(d.data, policy=email.policy.default))
            for d in self.agent.deliveries if d.envelope.session.listener == "dsn"
        ]

"""A real delivery target that fails and recovers, and a queue restarted with deferred mail:
retried on schedule, delivered once, nothing forgotten and no stampede."""

from __future__ import annotations

import os

from mailplat.interfaces import Route
from mailplat.maildir import MaildirAgent
from mailplat.queue import QueueManager
from mailplat.store import DEFERRED as DEFERRED_DIR
from mailplat.store import QueueStore
from mailplat.testing import StaticRouter, run_synchronously
from tests.queuefixtures import QueueTestCase

USERS = 20


class MaildirRecoveryTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.root = os.path.abspath(self.mktemp())
        self.domain_dir = os.path.join(self.root, "example.com")
        os.makedirs(self.root)
        with open(self.domain_dir, "w") as f:  # a file where the domain's directory belongs
            f.write("in the way\n")
        routes = {f"u{n}@example.com": Route("maildir", self.maildir(f"u{n}"), f"u{n}")
                  for n in range(USERS)}
        self.router = StaticRouter(routes)
        self.queue = self.make_queue()

    def make_queue(self) -> QueueManager:
        agent = MaildirAgent("mx.test", self.clock, runInThread=run_synchronously)
        return QueueManager(self.store, self.router, {"maildir": agent}, self.clock,
                            schedule=self.schedule)

    def maildir(self, user: str) -> str:
        return os.path.join(self.root, "example.com", user)

    def delivered(self, user: str) -> list[str]:
        new = os.path.join(self.maildir(user), "new")
        return os.listdir(new) if os.path.isdir(new) else []

    def fix(self) -> None:
        os.unlink(self.domain_dir)

    def test_fails_then_recovers_delivered_once(self) -> None:
        """A Maildir that cannot be created defers the message (451); once fixed, the
        scheduled retry delivers it, exactly once."""
        env = self.submit("u0@example.com")
        state, stored = self.state_of(env.queue_id)
        self.assertEqual(state, DEFERRED_DIR)
        self.assertTrue((stored.recipients[0].last_reply or "").startswith("451 4.3.0"))
        self.fix()
        self.clock.advance(self.schedule.first - 1)
        self.assertEqual(self.delivered("u0"), [])
        self.clock.advance(1)
        [name] = self.delivered("u0")
        with open(os.path.join(self.maildir("u0"), "new", name), "rb") as f:
            self.assertTrue(f.read().endswith(b"\r\n\r\nhello\r\n"))
        self.assertEqual(self.store.state_of(env.queue_id), None)
        self.clock.advance(86400)
        self.assertEqual(len(self.delivered("u0")), 1)
        statuses = [line.split("status=")[1].split(" ")[0] for line in self.lines()]
        self.assertEqual(statuses, ["deferred", "sent"])

    def test_restart_resumes_schedule(self) -> None:
        """After a restart, deferred mail keeps its retry times: nothing is tried at start
        (no stampede) and every message is delivered once, when it is due."""
        for n in range(USERS):
            self.submit(f"u{n}@example.com")
            self.clock.advance(10)
        self.queue.stopService()
        self.clock.advance(60)  # the daemon is down for a minute
        self.fix()
        self.store = QueueStore(self.store.root, runInThread=run_synchronously)
        self.queue = self.make_queue()
        self.queue.startService()
        self.clock.advance(0)
        self.assertEqual([u for u in range(USERS) if self.delivered(f"u{u}")], [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one timer, 20 messages
        # Message n failed at START + 10n and is due 300 s later; the restart came at +260.
        self.clock.advance(300 - 260 - 1)
        self.assertEqual([u for u in range(USERS) if self.delivered(f"u{u}")], [])
        self.clock.advance(1)
        self.assertEqual([u for u in range(USERS) if self.delivered(f"u{u}")], [0])
        for _ in range(USERS):
            self.clock.advance(10)
        self.assertEqual([len(self.delivered(f"u{n}")) for n in range(USERS)], [1] * USERS)
        self.assertEqual(self.store.list_ids(DEFERRED_DIR), [])

    def test_restart_after_long_downtime_spreads_retries(self) -> None:
        """Mail that became due while the server was down is retried over the recovery
        window rather than all at the first instant, and each message once."""
        for n in range(USERS):
            self.submit(f"u{n}@example.com")
        self.queue.stopService()
        self.clock.advance(3600)
        self.fix()
        self.queue = self.make_queue()
        self.queue.startService()
        self.clock.advance(0)
        early = sum(bool(self.delivered(f"u{n}")) for n in range(USERS))
        self.assertLess(early, USERS // 2)
        self.clock.advance(self.queue.recovery_window)
        self.assertEqual([len(self.delivered(f"u{n}")) for n in range(USERS)], [1] * USERS)

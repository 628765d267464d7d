"""The LMTP server (RFC 2033): LHLO, one reply per accepted recipient after the data, each
reflecting that recipient's own Maildir delivery; nothing is ever queued."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailplat.config import ListenerConfig
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import Action, IDeliveryAgent, IIncomingMessage, IMessageSink, Route
from mailplat.interfaces import Verdict
from mailplat.listeners import build_factory
from mailplat.lmtp import LMTPSink
from mailplat.maildir import MAILBOX_FULL, MaildirAgent
from mailplat.store import STATES, QueueStore
from mailplat.testing import ManualThreads, RecordingAgent, StaticRouter, run_synchronously
from tests.support import Client

BODY = b"Subject: hello\r\n\r\n.dotted\r\nbody\r\n"
HEAD = b"LHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"


def rcpts(*addresses: str) -> bytes:
    return b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in addresses)


@implementer(IDeliveryAgent)
class LateAgent:
    """Answers only when the test fires ``pending``; lets tests check reply timing."""

    name = "late"

    def __init__(self) -> None:
        self.pending: list[Deferred[dict[str, Any]]] = []

    def deliver(self, message: Any, recipients: Any) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.pending.append(d)
        return d


class LMTPTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = QueueStore(os.path.join(self.root, "queue"), runInThread=run_synchronously)
        self.threads = ManualThreads()
        self.maildir = MaildirAgent("mx.test", None, runInThread=run_synchronously)
        self.recording = RecordingAgent()
        self.late = LateAgent()
        self.router = StaticRouter({
            "alice@mx.test": self.route("alice"),
            "bob@mx.test": self.route("bob"),
            "broken@mx.test": Route("maildir", os.path.join(self.root, "not-a-dir", "x"), "b"),
            "full@mx.test": Route("recording", "", "full@mx.test"),
            "late@mx.test": Route("late", "", "late@mx.test"),
            "ghost@mx.test": Route("nonexistent", "", "ghost@mx.test"),
            "team@mx.test": Route("expand", "alias", "team@mx.test",
                                  expansion=("alice@mx.test", "bob@mx.test")),
            "mixed@mx.test": Route("expand", "alias", "mixed@mx.test",
                                   expansion=("alice@mx.test", "full@mx.test")),
        })
        self.agents: dict[str, Any] = {
            "maildir": self.maildir, "recording": self.recording, "late": self.late,
        }
        self.sink = LMTPSink(self.store, self.router, self.agents, Clock(),
                             runInThread=run_synchronously)
        self.client = Client(sink=self.sink, lmtp=True)
        self.client.take()
        with open(os.path.join(self.root, "not-a-dir"), "wb"):
            pass

    def route(self, user: str) -> Route:
        return Route("maildir", os.path.join(self.root, "mail", user), f"{user}@mx.test")

    def delivered(self, user: str) -> list[bytes]:
        new = os.path.join(self.root, "mail", user, "new")
        if not os.path.isdir(new):
            return []
        contents = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                contents.append(f.read())
        return contents

    def queue_is_empty(self) -> bool:
        dirs = [self.store.data_dir, self.store.tmp_dir, *map(self.store.state_dir, STATES)]
        return not any(os.listdir(d) for d in dirs)

    def transaction(self, *addresses: str, body: bytes = BODY) -> list[str]:
        """Final reply codes of one pipelined LMTP transaction (after 354)."""
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        codes = self.client.codes(HEAD + rcpts(*addresses) + b"DATA\r\n" + stuffed + b".\r\n")
        return codes[codes.index("354") + 1:]


class ReplyTests(LMTPTestCase):
    def test_providers(self) -> None:
        """The sink and its messages provide the interfaces the engine relies on."""
        verifyObject(IMessageSink, self.sink)
        message = self.sink.begin(SessionInfo(protocol="LMTP"), Transaction("a@b"))
        verifyObject(IIncomingMessage, message)
        message.abort()

    def test_delivered_before_250(self) -> None:
        """Each recipient's 250 comes after its Maildir file exists; nothing stays queued."""
        self.assertEqual(self.transaction("alice@mx.test", "bob@mx.test"),
                         ["250 2.0.0", "250 2.0.0"])
        for user in ("alice", "bob"):
            [message] = self.delivered(user)
            self.assertTrue(message.startswith(b"Received: from client.test"))
            self.assertTrue(message.endswith(BODY))
        self.assertTrue(self.queue_is_empty())

    def test_one_mailbox_full(self) -> None:
        """One recipient's full mailbox is a 452 4.2.2 for that one only, in RCPT order."""
        self.recording.replies = {"full@mx.test": MAILBOX_FULL}
        self.assertEqual(self.transaction("alice@mx.test", "full@mx.test", "bob@mx.test"),
                         ["250 2.0.0", "452 4.2.2", "250 2.0.0"])
        self.assertEqual(len(self.delivered("bob")), 1)

    def test_one_maildir_broken(self) -> None:
        """A Maildir that cannot be written gives that recipient a 4xx; others get 250."""
        self.assertEqual(self.transaction("broken@mx.test", "alice@mx.test"),
                         ["451 4.3.0", "250 2.0.0"])

    def test_everything_fails(self) -> None:
        """When every delivery fails there is still one reply per accepted recipient."""
        self.assertEqual(self.transaction("broken@mx.test", "ghost@mx.test", "nobody@mx.test"),
                         ["451 4.3.0", "451 4.3.5", "550 5.1.1"])
        self.assertTrue(self.queue_is_empty())

    def test_agent_failure_only_hits_its_recipients(self) -> None:
        """An agent that raises costs its own recipients a 451, not the others."""
        self.recording.replies = lambda recipient, route: 1 / 0  # type: ignore[assignment]
        self.assertEqual(self.transaction("full@mx.test", "alice@mx.test"),
                         ["451 4.3.0", "250 2.0.0"])
        self.flushLoggedErrors(ZeroDivisionError)

    def test_no_reply_before_delivery(self) -> None:
        """The replies wait for the slowest delivery, then come out in RCPT order."""
        out = self.client.send(HEAD + rcpts("late@mx.test", "alice@mx.test") + b"DATA\r\n"
                               + BODY + b".\r\n")
        self.assertEqual(out[-1][:3], b"354")
        self.assertEqual(self.client.take(), [])
        self.late.pending[0].callback({"late@mx.test": MAILBOX_FULL})
        self.assertEqual([line[:9] for line in self.client.take()],
                         [b"452 4.2.2", b"250 2.0.0"])

    def test_durable_before_reply(self) -> None:
        """Nothing is answered while the Maildir copy (tmp, fsync, rename) is still running."""
        self.maildir._run = self.threads
        self.client.send(HEAD + rcpts("alice@mx.test") + b"DATA\r\n" + BODY + b".\r\n")
        self.assertEqual(self.client.take(), [])
        self.threads.run_all()
        self.assertEqual([line[:9] for line in self.client.take()], [b"250 2.0.0"])
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_same_recipient_twice(self) -> None:
        """A recipient given twice gets two replies but one copy."""
        self.assertEqual(self.transaction("alice@mx.test", "alice@mx.test"),
                         ["250 2.0.0", "250 2.0.0"])
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_alias_delivers_to_each_final_address(self) -> None:
        """An alias RCPT gets one reply, after a copy reached each of its final mailboxes."""
        self.assertEqual(self.transaction("team@mx.test"), ["250 2.0.0"])
        self.assertEqual((len(self.delivered("alice")), len(self.delivered("bob"))), (1, 1))

    def test_alias_with_a_failing_member(self) -> None:
        """An alias whose member has a full mailbox answers that member's 4xx, so the
        client retries."""
        self.recording.replies = {"full@mx.test": MAILBOX_FULL}
        self.assertEqual(self.transaction("mixed@mx.test", "bob@mx.test"),
                         ["452 4.2.2", "250 2.0.0"])

    def test_refused_rcpt_gets_no_final_reply(self) -> None:
        """Only recipients accepted at RCPT are answered after the data."""
        self.client.policy.answers[("rcpt", "bob@mx.test")] = Verdict(Action.REJECT)
        self.assertEqual(self.transaction("alice@mx.test", "bob@mx.test"), ["250 2.0.0"])

    def test_bdat_last(self) -> None:
        """BDAT ... LAST ends an LMTP message with one reply per recipient too."""
        codes = self.client.codes(HEAD + rcpts("alice@mx.test", "bob@mx.test")
                                  + b"BDAT %d LAST\r\n" % len(BODY) + BODY)
        self.assertEqual(codes[-2:], ["250 2.0.0", "250 2.0.0"])
        self.assertEqual(len(self.delivered("bob")), 1)

    def test_too_big_answers_each(self) -> None:
        """A message over the size limit is refused once per recipient and not delivered."""
        self.client = Client(sink=self.sink, lmtp=True, max_message_size=10)
        self.client.take()
        self.assertEqual(self.transaction("alice@mx.test", "bob@mx.test"),
                         ["552 5.3.4", "552 5.3.4"])
        self.assertEqual(self.delivered("alice"), [])
        self.assertTrue(self.queue_is_empty())

    def test_rset_discards(self) -> None:
        """RSET in the middle of BDAT leaves no data file behind."""
        self.client.send(HEAD + rcpts("alice@mx.test") + b"BDAT 3\r\nabcRSET\r\n")
        self.assertTrue(self.queue_is_empty())
        self.assertEqual(self.delivered("alice"), [])

    def test_spool_refuses_data_file(self) -> None:
        """If the data file cannot be created, DATA is refused with 451 and nothing stays."""
        self.patch(self.store, "open_data_for_write", lambda qid: (_ for _ in ()).throw(
            OSError(28, "No space left on device")))
        codes = self.client.codes(HEAD + rcpts("alice@mx.test") + b"DATA\r\n")
        self.assertEqual(codes[-1], "452 4.3.1")


class LHLOTests(LMTPTestCase):
    def test_lhlo_keywords(self) -> None:
        """LHLO announces PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SIZE and CHUNKING."""
        lines = self.client.send(b"LHLO client.test\r\n")
        keywords = {line[4:].split(b" ")[0] for line in lines[1:]}
        self.assertTrue({b"PIPELINING", b"ENHANCEDSTATUSCODES", b"8BITMIME", b"SIZE",
                         b"CHUNKING"} <= keywords)

    def test_helo_and_ehlo_refused(self) -> None:
        """HELO and EHLO get 500 on an LMTP listener; MAIL before LHLO gets 503."""
        self.assertEqual(self.client.codes(b"HELO c\r\nEHLO c\r\nMAIL FROM:<a@b.test>\r\n"),
                         ["500 5.5.1", "500 5.5.1", "503 5.5.1"])

    def test_received_says_lmtp(self) -> None:
        """The trace header records the LMTP protocol and the id used in the log."""
        self.transaction("alice@mx.test")
        [message] = self.delivered("alice")
        self.assertIn(b"with LMTP id ", message)


class ProfileTests(SynchronousTestCase):
    def test_lmtp_profile(self) -> None:
        """The ``lmtp`` listener profile builds LMTP sessions that deliver through the
        server's router and agents."""
        store = QueueStore(self.mktemp(), runInThread=run_synchronously)
        config = SimpleNamespace(
            hostname="mx.test", max_message_size=1000, max_recipients=5, command_timeout=60.0,
            data_timeout=60.0, max_received_headers=10,
        )
        server = SimpleNamespace(config=config, store=store, router=StaticRouter({}),
                                 agents={}, policy=object())
        listener = ListenerConfig("lmtp", "unix:/nonexistent", "lmtp")
        factory = build_factory(listener, server, None)  # type: ignore[arg-type]
        session = factory.buildProtocol(None)
        self.assertTrue(session.settings.lmtp)
        self.assertEqual(session.settings.listener, "lmtp")
        self.assertIsInstance(session.sink, LMTPSink)
        self.assertIs(session.sink.router, server.router)

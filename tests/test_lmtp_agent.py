"""The ``lmtp`` delivery agent: per-recipient LMTP replies become queue outcomes (2xx delivered,
4xx deferred, 5xx bounced), unreachable servers defer, connections are reused; its config, its
plugin and the ``lmtp`` option of a domain."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.plugin import getPlugins
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import mailplat.plugins
from mailplat.client import SMTPClient
from mailplat.config import ConfigError, parse_config
from mailplat.envelope import BOUNCED, DEFERRED, DELIVERED, Envelope, Recipient
from mailplat.interfaces import (
    Action, AgentContext, IDeliveryAgent, IDeliveryAgentFactory, Route, Verdict,
)
from mailplat.lmtp import LMTPSink
from mailplat.lmtp_agent import NO_ENDPOINT, LMTPAgent
from mailplat.queue import StoredMessage
from mailplat.replies import Reply
from mailplat.routing import LocalRouter
from mailplat.session import ESMTPSession, SessionSettings
from mailplat.store import QueueStore, envelope_trailer
from mailplat.testing import RecordingAgent, StaticRouter, run_synchronously
from tests.support import ScriptedPolicy

DATA = b"Subject: test\r\n\r\nhello\r\n.dot\r\n"
DEST = "unix:/run/lmtp.test"
FULL = Reply(452, "4.2.2", "mailbox full")
GONE = Reply(550, "5.1.1", "no such user")


class FakeLMTPServers:
    """mailplat's own LMTP engine and sink, reached in memory (iosim) instead of a socket; the
    mailboxes behind it are a RecordingAgent answering ``replies``."""

    def __init__(self, testcase: SynchronousTestCase, clock: Clock) -> None:
        self.clock = clock
        self.store = QueueStore(testcase.mktemp(), runInThread=run_synchronously)
        self.mailboxes = RecordingAgent("mailboxes")
        self.policy = ScriptedPolicy()
        router = StaticRouter({"@example.org": Route("mailboxes", "", "")})
        self.sink = LMTPSink(self.store, router, {"mailboxes": self.mailboxes}, clock,
                             runInThread=run_synchronously)
        self.pumps: list[iosim.IOPump] = []
        self.connected_to: list[str] = []
        self.refuse = False

    def connect(self, destination: str) -> Deferred[SMTPClient]:
        if self.refuse:
            return fail(ConnectionRefusedError("nobody listens"))
        self.connected_to.append(destination)
        server = ESMTPSession(SessionSettings(hostname="lmtp.test", lmtp=True), self.policy,
                              self.sink, self.clock)
        client = SMTPClient("mx.test", self.clock, lmtp=True)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server),
                                        client, iosim.makeFakeClient(client), greet=False))
        return client.when_ready()

    def flush(self) -> None:
        for _ in range(10):  # each round moves every pending byte; a few rounds suffice
            for pump in self.pumps:
                pump.flush()

    def received(self) -> list[list[str]]:
        """The RCPT addresses of each message the LMTP server delivered."""
        return [[r.address for r, _ in d.recipients] for d in self.mailboxes.deliveries]


class AgentTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.servers = FakeLMTPServers(self, self.clock)
        self.agent = LMTPAgent("mx.test", self.clock, idle_timeout=10.0,
                               connector=self.servers.connect)
        self.queue_store = QueueStore(self.mktemp(), runInThread=run_synchronously)

    def message(self, *addresses: str, data: bytes = DATA) -> StoredMessage:
        qid = self.queue_store.new_queue_id()
        with self.queue_store.open_data_for_write(qid) as f:
            f.write(data)
        envelope = Envelope(qid, "a@example.com", tuple(Recipient(a) for a in addresses),
                            received_at=0.0, size=len(data))
        return StoredMessage(envelope, self.queue_store.data_path(qid))

    def deliver(self, message: StoredMessage, destination: str = DEST,
                mailboxes: dict[str, str] | None = None) -> dict[str, Reply]:
        pairs = [(r, Route("lmtp", destination, (mailboxes or {}).get(r.address, r.address)))
                 for r in message.envelope.recipients]
        result = self.agent.deliver(message, pairs)
        self.servers.flush()
        outcome: dict[str, Reply] = self.successResultOf(result)
        return outcome


class DeliveryTests(AgentTestCase):
    def test_provider(self) -> None:
        """The agent provides IDeliveryAgent under the name ``lmtp``."""
        verifyObject(IDeliveryAgent, self.agent)
        self.assertEqual(self.agent.name, "lmtp")

    def test_per_recipient_replies(self) -> None:
        """Each recipient's own LMTP reply comes back: 250, 452 and 550 side by side."""
        self.servers.mailboxes.replies = {"full@example.org": FULL, "gone@example.org": GONE}
        outcomes = self.deliver(self.message("ok@example.org", "full@example.org",
                                             "gone@example.org"))
        self.assertEqual({a: r.code for a, r in outcomes.items()},
                         {"ok@example.org": 250, "full@example.org": 452,
                          "gone@example.org": 550})
        self.assertEqual(self.servers.received(),
                         [["ok@example.org", "full@example.org", "gone@example.org"]])

    def test_message_arrives_whole(self) -> None:
        """The LMTP server gets the stored bytes exactly (dot-stuffing undone)."""
        self.deliver(self.message("ok@example.org"))
        [delivery] = self.servers.mailboxes.deliveries
        self.assertTrue(delivery.data.endswith(DATA))
        self.assertEqual(delivery.envelope.sender, "a@example.com")

    def test_rcpt_uses_route_mailbox(self) -> None:
        """The RCPT names the route's mailbox; the outcome is filed under the envelope
        address the queue knows."""
        outcomes = self.deliver(self.message("Alias@example.org"),
                                mailboxes={"Alias@example.org": "user@example.org"})
        self.assertEqual(self.servers.received(), [["user@example.org"]])
        self.assertEqual(list(outcomes), ["Alias@example.org"])

    def test_refused_connection_defers(self) -> None:
        """An LMTP server that is down defers every recipient (451 4.4.1), none bounce."""
        self.servers.refuse = True
        outcomes = self.deliver(self.message("a@example.org", "b@example.org"))
        self.assertEqual({(r.code, r.status) for r in outcomes.values()}, {(451, "4.4.1")})
        self.flushLoggedErrors()

    def test_refusing_greeting_defers(self) -> None:
        """Even a 5xx greeting defers: the mail store is ours to fix, not the sender's."""
        self.servers.policy.answers[("connect", "")] = Verdict(Action.REJECT)
        outcomes = self.deliver(self.message("a@example.org"))
        self.assertEqual(outcomes["a@example.org"].code, 451)
        self.assertIn("said: 550 5.7.1", outcomes["a@example.org"].text)

    def test_no_endpoint(self) -> None:
        """Without a destination in the route or in [agent.lmtp], the recipient waits (4xx)."""
        outcomes = self.deliver(self.message("a@example.org"), destination="")
        self.assertEqual(outcomes["a@example.org"], NO_ENDPOINT)
        self.agent.endpoint = "unix:/default"
        self.deliver(self.message("a@example.org"), destination="")
        self.assertEqual(self.servers.connected_to, ["unix:/default"])

    def test_one_connection_per_destination(self) -> None:
        """Recipients on two LMTP servers: one transaction on each."""
        message = self.message("a@example.org", "b@example.org")
        a, b = message.envelope.recipients
        result = self.agent.deliver(message, [(a, Route("lmtp", "unix:/one", a.address)),
                                              (b, Route("lmtp", "unix:/two", b.address))])
        self.servers.flush()
        self.assertEqual(len(self.successResultOf(result)), 2)
        self.assertEqual(sorted(self.servers.connected_to), ["unix:/one", "unix:/two"])


class ReuseTests(AgentTestCase):
    def test_consecutive_messages_share_a_connection(self) -> None:
        """Two messages in a row to one server go over one connection."""
        for number in range(2):
            outcome = self.deliver(self.message(f"u{number}@example.org"))
            self.assertEqual(outcome[f"u{number}@example.org"].code, 250)
        self.assertEqual((self.agent.pool.connections_made, len(self.servers.pumps)), (1, 1))
        self.assertEqual(len(self.servers.mailboxes.deliveries), 2)

    def test_idle_connection_closed(self) -> None:
        """An idle connection is QUIT after idle_timeout; the next message connects anew."""
        self.deliver(self.message("a@example.org"))
        [pump] = self.servers.pumps
        self.clock.advance(10.5)
        self.servers.flush()
        self.assertTrue(pump.client.transport.disconnecting or pump.client.disconnected)
        self.deliver(self.message("b@example.org"))
        self.assertEqual(self.agent.pool.connections_made, 2)

    def test_closed_connection_not_reused(self) -> None:
        """A pooled connection the server closed meanwhile is skipped, not used."""
        self.deliver(self.message("a@example.org"))
        [pump] = self.servers.pumps
        pump.server.transport.loseConnection()
        self.servers.flush()
        self.assertEqual(self.deliver(self.message("b@example.org"))["b@example.org"].code, 250)
        self.assertEqual(self.agent.pool.connections_made, 2)


    def test_dead_pooled_connection_retried_once(self) -> None:
        """A pooled connection the server dropped just as it was reused costs nothing: no reply
        was seen, so no data was sent, and the message goes over a new connection."""
        self.deliver(self.message("a@example.org"))
        [pump] = self.servers.pumps
        pump.server.transport.loseConnection()  # the client learns it only at the next flush
        self.assertEqual(self.deliver(self.message("b@example.org"))["b@example.org"].code, 250)
        self.assertEqual(self.agent.pool.connections_made, 2)
        self.assertEqual(self.servers.received(), [["a@example.org"], ["b@example.org"]])


class QueueOutcomeTests(AgentTestCase):
    def test_queue_records_each_outcome(self) -> None:
        """Through the QueueManager: 250 → delivered, 452 → deferred, 550 → bounced."""
        from mailplat.queue import QueueManager

        self.servers.mailboxes.replies = {"full@example.org": FULL, "gone@example.org": GONE}
        router = StaticRouter({"@example.org": Route("lmtp", DEST, "")})
        queue = QueueManager(self.queue_store, _MailboxIsAddress(router),
                             {"lmtp": self.agent}, self.clock, notifier=_NoDSN())  # type: ignore[arg-type]
        queue.startService()
        message = self.message("ok@example.org", "full@example.org", "gone@example.org")
        envelope = replace(message.envelope, data_length=message.envelope.size)
        with open(message.path, "ab") as f:  # committed as the spool does: the trailer
            f.write(envelope_trailer(envelope))
        self.addCleanup(queue.stopService)
        attempt = queue.submit(envelope)
        self.servers.flush()
        self.successResultOf(attempt)
        _, after = self.queue_store.read_envelope(envelope.queue_id)
        self.assertEqual([r.state for r in after.recipients], [DELIVERED, DEFERRED, BOUNCED])
        self.assertEqual(after.recipients[1].last_reply, str(FULL))


class _MailboxIsAddress:
    """A router giving each address an LMTP route whose mailbox is the address itself."""

    def __init__(self, router: StaticRouter) -> None:
        self.router = router

    def route(self, recipient: Any) -> Any:
        from dataclasses import replace

        address = f"{recipient.local}@{recipient.domain}"
        return self.router.route(recipient).addCallback(
            lambda r: replace(r, mailbox=address) if isinstance(r, Route) else r)


class _NoDSN:
    def send(self, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import succeed

        return succeed("DSN")


class ConfigTests(SynchronousTestCase):
    BASE = ('[[listener]]\nname = "l"\nendpoint = "unix:/tmp/x.sock"\nprofile = "lmtp"\n'
            '[domains."example.org"]\ncatch_all = true\nlmtp = "unix:/run/dovecot/lmtp"\n'
            '[domains."localhost"]\ncatch_all = true\n')

    def test_domain_routed_by_lmtp(self) -> None:
        """``lmtp = ENDPOINT`` in a domain routes its mailboxes to the lmtp agent."""
        router = LocalRouter(parse_config(self.BASE))
        from mailplat.address import Mailbox

        route = router.resolve(Mailbox("Bob", "example.org"))
        self.assertEqual((route.agent, route.destination, route.mailbox),
                         ("lmtp", "unix:/run/dovecot/lmtp", "Bob@example.org"))
        self.assertEqual(router.resolve(Mailbox("bob", "localhost")).agent, "maildir")

    def test_bad_domain_endpoint(self) -> None:
        """A domain's lmtp endpoint that Twisted cannot parse is a config error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(self.BASE.replace("unix:/run/dovecot/lmtp", "inet:1.2.3.4:24"))
        self.assertIn('domains."example.org".lmtp', str(caught.exception))

    def test_agent_section(self) -> None:
        """[agent.lmtp] is checked: unknown keys, endpoints and durations are reported."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(self.BASE + '[agent.lmtp]\nendpoint = "tcp:host=x"\n'
                         'idle_timeout = "soon"\nmax_idel = 3\n')
        text = str(caught.exception)
        for key in ("agent.lmtp.endpoint", "agent.lmtp.idle_timeout", "agent.lmtp.max_idel"):
            self.assertIn(key, text)

    def test_plugin_builds_agent(self) -> None:
        """The plugin named ``lmtp`` builds the agent from its [agent.lmtp] section."""
        [factory] = [f for f in getPlugins(IDeliveryAgentFactory, mailplat.plugins)
                     if f.name == "lmtp"]
        config = parse_config(self.BASE + '[agent.lmtp]\nendpoint = "tcp:host=127.0.0.1:port=24"'
                              '\nidle_timeout = "30s"\nmax_idle = 2\n')
        agent = factory.makeAgent(config.raw["agent"]["lmtp"], AgentContext(Clock(), "mx.test"))
        verifyObject(IDeliveryAgent, agent)
        self.assertEqual((agent.endpoint, agent.pool.idle_timeout, agent.pool.max_idle),
                         ("tcp:host=127.0.0.1:port=24", 30.0, 2))

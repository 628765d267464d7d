"""ETRN (RFC 1985) on the relay listener: who may ask, for which node, and the replies
250/251/253/458/459; held mail of a site with a static host goes there over a new connection."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailplat.odmr
from mailplat.envelope import DEFERRED as RCPT_DEFERRED
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import Route
from mailplat.odmr import EtrnRelaySession, OdmrContext
from mailplat.odmr_hold import HoldAgent, Site, Sites
from mailplat.policy import parse_networks
from mailplat.queue import QueueManager
from mailplat.replies import Reply
from mailplat.session import ESMTPFactory, SessionSettings
from mailplat.store import DEFERRED, QueueStore
from mailplat.submission import Security
from mailplat.testing import MemorySink, RecordingAgent, StaticRouter, run_synchronously
from mailplat.turnaround import Collect, endpoint_connector
from tests.odmr_support import DATA, accounts, cram_answer, hold
from tests.support import Client, ScriptedPolicy

HOST = "tcp:host=192.0.2.10:port=25"
SITES = Sites([
    Site("site1.example", frozenset({"siteuser"}), HOST, ("192.0.2.0/24",)),
    Site("sub.site1.example", frozenset({"siteuser"}), HOST, ("192.0.2.0/24",)),
    Site("site2.example", frozenset({"siteuser"}), None, ("192.0.2.0/24",)),
])
ROUTES = {"@site1.example": Route("odmr", "site1.example", "x"),
          "@sub.site1.example": Route("odmr", "sub.site1.example", "x"),
          "@relayed.example": Route("recording", "relayed.example", "x")}


class FakeSite:
    """Stands in for a connected SMTPClient to the site's host."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.usable = True
        self.quitted = False

    def when_ready(self) -> Deferred[Any]:
        return succeed(self)

    def send(self, sender: str, recipients: list[str], source: Any, params: Any
             ) -> Deferred[dict[str, Reply]]:
        self.sent.append(list(recipients))
        return succeed({r: Reply(250, "2.0.0", "ok") for r in recipients})

    def quit(self) -> Deferred[Reply]:
        self.quitted = True
        return succeed(Reply(221, "2.0.0", "bye"))


class EtrnClient(Client):
    """tests.support.Client for the relay session with ETRN, from a chosen address."""

    def __init__(self, test: SynchronousTestCase, peer: str = "192.0.2.10") -> None:
        self.clock = Clock()
        self.sink, self.policy = MemorySink(), ScriptedPolicy()
        self.store = QueueStore(test.mktemp(), runInThread=run_synchronously)
        self.agent = HoldAgent()
        self.relayed = RecordingAgent(replies={"x@relayed.example": Reply(451, "4.4.1", "down")})
        self.queue = QueueManager(self.store, StaticRouter(ROUTES),
                                  {"odmr": self.agent, "recording": self.relayed}, self.clock)
        self.site = FakeSite()
        self.hosts: list[str] = []
        self.portal, self.secrets, _ = accounts(test)
        self.context = OdmrContext(
            SITES, Collect(self.agent, self.queue, "mx.test", self.clock),
            trusted=parse_networks(["198.51.100.0/24"]), connector=self._connect)
        security = Security(portal=self.portal, cram_available=lambda: True)
        self.session = EtrnRelaySession(SessionSettings(hostname="mx.test"), self.policy,
                                        self.sink, self.clock, security)
        self.session.factory = SimpleNamespace(odmr=self.context)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 4000))
        self.session.makeConnection(self.transport)
        self.take()

    def _connect(self, host: str) -> Deferred[Any]:
        self.hosts.append(host)
        return succeed(self.site)

    def etrn(self, node: str) -> list[bytes]:
        return self.send(b"EHLO client.test\r\nETRN " + node.encode() + b"\r\n")[-1:]


class EtrnTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = EtrnClient(self)

    def test_advertised(self) -> None:
        """The relay listener's EHLO lists ETRN."""
        self.assertIn(b"250-ETRN", self.client.send(b"EHLO client.test\r\n"))

    def test_sequence_and_syntax(self) -> None:
        """ETRN needs EHLO, an argument that names a node, and no transaction in progress."""
        self.assertEqual(self.client.codes(b"ETRN site1.example\r\n"), ["503 5.5.1"])
        self.assertEqual(self.client.codes(b"EHLO c.test\r\nETRN\r\nETRN a..b\r\nETRN @\r\n"),
                         ["250", "501 5.5.4", "501 5.5.4", "501 5.5.4"])
        self.assertEqual(self.client.codes(b"MAIL FROM:<a@b.example>\r\nETRN site1.example\r\n"),
                         ["250 2.1.0", "503 5.5.1"])

    def test_site_mail_sent_to_its_host(self) -> None:
        """ETRN for a site with held mail: 253 with the count, then the mail goes to the
        site's etrn_host and leaves the queue; the domain is free again afterwards."""
        message = hold(self.client.store, "a@site1.example")
        self.assertEqual(self.client.etrn("site1.example"),
                         [b"253 2.0.0 OK, 1 pending messages for node site1.example started"])
        self.assertEqual(self.client.hosts, [HOST])
        self.assertEqual(self.client.site.sent, [["a@site1.example"]])
        self.assertTrue(self.client.site.quitted)
        self.assertIsNone(self.client.store.state_of(message.queue_id))
        self.assertFalse(self.client.agent.locked("site1.example"))

    def test_subdomains_and_queue_names(self) -> None:
        """``@domain`` takes the sites below it too; ``#name`` names a site's queue."""
        hold(self.client.store, "a@site1.example", "b@sub.site1.example")
        self.assertEqual(self.client.etrn("@site1.example")[0][:4], b"253 ")
        self.assertEqual(self.client.site.sent, [["a@site1.example", "b@sub.site1.example"]])
        self.assertEqual(self.client.etrn("#nosuch")[0][:4], b"459 ")
        self.assertEqual(self.client.etrn("#site1.example")[0][:4], b"251 ")

    def test_nothing_waiting(self) -> None:
        """No mail for the node: 251."""
        self.assertEqual(self.client.etrn("site1.example"),
                         [b"251 2.0.0 OK, no messages waiting for node site1.example"])
        self.assertEqual(self.client.hosts, [])

    def test_client_not_allowed(self) -> None:
        """A client outside the site's etrn_clients (and not its account) gets 459."""
        stranger = EtrnClient(self, peer="203.0.113.5")
        hold(stranger.store, "a@site1.example")
        self.assertEqual(stranger.etrn("site1.example")[0][:4], b"459 ")
        self.assertEqual(stranger.hosts, [])

    def test_account_may_etrn(self) -> None:
        """The site's account, authenticated on the relay listener, may ETRN from anywhere."""
        client = EtrnClient(self, peer="203.0.113.5")
        hold(client.store, "a@site1.example")
        client.send(b"EHLO c.test\r\n")
        [challenge] = client.send(b"AUTH CRAM-MD5\r\n")
        client.send(cram_answer("siteuser", client.secrets["siteuser"], challenge))
        self.assertEqual(client.etrn("site1.example")[0][:4], b"253 ")

    def test_site_without_host(self) -> None:
        """A site without etrn_host collects by ATRN only: 459."""
        self.assertIn(b"use ODMR", self.client.etrn("site2.example")[0])

    def test_locked(self) -> None:
        """A site being collected right now: 458, and nothing is sent."""
        hold(self.client.store, "a@site1.example")
        self.client.agent.lock({"site1.example"})
        self.assertEqual(self.client.etrn("site1.example")[0][:4], b"458 ")
        self.assertEqual(self.client.hosts, [])

    def test_scan_failure(self) -> None:
        """Trouble reading the queue: 458."""
        self.patch(mailplat.odmr, "waiting", lambda queue, domains: fail(OSError("EIO")))
        self.assertEqual(self.client.etrn("site1.example")[0][:4], b"458 ")
        self.flushLoggedErrors(OSError)

    def test_other_domain_flush(self) -> None:
        """For any other domain a trusted client makes the deferred mail be retried now."""
        trusted = EtrnClient(self, peer="198.51.100.7")
        envelope = Envelope("0001", "a@example.org", (Recipient(
            "x@relayed.example", state=RCPT_DEFERRED, attempts=1, next_attempt=9e9),),
            received_at=0.0, size=len(DATA))
        with trusted.store.open_data_for_write("0001") as f:
            f.write(DATA)
        self.successResultOf(trusted.store.write_envelope(envelope, DEFERRED))
        trusted.queue.startService()
        self.assertEqual(trusted.etrn("relayed.example")[0][:4], b"253 ")
        trusted.clock.advance(0)
        self.assertEqual(trusted.etrn("@relayed.example")[0][:4], b"253 ")
        trusted.clock.advance(0)
        self.assertEqual(trusted.relayed.delivered_to, ["x@relayed.example"] * 2)
        self.assertEqual(trusted.etrn("nothing.example")[0][:4], b"251 ")

    def test_other_domain_untrusted(self) -> None:
        """Strangers may not trigger queue runs for other domains: 459."""
        self.assertEqual(self.client.etrn("relayed.example")[0][:4], b"459 ")


class EtrnLoopbackTests(TestCase):
    """ETRN with a real connection to the site's host (our engine over a MemorySink)."""

    async def test_real_host(self) -> None:
        """The held message arrives at the site's host, byte for byte after the trace."""
        sink = MemorySink()
        factory = ESMTPFactory(SessionSettings(hostname="site.test"), ScriptedPolicy(), sink,
                               global_reactor)
        port = await TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = EtrnClient(self)
        host = f"tcp:host=127.0.0.1:port={port.getHost().port}"
        client.context.sites = Sites([Site("site1.example", frozenset(), host,
                                           ("192.0.2.0/24",))])
        assert client.context.collect is not None
        collect = Collect(client.agent, client.queue, "mx.test", global_reactor)
        client.context.collect = collect
        client.context.connector = endpoint_connector(global_reactor, collect)
        message = hold(client.store, "a@site1.example")
        self.assertEqual(client.etrn("site1.example")[0][:4], b"253 ")
        [started] = client.context.etrn_started
        await started
        [received] = sink.messages
        self.assertTrue(received.data.endswith(b"\r\n" + DATA))
        self.assertEqual(received.transaction.recipients[0].address, "a@site1.example")
        self.assertIsNone(client.store.state_of(message.queue_id))

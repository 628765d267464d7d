"""The ODMR service (RFC 2645): its states and replies, ATRN, and the turnaround, on a
StringTransport with a Clock and over real loopback connections (plaintext and TLS)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trustme
from cryptography.x509 import DNSName, SubjectAlternativeName
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailplat.odmr
from mailplat.client import SMTPClient
from mailplat.envelope import BOUNCED, HELD
from mailplat.interfaces import Route
from mailplat.listener_security import SecureFactory
from mailplat.odmr import OdmrContext, OdmrSession
from mailplat.odmr_hold import HoldAgent, Site, Sites
from mailplat.queue import QueueManager
from mailplat.session import SessionSettings
from mailplat.store import DEFERRED, QueueStore
from mailplat.submission import Security
from mailplat.testing import MemorySink, StaticRouter, run_synchronously
from mailplat.turnaround import Collect
from tests.odmr_support import DATA, SiteProtocol, accounts, cram_answer, hold
from tests.support import Client, ScriptedPolicy

SITES = Sites([Site("site1.example", frozenset({"siteuser"})),
               Site("site2.example", frozenset({"siteuser"})),
               Site("site3.example", frozenset({"other"}))])
ROUTES = {f"@site{n}.example": Route("odmr", f"site{n}.example", "x") for n in (1, 2, 3)}
EHLO_PIPELINING = b"250-site.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class FakeTLSTransport(StringTransport):
    """A StringTransport that can "start TLS" and whose ``protocol`` can be swapped."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.9", 4000))
        self.tls: Any = None
        self.protocol: Any = None

    def startTLS(self, context: Any) -> None:
        self.tls = context
        self.clear()


class Provider:
    """A queue with held mail, the odmr agent and the accounts: the provider's side."""

    def __init__(self, test: SynchronousTestCase, clock: Any = None, threaded: bool = False
                 ) -> None:
        self.clock = clock or Clock()
        threads = None if threaded else run_synchronously
        self.store = QueueStore(test.mktemp(), runInThread=threads)
        self.agent = HoldAgent()
        self.queue = QueueManager(self.store, StaticRouter(ROUTES), {"odmr": self.agent},
                                  self.clock)
        self.portal, self.secrets, _ = accounts(test, threads or run_synchronously)
        collect = Collect(self.agent, self.queue, "mx.test", self.clock)
        self.context = OdmrContext(SITES, collect)

    def held(self) -> dict[str, str]:
        """Every queued recipient and its state."""
        states = {}
        for qid in self.store.list_ids(DEFERRED):
            for r in self.store.read_envelope(qid)[1].recipients:
                states[r.address] = r.state
        return states


class OdmrClient(Client):
    """tests.support.Client for an OdmrSession."""

    def __init__(self, provider: Provider, tls: Any = object()) -> None:
        self.clock, self.sink, self.policy = provider.clock, MemorySink(), ScriptedPolicy()
        self.provider = provider
        security = Security(tls=tls, portal=provider.portal, require_auth=True,
                            cram_available=lambda: True)
        settings = SessionSettings(hostname="mx.test", listener="odmr")
        self.session = OdmrSession(settings, self.policy, self.sink, self.clock, security)
        self.session.factory = SimpleNamespace(odmr=provider.context)
        self.transport = FakeTLSTransport()
        self.transport.protocol = self.session
        self.session.makeConnection(self.transport)
        self.take()

    def login(self, user: str = "siteuser") -> None:
        self.send(b"EHLO site.test\r\n")
        [challenge] = self.send(b"AUTH CRAM-MD5\r\n")
        answer = cram_answer(user, self.provider.secrets[user], challenge)
        assert self.codes(answer) == ["235 2.7.0"]

    def site(self, data: bytes) -> list[bytes]:
        """After the turnaround: the site's bytes go to whatever protocol the transport has."""
        self.transport.protocol.dataReceived(data)
        return self.take()


class SessionStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = OdmrClient(Provider(self))

    def test_greeting(self) -> None:
        """The service greets with 220 like any SMTP server."""
        fresh = OdmrClient(Provider(self))
        fresh.session.makeConnection(fresh.transport)
        self.assertTrue(fresh.take()[0].startswith(b"220 mx.test "))

    def test_ehlo_keywords(self) -> None:
        """EHLO offers STARTTLS, AUTH CRAM-MD5 (no PLAIN/LOGIN in plaintext) and ATRN, and
        nothing about receiving mail."""
        lines = self.client.send(b"EHLO site.test\r\n")
        keywords = [line[4:] for line in lines[1:]]
        self.assertEqual(keywords, [b"ENHANCEDSTATUSCODES", b"STARTTLS", b"AUTH CRAM-MD5",
                                    b"ATRN"])

    def test_plain_and_login_under_tls(self) -> None:
        """Once STARTTLS ran, AUTH also offers PLAIN and LOGIN, and STARTTLS is gone."""
        client = OdmrClient(Provider(self))
        client.send(b"EHLO site.test\r\nSTARTTLS\r\n")
        keywords = [line[4:] for line in client.send(b"EHLO site.test\r\n")[1:]]
        self.assertEqual(keywords, [b"ENHANCEDSTATUSCODES", b"AUTH PLAIN LOGIN CRAM-MD5",
                                    b"ATRN"])

    def test_before_auth(self) -> None:
        """Before AUTH: ATRN is 530 5.7.0; mail, VRFY, EXPN, TURN, ETRN, HELO are 502."""
        self.client.send(b"EHLO site.test\r\n")
        self.assertEqual(self.client.codes(b"ATRN site1.example\r\n"), ["530 5.7.0"])
        for line in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<a@b.example>", b"DATA",
                     b"VRFY postmaster", b"EXPN list", b"TURN", b"ETRN site1.example",
                     b"HELO site.test", b"HELP"):
            self.assertEqual(self.client.codes(line + b"\r\n"), ["502 5.5.1"], line)
        self.assertEqual(self.client.codes(b"NOOP\r\nRSET\r\n"), ["250 2.0.0", "250 2.0.0"])

    def test_after_auth(self) -> None:
        """After AUTH: mail commands stay 502; STARTTLS and a second AUTH are 503."""
        self.client.login()
        self.assertEqual(self.client.codes(b"MAIL FROM:<a@b.example>\r\nVRFY x\r\n"),
                         ["502 5.5.1", "502 5.5.1"])
        self.assertEqual(self.client.codes(b"STARTTLS\r\nAUTH CRAM-MD5\r\n"),
                         ["503 5.5.1", "503 5.5.1"])
        self.assertEqual(self.client.codes(b"NOOP\r\nRSET\r\n"), ["250 2.0.0", "250 2.0.0"])

    def test_quit(self) -> None:
        """QUIT works in both states."""
        self.assertEqual(self.client.codes(b"QUIT\r\n"), ["221 2.0.0"])

    def test_wrong_secret(self) -> None:
        """A wrong CRAM-MD5 answer is 535 and ATRN still needs AUTH."""
        self.client.send(b"EHLO site.test\r\n")
        [challenge] = self.client.send(b"AUTH CRAM-MD5\r\n")
        self.assertEqual(self.client.codes(cram_answer("siteuser", b"wrong", challenge)), [])
        self.client.clock.advance(1)
        self.assertEqual([c.split()[0] for c in self.client.take()], [b"535"])
        self.assertEqual(self.client.codes(b"ATRN\r\n"), ["530 5.7.0"])


class AtrnReplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.provider = Provider(self)
        self.client = OdmrClient(self.provider)
        self.client.login()

    def test_unowned_domain(self) -> None:
        """A domain the account does not own: 450, nothing locked, nothing released."""
        hold(self.provider.store, "a@site1.example", "c@site3.example")
        self.assertEqual(self.client.codes(b"ATRN site1.example,site3.example\r\n"),
                         ["450 4.7.1"])
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD, "c@site3.example": HELD})
        self.assertIs(self.client.transport.protocol, self.client.session)

    def test_account_without_domains(self) -> None:
        """ATRN with no domains from an account that owns none is refused with 450."""
        self.provider.context.sites = Sites([])
        self.assertEqual(self.client.codes(b"ATRN\r\n"), ["450 4.7.1"])

    def test_no_mail(self) -> None:
        """Nothing waiting for the domains: 453, and they are not left locked."""
        hold(self.provider.store, "c@site3.example")
        self.assertEqual(self.client.codes(b"ATRN site1.example\r\n"), ["453 4.3.0"])
        self.assertFalse(self.provider.agent.locked("site1.example"))

    def test_locked(self) -> None:
        """A domain being collected by another connection: 451, until it is free again."""
        hold(self.provider.store, "a@site1.example")
        self.provider.agent.lock({"site2.example"})
        self.assertEqual(self.client.codes(b"ATRN\r\n"), ["451 4.3.0"])
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.provider.agent.unlock({"site2.example"})
        self.assertEqual(self.client.codes(b"ATRN\r\n"), ["250 2.0.0"])

    def test_syntax(self) -> None:
        """Something that is not a list of domain names is 501."""
        self.assertEqual(self.client.codes(b"ATRN site1..example\r\n"), ["501 5.5.4"])
        self.assertEqual(self.client.codes(b"ATRN site1.example, \r\n"), ["501 5.5.4"])

    def test_scan_failure(self) -> None:
        """Trouble looking at the queue is transient: 451, and the lock is given back."""
        self.patch(mailplat.odmr, "waiting", lambda queue, domains: fail(OSError("EIO")))
        self.assertEqual(self.client.codes(b"ATRN site1.example\r\n"), ["451 4.3.0"])
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.flushLoggedErrors(OSError)

    def test_case_and_idna(self) -> None:
        """Domains are compared case-insensitively."""
        hold(self.provider.store, "a@site1.example")
        self.assertEqual(self.client.codes(b"ATRN SITE1.Example\r\n"), ["250 2.0.0"])


class TurnaroundTests(SynchronousTestCase):
    """The reversed session, step by step on a StringTransport."""

    def setUp(self) -> None:
        self.provider = Provider(self)
        self.client = OdmrClient(self.provider)
        self.client.login()

    def turn(self, command: bytes = b"ATRN site1.example,site2.example\r\n") -> SMTPClient:
        self.assertEqual(self.client.codes(command), ["250 2.0.0"])
        protocol = self.client.transport.protocol
        self.assertIsInstance(protocol, SMTPClient)
        return protocol

    def greet(self) -> None:
        self.assertEqual(self.client.site(b"220 site.test ESMTP\r\n"), [b"EHLO mx.test"])
        self.client.site(EHLO_PIPELINING)

    def test_delivers_only_granted_recipients(self) -> None:
        """Each held message goes with only the recipients of the granted domains; those
        leave the queue, the others stay held; then QUIT."""
        one = hold(self.provider.store, "a@site1.example")
        two = hold(self.provider.store, "b@site2.example", "c@site3.example")
        self.turn()
        self.assertEqual(self.client.take(), [])  # waits for the site to speak first
        self.assertEqual(self.client.site(b"220 site.test ESMTP\r\n"), [b"EHLO mx.test"])
        sent = self.client.site(EHLO_PIPELINING)
        self.assertEqual(sent, [b"MAIL FROM:<alice@example.org>", b"RCPT TO:<a@site1.example>",
                                b"DATA"])
        self.assertEqual(self.client.site(b"250 ok\r\n250 ok\r\n354 go\r\n"), DATA.splitlines()
                         + [b"."])
        self.assertEqual(self.client.site(b"250 2.0.0 queued\r\n")[1:],
                         [b"RCPT TO:<b@site2.example>", b"DATA"])
        self.client.site(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.client.site(b"250 2.0.0 queued\r\n"), [b"QUIT"])
        self.client.site(b"221 bye\r\n")
        self.assertFalse(self.provider.store.state_of(one.queue_id))
        self.assertIsNotNone(self.provider.store.state_of(two.queue_id))  # c@ still waits
        self.assertEqual(self.provider.held(), {"b@site2.example": "delivered",
                                                "c@site3.example": HELD})
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.assertTrue(self.client.transport.disconnecting)

    def test_site_replies_recorded(self) -> None:
        """The site's 5xx bounces a recipient; its 4xx keeps one held with the site's reply."""
        hold(self.provider.store, "a@site1.example", "b@site1.example")
        self.turn(b"ATRN site1.example\r\n")
        self.greet()
        self.client.site(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
        self.client.site(b"451 4.3.0 disk trouble\r\n")
        self.client.site(b"221 bye\r\n")
        [qid] = self.provider.store.list_ids(DEFERRED)
        a, b = self.provider.store.read_envelope(qid)[1].recipients
        self.assertEqual((a.state, a.last_reply), (HELD, "451 4.3.0 disk trouble"))
        self.assertEqual((b.state, b.last_reply), (BOUNCED, "550 5.1.1 no such user"))

    def test_ehlo_refused_helo(self) -> None:
        """A site that refuses EHLO is spoken to with HELO, one command at a time."""
        hold(self.provider.store, "a@site1.example")
        self.turn()
        self.client.site(b"220 site.test\r\n")
        self.assertEqual(self.client.site(b"500 what\r\n"), [b"HELO mx.test"])
        self.assertEqual(self.client.site(b"250 site.test\r\n")[1:], [])
        self.assertEqual(self.client.site(b"250 ok\r\n"), [b"RCPT TO:<a@site1.example>"])

    def test_drop_after_250(self) -> None:
        """A site that hangs up after the 250 loses nothing: the mail stays held and the
        domains are free for the next connection."""
        hold(self.provider.store, "a@site1.example")
        client = self.turn()
        client.connectionLost(None)
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD})
        self.assertFalse(self.provider.agent.locked("site1.example"))
        again = OdmrClient(self.provider)
        again.login()
        self.assertEqual(again.codes(b"ATRN site1.example\r\n"), ["250 2.0.0"])

    def test_drop_in_message(self) -> None:
        """A connection lost before the reply to the end of data keeps the message held."""
        hold(self.provider.store, "a@site1.example")
        client = self.turn()
        self.greet()
        self.client.site(b"250 ok\r\n250 ok\r\n354 go\r\n")
        client.connectionLost(None)
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD})
        self.assertFalse(self.provider.agent.locked("site1.example"))

    def test_greeting_timeout(self) -> None:
        """The site has ten minutes to send its 220; then the link is dropped, mail kept."""
        hold(self.provider.store, "a@site1.example")
        self.turn()
        self.provider.clock.advance(599)
        self.assertFalse(self.client.transport.disconnecting)
        self.provider.clock.advance(2)
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD})

    def test_unknown_transport(self) -> None:
        """A transport whose protocol cannot be swapped: the link is closed and the domains
        are free again; the mail stays held."""
        hold(self.provider.store, "a@site1.example")
        self.client.transport.protocol = None
        self.assertEqual(self.client.codes(b"ATRN site1.example\r\n"), ["250 2.0.0"])
        self.assertTrue(self.client.transport.disconnecting)
        self.assertFalse(self.provider.agent.locked("site1.example"))
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD})
        self.flushLoggedErrors(RuntimeError)

    def test_session_stops_reading(self) -> None:
        """Once turned around, nothing reaches the ODMR session any more."""
        hold(self.provider.store, "a@site1.example")
        self.turn()
        self.client.session.dataReceived(b"NOOP\r\n")
        self.assertEqual(self.client.take(), [])


class LoopbackTests(TestCase):
    """The turnaround over real TCP connections, with and without TLS."""

    def setUp(self) -> Deferred[None]:
        self.provider = Provider(self, clock=global_reactor, threaded=True)
        self.ca = trustme.CA()
        issued = self.ca.issue_cert("mx.test")
        server_tls = ssl.PrivateCertificate.loadPEM(
            issued.private_key_and_cert_chain_pem.bytes()).options()
        security = Security(tls=server_tls, portal=self.provider.portal, require_auth=True,
                            cram_available=lambda: True)
        settings = SessionSettings(hostname="mx.test", listener="odmr")
        factory: Any = SecureFactory(settings, ScriptedPolicy(), MemorySink(), global_reactor,
                                     session_class=OdmrSession, security=security)
        factory.odmr = self.provider.context
        endpoint = TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1")
        return endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port
        self.addCleanup(port.stopListening)

    async def connect(self) -> SiteProtocol:
        site = SiteProtocol(global_reactor)
        site.waiter = Deferred()
        greeting = site.waiter
        connected: Deferred[None] = Deferred()
        factory = ClientFactory.forProtocol(lambda: site)
        factory.startedConnecting = lambda connector: None
        site.connectionMade = lambda: connected.callback(None)  # type: ignore[method-assign]
        global_reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        await connected
        self.addCleanup(lambda: site.transport.abortConnection())
        self.assertTrue((await greeting).startswith(b"220 mx.test"))
        return site

    async def login(self, site: SiteProtocol, tls: bool = False) -> None:
        await site.command(b"EHLO site.test")
        if tls:
            self.assertTrue((await site.command(b"STARTTLS")).startswith(b"220"))
            trust = ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())
            site.transport.startTLS(ssl.optionsForClientTLS("mx.test", trustRoot=trust))
            self.assertIn(b"AUTH PLAIN LOGIN", await site.command(b"EHLO site.test"))
        challenge = await site.command(b"AUTH CRAM-MD5")
        answer = cram_answer("siteuser", self.provider.secrets["siteuser"], challenge)
        self.assertTrue((await site.command(answer)).startswith(b"235"))

    async def test_turnaround(self) -> None:
        """After 250 the site's own SMTP server gets the held mail on the same connection,
        byte for byte after the trace fields, and the provider QUITs."""
        message = hold(self.provider.store, "a@site1.example")
        site = await self.connect()
        await self.login(site)
        self.assertTrue((await site.command(b"ATRN site1.example")).startswith(b"250"))
        server = site.become_server()
        await server.done
        [received] = site.sink.messages
        self.assertEqual(received.transaction.recipients[0].address, "a@site1.example")
        self.assertTrue(received.data.endswith(b"\r\n" + DATA))
        self.assertIsNone(self.provider.store.state_of(message.queue_id))

    async def test_tls_kept_across_turnaround(self) -> None:
        """STARTTLS before AUTH: the reversed session runs inside the same TLS session."""
        hold(self.provider.store, "a@site1.example")
        site = await self.connect()
        await self.login(site, tls=True)
        self.assertTrue((await site.command(b"ATRN")).startswith(b"250"))
        server = site.become_server()
        await server.done
        self.assertTrue(ISSLTransport.providedBy(server.transport))
        # Still the provider's certificate: the TLS session of the first half goes on.
        extensions = server.transport.getPeerCertificate().to_cryptography().extensions
        names = extensions.get_extension_for_class(SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(DNSName), ["mx.test"])
        self.assertEqual(len(site.sink.messages), 1)

    async def test_domain_lock(self) -> None:
        """While one connection collects a domain, another asking for it gets 451; once the
        first is gone the domain can be collected again."""
        hold(self.provider.store, "a@site1.example")
        first = await self.connect()
        await self.login(first)
        self.assertTrue((await first.command(b"ATRN site1.example")).startswith(b"250"))
        second = await self.connect()
        await self.login(second)
        self.assertTrue((await second.command(b"ATRN site1.example")).startswith(b"451"))
        first.transport.loseConnection()
        await first.lost
        await deferLater(global_reactor, 0.05, lambda: None)
        self.assertTrue((await second.command(b"ATRN site1.example")).startswith(b"250"))
        self.assertEqual(self.provider.held(), {"a@site1.example": HELD})

"""The ``smtp`` relay agent against receiving servers on loopback: MX order, failover,
per-recipient outcomes, TLS policies, smarthost AUTH, SMTPUTF8, connection reuse."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailplat.dns import MailResolver
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import Action, AgentContext, IDeliveryAgent, Route, Verdict
from mailplat.queue import StoredMessage
from mailplat.relay_agent import RelayAgent, give_up, make_agent
from mailplat.client import ClientError, SMTPClient
from mailplat.relay_session import Credentials, SessionFailure, Target, authenticate
from mailplat.replies import Reply
from mailplat.routeconfig import OutboundSettings
from tests.dns_support import AAAA, MX, A, DictAuthority, null_mx
from tests.test_client import Peer, ehlo_reply
from tests.relay_support import NoUTF8Session, Receiver, TestCA, receivers_on_one_port

MESSAGE = b"Subject: relayed\r\n\r\n.leading dot\r\nbody\r\n"


def zone() -> dict[str, list[Any]]:
    return {
        "example.org": [MX(10, "mx1.example.org"), MX(20, "mx2.example.org")],
        "mx1.example.org": [A("127.0.0.2")],
        "mx2.example.org": [A("127.0.0.3")],
        "failover.example": [MX(5, "dead.example.org"), MX(10, "mx2.example.org")],
        "dead.example.org": [A("127.0.0.4")],
        "nullmx.example": [null_mx()],
        "v6.example": [MX(10, "mx6.example.org")],
        "mx6.example.org": [AAAA("::1")],
        "tempfail.example": [MX(10, "servfail.example")],
    }


class AgentTestCase(TestCase):
    """Two receivers (127.0.0.2 and .3, one port) and an agent resolving from a dict zone."""

    tls_names: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.ca = TestCA(self.mktemp_dir())
        tls = self.ca.server_tls(*self.tls_names) if self.tls_names else None
        self.rx1, self.rx2 = receivers_on_one_port(reactor, ["127.0.0.2", "127.0.0.3"], tls=tls)
        for rx in (self.rx1, self.rx2):
            self.addCleanup(rx.stop)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def agent(self, port: int | None = None, **settings: Any) -> RelayAgent:
        settings.setdefault("ca_file", self.ca.ca_file)
        options = OutboundSettings(port=port or self.rx1.number, connect_timeout=5, **settings)
        resolver = MailResolver(DictAuthority(zone(), servfail={"servfail.example"}))
        credentials = settings.pop("credentials", None) if "credentials" in settings else None
        agent = RelayAgent(resolver, options, reactor, "relay.test", credentials)
        self.addCleanup(agent.close)
        return agent

    def message(self, *recipients: str, sender: str = "s@relay.test", **fields: Any) -> StoredMessage:
        path = os.path.join(self.mktemp_dir(), "data")
        with open(path, "wb") as f:
            f.write(MESSAGE)
        envelope = Envelope(f"Q{len(recipients)}", sender, tuple(Recipient(r) for r in recipients),
                            0.0, size=len(MESSAGE), **fields)
        return StoredMessage(envelope, path)

    def deliver(self, agent: RelayAgent, destination: str, *recipients: str,
                **fields: Any) -> "Deferred[dict[str, Reply]]":
        message = self.message(*recipients, **fields)
        pairs = [(r, Route("smtp", destination, r.address, relay=True))
                 for r in message.envelope.recipients]
        return agent.deliver(message, pairs)


class MXTests(AgentTestCase):
    """Resolution, order, failover and per-recipient outcomes."""

    def test_interface(self) -> None:
        """The agent provides IDeliveryAgent and is named smtp."""
        agent = self.agent()
        verifyObject(IDeliveryAgent, agent)
        self.assertEqual(agent.name, "smtp")

    async def test_most_preferred_mx_gets_the_message(self) -> None:
        """The MX with the lowest preference receives the message, dot-stuffing undone."""
        outcome = await self.deliver(self.agent(), "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        [got] = self.rx1.messages
        self.assertEqual(self.rx2.messages, [])
        self.assertTrue(got.data.endswith(MESSAGE))
        self.assertEqual(got.transaction.sender, "s@relay.test")

    async def test_failover_when_first_refuses_connections(self) -> None:
        """A refused connection at the first MX moves on to the next one."""
        outcome = await self.deliver(self.agent(), "failover.example", "a@failover.example")
        self.assertEqual(outcome["a@failover.example"].code, 250)
        self.assertEqual(len(self.rx2.messages), 1)

    async def test_failover_on_4xx_greeting(self) -> None:
        """A 4xx greeting means "try another host"; the next MX takes the message."""
        self.rx1.policy.answers[("connect", "127.0.0.1")] = Verdict(Action.TEMPFAIL)
        outcome = await self.deliver(self.agent(), "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        self.assertEqual((len(self.rx1.messages), len(self.rx2.messages)), (0, 1))

    async def test_all_hosts_down_defers(self) -> None:
        """When no host answers, every recipient is deferred (4xx), not bounced."""
        outcome = await self.deliver(self.agent(port=1), "example.org", "a@example.org")
        self.assertEqual((outcome["a@example.org"].code, outcome["a@example.org"].status),
                         (421, "4.4.1"))

    async def test_per_recipient_outcomes(self) -> None:
        """Each recipient gets its own reply: 2xx delivered, 4xx deferred, 5xx bounced."""
        self.rx1.policy.answers[("rcpt", "later@example.org")] = Verdict(Action.TEMPFAIL)
        self.rx1.policy.answers[("rcpt", "gone@example.org")] = Verdict(Action.REJECT)
        outcome = await self.deliver(self.agent(), "example.org", "ok@example.org",
                                     "later@example.org", "gone@example.org")
        self.assertEqual({a: r.code for a, r in outcome.items()},
                         {"ok@example.org": 250, "later@example.org": 451,
                          "gone@example.org": 550})
        [got] = self.rx1.messages
        self.assertEqual([r.address for r in got.transaction.recipients], ["ok@example.org"])

    async def test_null_mx_bounces_without_connecting(self) -> None:
        """A null MX domain bounces at once with 556 5.1.10."""
        outcome = await self.deliver(self.agent(), "nullmx.example", "a@nullmx.example")
        self.assertEqual(outcome["a@nullmx.example"].status, "5.1.10")
        self.assertEqual(self.rx1.factory.connections + self.rx2.factory.connections, 0)

    async def test_dns_failure_defers(self) -> None:
        """A temporary DNS failure defers the recipients (4.4.3)."""
        outcome = await self.deliver(self.agent(), "tempfail.example", "a@tempfail.example")
        self.assertEqual(outcome["a@tempfail.example"].status, "4.4.3")

    async def test_next_hop_without_mx_and_literal(self) -> None:
        """"[host]:port" skips the MX lookup, and an address literal needs no DNS at all."""
        agent = self.agent()
        port = self.rx1.number
        one = await self.deliver(agent, f"[mx2.example.org]:{port}", "a@x.example")
        two = await self.deliver(agent, "[127.0.0.2]", "b@x.example")
        self.assertEqual((one["a@x.example"].code, two["b@x.example"].code), (250, 250))
        self.assertEqual((len(self.rx1.messages), len(self.rx2.messages)), (1, 1))

    async def test_ipv6(self) -> None:
        """An MX with only an AAAA record is reached over IPv6."""
        rx6 = Receiver(reactor, "::1")
        self.addCleanup(rx6.stop)
        outcome = await self.deliver(self.agent(port=rx6.number), "v6.example", "a@v6.example")
        self.assertEqual(outcome["a@v6.example"].code, 250)
        self.assertEqual(len(rx6.messages), 1)

    async def test_connection_reused_for_next_message(self) -> None:
        """A second message to the same host travels on the same connection."""
        agent = self.agent()
        for n in range(3):
            outcome = await self.deliver(agent, "example.org", f"u{n}@example.org")
            self.assertEqual(outcome[f"u{n}@example.org"].code, 250)
        self.assertEqual((len(self.rx1.messages), self.rx1.factory.connections), (3, 1))

    async def test_smtputf8_needed_but_not_offered_bounces(self) -> None:
        """A message that needs SMTPUTF8 bounces with 5.6.7 at a peer without it."""
        rx = Receiver(reactor, "127.0.0.5", session_class=NoUTF8Session)
        self.addCleanup(rx.stop)
        outcome = await self.deliver(self.agent(port=rx.number), "[127.0.0.5]",
                                     "dörte@example.org", smtputf8=True)
        self.assertEqual(outcome["dörte@example.org"].status, "5.6.7")
        self.assertEqual(rx.messages, [])


class TLSTests(AgentTestCase):
    """STARTTLS by policy: opportunistic, required, verified against the MX name."""

    tls_names = ("mx1.example.org",)

    async def test_opportunistic_by_default(self) -> None:
        """STARTTLS is used when offered, with the default policy "may"."""
        await self.deliver(self.agent(), "example.org", "a@example.org")
        [got] = self.rx1.messages
        self.assertTrue(got.session.tls)

    async def test_verify_with_trusted_certificate(self) -> None:
        """Under "verify" a certificate from the trusted CA naming the MX host is accepted."""
        agent = self.agent(tls_policy={"example.org": "verify"})
        outcome = await self.deliver(agent, "example.org", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        self.assertTrue(self.rx1.messages[0].session.tls)

    async def test_verify_refuses_wrong_name_and_defers(self) -> None:
        """Under "verify" a certificate for another name fails: no host gets the message
        (not even in the clear) and the recipient is deferred with 4.7.5."""
        agent = self.agent(tls_policy={"[mx2.example.org]": "verify"})
        outcome = await self.deliver(agent, "[mx2.example.org]", "a@example.org")
        self.assertEqual((outcome["a@example.org"].code, outcome["a@example.org"].status),
                         (451, "4.7.5"))
        self.assertEqual(self.rx1.messages + self.rx2.messages, [])

    async def test_encrypt_accepts_any_certificate(self) -> None:
        """"encrypt" needs TLS but not a matching certificate."""
        agent = self.agent(tls_policy={"*": "encrypt"})
        outcome = await self.deliver(agent, "[mx2.example.org]", "a@example.org")
        self.assertEqual(outcome["a@example.org"].code, 250)
        self.assertTrue(self.rx2.messages[0].session.tls)

    async def test_encrypt_without_starttls_defers(self) -> None:
        """A peer without STARTTLS under "encrypt" gets nothing; 4.7.4 deferral."""
        plain = Receiver(reactor, "127.0.0.6")
        self.addCleanup(plain.stop)
        agent = self.agent(port=plain.number, tls_policy={"[127.0.0.6]": "encrypt"})
        outcome = await self.deliver(agent, "[127.0.0.6]", "a@example.org")
        self.assertEqual(outcome["a@example.org"].status, "4.7.4")
        self.assertEqual(plain.messages, [])

    async def test_policy_none_stays_in_clear(self) -> None:
        """"none" never starts TLS even when it is offered."""
        agent = self.agent(tls_policy={"example.org": "none"})
        await self.deliver(agent, "example.org", "a@example.org")
        self.assertFalse(self.rx1.messages[0].session.tls)


class SmarthostTests(AgentTestCase):
    """Smarthost delivery with AUTH over TLS."""

    def smarthost(self, users: dict[bytes, bytes]) -> Receiver:
        rx = Receiver(reactor, "127.0.0.7", tls=self.ca.server_tls("smarthost.test"), users=users)
        self.addCleanup(rx.stop)
        return rx

    def relay(self, rx: Receiver, password: str) -> RelayAgent:
        hop = f"[127.0.0.7]:{rx.number}"
        options = OutboundSettings(ca_file=self.ca.ca_file, smarthost=hop, connect_timeout=5)
        agent = RelayAgent(MailResolver(DictAuthority({})), options, reactor, "relay.test",
                           Credentials("relay", password))
        self.addCleanup(agent.close)
        return agent

    async def test_auth_plain_over_tls(self) -> None:
        """The smarthost gets the message after STARTTLS and AUTH with the configured login."""
        rx = self.smarthost({b"relay": b"s3cret"})
        outcome = await self.deliver(self.relay(rx, "s3cret"), f"[127.0.0.7]:{rx.number}",
                                     "a@far.example")
        self.assertEqual(outcome["a@far.example"].code, 250)
        [got] = rx.messages
        self.assertTrue(got.session.tls)
        self.assertIn("relay", got.session.auth_user or "")

    async def test_bad_password_defers(self) -> None:
        """Refused credentials defer the mail (an operator must fix them), never bounce."""
        rx = self.smarthost({b"relay": b"s3cret"})
        outcome = await self.deliver(self.relay(rx, "wrong"), f"[127.0.0.7]:{rx.number}",
                                     "a@far.example")
        self.assertEqual(outcome["a@far.example"].status, "4.7.0")
        self.assertEqual(rx.messages, [])

    async def test_no_auth_in_the_clear(self) -> None:
        """Credentials are never sent without TLS: a plaintext smarthost defers the mail."""
        rx = Receiver(reactor, "127.0.0.7")
        self.addCleanup(rx.stop)
        outcome = await self.deliver(self.relay(rx, "s3cret"), f"[127.0.0.7]:{rx.number}",
                                     "a@far.example")
        self.assertEqual(outcome["a@far.example"].status, "4.7.0")
        self.assertEqual(rx.messages, [])


class TLSTransport(StringTransport):
    """A StringTransport that records the STARTTLS switch."""

    tls_creator: Any = None

    def startTLS(self, creator: Any) -> None:
        self.tls_creator = creator


class TLSPeer(Peer):
    """The client test's scripted server, over a transport that can start TLS."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.client = SMTPClient("client.test", self.clock)
        self.transport = TLSTransport()
        self.client.makeConnection(self.transport)
        self.sizes = []


class ProtocolTests(SynchronousTestCase):
    """STARTTLS and AUTH on the wire, driven over a StringTransport."""

    def peer(self, keywords: list[str]) -> Peer:
        peer = TLSPeer()
        self.successResultOf(peer.ready(keywords))
        peer.heard()
        return peer

    def test_starttls_discards_injected_replies(self) -> None:
        """Replies the server sends after its 220 in the same packet are discarded
        (RFC 3207 §4.2): EHLO over TLS waits for the real answer."""
        peer = self.peer(["STARTTLS"])
        done = peer.client.starttls("creator")
        self.assertEqual(peer.heard(), b"STARTTLS\r\n")
        peer.say("220 go ahead", "250-injected", "250 AUTH PLAIN")
        self.assertEqual(peer.transport.tls_creator, "creator")
        self.assertEqual(peer.heard(), b"EHLO client.test\r\n")
        self.assertNoResult(done)
        peer.say(*ehlo_reply(["SIZE 1000"]))
        self.assertEqual(self.successResultOf(done), {"SIZE": "1000"})

    def test_starttls_refused(self) -> None:
        """A refused STARTTLS fails with the server's reply and leaves the session usable."""
        peer = self.peer(["STARTTLS"])
        done = peer.client.starttls("creator")
        peer.say("454 4.7.0 TLS not available")
        self.assertEqual(self.failureResultOf(done, ClientError).value.reply.code, 454)
        self.assertTrue(peer.client.usable)
        self.assertIsNone(peer.transport.tls_creator)

    def test_auth_plain(self) -> None:
        """AUTH PLAIN sends the login in one base64 line (RFC 4616)."""
        peer = self.peer(["AUTH LOGIN PLAIN"])
        done = Deferred.fromCoroutine(authenticate(peer.client, Credentials("u", "p"),
                                                   Target("h", "127.0.0.1", 25)))
        self.assertEqual(peer.heard(), b"AUTH PLAIN AHUAcA==\r\n")
        peer.say("235 2.7.0 ok")
        self.successResultOf(done)

    def test_auth_login(self) -> None:
        """AUTH LOGIN answers the two 334 challenges with the base64 user and password."""
        peer = self.peer(["AUTH LOGIN"])
        done = Deferred.fromCoroutine(authenticate(peer.client, Credentials("u", "p"),
                                                   Target("h", "127.0.0.1", 25)))
        for challenge, answer in (("334 VXNlcm5hbWU6", b"AUTH LOGIN"), ("334 UGFzc3dvcmQ6", b"dQ=="),
                                  ("235 2.7.0 ok", b"cA==")):
            self.assertEqual(peer.heard(), answer + b"\r\n")
            peer.say(challenge)
        self.successResultOf(done)

    def test_credentials_not_in_repr(self) -> None:
        """The password never shows in a repr (and so never in a log line)."""
        self.assertNotIn("s3cret", repr(Credentials("u", "s3cret")))


class GiveUpTests(SynchronousTestCase):
    """How session failures become the recipients' reply."""

    def test_all_refused_bounces(self) -> None:
        """Only when every host refused us with 5xx is the result permanent."""
        refused = SessionFailure(Reply(554, "5.7.1", "no"), refused=True)
        self.assertEqual(give_up([refused, refused]).code, 554)

    def test_mixed_defers(self) -> None:
        """A single transient failure among refusals keeps the message queued."""
        refused = SessionFailure(Reply(554, "5.7.1", "no"), refused=True)
        down = SessionFailure(Reply(421, "4.4.1", "refused"))
        self.assertEqual(give_up([down, refused]).code, 421)
        self.assertEqual(give_up([]).code, 451)

    def test_tls_policy_lookup(self) -> None:
        """The policy comes from the hop, its host or a recipient domain (strictest wins),
        else from "*", else "may"."""
        policies = {"partner.example": "verify", "[mx.hop.example]:25": "none",
                    "mx.hop.example": "encrypt", "*": "none"}
        agent = RelayAgent(MailResolver(DictAuthority({})), OutboundSettings(
            tls_policy=policies), reactor, "relay.test")
        self.assertEqual(agent.policy_for("[mx.hop.example]:25", ["a@partner.example"]), "verify")
        self.assertEqual(agent.policy_for("[mx.hop.example]:25", ["a@other.example"]), "encrypt")
        self.assertEqual(agent.policy_for("other.example", ["a@other.example"]), "none")
        bare = RelayAgent(MailResolver(DictAuthority({})), OutboundSettings(), reactor, "r")
        self.assertEqual(bare.policy_for("other.example"), "may")

    def test_make_agent_from_config(self) -> None:
        """The plugin builds the agent from the whole config without any network activity."""
        raw = {"agent": {"smtp": {"port": 2525}}, "dns": {"nameservers": ["127.0.0.1:5353"]}}
        context = AgentContext(reactor=reactor, hostname="relay.test",
                               config=type("C", (), {"raw": raw})())
        agent = make_agent(context)
        self.assertEqual((agent.settings.port, agent.settings.nameservers),
                         (2525, ("127.0.0.1:5353",)))

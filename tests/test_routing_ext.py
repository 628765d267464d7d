"""Routing beyond local mailboxes: subaddresses, aliases, lists, alias and relay domains,
the smarthost — answered by the router, applied at RCPT time, and carried out at delivery."""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailplat.address import Mailbox
from mailplat.config import ConfigError, parse_config
from mailplat.envelope import Envelope
from mailplat.interfaces import IQueueObserver, Route
from mailplat.policy import DefaultPolicy, PolicyChain
from mailplat.replies import Reply
from mailplat.routing import USER_UNKNOWN, LocalRouter
from tests.daemon import HOST, Daemon, wait_for_files, wait_until
from tests.support import Client

BASE = """\
[[listener]]
name = "smtp"
endpoint = "tcp:2525"
profile = "relay"

[domains."example.org"]
users = ["alice", "bob", "carol", "owner", "postmaster"]

[domains."plus.example"]
users = ["dan", "dan+special"]
recipient_delimiter = "-"

[domains."catch.example"]
catch_all = true
"""

ROUTING = BASE + """
[aliases]
"root" = "postmaster"
"sales@example.org" = ["bob", "dave@remote.example"]
"alice@example.org" = ["alice", "alice@backup.example"]
"@old.example" = "@example.org"
"@example.org" = "carol"
"info@shop.example" = ["bob@example.org"]

[lists."dev@example.org"]
owner = "owner@example.org"
members = ["alice", "bob", "erin@remote.example"]

[relay]
relay_domains = { "partner.example" = "[192.0.2.25]:2525", "backup.example" = "" }
smarthost = "[smtp.provider.example]:587"
smarthost_domains = ["far.example"]
"""


def route(address: str, text: str = ROUTING) -> Route | Reply:
    local, _, domain = address.rpartition("@")
    return LocalRouter(parse_config(text)).resolve(Mailbox(local, domain))


class RouterTests(SynchronousTestCase):
    """What the router answers for each kind of address."""

    def test_subaddress_goes_to_user_with_tag(self) -> None:
        """user+tag@ is delivered to user's mailbox; the tag is kept in the route."""
        answer = route("bob+lists@example.org")
        assert isinstance(answer, Route)
        self.assertEqual((answer.agent, answer.mailbox, answer.tag),
                         ("maildir", "bob@example.org", "lists"))
        self.assertTrue(answer.destination.endswith("/example.org/bob"))

    def test_delimiter_per_domain_and_real_user_first(self) -> None:
        """A domain may choose its delimiter; a user whose name has it is found first."""
        tagged = route("dan-x@plus.example")
        assert isinstance(tagged, Route)
        self.assertEqual(tagged.tag, "x")
        special = route("dan+special@plus.example")
        assert isinstance(special, Route)
        self.assertEqual((special.tag, special.destination.rsplit("/", 1)[1]),
                         (None, "dan+special"))

    def test_catch_all_domain_strips_tag(self) -> None:
        """In a catch-all domain user+tag still lands in user's mailbox."""
        answer = route("zoe+x@catch.example")
        assert isinstance(answer, Route)
        self.assertEqual((answer.destination.rsplit("/", 1)[1], answer.tag), ("zoe", "x"))

    def test_unknown_user_refused(self) -> None:
        """Without aliases an unknown local user is 550 5.1.1."""
        self.assertEqual(route("zed@example.org", BASE), USER_UNKNOWN)

    def test_alias_carries_expansion(self) -> None:
        """An alias routes with its final addresses; a pure alias goes to the expand agent."""
        answer = route("sales@example.org")
        assert isinstance(answer, Route)
        self.assertEqual(answer.agent, "expand")
        self.assertEqual(answer.expansion, ("bob@example.org", "dave@remote.example"))

    def test_alias_that_is_a_mailbox(self) -> None:
        """An alias naming its own mailbox keeps a copy there and routes to that mailbox."""
        answer = route("alice@example.org")
        assert isinstance(answer, Route)
        self.assertEqual(answer.agent, "maildir")
        self.assertEqual(answer.expansion, ("alice@example.org", "alice@backup.example"))

    def test_bare_alias_in_every_local_domain(self) -> None:
        """A bare alias key applies in each local domain, relative to that domain."""
        answer = route("root@catch.example")
        assert isinstance(answer, Route)
        self.assertEqual(answer.expansion, ("postmaster@catch.example",))

    def test_catch_all_alias(self) -> None:
        """"@domain" takes unknown local parts, never existing mailboxes."""
        unknown = route("nobody@example.org")
        assert isinstance(unknown, Route)
        self.assertEqual(unknown.expansion, ("carol@example.org",))
        self.assertEqual(route("bob@example.org").expansion, ())  # type: ignore[union-attr]

    def test_alias_domain(self) -> None:
        """A domain named only by aliases is accepted, its other addresses are unknown."""
        answer = route("bob@old.example")
        assert isinstance(answer, Route)
        self.assertEqual(answer.expansion, ("bob@example.org",))
        self.assertEqual(route("x@shop.example"), USER_UNKNOWN)

    def test_list_routes_to_expand(self) -> None:
        """A list stays one recipient, routed to the expand agent."""
        self.assertEqual(route("dev@example.org"),
                         Route(agent="expand", destination="list", mailbox="dev@example.org"))

    def test_relay_domains(self) -> None:
        """Relay domains are accepted from anyone and sent to their next hop or their MX."""
        self.assertEqual(route("x@partner.example"), Route(
            agent="smtp", destination="[192.0.2.25]:2525", mailbox="x@partner.example"))
        self.assertEqual(route("y@backup.example"), Route(
            agent="smtp", destination="backup.example", mailbox="y@backup.example"))

    def test_smarthost_for_listed_domains(self) -> None:
        """Only the smarthost's domains go to it; other mail goes by MX, both relay=True."""
        self.assertEqual(route("a@far.example"), Route(
            agent="smtp", destination="[smtp.provider.example]:587", mailbox="a@far.example",
            relay=True))
        self.assertEqual(route("a@near.example"), Route(
            agent="smtp", destination="near.example", mailbox="a@near.example", relay=True))

    def test_bad_settings_reported(self) -> None:
        """Mistakes in the routing tables are found by the config check, with their keys."""
        text = BASE + ('[aliases]\n"bad" = []\n"x@" = "a"\n[lists."l@example.org"]\n'
                       'members = ["a"]\n[relay]\nrelay_domains = {"p.example" = "[h]:99999"}\n'
                       '[tls_policy]\n"example.com" = "sometimes"\n[dns]\nnameservers = ["ns"]\n')
        error = self.assertRaises(ConfigError, parse_config, text)
        keys = {problem.key for problem in error.problems}
        self.assertTrue({"aliases.bad", 'aliases."x@"', 'lists."l@example.org".owner',
                         'relay.relay_domains."p.example"', 'tls_policy."example.com"',
                         "dns.nameservers"} <= keys, keys)


class RcptTimeTests(SynchronousTestCase):
    """The session applies routing answers when the client names the recipient."""

    def setUp(self) -> None:
        router = LocalRouter(parse_config(ROUTING))
        self.client = Client(policy=PolicyChain([DefaultPolicy(router)]))
        self.client.send(b"EHLO c.example\r\nMAIL FROM:<s@remote.example>\r\n")

    def rcpt(self, address: str) -> list[str]:
        return self.client.codes(f"RCPT TO:<{address}>\r\n".encode())

    def recipients(self) -> list[tuple[str, str | None]]:
        transaction = self.client.session.transaction
        assert transaction is not None
        return [(r.address, r.orcpt) for r in transaction.recipients]

    def test_alias_expanded_into_transaction(self) -> None:
        """RCPT to an alias is accepted and the transaction holds its final addresses,
        each remembering the alias as ORCPT."""
        self.assertEqual(self.rcpt("sales@example.org"), ["250 2.1.5"])
        self.assertEqual(self.recipients(), [
            ("bob@example.org", "rfc822;sales@example.org"),
            ("dave@remote.example", "rfc822;sales@example.org"),
        ])

    def test_duplicates_merged(self) -> None:
        """A recipient already named is not added twice by an alias expansion."""
        self.rcpt("bob@example.org")
        self.rcpt("sales@example.org")
        self.assertEqual([a for a, _ in self.recipients()],
                         ["bob@example.org", "dave@remote.example"])

    def test_unknown_refused_at_rcpt(self) -> None:
        """An unknown user is refused at RCPT (550 5.1.1), never accepted and bounced."""
        router = LocalRouter(parse_config(BASE))
        client = Client(policy=PolicyChain([DefaultPolicy(router)]))
        codes = client.codes(b"EHLO c\r\nMAIL FROM:<s@r.example>\r\nRCPT TO:<zed@example.org>\r\n")
        self.assertEqual(codes[-1], "550 5.1.1")

    def test_list_and_subaddress_kept_as_given(self) -> None:
        """A list and a subaddress stay as the client wrote them (expanded at delivery)."""
        self.assertEqual(self.rcpt("dev@example.org") + self.rcpt("bob+x@example.org"),
                         ["250 2.1.5", "250 2.1.5"])
        self.assertEqual([a for a, _ in self.recipients()],
                         ["dev@example.org", "bob+x@example.org"])

    def test_relay_domain_from_anyone_but_not_the_world(self) -> None:
        """Relay domains are accepted from an untrusted client; other domains are not."""
        self.assertEqual(self.rcpt("x@partner.example"), ["250 2.1.5"])
        self.assertEqual(self.rcpt("x@elsewhere.example"), ["554 5.7.1"])

    def test_lmtp_does_not_expand(self) -> None:
        """LMTP answers once per RCPT after the data, so an alias stays one recipient there."""
        router = LocalRouter(parse_config(ROUTING))
        client = Client(policy=PolicyChain([DefaultPolicy(router)]), lmtp=True)
        client.send(b"LHLO c\r\nMAIL FROM:<s@r.example>\r\nRCPT TO:<sales@example.org>\r\n")
        transaction = client.session.transaction
        assert transaction is not None
        self.assertEqual([r.address for r in transaction.recipients], ["sales@example.org"])


@implementer(IQueueObserver)
class Queued:
    """Records the envelopes committed to the queue."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def queued(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def delivered(self, envelope: Envelope, recipient: Any, reply: Reply) -> None:
        pass

    def deferred(self, envelope: Envelope, recipient: Any, reply: Reply) -> None:
        pass

    def bounced(self, envelope: Envelope, recipient: Any, reply: Reply) -> None:
        pass


DELIVERY_TOML = """
[aliases]
"sales@example.org" = ["bob", "carol"]
"@old.example" = "@example.org"

[lists."dev@example.org"]
owner = "owner@example.org"
members = ["alice", "sales"]
"""


class DeliveryTests(TestCase):
    """A running server carries the routing answers out, end to end over loopback."""

    def setUp(self) -> None:
        self.vroot = os.path.abspath(self.mktemp())
        self.daemon = Daemon(self.mktemp(), config={"domains": {
            "example.org": {"users": ["alice", "bob", "carol", "owner"]},
            "virtual.example": {"users": ["vic"], "maildir_root": self.vroot},
        }}, extra_toml=DELIVERY_TOML)
        self.server = self.daemon.in_process(self)
        self.queued = Queued()
        self.server.queue.observers.append(self.queued)

    def send(self, recipients: list[str], message: bytes) -> "Deferred[dict[str, Any]]":
        def client() -> dict[str, Any]:
            with smtplib.SMTP(HOST, self.daemon.port, timeout=10) as smtp:
                return smtp.sendmail("poster@remote.example", recipients, message)

        return deferToThread(client)

    def maildir(self, user: str) -> str:
        return self.daemon.maildir(user, "example.org")

    async def test_list_delivered_with_owner_as_sender(self) -> None:
        """A list's copy is queued with the owner as sender and reaches every member,
        nested aliases included, with Delivered-To naming the list."""
        await self.send(["dev@example.org"], b"Subject: to the list\r\n\r\nhello\r\n")
        for user in ("alice", "bob", "carol"):
            paths = await deferToThread(wait_for_files, self.maildir(user), 1)
            with open(paths[0], "rb") as f:
                self.assertTrue(f.read().startswith(b"Delivered-To: dev@example.org\r\n"))
        senders = [(e.sender, [r.address for r in e.recipients]) for e in self.queued.envelopes]
        self.assertEqual(senders, [
            ("poster@remote.example", ["dev@example.org"]),
            ("owner@example.org", ["alice@example.org", "bob@example.org", "carol@example.org"]),
        ])

    async def test_alias_subaddress_and_alias_domain(self) -> None:
        """Alias, subaddress and alias-domain recipients land in the right mailboxes in one
        queued message, whose recipients were expanded at RCPT time."""
        refused = await self.send(["sales@example.org", "alice+news@example.org",
                                   "owner@old.example"], b"Subject: mixed\r\n\r\nhi\r\n")
        self.assertEqual(refused, {})
        for user in ("bob", "carol", "alice", "owner"):
            await deferToThread(wait_for_files, self.maildir(user), 1)
        [envelope] = self.queued.envelopes
        self.assertEqual([r.address for r in envelope.recipients], [
            "bob@example.org", "carol@example.org", "alice+news@example.org",
            "owner@example.org"])
        await deferToThread(wait_until, lambda: not self.daemon.queue_files(), 10, "queue empty")

    async def test_virtual_domain_with_own_root(self) -> None:
        """A virtual domain's mailboxes live under its own Maildir root; subaddresses too."""
        await self.send(["vic+x@virtual.example"], b"Subject: v\r\n\r\nhi\r\n")
        await deferToThread(wait_for_files, os.path.join(self.vroot, "vic", "new"), 1)

    async def test_unknown_refused_at_rcpt(self) -> None:
        """An unknown recipient is refused at RCPT; only the known one is queued."""
        refused = await self.send(["nobody@example.org", "bob@example.org"], b"Subject: x\r\n\r\n")
        self.assertEqual(refused["nobody@example.org"][0], 550)
        # The queue announces the message a moment after the client's 250: wait for bob's copy.
        await deferToThread(wait_for_files, self.maildir("bob"), 1)
        [envelope] = self.queued.envelopes
        self.assertEqual([r.address for r in envelope.recipients], ["bob@example.org"])

"""Tests for mailplat.aliases: nested expansion, loops, lists and the ``expand`` agent."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailplat.aliases import (
    ALIAS_LOOP,
    LOOP,
    AliasTable,
    ExpandAgent,
    ExpansionError,
    expand,
    expanded_recipients,
    orcpt_for,
    resolve_target,
)
from mailplat.config import parse_config
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import IDeliveryAgent, Route, SpoolError
from mailplat.queue import StoredMessage
from mailplat.replies import Reply
from mailplat.routeconfig import MailingList
from mailplat.routing import USER_UNKNOWN, LocalRouter
from mailplat.testing import MemorySink

CONFIG = """\
[[listener]]
name = "smtp"
endpoint = "tcp:2525"
profile = "relay"

[domains."example.org"]
users = ["alice", "bob", "carol", "owner"]

[aliases]
"team@example.org" = ["alice", "bob", "dave@remote.example"]
"loop1@example.org" = "loop2"
"loop2@example.org" = "loop1"

[lists."dev@example.org"]
owner = "owner@example.org"
members = ["carol", "team", "ops@example.org", "dev"]

[lists."ops@example.org"]
owner = "alice@example.org"
members = ["bob", "dev@example.org"]
"""


def table(aliases: dict[str, list[str]]) -> AliasTable:
    return AliasTable(aliases, {})


def stepper(aliases: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A step function over a plain dict, as the router gives one over its tables."""
    return lambda address: aliases.get(address)


class ExpandTests(SynchronousTestCase):
    """The depth-first expansion with loop detection."""

    def test_nested(self) -> None:
        """Aliases of aliases expand to their final addresses, in order, without repeats."""
        step = stepper({"a@x": ["b@x", "c@x"], "b@x": ["d@x", "c@x"]})
        self.assertEqual(expand("a@x", step).addresses, ["d@x", "c@x"])

    def test_self_reference_is_final(self) -> None:
        """An alias that names itself keeps that address as a final one (keep a copy)."""
        result = expand("a@x", stepper({"a@x": ["a@x", "b@y"]}))
        self.assertEqual(result.addresses, ["a@x", "b@y"])
        self.assertTrue(result.loop)

    def test_loop_is_cut(self) -> None:
        """A loop a → b → a ends at the address met again; expansion terminates."""
        result = expand("a@x", stepper({"a@x": ["b@x"], "b@x": ["a@x"]}))
        self.assertEqual((result.addresses, result.loop), (["a@x"], True))

    def test_case_insensitive_keys(self) -> None:
        """Repeats are found whatever the case of local part and domain."""
        result = expand("a@x", stepper({"a@x": ["B@X", "b@x"]}))
        self.assertEqual(result.addresses, ["B@X"])

    def test_depth_limit(self) -> None:
        """A chain deeper than the limit is refused as a likely loop (5.4.6)."""
        chain = {f"a{n}@x": [f"a{n + 1}@x"] for n in range(50)}
        error = self.assertRaises(ExpansionError, expand, "a0@x", stepper(chain))
        self.assertEqual(error.reply.status, "5.4.6")

    def test_size_limit(self) -> None:
        """An expansion with too many addresses is refused rather than queued."""
        step = stepper({"a@x": [f"u{n}@x" for n in range(20)]})
        self.assertRaises(ExpansionError, expand, "a@x", step, max_size=10)

    def test_shared_subtrees_expanded_once(self) -> None:
        """A diamond-shaped table (every level names the next twice) costs one step per
        alias, not one per path."""
        calls: list[str] = []
        table = {f"a{n}@x": [f"a{n + 1}@x", f"a{n + 1}@x", f"u{n}@x"] for n in range(18)}

        def step(address: str) -> list[str] | None:
            calls.append(address)
            return table.get(address)

        result = expand("a0@x", step)
        self.assertEqual(len(result.addresses), 19)
        self.assertLess(len(calls), 100)

    @given(st.dictionaries(st.sampled_from("abcdef"), st.lists(st.sampled_from("abcdefg"),
                                                                 max_size=4), max_size=6))
    def test_always_terminates(self, graph: dict[str, list[str]]) -> None:
        """Any alias graph, cycles included, expands to a finite list without repeats."""
        step = stepper({f"{k}@x": [f"{t}@x" for t in v] for k, v in graph.items() if v})
        result = expand("a@x", step)
        self.assertEqual(len(result.addresses), len(set(result.addresses)))
        self.assertLessEqual(len(result.addresses), 7)


class TableTests(SynchronousTestCase):
    """Alias keys and relative targets."""

    def test_relative_targets(self) -> None:
        """A bare target is at the alias's domain; "@domain" keeps the local part."""
        self.assertEqual(resolve_target("bob", "sales", "example.org"), "bob@example.org")
        self.assertEqual(resolve_target("@new.example", "sales", "old.example"),
                         "sales@new.example")
        self.assertEqual(resolve_target("x@y.example", "s", "d"), "x@y.example")

    def test_bare_key_only_in_local_domains(self) -> None:
        """A key without domain applies to our own domains only."""
        aliases = table({"root": ["alice"]})
        self.assertEqual(aliases.alias("root@example.org", True), ("alice@example.org",))
        self.assertIsNone(aliases.alias("root@remote.example", False))

    def test_exact_key_wins(self) -> None:
        """"local@domain" is preferred over the bare "local" key."""
        aliases = table({"root": ["alice"], "root@example.org": ["bob"]})
        self.assertEqual(aliases.alias("ROOT@Example.ORG", True), ("bob@example.org",))

    def test_catch_all_and_domains(self) -> None:
        """"@domain" is the catch-all, and every domain named becomes an accepted domain."""
        lists = {"l@lists.example": MailingList("l@lists.example", "o@x", ())}
        aliases = AliasTable({"@old.example": ["@example.org"]}, lists)
        self.assertEqual(aliases.catch_all("zed@old.example"), ("zed@example.org",))
        self.assertEqual(aliases.domains(), {"old.example", "lists.example"})

    def test_expanded_recipients_keep_orcpt(self) -> None:
        """Expanded recipients remember the alias as ORCPT, keep NOTIFY, skip repeats."""
        entry = Recipient("team@example.org", notify=("FAILURE",))
        existing = [Recipient("alice@example.org")]
        out = expanded_recipients(entry, ["alice@example.org", "bob@example.org"], existing)
        self.assertEqual(out, [Recipient("bob@example.org", orcpt="rfc822;team@example.org",
                                         notify=("FAILURE",))])
        self.assertEqual(orcpt_for("dörte@example.org"), "utf-8;dörte@example.org")


class RouterExpansionTests(SynchronousTestCase):
    """The alias and list answers of the router that the expand agent uses."""

    def setUp(self) -> None:
        self.router = LocalRouter(parse_config(CONFIG))

    def test_list_expansion_uses_owner_and_nested_lists(self) -> None:
        """A list expands its members, aliases and nested lists in place, and names its
        owner as the new envelope sender; the lists themselves are not repeated."""
        sender, members = self.router.aliases.expansion("dev@example.org")  # type: ignore[misc]
        self.assertEqual(sender, "owner@example.org")
        self.assertEqual(members, ["carol@example.org", "alice@example.org",
                                   "bob@example.org", "dave@remote.example"])

    def test_alias_expansion_keeps_sender(self) -> None:
        """An alias expanded at delivery keeps the original envelope sender (None)."""
        self.assertEqual(self.router.aliases.expansion("team@example.org"),
                         (None, ["alice@example.org", "bob@example.org", "dave@remote.example"]))

    def test_pure_loop_refused(self) -> None:
        """Aliases that only point at each other have no deliverable address: 554 5.4.6."""
        self.assertEqual(self.router.aliases.expansion("loop1@example.org"), ALIAS_LOOP)

    def test_not_an_alias(self) -> None:
        """An address that is no longer an alias is retried, not bounced."""
        answer = self.router.aliases.expansion("alice@example.org")
        self.assertEqual(answer.code, 451)  # type: ignore[union-attr]


class ExpandAgentTests(SynchronousTestCase):
    """The ``expand`` agent puts copies back into the queue through the sink."""

    def setUp(self) -> None:
        self.router = LocalRouter(parse_config(CONFIG))
        self.sink = MemorySink()
        self.agent = ExpandAgent(self.router, self.sink, "mx.example.org")

    def message(self, data: bytes = b"Subject: hi\r\n\r\nbody\r\n", **fields: object) -> StoredMessage:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        envelope = Envelope("Q1", "poster@remote.example", (Recipient("dev@example.org"),),
                            0.0, **fields)  # type: ignore[arg-type]
        return StoredMessage(envelope, path)

    def deliver(self, message: StoredMessage, address: str, kind: str) -> dict[str, Reply]:
        route = Route(agent="expand", destination=kind, mailbox=address)
        return self.successResultOf(self.agent.deliver(message, [(Recipient(address), route)]))

    def test_interface(self) -> None:
        """The agent provides IDeliveryAgent."""
        verifyObject(IDeliveryAgent, self.agent)

    def test_list_reinjected_with_owner(self) -> None:
        """A list's copy goes to its members with the owner as sender and Delivered-To."""
        outcome = self.deliver(self.message(envid="E1", ret="FULL"), "dev@example.org", "list")
        self.assertEqual(outcome["dev@example.org"].code, 250)
        [copy] = self.sink.messages
        self.assertEqual(copy.transaction.sender, "owner@example.org")
        self.assertEqual([r.address for r in copy.transaction.recipients][:2],
                         ["carol@example.org", "alice@example.org"])
        self.assertEqual((copy.transaction.envid, copy.transaction.ret), (None, None))
        self.assertEqual(copy.data, b"Delivered-To: dev@example.org\r\nSubject: hi\r\n\r\nbody\r\n")

    def test_alias_reinjected_with_sender(self) -> None:
        """An alias reaching the queue unexpanded keeps the sender and DSN parameters."""
        self.deliver(self.message(envid="E1"), "team@example.org", "alias")
        [copy] = self.sink.messages
        self.assertEqual((copy.transaction.sender, copy.transaction.envid),
                         ("poster@remote.example", "E1"))
        self.assertEqual(copy.transaction.recipients[0].orcpt, "rfc822;team@example.org")

    def test_loop_detected(self) -> None:
        """A message that already went through this list is refused as a loop, not copied."""
        data = b"Delivered-To: <DEV@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"
        self.assertEqual(self.deliver(self.message(data), "dev@example.org", "list"),
                         {"dev@example.org": LOOP})
        self.assertEqual(self.sink.messages, [])

    def test_delivered_to_in_body_ignored(self) -> None:
        """Only the header section counts: a Delivered-To line in the body is no loop."""
        data = b"Subject: hi\r\n\r\nDelivered-To: dev@example.org\r\n"
        self.assertEqual(self.deliver(self.message(data), "dev@example.org", "list")
                         ["dev@example.org"].code, 250)

    def test_spool_refusal_defers(self) -> None:
        """When the spool cannot take the copy, the list recipient is retried later."""
        self.sink.fail_on = "begin"
        self.sink.error = SpoolError(Reply(452, "4.3.1", "full"))
        outcome = self.deliver(self.message(), "dev@example.org", "list")
        self.assertEqual(outcome["dev@example.org"].code, 452)

    def test_unknown_member_only(self) -> None:
        """An expansion whose addresses are all unknown local users bounces with 5.1.1."""
        self.assertEqual(self.router.aliases.finals("nobody@example.org", lambda a: None),
                         USER_UNKNOWN)

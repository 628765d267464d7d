"""Tests for mailplat.routing: local Maildirs, unknown users, escapes and relay routes."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailplat.config import Config, parse_config
from mailplat.interfaces import IRouter, Route
from mailplat.replies import Reply
from mailplat.routing import BAD_SYNTAX, USER_UNKNOWN, LocalRouter, local_part_problem

CONFIG = """\
[maildir]
root = "/srv/mail"

[[listener]]
name = "smtp"
endpoint = "tcp:2525"
profile = "relay"

[domains."example.org"]
users = ["alice", "Bob"]

[domains."localhost"]
catch_all = true

[domains."staff.example"]
users = ["carol", "postmaster"]

[domains."bücher.example"]
users = ["dora"]
"""


@dataclass(frozen=True)
class Mailbox:
    """A stand-in for mailplat.address.Mailbox: all the router looks at."""

    local: str
    domain: str


def make_router(text: str = CONFIG) -> LocalRouter:
    """A router over the test configuration."""
    config: Config = parse_config(text)
    return LocalRouter(config)


class LocalRouterTests(SynchronousTestCase):
    """Recipients in our own domains go to Maildirs; others are relayed."""

    def route(self, local: str, domain: str) -> Route | Reply:
        """The router's answer for local@domain, which must be available at once."""
        result: Route | Reply = self.successResultOf(make_router().route(Mailbox(local, domain)))
        return result

    def test_provides_irouter(self) -> None:
        """LocalRouter provides IRouter."""
        self.assertTrue(verifyObject(IRouter, make_router()))

    def test_listed_user(self) -> None:
        """A listed user is routed to <maildir_root>/<user> by the maildir agent."""
        self.assertEqual(
            self.route("alice", "example.org"),
            Route("maildir", "/srv/mail/example.org/alice", "alice@example.org"),
        )

    def test_case_insensitive_user(self) -> None:
        """Local parts match case-insensitively and the Maildir name is lowercased."""
        route = self.route("BOB", "example.org")
        assert isinstance(route, Route)
        self.assertEqual(route.destination, "/srv/mail/example.org/bob")
        self.assertEqual(route.mailbox, "BOB@example.org")

    def test_case_insensitive_domain(self) -> None:
        """Domains match case-insensitively even if the caller did not lowercase them."""
        route = self.route("alice", "Example.ORG")
        assert isinstance(route, Route)
        self.assertEqual(route.agent, "maildir")

    def test_unknown_user(self) -> None:
        """A local part not listed for its domain is refused with 550 5.1.1."""
        self.assertEqual(self.route("mallory", "example.org"), USER_UNKNOWN)
        self.assertEqual(USER_UNKNOWN, Reply(550, "5.1.1", "User unknown"))

    def test_catch_all(self) -> None:
        """In a catch-all domain every safe local part has a Maildir."""
        self.assertEqual(
            self.route("Anyone", "localhost"),
            Route("maildir", "/srv/mail/localhost/anyone", "Anyone@localhost"),
        )

    def test_escape_attempts(self) -> None:
        """Local parts that could leave the Maildir root are refused with 553 5.1.3."""
        for local in ["../x", "..", ".", ".hidden", "a/b", "a\\b", "a\0b", "a\nb", "\x7f", ""]:
            for domain in ["localhost", "example.org"]:
                self.assertEqual(self.route(local, domain), BAD_SYNTAX, (local, domain))
        self.assertEqual(BAD_SYNTAX, Reply(553, "5.1.3", "Bad recipient address syntax"))

    def test_postmaster_listed(self) -> None:
        """A listed postmaster has its own Maildir."""
        route = self.route("PostMaster", "staff.example")
        assert isinstance(route, Route)
        self.assertEqual(route.destination, "/srv/mail/staff.example/postmaster")

    def test_postmaster_unlisted(self) -> None:
        """Postmaster always exists: unlisted, it reads into the first listed user's Maildir."""
        self.assertEqual(
            self.route("postmaster", "example.org"),
            Route("maildir", "/srv/mail/example.org/alice", "postmaster@example.org"),
        )

    def test_bare_postmaster(self) -> None:
        """<postmaster> (empty domain) is the postmaster of the first configured domain."""
        self.assertEqual(
            self.route("postmaster", ""),
            Route("maildir", "/srv/mail/example.org/alice", "postmaster@example.org"),
        )

    def test_non_local_domain(self) -> None:
        """Other domains get a relay route to the smtp agent; policy decides if it is allowed."""
        self.assertEqual(
            self.route("someone", "elsewhere.example"),
            Route("smtp", "elsewhere.example", "someone@elsewhere.example", relay=True),
        )

    def test_subdomain_is_not_local(self) -> None:
        """Only the configured domain itself is local, not its subdomains."""
        route = self.route("alice", "sub.example.org")
        assert isinstance(route, Route)
        self.assertTrue(route.relay)

    def test_unsafe_local_part_relayed_untouched(self) -> None:
        """Relay routes never become paths, so their local parts are not judged here."""
        route = self.route("a/b", "elsewhere.example")
        assert isinstance(route, Route)
        self.assertEqual(route.agent, "smtp")

    def test_idn_domain(self) -> None:
        """A configured U-label domain is found when the address uses the A-label."""
        route = self.route("dora", "xn--bcher-kva.example")
        assert isinstance(route, Route)
        self.assertEqual(route.destination, os.path.join("/srv/mail/bücher.example", "dora"))

    @given(st.text(min_size=1, max_size=40))
    def test_routes_stay_inside_root(self, local: str) -> None:
        """Whatever the local part, a Maildir route is a direct child of the domain's root."""
        route = make_router().resolve(Mailbox(local, "localhost"))
        if isinstance(route, Route):
            self.assertEqual(os.path.dirname(route.destination), "/srv/mail/localhost")
            self.assertEqual(os.path.normpath(route.destination), route.destination)
        else:
            self.assertIsNotNone(local_part_problem(local))

"""The hold of ODMR sites in the queue: HELD recipients, their lifetime and DSNs, releasing
them through a site's client, the domain locks, routing and the [odmr] config."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailplat.config import ConfigError, parse_config
from mailplat.odmr import EtrnRelaySession, OdmrSession
from mailplat.envelope import BOUNCED, DELIVERED, HELD, PENDING
from mailplat.interfaces import Route
from mailplat.odmr_hold import HoldAgent, OdmrRouter, Site, Sites, odmr_sites, release, waiting
from mailplat.queue import Held, QueueManager
from mailplat.replies import Reply
from mailplat.server import MailServer
from mailplat.store import DEFERRED, HOLD, QueueStore
from mailplat.testing import StaticRouter
from tests.odmr_support import hold
from tests.queuefixtures import OK, QueueTestCase, route
from tests.test_cli_queue import run_cli, short_dir

SITE = Route("odmr", "site1.example", "x")
HOUR = 3600.0


class FakeClient:
    """Stands in for SMTPClient: records each transaction and answers from ``replies``."""

    def __init__(self, replies: dict[str, Reply] | None = None) -> None:
        self.replies = replies or {}
        self.sent: list[tuple[str, list[str], bytes]] = []
        self.usable = True

    def send(self, sender: str, recipients: list[str], source: Any, params: Any
             ) -> Deferred[dict[str, Reply]]:
        self.sent.append((sender, list(recipients), source.read()))
        return succeed({r: self.replies.get(r, OK) for r in recipients})


class HoldQueueTests(QueueTestCase):
    """The odmr agent in a real queue with the default retry schedule (delay warning 4h)."""

    def setUp(self) -> None:
        self.hold_agent = HoldAgent()
        super().setUp()
        self.router.routes["@site1.example"] = SITE
        self.router.routes["@site2.example"] = Route("odmr", "site2.example", "x")

    def make_queue(self) -> QueueManager:
        return QueueManager(
            self.store, self.router, {"recording": self.agent, "odmr": self.hold_agent},
            self.clock, schedule=self.schedule, notifier=self.notifier,  # type: ignore[arg-type]
        )

    def recipients(self, qid: str) -> dict[str, str]:
        return {r.address: r.state for r in self.state_of(qid)[1].recipients}

    def test_held_not_retried(self) -> None:
        """A site's recipient is HELD after the first attempt, and left alone until the
        delay warning is due: never retried on the schedule, never sent anywhere."""
        env = self.submit("a@site1.example")
        state, held = self.state_of(env.queue_id)
        [recipient] = held.recipients
        self.assertEqual((state, recipient.state, recipient.agent), (DEFERRED, HELD, "odmr"))
        self.assertEqual(recipient.next_attempt, held.received_at + 4 * HOUR)
        self.clock.advance(4 * HOUR - 1)
        self.assertEqual(self.state_of(env.queue_id)[1].recipients[0].attempts, 1)
        self.assertIn("status=held", self.lines()[0])

    def test_delay_warning_then_bounce(self) -> None:
        """Held mail gets the "delayed" DSN after delay_warning and bounces (with a "failed"
        DSN) when the queue lifetime ends."""
        env = self.submit("a@site1.example")
        self.clock.advance(4 * HOUR)
        self.assertEqual(self.notifier.sent, [(env.queue_id, "delayed", ["a@site1.example"])])
        self.assertEqual(self.recipients(env.queue_id), {"a@site1.example": HELD})
        self.clock.advance(self.schedule.max_lifetime - 4 * HOUR)
        self.assertEqual(self.notifier.sent[1], (env.queue_id, "failed", ["a@site1.example"]))
        self.assertIsNone(self.store.state_of(env.queue_id))

    def test_mixed_message(self) -> None:
        """In one message the local recipient is delivered and the site's is held."""
        env = self.submit("bob@example.com", "a@site1.example")
        self.assertEqual(self.recipients(env.queue_id),
                         {"bob@example.com": DELIVERED, "a@site1.example": HELD})

    def test_release_through_client(self) -> None:
        """While a site collects, the agent sends its recipients through the site's client:
        250 delivers, 4xx keeps held (with the site's reply), 5xx bounces."""
        env = self.submit("a@site1.example", "b@site1.example", "c@site1.example",
                          "z@site2.example")
        client: Any = FakeClient({"b@site1.example": Reply(452, "4.2.2", "full"),
                                  "c@site1.example": Reply(550, "5.1.1", "unknown")})
        domains = frozenset({"site1.example"})
        self.assertTrue(self.hold_agent.lock(domains))
        ids = self.successResultOf(waiting(self.queue, domains))
        self.assertEqual(ids, [env.queue_id])
        pull = self.successResultOf(Deferred.fromCoroutine(
            release(self.queue, self.hold_agent, domains, ids, client)))
        self.assertEqual([s[1] for s in client.sent],
                         [["a@site1.example", "b@site1.example", "c@site1.example"]])
        self.assertTrue(client.sent[0][2].endswith(b"hello\r\n"))
        self.assertEqual((pull.delivered, pull.held, pull.bounced), (1, 1, 1))
        recipients = {r.address: r for r in self.state_of(env.queue_id)[1].recipients}
        self.assertEqual({a: r.state for a, r in recipients.items()},
                         {"a@site1.example": DELIVERED, "b@site1.example": HELD,
                          "c@site1.example": BOUNCED, "z@site2.example": HELD})
        self.assertEqual(recipients["b@site1.example"].last_reply, "452 4.2.2 full")

    def test_without_pull_answers_held(self) -> None:
        """After the pull ended, the agent is back to answering "held"."""
        env = self.submit("a@site1.example")
        domains = frozenset({"site1.example"})
        client: Any = FakeClient()
        client.usable = False  # gone before the first message
        self.successResultOf(Deferred.fromCoroutine(release(
            self.queue, self.hold_agent, domains, [env.queue_id], client)))
        self.successResultOf(self.queue.deliver_now(env.queue_id, domains))
        self.assertEqual(client.sent, [])
        self.assertEqual(self.recipients(env.queue_id), {"a@site1.example": HELD})

    def test_waiting_skips_operator_hold(self) -> None:
        """Messages the operator put on hold are not released to the site."""
        env = self.submit("a@site1.example")
        other = self.submit("b@site1.example")
        self.successResultOf(self.queue.hold(other.queue_id))
        self.assertEqual(self.store.state_of(other.queue_id), HOLD)
        ids = self.successResultOf(waiting(self.queue, {"site1.example"}))
        self.assertEqual(ids, [env.queue_id])
        self.assertFalse(self.successResultOf(self.queue.deliver_now(other.queue_id)))

    def test_flush_by_domain_reaches_held(self) -> None:
        """``mailplat queue flush --domain`` also looks at held recipients (they stay held)."""
        env = self.submit("a@site1.example")
        self.assertEqual(self.successResultOf(self.queue.flush(domain="site1.example")), 1)
        self.clock.advance(0)
        [recipient] = self.state_of(env.queue_id)[1].recipients
        self.assertEqual((recipient.state, recipient.attempts), (HELD, 2))


class LockTests(SynchronousTestCase):
    def test_all_or_nothing(self) -> None:
        """A set of domains is locked whole or not at all."""
        agent = HoldAgent()
        self.assertTrue(agent.lock({"a.example", "b.example"}))
        self.assertFalse(agent.lock({"b.example", "c.example"}))
        self.assertFalse(agent.locked("c.example"))
        agent.unlock({"a.example", "b.example"})
        self.assertTrue(agent.lock({"b.example", "c.example"}))

    def test_held_is_a_marked_4xx(self) -> None:
        """The agent's answer without a pull is a queue.Held 4xx."""
        message: Any = None  # not read when the recipient is only held
        result = self.successResultOf(HoldAgent().deliver(message, [(_Rcpt("a@s.example"), SITE)]))
        self.assertIsInstance(result["a@s.example"], Held)
        self.assertTrue(result["a@s.example"].transient)


class _Rcpt:
    def __init__(self, address: str) -> None:
        self.address = address
        self.state = PENDING


class RouterTests(SynchronousTestCase):
    def test_sites_to_hold(self) -> None:
        """ODMR domains (any case, U-label or A-label) route to the hold, not as a relay;
        other domains go to the inner router."""
        inner = StaticRouter({"@example.com": route()})
        router = OdmrRouter(Sites([Site("xn--bcher-kva.example", frozenset({"u"}))]), inner)
        for domain in ("bücher.example", "XN--BCHER-KVA.example"):
            answer = self.successResultOf(router.route(_Mailbox("a", domain)))
            self.assertEqual((answer.agent, answer.destination, answer.relay),
                             ("odmr", "xn--bcher-kva.example", False))
        self.assertEqual(self.successResultOf(router.route(_Mailbox("b", "example.com"))),
                         route())


class _Mailbox:
    def __init__(self, local: str, domain: str) -> None:
        self.local, self.domain = local, domain


BASE = '[[listener]]\nname = "smtp"\nendpoint = "tcp:0"\nprofile = "relay"\n' \
       '[domains."example.org"]\ncatch_all = true\n'


class ConfigTests(SynchronousTestCase):
    def problems(self, text: str) -> list[str]:
        try:
            parse_config(BASE + text)
        except ConfigError as error:
            return [f"{p.key}: {p.message}" for p in error.problems]
        return []

    def test_sites(self) -> None:
        """[odmr.domains."D"] gives each site its accounts, ETRN host and clients."""
        config = parse_config(BASE + '[odmr.domains."Site1.Example"]\naccounts = ["SiteUser"]\n'
                              'etrn_host = "tcp:host=192.0.2.5:port=25"\n'
                              'etrn_clients = ["192.0.2.0/24"]\n')
        sites = odmr_sites(config)
        self.assertEqual(sites.get("site1.example"), Site(
            "site1.example", frozenset({"siteuser"}), "tcp:host=192.0.2.5:port=25",
            ("192.0.2.0/24",)))
        self.assertEqual(sites.domains_of("SITEUSER"), frozenset({"site1.example"}))

    def test_problems(self) -> None:
        """Missing accounts, a bad endpoint or network, unknown keys and a domain that is
        also local are reported with their keys."""
        found = self.problems(
            '[odmr]\ncolour = 1\n[odmr.domains."a.example"]\netrn_host = "nonsense:x"\n'
            'etrn_clients = ["not a net"]\nbogus = 1\n[odmr.domains."example.org"]\n'
            'accounts = ["x"]\n')
        self.assertEqual(len(found), 6, found)
        for fragment in ("odmr.colour: unknown key", 'a.example".accounts: must be',
                         'a.example".etrn_host: bad endpoint', 'a.example".etrn_clients: must',
                         'a.example".bogus: unknown key', '"example.org": is also a local'):
            self.assertTrue(any(fragment in line for line in found), (fragment, found))


class QueueListTests(SynchronousTestCase):
    def test_list_domain_shows_held(self) -> None:
        """``mailplat queue list --domain D`` shows what waits for site D, marked as such."""
        root = short_dir(self)
        config = os.path.join(root, "mailplat.toml")
        with open(config, "w") as f:
            f.write(f'data_dir = "{root}/data"\n{BASE}'
                    '[odmr.domains."site1.example"]\naccounts = ["siteuser"]\n')
        store = QueueStore(os.path.join(root, "data", "queue"))
        waiting_one = hold(store, "a@site1.example", now=1_700_000_000.0)
        hold(store, "b@site2.example")
        status, out, _ = run_cli("queue", "list", "--domain", "site1.example", "-c", config)
        lines = out.splitlines()
        self.assertEqual(status, 0)
        self.assertTrue(lines[0].startswith(waiting_one.queue_id))
        self.assertEqual(lines[1], "    <a@site1.example>  held, 1 attempt, waiting for its "
                                   "site; next check 2023-11-15 22:13:20Z")
        self.assertEqual(lines[-1], f"-- 1 message, {waiting_one.size} bytes")


class ProfileTests(SynchronousTestCase):
    def test_profiles_from_config(self) -> None:
        """An ``odmr`` listener gets OdmrSession (idle timeout at least ten minutes) and the
        relay listener gets ETRN; both share the server's odmr agent and queue."""
        data = os.path.abspath(self.mktemp())
        config = parse_config(
            f'data_dir = "{data}"\nhostname = "mx.test"\n'
            '[[listener]]\nname = "smtp"\nendpoint = "tcp:0:interface=127.0.0.1"\n'
            'profile = "relay"\n[[listener]]\nname = "odmr"\n'
            'endpoint = "tcp:0:interface=127.0.0.1"\nprofile = "odmr"\n'
            '[domains."example.org"]\ncatch_all = true\n'
            '[odmr.domains."site1.example"]\naccounts = ["siteuser"]\n')
        server = MailServer(config, Clock())
        odmr, relay = server.listeners["odmr"].factory, server.listeners["smtp"].factory
        self.assertIs(odmr.protocol, OdmrSession)
        self.assertEqual(odmr.settings.command_timeout, 600.0)
        self.assertIs(relay.protocol, EtrnRelaySession)
        self.assertIs(odmr.odmr, relay.odmr)
        assert odmr.odmr.collect is not None
        self.assertIs(odmr.odmr.collect.agent, server.agents["odmr"])
        self.assertIs(odmr.odmr.collect.queue, server.queue)
        route = self.successResultOf(server.router.route(_Mailbox("u", "Site1.Example")))
        self.assertEqual((route.agent, route.relay), ("odmr", False))


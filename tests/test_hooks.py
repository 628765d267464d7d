"""The plugin API: ordering and guards from the config, notes, added headers, queue events."""

from __future__ import annotations

import io

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailplat import hooks
from mailplat.addheaders import HeaderError, check_field, header_field, prefixed
from mailplat.config import ConfigError, parse_config
from mailplat.envelope import Envelope, Recipient, Transaction
from mailplat.interfaces import (
    CONTINUE, Action, IDisconnectHook, IPolicy, IPolicyPluginFactory, IQueueObserver, Route,
    Verdict,
)
from mailplat.policy import POLICY_TIMEOUT, DefaultPolicy, Guard, PolicyChain
from mailplat.queue import QueueManager, StoredMessage
from mailplat.replies import LOCAL_ERROR, Reply
from mailplat.spool import Spool
from mailplat.store import QueueStore
from mailplat.testing import (
    FakeResolver, RecordingAgent, StaticRouter, run_synchronously, session_info,
)
from tests.support import Client

BASE = """
[[listener]]
name = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
profile = "relay"
[domains."example.org"]
catch_all = true
"""
GREY = Verdict(Action.TEMPFAIL, Reply(450, "4.7.1", "Greylisted"))


class Plugin(hooks.PolicyPlugin):
    """Answers ``answer`` at rcpt and data, adds ``headers`` at data, records calls."""

    def __init__(self, answer: Any = CONTINUE, headers: tuple[str, ...] = ()) -> None:
        self.answer = answer
        self.headers = headers
        self.calls: list[str] = []

    def rcpt(self, session: Any, transaction: Any, recipient: Any, params: Any) -> Any:
        self.calls.append("rcpt")
        return self.answer() if callable(self.answer) else succeed(self.answer)

    def data(self, session: Any, transaction: Any, headers: bytes) -> Any:
        self.calls.append("data")
        return succeed(Verdict(Action.CONTINUE, add_headers=self.headers))

    def disconnect(self, session: Any) -> None:
        self.calls.append("disconnect")


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.session = session_info(peer_host="192.0.2.1")

    def chain(self, *pairs: tuple[Any, Guard]) -> PolicyChain:
        return PolicyChain([p for p, _ in pairs], timeout=30, clock=self.clock,
                           guards=[g for _, g in pairs])

    def rcpt(self, chain: PolicyChain) -> Deferred[Verdict]:
        return chain.rcpt(self.session, Transaction("a@example.net"), "b@example.org", {})

    def test_per_plugin_timeout(self) -> None:
        """A plugin's own timeout applies instead of the chain's, and answers 451."""
        slow = Plugin(lambda: Deferred())
        d = self.rcpt(self.chain((slow, Guard("slow", timeout=2.0))))
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), Verdict(Action.TEMPFAIL, POLICY_TIMEOUT))

    def test_on_error_continue_skips_broken_plugin(self) -> None:
        """With on_error continue, a failing plugin is skipped and the next one decides."""
        broken = Plugin(lambda: fail(RuntimeError("bug")))
        after = Plugin(GREY)
        d = self.rcpt(self.chain((broken, Guard("b", on_error=Action.CONTINUE)), (after, Guard())))
        self.assertEqual(self.successResultOf(d), GREY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_on_error_continue_on_timeout(self) -> None:
        """A timed-out plugin with on_error continue lets the chain go on."""
        slow = Plugin(lambda: Deferred())
        d = self.rcpt(self.chain((slow, Guard("s", timeout=1.0, on_error=Action.CONTINUE))))
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), CONTINUE)

    def test_on_error_tempfail_is_default(self) -> None:
        """Without a setting, a failing plugin costs the client a 451."""
        d = self.rcpt(self.chain((Plugin(lambda: fail(ValueError())), Guard()),))
        self.assertEqual(self.successResultOf(d), Verdict(Action.TEMPFAIL, LOCAL_ERROR))
        self.flushLoggedErrors(ValueError)

    def test_added_headers_are_collected(self) -> None:
        """Header fields from every plugin at data end up in the chain's verdict, in order."""
        chain = self.chain((Plugin(headers=("X-A: 1",)), Guard()),
                           (Plugin(headers=("X-B: 2",)), Guard()))
        verdict = self.successResultOf(chain.data(self.session, Transaction(""), b""))
        self.assertEqual(verdict.add_headers, ("X-A: 1", "X-B: 2"))


class HookChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        routes = {"@example.org": Route("maildir", "/m", "x"),
                  "@far.example": Route("smtp", "far.example", "x", relay=True)}
        self.default = DefaultPolicy(StaticRouter(routes))
        self.session = session_info(peer_host="192.0.2.1")

    def chain(self, *plugins: Any) -> hooks.HookChain:
        context = _context(self.clock)
        loaded = [hooks.Loaded(f"p{i}", p, Guard()) for i, p in enumerate(plugins)]
        return hooks.build_chain(self.default, loaded, context)

    def test_provides_interfaces(self) -> None:
        """The chain is an IPolicy and an IDisconnectHook; the base plugin provides all three."""
        verifyObject(IPolicy, self.chain())
        verifyObject(IDisconnectHook, self.chain())
        for interface in (IPolicy, IDisconnectHook, IQueueObserver):
            verifyObject(interface, hooks.PolicyPlugin())

    def test_plugins_run_after_routing_accepts(self) -> None:
        """The routing check's ACCEPT does not end the chain: a later plugin may greylist."""
        grey = Plugin(GREY)
        d = self.chain(grey).rcpt(self.session, Transaction(""), _box("a@example.org"), {})
        self.assertEqual(self.successResultOf(d), GREY)

    def test_routing_refusal_comes_first(self) -> None:
        """Relaying is refused before any plugin is asked, so none can open the relay."""
        plugin = Plugin(Verdict(Action.ACCEPT))
        d = self.chain(plugin).rcpt(self.session, Transaction(""), _box("a@far.example"), {})
        self.assertEqual(self.successResultOf(d).reply.code, 554)
        self.assertEqual(plugin.calls, [])

    def test_all_continue_accepts(self) -> None:
        """When every plugin continues, the recipient is accepted (CONTINUE at the end)."""
        d = self.chain(Plugin()).rcpt(self.session, Transaction(""), _box("a@example.org"), {})
        self.assertEqual(self.successResultOf(d).action, Action.CONTINUE)

    def test_notes_reset_per_transaction(self) -> None:
        """Session notes last; transaction notes and results are emptied by the next MAIL."""
        chain = self.chain()
        notes = hooks.notes(self.session)
        notes.session["kept"] = notes.transaction["dropped"] = 1
        hooks.record_result(self.session, object())
        self.successResultOf(chain.mail(self.session, None, {}))
        self.assertEqual((notes.session, notes.transaction, notes.results), ({"kept": 1}, {}, []))

    def test_authentication_results_header(self) -> None:
        """Recorded results become one Authentication-Results field naming our host."""
        import authres

        chain = self.chain(Plugin(headers=("X-Other: 1",)))
        self.successResultOf(chain.mail(self.session, None, {}))
        hooks.record_result(self.session, authres.SPFAuthenticationResult(
            result="pass", smtp_mailfrom="a@example.net"))
        verdict = self.successResultOf(chain.data(self.session, Transaction(""), b""))
        self.assertEqual(verdict.add_headers, (
            "Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=a@example.net",
            "X-Other: 1",
        ))

    def test_no_results_no_header(self) -> None:
        """Without recorded results no Authentication-Results field is added."""
        chain = self.chain()
        verdict = self.successResultOf(chain.data(self.session, Transaction(""), b""))
        self.assertEqual(verdict.add_headers, ())

    def test_disconnect_tells_plugins_and_forgets_notes(self) -> None:
        """At disconnect every plugin hears of it, then the session's notes are dropped."""
        plugin = Plugin()
        hooks.notes(self.session).session["x"] = 1
        self.successResultOf(self.chain(plugin).disconnect(self.session))
        self.assertEqual(plugin.calls, ["disconnect"])
        self.assertEqual(hooks.notes(self.session).session, {})


class SessionTests(SynchronousTestCase):
    """The chain behind a real session engine."""

    def test_added_headers_reach_the_transaction_and_disconnect_is_called(self) -> None:
        """Fields added at data are handed to the sink with the transaction; closing the
        connection reaches the plugins' disconnect hook."""
        plugin = Plugin(headers=("X-Checked: yes",))
        loaded = [hooks.Loaded("p", plugin, Guard())]
        router = StaticRouter({"@example.org": Route("maildir", "/m", "x")})
        chain = hooks.build_chain(DefaultPolicy(router), loaded, _context(Clock()))
        client = Client(policy=chain)
        codes = client.codes(b"EHLO c.test\r\nMAIL FROM:<a@example.net>\r\n"
                             b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(codes, ["220", "250", "250 2.1.0", "250 2.1.5", "354"])
        self.assertEqual(client.codes(b"Subject: x\r\n\r\nhi\r\n.\r\n"), ["250 2.0.0"])
        [(_, transaction, data)] = client.sink.finished
        self.assertEqual(transaction.add_headers, ["X-Checked: yes"])
        self.assertIn(b"Subject: x", data)
        client.session.connectionLost()
        self.assertEqual(plugin.calls, ["rcpt", "data", "disconnect"])


class AddedHeaderTests(SynchronousTestCase):
    def test_prefixed_reader(self) -> None:
        """Added fields come first, CRLF-terminated, then the stored bytes unchanged."""
        stream = prefixed(["X-A: 1", "X-B: 2"], io.BytesIO(b"Received: x\r\n\r\nbody"))
        self.assertEqual(stream.read(), b"X-A: 1\r\nX-B: 2\r\nReceived: x\r\n\r\nbody")

    def test_prefixed_reader_small_reads(self) -> None:
        """Reading a byte at a time yields the same bytes."""
        stream = prefixed(["X-A: 1"], io.BytesIO(b"rest"))
        self.assertEqual(b"".join(iter(lambda: stream.read(1), b"")), b"X-A: 1\r\nrest")

    def test_nothing_to_add_returns_the_file(self) -> None:
        """Without added fields the agent gets the stored file itself."""
        raw = io.BytesIO(b"x")
        self.assertIs(prefixed([], raw), raw)

    def test_field_checks(self) -> None:
        """Folded values are allowed; a line break that would start a new field is not."""
        self.assertEqual(header_field("X-A", "a\r\n\tb"), "X-A: a\r\n\tb")
        for bad in ("X-A: a\r\nX-Evil: 1", "X-A: a\nb", "no colon", "X A: b", "X-A: a\r\n"):
            self.assertRaises(HeaderError, check_field, bad)

    def test_stored_message_with_added_headers(self) -> None:
        """The queue's stored message shows the envelope's added fields ahead of the file."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"Subject: s\r\n\r\nbody\r\n")
        envelope = Envelope("Q1", "", (Recipient("b@example.org"),), 0.0,
                            add_headers=("DKIM-Signature: v=1",))
        with StoredMessage(envelope, path).open() as f:
            self.assertEqual(f.read(), b"DKIM-Signature: v=1\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)


@implementer(IQueueObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def queued(self, envelope: Any) -> None:
        self.events.append(("queued", envelope.queue_id))

    def delivered(self, envelope: Any, recipient: Any, reply: Any) -> None:
        self.events.append(("delivered", recipient.address))

    def deferred(self, envelope: Any, recipient: Any, reply: Any) -> None:
        self.events.append(("deferred", recipient.address))

    def bounced(self, envelope: Any, recipient: Any, reply: Any) -> Any:
        self.events.append(("bounced", recipient.address))
        return fail(RuntimeError("observer bug"))


class QueueEventTests(SynchronousTestCase):
    def test_queue_events_reach_observers(self) -> None:
        """Observers hear queued, then each recipient's outcome; their failures are logged
        and change nothing."""
        clock = Clock()
        store = QueueStore(self.mktemp(), runInThread=run_synchronously)
        later, no_user = Reply(451, "4.2.0", "later"), Reply(550, "5.1.1", "no")
        agent = RecordingAgent(replies={"c@example.org": later, "d@example.org": no_user})
        router = StaticRouter({"@example.org": Route("recording", "/m", "x")})
        queue = QueueManager(store, router, {"recording": agent}, clock)
        recorder = Recorder()
        queue.observers.append(recorder)
        spool = Spool(store, None, queue.submit, clock, run_synchronously)
        transaction = Transaction("a@example.net", [Recipient(a) for a in (
            "b@example.org", "c@example.org", "d@example.org")])
        incoming = spool.begin(session_info(), transaction)
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(incoming.finish(transaction))
        clock.advance(0)
        self.assertEqual(recorder.events, [
            ("queued", incoming.queue_id), ("delivered", "b@example.org"),
            ("deferred", "c@example.org"), ("bounced", "d@example.org"),
        ])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ConfigTests(SynchronousTestCase):
    def test_builtins_are_discovered(self) -> None:
        """twisted.plugin finds the seven built-in policy plugins."""
        found = hooks.factories()
        self.assertEqual(sorted(found), ["access", "dkim", "dmarc", "dnsbl", "greylist",
                                         "ratelimit", "spf"])
        for factory in found.values():
            verifyObject(IPolicyPluginFactory, factory)

    def test_order_and_guards_from_config(self) -> None:
        """[plugins] order enables and orders plugins; [plugin.NAME] sets timeout/on_error."""
        config = parse_config(BASE + """
[plugins]
order = ["ratelimit", "access"]
timeout = "9s"
[plugin.access]
deny_helo = ["bad.test"]
on_error = "continue"
timeout = "2s"
""")
        loaded = hooks.load_plugins(config.raw, _context(Clock(), self.mktemp()))
        self.assertEqual([p.name for p in loaded], ["ratelimit", "access"])
        self.assertEqual([p.guard.timeout for p in loaded], [9.0, 2.0])
        self.assertEqual([p.guard.on_error for p in loaded], [Action.TEMPFAIL, Action.CONTINUE])
        self.assertEqual(loaded[1].policy.settings.deny_helo, ("bad.test",))

    def test_config_problems_are_located(self) -> None:
        """Unknown plugins, bad guard settings and a plugin's own problems are reported."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + """
[plugins]
order = ["greylist", "nosuch"]
[plugin.greylist]
delay = "soon"
on_error = "ignore"
colour = "grey"
""")
        text = str(caught.exception)
        self.assertIn(":10: plugins.order: no plugin named 'nosuch'", text)
        self.assertIn(":12: plugin.greylist.delay:", text)
        self.assertIn(":13: plugin.greylist.on_error:", text)
        self.assertIn(":14: plugin.greylist.colour: unknown key", text)

    def test_enabled_plugin_without_section_is_checked(self) -> None:
        """A plugin in order without its section is checked with an empty one."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + '[plugins]\norder = ["dnsbl"]\n')
        self.assertIn("plugin.dnsbl.zones", str(caught.exception))

    def test_make_context_shares_the_servers_resolver(self) -> None:
        """Plugins get the server's one [dns] resolver, and the PluginService starts and
        stops its thread pool with the server."""
        from twisted.internet import reactor

        resolver = FakeResolver()
        context, pool = hooks.make_context(parse_config(BASE), reactor, resolver)
        self.assertIs(context.resolver, resolver)
        service = hooks.PluginService([], pool)
        service.startService()
        self.assertTrue(pool.started)
        self.successResultOf(service.stopService())
        self.assertFalse(pool.started)



def _context(clock: Clock, data_dir: str = "/nonexistent") -> Any:
    from mailplat.interfaces import PluginContext

    return PluginContext(reactor=clock, hostname="mx.test", data_dir=data_dir,
                         resolver=FakeResolver(), run_in_thread=run_synchronously)


def _box(address: str) -> Any:
    from mailplat.address import Mailbox

    local, _, domain = address.rpartition("@")
    return Mailbox(local, domain)




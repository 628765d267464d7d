"""The public plugin API: finding policy plugins, ordering them from the config, and the
notes, added headers and queue events they share.

A plugin is an ``IPolicyPluginFactory`` found by ``twisted.plugin`` in ``mailplat.plugins``;
``[plugins] order`` enables and orders them and ``[plugin.NAME]`` configures each. The policies
run in one ``HookChain`` (a ``PolicyChain``): the built-in routing and relay check first, so no
plugin can make the server an open relay or greylist a recipient that does not exist, then the
plugins in configured order. See docs/plugins.rst.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat import config as C
from mailplat.addheaders import HeaderError, check_field
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import (
    Action,
    IDisconnectHook,
    IPolicy,
    IQueueObserver,
    PluginContext,
    Verdict,
)
from mailplat.hookconfig import (
    ON_ERROR, factories, plugin_sections, register_config,
)
from mailplat.policy import Guard, PassThroughPolicy, PolicyChain

log = Logger()



# ------------------------------------------------------------------------------------- notes


@dataclass
class Notes:
    """What hooks of one session leave for later hooks.

    ``session`` lives as long as the connection; ``transaction`` is emptied when a new MAIL
    command starts a transaction; ``results`` are authres result objects that become the
    message's Authentication-Results header.
    """

    session: dict[str, Any] = field(default_factory=dict)
    transaction: dict[str, Any] = field(default_factory=dict)
    results: list[Any] = field(default_factory=list)

    def new_transaction(self) -> None:
        self.transaction = {}
        self.results = []


_notes: dict[str, Notes] = {}
_anonymous = itertools.count(1)


def notes(session: SessionInfo) -> Notes:
    """The notes of ``session`` (keyed by its session_id, which the engine sets)."""
    return _notes.setdefault(session.session_id, Notes())


def forget(session: SessionInfo) -> None:
    """Drop a finished session's notes."""
    _notes.pop(session.session_id, None)


def record_result(session: SessionInfo, result: Any) -> None:
    """Add an authres result (SPF, DKIM, DMARC...) to this message's Authentication-Results."""
    notes(session).results.append(result)


def is_allowlisted(session: SessionInfo) -> bool:
    """Set by the access plugin for clients in allow_clients: other checks may skip them."""
    return bool(notes(session).session.get("allowlisted"))


# ---------------------------------------------------------------------------- for authors


@implementer(IDisconnectHook, IQueueObserver)
class PolicyPlugin(PassThroughPolicy):
    """A base class: every hook answers CONTINUE or does nothing; override what you need.

    ``start``/``stop`` are called when the server starts and stops (return a Deferred to make
    shutdown wait, e.g. for a state file to be written).
    """

    def disconnect(self, session: SessionInfo) -> None:
        return None

    def queued(self, envelope: Any) -> None:
        return None

    def delivered(self, envelope: Any, recipient: Any, reply: Any) -> None:
        return None

    def deferred(self, envelope: Any, recipient: Any, reply: Any) -> None:
        return None

    def bounced(self, envelope: Any, recipient: Any, reply: Any) -> None:
        return None

    def start(self) -> Any:
        return None

    def stop(self) -> Any:
        return None


@implementer(IPolicy)
class Mandatory:
    """Runs a policy whose refusals stand but whose ACCEPT must not skip the plugins after it
    (the routing and relay check)."""

    def __init__(self, policy: IPolicy) -> None:
        self.policy = policy

    def __getattr__(self, hook: str) -> Any:
        method = getattr(self.policy, hook)

        def call(*args: Any) -> Deferred[Verdict]:
            return maybeDeferred(method, *args).addCallback(_accept_as_continue)

        return call

    def __repr__(self) -> str:
        return f"Mandatory({self.policy!r})"


def _accept_as_continue(verdict: Verdict) -> Verdict:
    """ACCEPT becomes CONTINUE, keeping what the verdict carries (an alias expansion)."""
    if verdict.action is not Action.ACCEPT:
        return verdict
    return replace(verdict, action=Action.CONTINUE, reply=None)


@implementer(IPolicy, IDisconnectHook)
class HookChain(PolicyChain):
    """The server's chain: notes per session and transaction, disconnect hooks, and one
    Authentication-Results header from the results the plugins recorded."""

    def __init__(self, policies: Iterable[IPolicy], *args: Any, authserv_id: str = "",
                 **kwargs: Any) -> None:
        super().__init__(policies, *args, **kwargs)
        self.authserv_id = authserv_id

    def mail(self, session: SessionInfo, sender: Any, params: Any) -> Deferred[Verdict]:
        notes(session).new_transaction()
        return super().mail(session, sender, params)

    def data(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        return super().data(session, transaction, headers).addCallback(self._results, session)

    def _results(self, verdict: Verdict, session: SessionInfo) -> Verdict:
        results = notes(session).results
        if not results or not self.authserv_id or verdict.action not in (
            Action.CONTINUE, Action.ACCEPT
        ):
            return verdict
        try:
            field = authentication_results(self.authserv_id, results)
        except (HeaderError, ValueError, TypeError):
            log.failure("cannot format Authentication-Results")
            return verdict
        return Verdict(verdict.action, verdict.reply, (field, *verdict.add_headers))

    def disconnect(self, session: SessionInfo) -> Deferred[Any]:
        """Tell every plugin that wants to know, then forget the session's notes."""
        calls = []
        for policy in self.policies:
            hook = IDisconnectHook(policy, None)
            if hook is not None:
                d = maybeDeferred(hook.disconnect, session)
                calls.append(d.addErrback(_disconnect_failed, policy))
        return DeferredList(calls).addBoth(lambda _: forget(session))


def _disconnect_failed(failure: Failure, policy: IPolicy) -> None:
    log.failure("{p!r}", failure, p=policy)


def authentication_results(authserv_id: str, results: list[Any]) -> str:
    """RFC 8601 header field, one result per folded line; built with the authres library."""
    import authres

    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    text = str(header).replace("; ", ";\r\n\t")
    return check_field(text)


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Loaded:
    """One enabled plugin: its policy and how the chain guards it."""

    name: str
    policy: Any
    guard: Guard


def load_plugins(raw: Mapping[str, Any], context: PluginContext) -> list[Loaded]:
    """The enabled plugins in configured order, each built from its own section."""
    plugins, sections = plugin_sections(raw)
    found = factories()
    default_timeout = C.parse_duration(plugins.get("timeout", 30))
    loaded = []
    for name in plugins.get("order", []):
        section = dict(sections.get(name, {}))
        guard = Guard(
            name=name,
            timeout=C.parse_duration(section.pop("timeout", default_timeout)),
            on_error=ON_ERROR[section.pop("on_error", "tempfail")],
        )
        policy = found[name].makePolicy(section, context)
        loaded.append(Loaded(name, policy, guard))
    return loaded


def build_chain(
    default: IPolicy, loaded: list[Loaded], context: PluginContext, timeout: float = 30.0
) -> HookChain:
    """The routing/relay check first, then the plugins; timeouts run on the context's clock."""
    return HookChain(
        [Mandatory(default), *(p.policy for p in loaded)],
        timeout=timeout,
        clock=context.reactor,
        guards=[Guard(name="routing"), *(p.guard for p in loaded)],
        authserv_id=context.hostname,
    )


def make_context(config: C.Config, reactor: Any, resolver: Any) -> tuple[PluginContext, Any]:
    """The context plugins are built with (``resolver`` is the server's one [dns] resolver),
    and the bounded thread pool behind run_in_thread (started and stopped by PluginService)."""
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    plugins, _ = plugin_sections(config.raw)
    pool = ThreadPool(minthreads=0, maxthreads=int(plugins.get("threads", 4)), name="plugins")

    def run_in_thread(f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f, *args)

    context = PluginContext(
        reactor=reactor, hostname=config.hostname, data_dir=config.data_dir,
        resolver=resolver, run_in_thread=run_in_thread,
        trusted_networks=config.trusted_networks,
    )
    return context, pool


def observers(loaded: list[Loaded]) -> list[Any]:
    """The enabled plugins that want queue events."""
    return [p.policy for p in loaded if IQueueObserver.providedBy(p.policy)]


class PluginService(Service):
    """Starts and stops the plugins with the server (state files, timers)."""

    name = "plugins"

    def __init__(self, loaded: list[Loaded], pool: Any = None) -> None:
        self.loaded = loaded
        self.pool = pool

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.pool is not None:
            self.pool.start()
        for plugin in self.loaded:
            start = getattr(plugin.policy, "start", None)
            if start is not None:
                start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        stops = [maybeDeferred(p.policy.stop) for p in self.loaded if hasattr(p.policy, "stop")]
        d = DeferredList(stops)
        if self.pool is not None:
            d.addBoth(lambda _: self.pool.stop())
        return d


__all__ = ["HookChain", "Notes", "PolicyPlugin", "factories", "forget", "is_allowlisted",
           "load_plugins", "notes", "record_result", "register_config"]

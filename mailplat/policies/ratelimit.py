"""ratelimit: connections, messages and recipients per client in a sliding time window, and
concurrent connections per client address.

Connections are counted per client address; messages and recipients per authenticated user
when there is one (so a submission user cannot escape by changing networks), else per client
address. Over a connection limit the client hears 421 4.7.0 and is disconnected; over a
message or recipient limit, 450 4.7.1 for that command only. Counts live in memory: a restart
forgives everybody, which errs on the side of delivering mail.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.replies import Reply

KEYS = ("window", "connections", "concurrent", "messages", "recipients", "exempt_clients")
_PRUNE_EVERY = 1000


@dataclass(frozen=True)
class Settings:
    window: float = 60.0
    connections: int = 0  # 0: no limit
    concurrent: int = 0
    messages: int = 0
    recipients: int = 0
    exempt_clients: tuple[common.Network, ...] = ()


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    result = Settings(
        window=o.get("window", common.duration, 60.0),
        connections=o.get("connections", common.count, 0),
        concurrent=o.get("concurrent", common.count, 0),
        messages=o.get("messages", common.count, 0),
        recipients=o.get("recipients", common.count, 0),
        exempt_clients=o.get("exempt_clients", common.networks, ()),
    )
    return result, o.problems


class SlidingWindow:
    """Event times per key within the last ``window`` seconds; memory is at most ``limit``
    times per key, and idle keys are dropped now and then."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.events: dict[str, deque[float]] = {}
        self._until_prune = _PRUNE_EVERY

    def allow(self, key: str, now: float, limit: int) -> bool:
        """Record one event for ``key`` unless that would exceed ``limit`` in the window."""
        self._prune_some(now)
        times = self.events.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    def _prune_some(self, now: float) -> None:
        self._until_prune -= 1
        if self._until_prune > 0:
            return
        self._until_prune = _PRUNE_EVERY
        idle = [k for k, t in self.events.items() if not t or t[-1] <= now - self.window]
        for key in idle:
            del self.events[key]


def too_many_connections(address: object) -> Verdict:
    return Verdict(Action.DISCONNECT, Reply(
        421, "4.7.0", f"Too many connections from [{address}], try again later"))


def too_many(what: str) -> Verdict:
    return Verdict(Action.TEMPFAIL, Reply(450, "4.7.1", f"Too many {what}, try again later"))


class RateLimitPolicy(hooks.PolicyPlugin):
    """In-memory counters on the server's clock."""

    def __init__(self, settings: Settings, clock: Any) -> None:
        self.settings = settings
        self.clock = clock
        self.connections = SlidingWindow(settings.window)
        self.messages = SlidingWindow(settings.window)
        self.recipients = SlidingWindow(settings.window)
        self.open: dict[str, int] = {}

    def _exempt(self, session: SessionInfo) -> str | None:
        """The client's address as a key, or None when it is not limited."""
        address = common.client_address(session.peer_host)
        if address is None or common.in_any(address, self.settings.exempt_clients):
            return None
        return str(address)

    def connect(self, session: SessionInfo) -> Deferred[Verdict]:
        key = self._exempt(session)
        if key is None:
            return succeed(CONTINUE)
        s = self.settings
        if s.concurrent and self.open.get(key, 0) >= s.concurrent:
            return succeed(too_many_connections(key))
        if s.connections and not self.connections.allow(key, self.clock.seconds(), s.connections):
            return succeed(too_many_connections(key))
        self.open[key] = self.open.get(key, 0) + 1
        hooks.notes(session).session["ratelimit.open"] = key
        return succeed(CONTINUE)

    def disconnect(self, session: SessionInfo) -> None:
        key = hooks.notes(session).session.pop("ratelimit.open", None)
        if key is not None:
            left = self.open.get(key, 1) - 1
            if left > 0:
                self.open[key] = left
            else:
                self.open.pop(key, None)

    def _sender_key(self, session: SessionInfo) -> str | None:
        if session.auth_user:
            return "user:" + session.auth_user
        return self._exempt(session)

    def mail(self, session: SessionInfo, sender: Any, params: Any) -> Deferred[Verdict]:
        key, limit = self._sender_key(session), self.settings.messages
        if key and limit and not self.messages.allow(key, self.clock.seconds(), limit):
            return succeed(too_many("messages"))
        return succeed(CONTINUE)

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: Any
    ) -> Deferred[Verdict]:
        key, limit = self._sender_key(session), self.settings.recipients
        if key and limit and not self.recipients.allow(key, self.clock.seconds(), limit):
            return succeed(too_many("recipients"))
        return succeed(CONTINUE)


def make(section: dict[str, Any], context: PluginContext) -> RateLimitPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return RateLimitPolicy(result, context.reactor)

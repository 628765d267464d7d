"""The default policy (no open relay) and the chain that runs policies in configured order.

Sessions never decide anything themselves: they ask an IPolicy at each SMTP stage. The chain
makes plugins safe to run: a hook that hangs or raises costs the client a 451 (try again later),
never a crash and never a silent accept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as HookTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, IPolicy, IRouter, Route, Verdict
from mailplat.params import MailParams, RcptParams
from mailplat.replies import LOCAL_ERROR, Reply

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
POLICY_TIMEOUT = Reply(451, "4.3.0", "Policy check timed out, try again later")
HOOKS = ("connect", "helo", "mail", "rcpt", "data")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: Iterable[str | Network]) -> tuple[Network, ...]:
    """Networks from CIDR strings (as in Config.trusted_networks) or network objects."""
    return tuple(ipaddress.ip_network(network) for network in networks)


def in_networks(host: str, networks: Sequence[Network]) -> bool:
    """Whether the peer address ``host`` lies in one of ``networks``.

    IPv4 clients on an IPv6 socket appear as ::ffff:a.b.c.d and are matched as IPv4; a host
    that is not an IP address at all (a UNIX socket peer, say) is never trusted.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@implementer(IPolicy)
class PassThroughPolicy:
    """Every SMTP-stage hook answers CONTINUE: the base to override only what you need."""

    def connect(self, session: SessionInfo) -> Deferred[Verdict]:
        return succeed(CONTINUE)

    def helo(self, session: SessionInfo, name: str) -> Deferred[Verdict]:
        return succeed(CONTINUE)

    def mail(self, session: SessionInfo, sender: Any, params: MailParams) -> Deferred[Verdict]:
        return succeed(CONTINUE)

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: RcptParams
    ) -> Deferred[Verdict]:
        return succeed(CONTINUE)

    def data(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        return succeed(CONTINUE)


class DefaultPolicy(PassThroughPolicy):
    """Accept mail for routable local recipients; relay only for authenticated or trusted clients.

    It answers ACCEPT at RCPT, so it belongs at the end of a chain: policies before it may
    reject or accept first.
    """

    def __init__(self, router: IRouter, trusted_networks: Iterable[str | Network] = ()) -> None:
        self.router = router
        self.trusted = parse_networks(trusted_networks)

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: RcptParams
    ) -> Deferred[Verdict]:
        """Route the recipient; refuse unroutable ones and relaying for strangers."""
        routed: Deferred[Route | Reply] = self.router.route(recipient)
        return routed.addCallback(self._judge, session)

    def _judge(self, route: Route | Reply, session: SessionInfo) -> Verdict:
        if isinstance(route, Reply):
            return Verdict(Action.REJECT, route)
        if route.relay and not self.may_relay(session):
            return Verdict(Action.REJECT, RELAY_DENIED)
        return Verdict(Action.ACCEPT, recipients=route.expansion)

    def may_relay(self, session: SessionInfo) -> bool:
        """Authenticated clients and clients in the trusted networks may relay."""
        return bool(session.auth_user) or in_networks(session.peer_host, self.trusted)


@dataclass(frozen=True)
class Guard:
    """How the chain treats one policy that is late or fails (set per plugin in the config)."""

    name: str = ""
    timeout: float | None = None  # None: the chain's own timeout
    on_error: Action = Action.TEMPFAIL  # TEMPFAIL answers 451; CONTINUE skips the policy


@implementer(IPolicy)
class PolicyChain:
    """Runs policies in order; the first verdict other than CONTINUE answers for the chain.

    Each hook call gets ``timeout`` seconds on ``clock``; a late or failing hook yields a
    TEMPFAIL with a 451 reply and a log entry, so a broken plugin delays mail but loses none.
    """

    log = Logger()

    def __init__(
        self,
        policies: Iterable[IPolicy],
        timeout: float = 30.0,
        clock: IReactorTime | None = None,
        guards: Sequence[Guard] = (),
    ) -> None:
        self.policies = tuple(policies)
        self.timeout = timeout
        self._clock = clock
        self.guards = tuple(guards) + (Guard(),) * (len(self.policies) - len(guards))

    def connect(self, session: SessionInfo) -> Deferred[Verdict]:
        return self._run("connect", session)

    def helo(self, session: SessionInfo, name: str) -> Deferred[Verdict]:
        return self._run("helo", session, name)

    def mail(self, session: SessionInfo, sender: Any, params: MailParams) -> Deferred[Verdict]:
        return self._run("mail", session, sender, params)

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: RcptParams
    ) -> Deferred[Verdict]:
        return self._run("rcpt", session, transaction, recipient, params)

    def data(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        return self._run("data", session, transaction, headers)

    @property
    def clock(self) -> IReactorTime:
        """The injected clock, or the global reactor chosen only when first needed."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    def _run(self, hook: str, *args: Any) -> Deferred[Verdict]:
        """Ask each policy in turn, stopping at the first verdict that is not CONTINUE.

        Header fields added by every policy asked are collected into the final verdict, and
        so is the latest alias expansion (``recipients``) a policy answered.
        """
        pending = list(zip(self.policies, self.guards))
        added: list[str] = []
        expansion: list[tuple[str, ...]] = [()]

        def next_policy(verdict: Verdict) -> Verdict | Deferred[Verdict]:
            added.extend(verdict.add_headers)
            expansion[0] = verdict.recipients or expansion[0]
            if verdict.action is not Action.CONTINUE or not pending:
                if not added and verdict.recipients == expansion[0]:
                    return verdict
                return replace(verdict, add_headers=tuple(added), recipients=expansion[0])
            policy, guard = pending.pop(0)
            return self._call(policy, hook, args, guard).addCallback(next_policy)

        return succeed(CONTINUE).addCallback(next_policy)

    def _call(
        self, policy: IPolicy, hook: str, args: tuple[Any, ...], guard: Guard = Guard()
    ) -> Deferred[Verdict]:
        """One hook call, guarded by the timeout and turned into a verdict whatever happens."""
        method: Callable[..., Deferred[Verdict]] = getattr(policy, hook)
        result: Deferred[Verdict] = maybeDeferred(method, *args)
        timeout = self.timeout if guard.timeout is None else guard.timeout
        if not result.called:  # an answer given at once needs no timer (set and cancelled)
            result.addTimeout(timeout, self.clock)
        return result.addCallback(self._checked, policy, hook).addErrback(
            self._failed, policy, hook, guard, timeout
        )

    def _checked(self, verdict: object, policy: IPolicy, hook: str) -> Verdict:
        if not isinstance(verdict, Verdict):
            raise TypeError(f"{policy!r}.{hook} answered {verdict!r}, not a Verdict")
        return verdict

    def _failed(
        self, failure: Failure, policy: IPolicy, hook: str, guard: Guard, timeout: float
    ) -> Verdict:
        """Log, then answer as the guard says: 451 (the default) or skip this policy."""
        if failure.check(HookTimeout):
            self.log.warn(
                "Policy hook {hook} of {policy!r} timed out after {timeout}s",
                hook=hook, policy=policy, timeout=timeout,
            )
            reply = POLICY_TIMEOUT
        else:
            self.log.failure(
                "Policy hook {hook} of {policy!r} failed", failure, hook=hook, policy=policy
            )
            reply = LOCAL_ERROR
        if guard.on_error is Action.CONTINUE:
            return CONTINUE
        return Verdict(Action.TEMPFAIL, reply)

"""The ``odmr`` listener profile (RFC 2645, port 366) and ETRN (RFC 1985) on the relay listener.

``OdmrSession`` is the AUTH-capable session with a smaller command set: before AUTH only
EHLO, AUTH, STARTTLS and QUIT (ATRN earns 530); after it ATRN and QUIT (EHLO, RSET and NOOP
are harmless and allowed in both states); anything else is 502. ``ATRN [domain,...]`` checks
that the account owns every domain (450 and nothing released if not), locks them (451 while
another connection collects one of them), finds their waiting mail (453 if none), answers 250
and turns the connection around (mailplat.turnaround).

``EtrnCommands`` adds ``ETRN domain | @domain | #queue`` to the relay session: a site with a
static host (``etrn_host``) gets its held mail sent there; other domains' deferred mail is
retried now (for trusted clients). Replies as RFC 1985 §5 lists them.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailplat import replies as R
from mailplat.config import ListenerConfig
from mailplat.odmr_hold import HoldAgent, Site, Sites, domain_key, odmr_sites, waiting
from mailplat.policy import in_networks, parse_networks
from mailplat.submission import AUTH_REQUIRED, SecureSession
from mailplat.store import DEFERRED
from mailplat.transaction import Stage
from mailplat.turnaround import Collect, Connector, deliver_to_host, endpoint_connector
from mailplat.turnaround import turn_around

if TYPE_CHECKING:
    from mailplat.server import MailServer

log = Logger()

NOT_HERE = R.Reply(502, "5.5.1", "Command not implemented on the ODMR service")
REVERSING = R.Reply(250, "2.0.0", "OK now reversing the connection")
NO_MAIL = R.Reply(453, "4.3.0", "You have no mail")
NOT_NOW = R.Reply(451, "4.3.0", "Unable to process ATRN request now")
ODMR_IDLE = 600.0  # seconds a session may wait for the site's next command, at least
_DOMAIN = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass
class OdmrContext:
    """What ATRN and ETRN need from the server, shared by the sessions of a listener."""

    sites: Sites
    collect: Collect | None  # None when the server has no odmr agent
    trusted: tuple[Any, ...] = ()
    connector: Connector | None = None  # ETRN's way to a site's host
    etrn_started: list[Deferred[None]] = field(default_factory=list)  # ETRN runs in progress


def parse_domains(text: str) -> list[str] | None:
    """ATRN's comma-separated domains in A-label form; None if one is not a domain name."""
    domains = []
    for word in text.split(","):
        key = domain_key(word)
        if not _DOMAIN.fullmatch(key):
            return None
        domains.append(key)
    return domains


# -------------------------------------------------------------------------- the ODMR session


class _OdmrParts(SecureSession):
    """The listener's OdmrContext, which its factory carries."""

    _gone = False

    @property
    def odmr(self) -> OdmrContext:
        context: OdmrContext = getattr(self.factory, "odmr")
        return context

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        super().connectionLost(reason)


class OdmrSession(_OdmrParts):
    """The ODMR service: authenticate, ATRN, turn around."""

    def ehlo_keywords(self) -> list[str]:
        """No mail is received here, so no SIZE, 8BITMIME...: only what ODMR uses."""
        return ["ENHANCEDSTATUSCODES", *self.extra_keywords(), "ATRN"]

    def offered_mechanisms(self) -> list[str]:
        """CRAM-MD5 always (RFC 2645 §5.1: the client may rely on it), PLAIN and LOGIN as
        for the other listeners (under TLS only, unless the operator says otherwise)."""
        offered = [m for m in super().offered_mechanisms() if m != "CRAM-MD5"]
        return offered + ["CRAM-MD5"] if self.security.portal is not None else offered

    # Verbs that mean something elsewhere but not on this service.
    def _not_here(self, args: str) -> R.Reply:
        return NOT_HERE

    smtp_HELO = smtp_MAIL = smtp_RCPT = smtp_DATA = smtp_BDAT = smtp_VRFY = smtp_EXPN = \
        smtp_HELP = smtp_TURN = smtp_ETRN = smtp_LHLO = _not_here

    def smtp_STARTTLS(self, args: str) -> R.Reply | None:
        if self.info.auth_user is not None:
            return R.Reply(503, "5.5.1", "STARTTLS must come before AUTH")
        return super().smtp_STARTTLS(args)

    def smtp_ATRN(self, args: str) -> Any:
        account = self.info.auth_user
        if account is None:
            return AUTH_REQUIRED
        if not self.greeted:
            return R.Reply(503, "5.5.1", "Send EHLO first")
        collect = self.odmr.collect
        owned = self.odmr.sites.domains_of(account)
        asked = parse_domains(args.strip()) if args.strip() else sorted(owned)
        if asked is None:
            return R.Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain]...]")
        refused = [d for d in asked if d not in owned]
        if refused or not asked:
            log.info("odmr: [{peer}] {user} may not collect {domains}", peer=self.info.peer_host,
                     user=account, domains=",".join(refused) or "(no domains)")
            return R.Reply(450, "4.7.1", "ATRN request refused: "
                           + (f"not authorized for {refused[0]}" if refused else "no domains"))
        domains = frozenset(asked)
        if collect is None or not collect.agent.lock(domains):
            return NOT_NOW
        d = maybeDeferred(waiting, collect.queue, domains)
        return d.addCallbacks(self._found, self._scan_failed, (collect, domains),
                              errbackArgs=(collect, domains))

    def _found(self, ids: list[str], collect: Collect, domains: frozenset[str]) -> Any:
        if not ids:
            collect.agent.unlock(domains)
            return NO_MAIL
        if self._gone:  # the site hung up while we looked
            collect.agent.unlock(domains)
            return None
        self.reply(REVERSING)
        turn_around(self, collect, domains, ids).addErrback(
            lambda f: log.failure("odmr: turnaround failed", f))
        return None

    def _scan_failed(self, failure: Any, collect: Collect, domains: frozenset[str]) -> R.Reply:
        log.failure("odmr: cannot look for waiting mail", failure)
        collect.agent.unlock(domains)
        return NOT_NOW


# ---------------------------------------------------------------------------------- ETRN


def etrn_reply(code: int, node: str, text: str) -> R.Reply:
    """An RFC 1985 reply; ``{node}`` in ``text`` is the node as the client named it."""
    status = "2.0.0" if code < 400 else ("4.3.0" if code < 500 else "5.7.1")
    if code == 459:
        status = "4.7.1"
    return R.Reply(code, status, text.format(node=node))


class EtrnCommands(_OdmrParts):
    """ETRN (RFC 1985) for the relay session: ``smtp_ETRN`` and its EHLO keyword.

    The session checks the command; what to do for the node is the ``EtrnDesk``'s business,
    which the factory carries as ``etrn`` (in a receiver process, a desk that asks the main
    process, where the queue is: mailplat.receivers)."""

    def extra_keywords(self) -> list[str]:
        return [*super().extra_keywords(), "ETRN"]

    def smtp_ETRN(self, args: str) -> Any:
        if not self.greeted:
            return R.Reply(503, "5.5.1", "Send EHLO first")
        if self.stage is not Stage.IDLE:
            return R.Reply(503, "5.5.1", "ETRN not allowed during a mail transaction")
        node = args.strip()
        kind, name = (node[0], node[1:]) if node[:1] in ("@", "#") else ("", node)
        if not name or " " in name or (kind != "#" and parse_domains(name) is None):
            return R.Reply(501, "5.5.4", "Syntax: ETRN [@|#]domain")
        desk = getattr(self.factory, "etrn", None) or EtrnDesk(self.odmr)
        return desk.etrn(node, self.info.peer_host, self.info.auth_user)


class EtrnDesk:
    """Answers a checked ETRN node for a client (its address and AUTH user): starts the
    queue run and says how it went."""

    def __init__(self, odmr: OdmrContext) -> None:
        self.odmr = odmr

    def etrn(self, node: str, peer_host: str, auth_user: str | None) -> Any:
        kind, name = (node[0], node[1:]) if node[:1] in ("@", "#") else ("", node)
        sites = self.odmr.sites.matching(name, subdomains=kind == "@")
        if sites:
            return self._etrn_sites(node, sites, peer_host, auth_user)
        if kind == "#":
            return etrn_reply(459, node, "Node {node} not allowed: no such queue")
        if not in_networks(peer_host, self.odmr.trusted):
            return etrn_reply(459, node, "Node {node} not allowed: client not authorized")
        return self._etrn_flush(node, domain_key(name), kind == "@")

    @staticmethod
    def _may_etrn(site: Site, peer_host: str, auth_user: str | None) -> bool:
        if auth_user is not None and auth_user.lower() in site.accounts:
            return True
        return in_networks(peer_host, parse_networks(site.etrn_clients))

    def _etrn_sites(
        self, node: str, sites: list[Site], peer_host: str, auth_user: str | None
    ) -> Any:
        """Held mail of ODMR sites with a static host goes to that host now."""
        collect, connector = self.odmr.collect, self.odmr.connector
        refused = [s for s in sites if not self._may_etrn(s, peer_host, auth_user)]
        if refused:
            return etrn_reply(459, node, "Node {node} not allowed: client not authorized")
        if any(s.etrn_host is None for s in sites):
            return etrn_reply(459, node, "Node {node} not allowed: no static host, use ODMR")
        if collect is None or connector is None:
            return etrn_reply(458, node, "Unable to queue messages for node {node}")
        d = maybeDeferred(waiting, collect.queue, [s.domain for s in sites])
        return d.addCallbacks(self._start_sites, self._etrn_failed, (node, sites, collect),
                              errbackArgs=(node,))

    def _start_sites(self, ids: list[str], node: str, sites: list[Site], collect: Collect) -> Any:
        if not ids:
            return etrn_reply(251, node, "OK, no messages waiting for node {node}")
        started = []
        hosts = {s.etrn_host for s in sites if s.etrn_host is not None}  # _etrn_sites checked
        for host in sorted(hosts):
            domains = frozenset(s.domain for s in sites if s.etrn_host == host)
            if not collect.agent.lock(domains):
                continue  # being collected right now (ATRN or another ETRN)
            assert self.odmr.connector is not None
            started.append(deliver_to_host(self.odmr.connector, host, collect, domains, ids))
        if not started:
            return etrn_reply(458, node, "Unable to queue messages for node {node} now")
        for run in started:  # kept while running, for tests and for the operator's logs
            self.odmr.etrn_started.append(run)
            run.addBoth(_forget, self.odmr.etrn_started, run)
        return etrn_reply(253, node, f"OK, {len(ids)} pending messages for node {{node}} started")

    def _etrn_flush(self, node: str, domain: str, subdomains: bool) -> Any:
        """Any other domain: retry its deferred mail now (trusted clients only, checked)."""
        collect = self.odmr.collect
        if collect is None:
            return etrn_reply(458, node, "Unable to queue messages for node {node}")
        queue = collect.queue
        if not subdomains:
            d = queue.flush(domain=domain)
            return d.addCallbacks(self._flushed, self._etrn_failed, (node,), errbackArgs=(node,))
        found = maybeDeferred(waiting_domains, queue, domain)
        flushed = found.addCallback(lambda names: Deferred.fromCoroutine(_flush_all(queue, names)))
        return flushed.addCallbacks(self._flushed, self._etrn_failed, (node,), errbackArgs=(node,))

    def _flushed(self, count: int, node: str) -> R.Reply:
        if not count:
            return etrn_reply(251, node, "OK, no messages waiting for node {node}")
        return etrn_reply(253, node, f"OK, {count} pending messages for node {{node}} started")

    def _etrn_failed(self, failure: Any, node: str) -> R.Reply:
        log.failure("etrn: cannot start a queue run for {node}", failure, node=node)
        return etrn_reply(458, node, "Unable to queue messages for node {node}")


def _forget(result: object, running: list[Deferred[None]], run: Deferred[None]) -> object:
    if run in running:
        running.remove(run)
    return result


def waiting_domains(queue: Any, parent: str) -> Deferred[set[str]]:
    """The recipient domains at or below ``parent`` that have mail in the queue."""
    store = queue.store

    def scan() -> set[str]:
        found: set[str] = set()
        for qid in store.list_ids(DEFERRED):
            try:
                envelope = store.read_envelope(qid)[1]
            except (OSError, ValueError, TypeError, KeyError):
                continue
            for r in envelope.recipients:
                domain = r.address.rpartition("@")[2].lower()
                if not r.finished and (domain == parent or domain.endswith("." + parent)):
                    found.add(domain)
        return found

    result: Deferred[set[str]] = store.in_thread(scan)
    return result


async def _flush_all(queue: Any, domains: set[str]) -> int:
    total = 0
    for domain in sorted(domains):
        total += await queue.flush(domain=domain)
    return total


class EtrnRelaySession(EtrnCommands):
    """The relay listener's session: STARTTLS, AUTH, and ETRN."""


# ------------------------------------------------------------------------------ profiles


_CONTEXTS: weakref.WeakKeyDictionary[Any, OdmrContext] = weakref.WeakKeyDictionary()


def odmr_context(server: MailServer, reactor: Any) -> OdmrContext:
    """The server's ODMR parts, made once and shared by the odmr and relay listeners."""
    context = _CONTEXTS.get(server)
    if context is None:
        agent = server.agents.get("odmr")
        collect = None
        if isinstance(agent, HoldAgent):
            collect = Collect(agent, server.queue, server.config.hostname, reactor)
        context = OdmrContext(
            sites=odmr_sites(server.config), collect=collect,
            trusted=parse_networks(server.config.trusted_networks),
            connector=endpoint_connector(reactor, collect) if collect else None,
        )
        _CONTEXTS[server] = context
    return context


def odmr_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """Port 366 role (RFC 2645): AUTH (CRAM-MD5 always), STARTTLS, ATRN and the turnaround."""
    from mailplat.listener_security import SecureFactory, security_for, server_security
    from mailplat.listeners import session_settings

    shared = server_security(server, reactor)
    security = replace(security_for(shared, require_auth=True, implicit_tls=False),
                       cram_available=lambda: True)
    settings = session_settings(server.config, listener)
    # A site may sit idle between its steps (dial-up links are slow to settle, and RFC 2645
    # clients wait ten minutes for ATRN's answer); so do we.
    settings = replace(settings, command_timeout=max(settings.command_timeout, ODMR_IDLE))
    factory = SecureFactory(settings, server.policy, server.spool, reactor,
                            session_class=OdmrSession, security=security)
    setattr(factory, "odmr", odmr_context(server, reactor))  # OdmrSession.odmr reads it
    return factory


def relay_etrn_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """The relay profile (mailplat.listener_security) with ETRN added."""
    from mailplat.listener_security import relay_profile

    factory = relay_profile(listener, server, reactor)
    factory.protocol = EtrnRelaySession
    context = odmr_context(server, reactor)
    setattr(factory, "odmr", context)  # OdmrSession.odmr reads it
    # A receiver process (mailplat.receivers) has a desk of its own that asks the main one.
    setattr(factory, "etrn", getattr(server, "etrn_desk", None) or EtrnDesk(context))
    return factory


__all__ = [
    "EtrnCommands", "EtrnDesk", "EtrnRelaySession", "OdmrContext", "OdmrSession", "odmr_profile",
    "parse_domains", "relay_etrn_profile",
]

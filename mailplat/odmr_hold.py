"""Where the mail of On-Demand Mail Relay sites waits, and how a site takes it (RFC 2645).

Mail for an ODMR domain (``[odmr.domains."site.example"]``) is accepted by the relay listener
like local mail: ``OdmrRouter`` routes it to the ``odmr`` agent, whose answer (``queue.Held``)
parks each recipient as HELD in the one queue. It is never sent by MX; the queue looks at it
again only for the delay warning and, at the end of the queue lifetime, to bounce it.

A site collects its mail by ATRN (the turnaround, mailplat.turnaround) or by ETRN to its
static host. Either way its domains are locked first (``HoldAgent.lock``: one connection per
domain at a time), and ``release`` attempts each waiting message at once through
``QueueManager.deliver_now``; while a ``Pull`` is registered for a domain the agent sends that
domain's recipients through the site's SMTP client instead of answering "held", and the queue
records the site's replies as for any agent: 2xx delivered, 4xx held again, 5xx bounced. A
message leaves the queue only after the site's reply for it, so a lost connection loses nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.client import SMTPClient
from mailplat.clientwire import envelope_params
from mailplat.config import Config, client_endpoint_problem
from mailplat.envelope import Envelope
from mailplat.interfaces import IDeliveryAgent, IRouter, IStoredMessage, Route
from mailplat.queue import Held, domain_of
from mailplat.replies import Reply
from mailplat.store import ACTIVE, DEFERRED
from mailplat.userdb import UserError, normal_name

if TYPE_CHECKING:
    from mailplat.queue import QueueManager

log = Logger()

AGENT = "odmr"
HELD = Held(450, "4.4.1", "Held until the site collects its mail (ODMR)")
SITE_KEYS = frozenset({"accounts", "etrn_host", "etrn_clients"})
Problems = list[tuple[tuple[str | int, ...], str]]


def domain_key(domain: str) -> str:
    """One spelling per domain: lowercase, no final dot, A-labels (IDNA)."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def spellings(domains: Iterable[str]) -> frozenset[str]:
    """The domains as A-labels and as U-labels: how envelope addresses may spell them."""
    found = set(domains)
    for domain in list(found):
        try:
            found.add(domain.encode("ascii").decode("idna").lower())
        except UnicodeError:
            pass
    return frozenset(found)


# ------------------------------------------------------------------------------ the sites


@dataclass(frozen=True)
class Site:
    """One ODMR domain: the AUTH accounts that may collect it, and for ETRN the host its
    mail goes to (a client endpoint string) and the networks that may ask for that."""

    domain: str
    accounts: frozenset[str]
    etrn_host: str | None = None
    etrn_clients: tuple[str, ...] = ()


class Sites:
    """Every configured ODMR domain, looked up by its A-label form."""

    def __init__(self, sites: Iterable[Site] = ()) -> None:
        self.by_domain = {site.domain: site for site in sites}

    def __contains__(self, domain: object) -> bool:
        return isinstance(domain, str) and domain_key(domain) in self.by_domain

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def get(self, domain: str) -> Site | None:
        return self.by_domain.get(domain_key(domain))

    def domains_of(self, account: str) -> frozenset[str]:
        """The domains an authenticated account may collect."""
        name = account.lower()
        return frozenset(d for d, site in self.by_domain.items() if name in site.accounts)

    def matching(self, domain: str, subdomains: bool) -> list[Site]:
        """The site for ``domain``, and with ``subdomains`` those below it too (ETRN @)."""
        key = domain_key(domain)
        return [site for name, site in sorted(self.by_domain.items())
                if name == key or (subdomains and name.endswith("." + key))]


def odmr_sites(config: Config) -> Sites:
    """The [odmr.domains] of a config that passed ``check_odmr``."""
    domains = config.raw.get("odmr", {}).get("domains", {})
    return Sites(
        Site(domain=domain_key(name), accounts=frozenset(normal_name(a) for a in table["accounts"]),
             etrn_host=table.get("etrn_host"), etrn_clients=tuple(table.get("etrn_clients", ())))
        for name, table in domains.items()
    )


def check_odmr(raw: Mapping[str, Any]) -> Problems:
    """Problems in [odmr], each with its key path."""
    table = raw.get("odmr", {})
    if not isinstance(table, dict):
        return [(("odmr",), "must be a table: [odmr.domains.\"site.example\"]")]
    problems: Problems = [(("odmr", key), "unknown key") for key in table if key != "domains"]
    domains = table.get("domains", {})
    if not isinstance(domains, dict):
        return problems + [(("odmr", "domains"), "must be a table of domains")]
    local = {domain_key(name) for name in raw.get("domains", {}) or {}}
    for name, site in domains.items():
        path: tuple[str | int, ...] = ("odmr", "domains", name)
        if domain_key(name) in local:
            problems.append((path, "is also a local domain in [domains]"))
        if not isinstance(site, dict):
            problems.append((path, "must be a table with accounts = [...]"))
            continue
        problems += _site_problems(path, site)
    return problems


def _site_problems(path: tuple[str | int, ...], site: Mapping[str, Any]) -> Problems:
    problems: Problems = [(path + (key,), "unknown key") for key in site if key not in SITE_KEYS]
    accounts = site.get("accounts")
    if not isinstance(accounts, list) or not accounts or \
            not all(isinstance(a, str) for a in accounts):
        problems.append((path + ("accounts",), "must be a list of AUTH user names"))
    else:
        for account in accounts:
            try:
                normal_name(account)
            except UserError as error:
                problems.append((path + ("accounts",), f"{account!r}: {error}"))
    host = site.get("etrn_host")
    if host is not None:
        problem = client_endpoint_problem(host) if isinstance(host, str) else "must be a string"
        if problem:
            problems.append((path + ("etrn_host",), f"bad endpoint {host!r}: {problem}"))
    clients = site.get("etrn_clients", [])
    if not isinstance(clients, list) or not all(_is_network(c) for c in clients):
        problems.append((path + ("etrn_clients",),
                         'must be a list of networks like "192.0.2.0/24"'))
    return problems


def _is_network(value: object) -> bool:
    try:
        ipaddress.ip_network(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


# ------------------------------------------------------------------------------ routing


@implementer(IRouter)
class OdmrRouter:
    """Routes the ODMR domains to the hold and asks the server's router about the rest.

    The route is not a relay: like local mail, anyone may send to a site's domain.
    """

    def __init__(self, sites: Sites, inner: IRouter) -> None:
        self.sites = sites
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def route(self, recipient: Any) -> Deferred[Route | Reply]:
        domain = domain_key(str(getattr(recipient, "domain", "")))
        if domain and domain in self.sites.by_domain:
            mailbox = f"{recipient.local}@{recipient.domain}"
            return succeed(Route(agent=AGENT, destination=domain, mailbox=mailbox))
        answer: Deferred[Route | Reply] = self.inner.route(recipient)
        return answer


def odmr_router(config: Config, inner: IRouter) -> IRouter:
    """``inner``, behind the ODMR domains when the config has any."""
    sites = odmr_sites(config)
    return OdmrRouter(sites, inner) if sites else inner


# ------------------------------------------------------------------------------ the agent


class Pull:
    """A site's SMTP client while its mail is released; one transaction at a time on it."""

    def __init__(self, client: SMTPClient, domains: frozenset[str]) -> None:
        self.client = client
        self.domains = domains
        self.lock = DeferredLock()
        self.delivered = 0
        self.held = 0
        self.bounced = 0


@implementer(IDeliveryAgent)
class HoldAgent:
    """The ``odmr`` delivery agent: "held" for every recipient, unless its site is connected.

    It also keeps which domains are being collected right now (``lock``), so that two
    connections never take the same domain's mail at once.
    """

    name = AGENT

    def __init__(self) -> None:
        self._locked: set[str] = set()
        self._pulls: dict[str, Pull] = {}

    # -- locks and pulls -----------------------------------------------------------------

    def lock(self, domains: Iterable[str]) -> bool:
        """Take every domain, or none of them if one is taken already."""
        wanted = set(domains)
        if wanted & self._locked:
            return False
        self._locked |= wanted
        return True

    def unlock(self, domains: Iterable[str]) -> None:
        self._locked.difference_update(domains)

    def locked(self, domain: str) -> bool:
        return domain in self._locked

    def start_pull(self, client: SMTPClient, domains: frozenset[str]) -> Pull:
        pull = Pull(client, domains)
        for domain in domains:
            self._pulls[domain] = pull
        return pull

    async def end_pull(self, pull: Pull) -> None:
        """Unregister once the transaction in flight (if any) has its reply."""
        await pull.lock.acquire()
        try:
            self.drop_pull(pull)
        finally:
            pull.lock.release()

    def drop_pull(self, pull: Pull) -> None:
        """Unregister at once (the pull is being abandoned: nothing can wait for it)."""
        for domain in pull.domains:
            if self._pulls.get(domain) is pull:
                del self._pulls[domain]

    # -- IDeliveryAgent ------------------------------------------------------------------

    def deliver(self, message: IStoredMessage,
                recipients: Sequence[tuple[Any, Route]]) -> Deferred[dict[str, Reply]]:
        return Deferred.fromCoroutine(self._deliver(message, list(recipients)))

    async def _deliver(self, message: IStoredMessage,
                       recipients: list[tuple[Any, Route]]) -> dict[str, Reply]:
        outcomes: dict[str, Reply] = {}
        by_pull: dict[int, tuple[Pull, list[str]]] = {}
        for recipient, route in recipients:
            pull = self._pulls.get(route.destination)
            if pull is None:
                outcomes[recipient.address] = HELD
            else:
                by_pull.setdefault(id(pull), (pull, []))[1].append(recipient.address)
        for pull, addresses in by_pull.values():
            outcomes.update(await self._send(pull, message, addresses))
        return outcomes

    async def _send(self, pull: Pull, message: IStoredMessage,
                    addresses: list[str]) -> dict[str, Reply]:
        """One transaction on the site's connection; its 4xx keep the recipients held."""
        envelope: Envelope = message.envelope
        await pull.lock.acquire()
        try:
            with message.open() as source:
                replies = await pull.client.send(
                    envelope.sender, addresses, source, envelope_params(envelope))
        finally:
            pull.lock.release()
        outcomes = {address: _as_outcome(replies[address]) for address in addresses}
        for reply in outcomes.values():
            if reply.positive:
                pull.delivered += 1
            elif reply.transient:
                pull.held += 1
            else:
                pull.bounced += 1
        return outcomes


def _as_outcome(reply: Reply) -> Reply:
    """The site's transient answers keep the recipient held, not retried by the schedule."""
    if reply.transient and not isinstance(reply, Held):
        return Held(reply.code, reply.status, reply.text)
    return reply


# ------------------------------------------------------------------------------ releasing


def waiting(queue: QueueManager, domains: Iterable[str]) -> Deferred[list[str]]:
    """Queue ids (oldest first) of the messages with an unfinished recipient in ``domains``.

    Reads the waiting envelopes in a thread; operator-held messages are left out.
    """
    wanted = frozenset(domains)
    store = queue.store

    def scan() -> list[str]:
        ids = sorted(store.list_ids(DEFERRED) + store.list_ids(ACTIVE))
        return store.select(ids, lambda envelope: _waits_for(envelope, wanted))

    return store.in_thread(scan)


def _waits_for(envelope: Envelope, domains: frozenset[str]) -> bool:
    return any(not r.finished and domain_key(domain_of(r.address)) in domains
               for r in envelope.recipients)


async def release(queue: QueueManager, agent: HoldAgent, domains: frozenset[str],
                  ids: Sequence[str], client: SMTPClient) -> Pull:
    """Send the waiting messages ``ids`` for ``domains`` through ``client``, one at a time,
    until done or the connection is gone; the caller holds the domains' lock."""
    pull = agent.start_pull(client, domains)
    try:
        for qid in ids:
            if not client.usable:
                break
            await queue.deliver_now(qid, spellings(domains))
    except GeneratorExit:
        # Garbage-collected while suspended: a coroutine may not await any more here.
        agent.drop_pull(pull)
        raise
    except BaseException:
        await agent.end_pull(pull)
        raise
    await agent.end_pull(pull)
    log.info("odmr: {domains}: {delivered} delivered, {held} still held, {bounced} bounced",
             domains=",".join(sorted(domains)), delivered=pull.delivered, held=pull.held,
             bounced=pull.bounced)
    return pull


__all__ = [
    "AGENT", "HELD", "HoldAgent", "OdmrRouter", "Pull", "Site", "Sites", "check_odmr",
    "domain_key", "odmr_router", "odmr_sites", "release", "spellings", "waiting",
]

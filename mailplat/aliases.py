"""Aliases and simple mailing lists: one address standing for others.

Aliases are expanded when the client names the recipient (RCPT time, see routing.py): the
transaction then holds the final addresses, so an alias to an unknown user is refused at once
and each final recipient has its own delivery state in the queue. Expansion is nested, with
loop detection: an address met again on its own expansion path is a final address (so
``alice = ["alice", "alice@elsewhere"]`` keeps a copy in alice's mailbox).

A mailing list stays one recipient until delivery, where the ``expand`` agent re-injects the
message through the spool with the list's owner as envelope sender (bounces go to the owner,
never to the poster) and a ``Delivered-To:`` header that stops mail loops between lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.envelope import Recipient, SessionInfo, Transaction
from mailplat.headers import HeaderScanner
from mailplat.interfaces import IDeliveryAgent, IStoredMessage, Route, SpoolError
from mailplat.replies import LOCAL_ERROR, Reply
from mailplat.routing import USER_UNKNOWN
from mailplat.routeconfig import MailingList, address_key, split_address

MAX_DEPTH = 20  # nested aliases; deeper is a misconfiguration
MAX_EXPANSION = 1000  # final addresses from one alias or list
TOO_DEEP = Reply(554, "5.4.6", "Alias expansion too deep (loop?)")
TOO_BIG = Reply(554, "5.4.6", "Alias expansion has too many addresses")
ALIAS_LOOP = Reply(554, "5.4.6", "Alias loop: no deliverable address")
LOOP = Reply(554, "5.4.6", "Mail loop: this message was expanded here before")
CHUNK = 1 << 20
HEADER_LIMIT = 64 * 1024
_DELIVERED_TO = re.compile(rb"(?im)^delivered-to[ \t]*:[ \t]*([^\r\n]*)")
NOT_EXPANDABLE = Reply(451, "4.3.5", "Address is no longer an alias or list; will retry")

log = Logger()


class ExpansionError(Exception):
    """An expansion that cannot be used; ``reply`` says why (always permanent)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass
class Expansion:
    """The final addresses an address stands for; ``loop`` notes a loop was cut."""

    addresses: list[str]
    loop: bool = False


def resolve_target(target: str, local: str, domain: str) -> str:
    """A target as written in the config, made absolute relative to the alias it belongs to:
    "bob" is bob at the alias's domain, "@example.org" is the same local part there."""
    if target.startswith("@"):
        return f"{local}@{target[1:]}"
    if "@" not in target:
        return f"{target}@{domain}" if domain else target
    return target


def expand(
    address: str,
    step: Callable[[str], Sequence[str] | None],
    max_depth: int = MAX_DEPTH,
    max_size: int = MAX_EXPANSION,
) -> Expansion:
    """Expand ``address`` depth-first; ``step`` gives an address's targets, or None when the
    address is final. Duplicates are dropped, first occurrence kept; an alias met again in
    another branch is not expanded twice (its addresses are already in), so the work stays
    linear in the size of the alias table."""
    result = Expansion([])
    seen: set[str] = set()
    expanded: set[str] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [(address, ())]
    while stack:
        current, path = stack.pop()
        key = address_key(current)
        targets = None if key in path else step(current)
        result.loop = result.loop or key in path
        if targets is not None and key in expanded:
            continue
        if targets is None:
            if key not in seen:
                seen.add(key)
                result.addresses.append(current)
            if len(result.addresses) > max_size:
                raise ExpansionError(TOO_BIG)
            continue
        if len(path) >= max_depth:
            raise ExpansionError(TOO_DEEP)
        expanded.add(key)
        stack.extend((target, path + (key,)) for target in reversed(targets))
    return result


class AliasTable:
    """The ``[aliases]`` and ``[lists]`` tables, looked up by address.

    Alias keys are "local@domain", "local" (in every local domain) or "@domain" (the
    catch-all: any local part of that domain that is no mailbox and no other alias).
    """

    def __init__(
        self, aliases: Mapping[str, Sequence[str]], lists: Mapping[str, MailingList]
    ) -> None:
        self._aliases = {address_key(key): tuple(value) for key, value in aliases.items()}
        self._lists = {address_key(key): value for key, value in lists.items()}

    def __bool__(self) -> bool:
        return bool(self._aliases or self._lists)

    def domains(self) -> set[str]:
        """Domains named by an alias or a list: we accept mail for them (virtual alias
        domains) even when they are not local mailbox domains."""
        names = {split_address(key)[1] for key in [*self._aliases, *self._lists]}
        return {name for name in names if name}

    def alias(self, address: str, local_domain: bool) -> tuple[str, ...] | None:
        """The targets of an exact alias ("local@domain", or "local" when the domain is one
        of ours), made absolute; None when there is no such alias."""
        local, domain = split_address(address)
        targets = self._aliases.get(address_key(address))
        if targets is None and local_domain:
            targets = self._aliases.get(local.lower())
        return self._absolute(targets, local, domain)

    def catch_all(self, address: str) -> tuple[str, ...] | None:
        local, domain = split_address(address)
        return self._absolute(self._aliases.get(f"@{domain}"), local, domain)

    def mailing_list(self, address: str) -> MailingList | None:
        return self._lists.get(address_key(address))

    def members(self, mailing_list: MailingList) -> tuple[str, ...]:
        local, domain = split_address(mailing_list.address)
        return tuple(resolve_target(m, local, domain) for m in mailing_list.members)

    @staticmethod
    def _absolute(targets: Sequence[str] | None, local: str, domain: str) -> tuple[str, ...] | None:
        if targets is None:
            return None
        return tuple(resolve_target(target, local, domain) for target in targets)


def orcpt_for(address: str) -> str:
    """The RFC 3461 ORCPT of an expanded recipient: the address the client gave."""
    if address.isascii():
        return f"rfc822;{address}"
    return f"utf-8;{address}"  # RFC 6533


def expanded_recipients(entry: Any, addresses: Iterable[str], existing: Iterable[Any]) -> list[Any]:
    """Recipient records for an alias's final addresses, each remembering the alias as ORCPT,
    without the addresses the transaction already has."""
    have = {address_key(r.address) for r in existing}
    out = []
    for address in addresses:
        key = address_key(address)
        if key in have:
            continue
        have.add(key)
        out.append(replace(entry, address=address, orcpt=entry.orcpt or orcpt_for(entry.address)))
    return out


class RouterLike(Protocol):
    """What AliasRouter needs from the router it extends (routing.LocalRouter)."""

    def direct(self, local: str, domain: str) -> Route | Reply: ...

    def is_local_domain(self, domain: str) -> bool: ...

    def subaddress_base(self, address: str) -> str | None: ...


class AliasRouter:
    """Aliases and lists on top of a router's direct answer (mailboxes and relay routes).

    ``route`` is asked at RCPT time and at delivery. For an alias it returns a Route whose
    ``expansion`` lists the final addresses (the session records those instead); its agent
    is the address's own mailbox when it has one (so an alias that includes itself delivers
    there), or ``expand`` when it is only an alias. A list routes to ``expand`` as itself.
    """

    def __init__(self, table: AliasTable, router: RouterLike) -> None:
        self.table = table
        self.router = router

    def route(self, address: str) -> Route | Reply | None:
        """None when aliases and lists have nothing to say about ``address``."""
        if not self.table:
            return None
        found = self.table.mailing_list(address)
        if found is not None:
            return Route(agent="expand", destination="list", mailbox=found.address)
        if self.step(address) is None:
            return None
        finals = self.finals(address, self.step)
        if isinstance(finals, Reply):
            return finals
        base = self._direct(address)
        if isinstance(base, Route) and base.agent not in ("smtp", "expand"):
            return replace(base, expansion=tuple(finals))
        return Route(agent="expand", destination="alias", mailbox=address,
                     expansion=tuple(finals))

    def step(self, address: str) -> tuple[str, ...] | None:
        """One level of alias expansion; None for a final address (mailbox, list, remote)."""
        if self.table.mailing_list(address) is not None:
            return None
        local_domain = self.router.is_local_domain(split_address(address)[1])
        targets = self.table.alias(address, local_domain)
        base = self.router.subaddress_base(address)
        if targets is None and base is not None:
            targets = self.table.alias(base, local_domain)  # the tag is dropped
        if targets is None and isinstance(self._direct(address), Reply):
            targets = self.table.catch_all(address)
        return targets

    def _list_step(self, address: str) -> tuple[str, ...] | None:
        """Like ``step``, but nested lists are expanded in place (one owner for all)."""
        found = self.table.mailing_list(address)
        return self.table.members(found) if found is not None else self.step(address)

    def _direct(self, address: str) -> Route | Reply:
        local, domain = split_address(address)
        return self.router.direct(local, domain)

    def finals(
        self, address: str, step: Callable[[str], Sequence[str] | None]
    ) -> list[str] | Reply:
        """The deliverable final addresses; unknown local ones are left out (and logged)."""
        try:
            expansion = expand(address, step)
        except ExpansionError as error:
            return error.reply
        finals = []
        for final in expansion.addresses:
            if self.table.mailing_list(final) is not None:
                if step is self.step:
                    finals.append(final)
                continue  # a list met again inside a list expansion is a loop
            if isinstance(self._direct(final), Reply):
                log.warn("alias {alias}: dropping undeliverable {final}", alias=address, final=final)
                continue
            finals.append(final)
        if finals:
            return finals
        return ALIAS_LOOP if expansion.loop else USER_UNKNOWN

    def expansion(self, address: str) -> tuple[str | None, list[str]] | Reply:
        """For the ``expand`` agent: (new envelope sender or None to keep it, addresses)."""
        found = self.table.mailing_list(address)
        if found is not None:
            finals = self.finals(found.address, self._list_step)
            return finals if isinstance(finals, Reply) else (found.owner, finals)
        if self.step(address) is None:
            return NOT_EXPANDABLE
        finals = self.finals(address, self.step)
        return finals if isinstance(finals, Reply) else (None, finals)


@implementer(IDeliveryAgent)
class ExpandAgent:
    """The ``expand`` agent: puts a message back into the queue for a list's members (sender:
    the list owner) or an alias's final addresses (sender unchanged), through the one spool.

    The copy carries ``Delivered-To: <list or alias>``; a message that already has that field
    for the same address has been here before, and is refused as a mail loop (554 5.4.6).
    """

    name = "expand"

    def __init__(self, router: Any, sink: Any, hostname: str) -> None:
        self.router = router
        self.sink = sink
        self.hostname = hostname

    def deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> Deferred[dict[str, Reply]]:
        return Deferred.fromCoroutine(self._deliver(message, recipients))

    async def _deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> dict[str, Reply]:
        seen = delivered_to(message)
        outcomes: dict[str, Reply] = {}
        for recipient, route in recipients:
            if address_key(route.mailbox) in seen:
                outcomes[recipient.address] = LOOP
                continue
            answer = self.router.aliases.expansion(route.mailbox)
            if isinstance(answer, Reply):
                outcomes[recipient.address] = answer
                continue
            sender, addresses = answer
            outcomes[recipient.address] = await self._inject(
                message, recipient, route.mailbox, sender, addresses
            )
        return outcomes

    async def _inject(
        self, message: IStoredMessage, recipient: Recipient, name: str,
        sender: str | None, addresses: list[str],
    ) -> Reply:
        """One new queue entry for one expanded address; a 4xx when the spool refuses."""
        envelope = message.envelope
        is_list = sender is not None
        entry = Recipient(address=recipient.address, orcpt=recipient.orcpt,
                          notify=() if is_list else recipient.notify)
        transaction = Transaction(
            sender=envelope.sender if sender is None else sender,
            recipients=expanded_recipients(entry, addresses, ()),
            body=envelope.body, smtputf8=envelope.smtputf8,
            envid=None if is_list else envelope.envid, ret=None if is_list else envelope.ret,
        )
        session = SessionInfo(helo=self.hostname, protocol="LOCAL", listener="expand")
        try:
            incoming = self.sink.begin(session, transaction)
        except SpoolError as error:
            return error.reply
        try:
            incoming.write(f"Delivered-To: {name}\r\n".encode("utf-8"))
            with message.open() as source:  # blocking reads
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    incoming.write(chunk)
        except (SpoolError, OSError) as error:
            incoming.abort()
            log.warn("expanding {name}: {error}", name=name, error=error)
            return error.reply if isinstance(error, SpoolError) else LOCAL_ERROR
        replies: list[Reply] = await incoming.finish(transaction)
        if not replies[0].positive:
            return replies[0]
        count = len(transaction.recipients)
        return Reply(250, "2.0.0", f"expanded to {count} recipients, queued as {incoming.queue_id}")


def delivered_to(message: IStoredMessage) -> set[str]:
    """The address keys named by ``Delivered-To:`` fields in the message's header section."""
    scanner = HeaderScanner(limit=HEADER_LIMIT)
    with message.open() as source:
        while not scanner.complete:
            chunk = source.read(1 << 14)
            if not chunk:
                break
            scanner.feed(chunk)
    return {address_key(value.decode("utf-8", "replace").strip().strip("<>"))
            for value in _DELIVERED_TO.findall(scanner.headers)}


__all__ = [
    "AliasRouter",
    "ExpandAgent",
    "AliasTable",
    "Expansion",
    "ExpansionError",
    "expand",
    "expanded_recipients",
    "orcpt_for",
    "resolve_target",
]

"""Where each recipient goes: a Maildir for our own domains, the SMTP relay agent for the rest.

The router only answers "where"; whether a client may send there (relaying) is the policy's
question. Local parts become directory names, so anything that could step outside the Maildir
root is refused here, once, before any agent sees it.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailplat.interfaces import IRouter, Route
from mailplat.replies import Reply

if TYPE_CHECKING:
    from mailplat.config import Config, DomainConfig

BAD_SYNTAX = Reply(553, "5.1.3", "Bad recipient address syntax")
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown")
POSTMASTER = "postmaster"
DEFAULT_DELIMITER = "+"  # user+tag@domain, RFC 5233

# Longest name most filesystems allow for one directory entry, in bytes.
_NAME_MAX = 255


class MailboxLike(Protocol):
    """What the router needs of an address: mailplat.address.Mailbox has it."""

    @property
    def local(self) -> str: ...

    @property
    def domain(self) -> str: ...


def local_part_problem(local: str) -> str | None:
    """Why ``local`` cannot safely name a directory under a Maildir root, or None if it can."""
    if not local:
        return "is empty"
    if local.startswith("."):
        return "starts with '.'"
    if "/" in local or "\\" in local:
        return "contains a path separator"
    # (Those categories are never printable: the common printable name skips the walk.)
    if not local.isprintable() and any(
        unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in local
    ):
        return "contains a control character"
    if len(local.encode("utf-8", "surrogatepass")) > _NAME_MAX:
        return "is too long"
    return None


def split_subaddress(local: str, delimiter: str) -> tuple[str, str | None]:
    """("user", "tag") for "user+tag" (RFC 5233); (local, None) when there is no tag."""
    if not delimiter:
        return local, None
    base, found, tag = local.partition(delimiter)
    if not found or not base:
        return local, None
    return base, tag


def _delimiter(domain: DomainConfig) -> str:
    return str(domain.options.get("recipient_delimiter", DEFAULT_DELIMITER))


def _domain_aliases(name: str) -> set[str]:
    """The spellings one configured domain may arrive in: as written, as A-label, as U-label."""
    aliases = {name}
    for convert in (_to_ascii, _to_unicode):
        try:
            aliases.add(convert(name))
        except UnicodeError:
            pass
    return aliases


def _to_ascii(name: str) -> str:
    return name.encode("idna").decode("ascii").lower()


def _to_unicode(name: str) -> str:
    return name.encode("ascii").decode("idna").lower()


@implementer(IRouter)
class LocalRouter:
    """Routes the configured local domains to Maildirs and everything else to the relay agent.

    Postmaster (RFC 5321 §4.5.1) always exists in every local domain: its mail goes to the
    Maildir of the domain's ``postmaster`` user (see DomainConfig). The bare ``<postmaster>``
    address (domain "") is the postmaster of the first configured domain.
    """

    def __init__(self, config: Config) -> None:
        self._first: DomainConfig | None = next(iter(config.domains.values()), None)
        self._domains: dict[str, DomainConfig] = {}
        for domain in config.domains.values():
            for alias in _domain_aliases(domain.name):
                self._domains.setdefault(alias, domain)
        from mailplat.aliases import AliasRouter, AliasTable
        from mailplat.routeconfig import routing_settings

        self.settings = routing_settings(config)
        table = AliasTable(self.settings.aliases, self.settings.lists)
        self.aliases = AliasRouter(table, self)
        self._alias_domains = table.domains()

    def route(self, recipient: MailboxLike) -> Deferred[Route | Reply]:
        """Resolve ``recipient`` at once; the Deferred lets other routers look things up."""
        return succeed(self.resolve(recipient))

    def resolve(self, recipient: MailboxLike) -> Route | Reply:
        """The synchronous core of ``route``, handy for tools and tests."""
        domain_name = recipient.domain.lower()
        if domain_name == "":
            if self._first is None:
                return USER_UNKNOWN
            return self._local(self._first, POSTMASTER)
        aliased = self.aliases.route(f"{recipient.local}@{domain_name}")
        if aliased is not None:
            return aliased
        return self.direct(recipient.local, domain_name)

    # -- without aliases and lists (see mailplat.aliases.AliasRouter for those) ---------------

    def direct(self, local: str, domain_name: str) -> Route | Reply:
        """A mailbox of ours (also as ``user+tag``), or the relay route for other domains."""
        domain = self._domains.get(domain_name)
        if domain is None:
            return self._foreign(local, domain_name)
        route = self._local(domain, local)
        base, tag = split_subaddress(local, _delimiter(domain))
        if tag is None or (domain.users is not None and local.lower() in domain.users):
            return route
        based = self._local(domain, base)
        return replace(based, tag=tag) if isinstance(based, Route) else route

    def is_local_domain(self, domain_name: str) -> bool:
        return domain_name in self._domains

    def subaddress_base(self, address: str) -> str | None:
        """``user@d`` for ``user+tag@d`` (with the domain's delimiter), else None."""
        local, _, domain_name = address.rpartition("@")
        domain = self._domains.get(domain_name)
        base, tag = split_subaddress(local, _delimiter(domain) if domain else DEFAULT_DELIMITER)
        return f"{base}@{domain_name}" if tag is not None else None

    def _foreign(self, local: str, domain_name: str) -> Route | Reply:
        """Not a mailbox domain: alias-only domains, relay domains, smarthost, the world."""
        from mailplat.routeconfig import domain_key

        key = domain_key(domain_name)
        if key in self._alias_domains:
            return USER_UNKNOWN  # its aliases and catch-all were asked already
        mailbox = f"{local}@{domain_name}"
        hop = self.settings.relay_domains.get(key)
        if hop is not None:  # accepted from anyone: we are their backup MX or gateway
            return Route(agent="smtp", destination=hop or domain_name, mailbox=mailbox)
        smarthost, only = self.settings.smarthost, self.settings.smarthost_domains
        if smarthost and (only is None or key in only):
            return Route(agent="smtp", destination=smarthost, mailbox=mailbox, relay=True)
        return Route(agent="smtp", destination=domain_name, mailbox=mailbox, relay=True)

    def _local(self, domain: DomainConfig, local: str) -> Route | Reply:
        """A mailbox in one of our domains: its Maildir, or why there is none."""
        if local_part_problem(local) is not None:
            return BAD_SYNTAX
        folder = local.lower()
        if folder == POSTMASTER:
            folder = domain.postmaster
        elif domain.users is not None and folder not in domain.users:
            return USER_UNKNOWN
        if domain.lmtp:  # the LMTP server (Dovecot...) owns the mailboxes
            user = folder if local.lower() == POSTMASTER else local
            return Route(agent="lmtp", destination=domain.lmtp, mailbox=f"{user}@{domain.name}")
        return Route(
            agent="maildir",
            destination=os.path.join(domain.maildir_root, folder),
            mailbox=f"{local}@{domain.name}",
        )


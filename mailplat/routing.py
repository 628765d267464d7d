"""Where each recipient goes: a Maildir for our own domains, the SMTP relay agent for the rest.

The router only answers "where"; whether a client may send there (relaying) is the policy's
question. Local parts become directory names, so anything that could step outside the Maildir
root is refused here, once, before any agent sees it.
"""

from __future__ import annotations

import os
import unicodedata
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
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in local):
        return "contains a control character"
    if len(local.encode("utf-8", "surrogatepass")) > _NAME_MAX:
        return "is too long"
    return None


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
        domain = self._domains.get(domain_name)
        if domain is None:
            return Route(
                agent="smtp",
                destination=domain_name,
                mailbox=f"{recipient.local}@{domain_name}",
                relay=True,
            )
        return self._local(domain, recipient.local)

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


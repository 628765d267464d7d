"""access: allow or deny by client network, HELO name, sender and recipient.

Denials answer at the stage they concern (a denied client at connect, then the connection is
closed); a client in ``allow_clients`` is marked allowlisted in the session notes, which the
dnsbl, greylist and spf plugins honour. Allow rules never bypass the routing and relay check.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.replies import Reply

KEYS = ("allow_clients", "deny_clients", "deny_helo", "deny_senders", "allow_senders",
        "deny_recipients")
CLIENT_DENIED = Reply(554, "5.7.1", "Access denied")
HELO_DENIED = Reply(550, "5.7.1", "HELO/EHLO name rejected")
SENDER_DENIED = Reply(550, "5.7.1", "Sender address rejected: access denied")
RECIPIENT_DENIED = Reply(550, "5.7.1", "Recipient address rejected: access denied")


@dataclass(frozen=True)
class Settings:
    allow_clients: tuple[common.Network, ...] = ()
    deny_clients: tuple[common.Network, ...] = ()
    deny_helo: tuple[str, ...] = ()
    deny_senders: tuple[str, ...] = ()
    allow_senders: tuple[str, ...] = ()
    deny_recipients: tuple[str, ...] = ()


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    patterns = {k: o.get(k, _patterns, ()) for k in KEYS[2:]}
    result = Settings(
        allow_clients=o.get("allow_clients", common.networks, ()),
        deny_clients=o.get("deny_clients", common.networks, ()),
        **patterns,
    )
    return result, o.problems


def _patterns(value: object) -> tuple[str, ...]:
    return tuple(p.lower() for p in common.strings(value))


def matches(address: str, patterns: tuple[str, ...]) -> bool:
    """Shell-style patterns against local@domain; a pattern without "@" is a domain pattern
    (``example.com``, ``*.example.com``); ``user@`` matches that local part at any domain."""
    address = address.lower()
    local, _, domain = address.rpartition("@")
    for pattern in patterns:
        if "@" not in pattern:
            if fnmatchcase(domain, pattern):
                return True
        elif pattern.endswith("@"):
            if fnmatchcase(local, pattern[:-1]):
                return True
        elif fnmatchcase(address, pattern):
            return True
    return False


class AccessPolicy(hooks.PolicyPlugin):
    """Static allow and deny lists, checked in order: allow_clients, then the deny lists."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def connect(self, session: SessionInfo) -> Deferred[Verdict]:
        address = common.client_address(session.peer_host)
        if common.in_any(address, self.settings.allow_clients):
            hooks.notes(session).session["allowlisted"] = True
        elif common.in_any(address, self.settings.deny_clients):
            return succeed(Verdict(Action.DISCONNECT, CLIENT_DENIED))
        return succeed(CONTINUE)

    def helo(self, session: SessionInfo, name: str) -> Deferred[Verdict]:
        if hooks.is_allowlisted(session):
            return succeed(CONTINUE)
        if any(fnmatchcase(name.lower(), p) for p in self.settings.deny_helo):
            return succeed(Verdict(Action.REJECT, HELO_DENIED))
        return succeed(CONTINUE)

    def mail(self, session: SessionInfo, sender: Any, params: Any) -> Deferred[Verdict]:
        address = str(sender) if sender else ""
        if matches(address, self.settings.allow_senders):
            return succeed(CONTINUE)
        if address and matches(address, self.settings.deny_senders):
            return succeed(Verdict(Action.REJECT, SENDER_DENIED))
        return succeed(CONTINUE)

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: Any
    ) -> Deferred[Verdict]:
        if matches(str(recipient), self.settings.deny_recipients):
            return succeed(Verdict(Action.REJECT, RECIPIENT_DENIED))
        return succeed(CONTINUE)


def make(section: dict[str, Any], context: PluginContext) -> AccessPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return AccessPolicy(result)

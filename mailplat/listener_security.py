"""TLS and AUTH for the relay, submission and submissions listeners, assembled from the config.

One certificate (``mailplat.tls``), one user database and one cred portal serve every listener
of a server; the three profiles differ only in their ``Security``: the relay offers STARTTLS
and optional AUTH, submission demands AUTH before MAIL, submissions is TLS from the first byte.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from twisted.cred.portal import Portal
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailplat.address import AddressError, parse_mailbox
from mailplat.config import Config, ListenerConfig, parse_duration, register_check, register_keys
from mailplat.config import Path as KeyPath
from mailplat.session import ESMTPFactory, ESMTPSession
from mailplat.submission import AuthenticatedSenders, SecureSession, Security, SenderRules
from mailplat.submission import SubmitterRealm
from mailplat.tls import ReloadingTLS, TLSService, tls_config
from mailplat.userdb import UserDB, UserDBChecker, UserError, normal_name

if TYPE_CHECKING:
    from mailplat.server import MailServer

AUTH_KEYS = frozenset({"users_file", "allow_plaintext", "max_failures", "failure_delay",
                       "senders"})


@dataclass(frozen=True)
class AuthConfig:
    """The [auth] section; ``senders`` maps users to their allowed sender patterns."""

    users_file: str
    allow_plaintext: bool = False
    max_failures: int = 3
    failure_delay: float = 1.0
    senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def auth_config(config: Config) -> AuthConfig:
    """[auth] with defaults; only call on a config that passed ``check_auth``."""
    table = config.raw.get("auth", {})
    users_file = table.get("users_file", os.path.join(config.data_dir, "users"))
    return AuthConfig(
        users_file=os.path.abspath(os.path.expanduser(users_file)),
        allow_plaintext=table.get("allow_plaintext", False),
        max_failures=table.get("max_failures", 3),
        failure_delay=parse_duration(table.get("failure_delay", 1)),
        senders={normal_name(user): tuple(patterns)
                 for user, patterns in table.get("senders", {}).items()},
    )


def check_auth(raw: Mapping[str, Any]) -> list[tuple[KeyPath, str]]:
    """Problems in [auth], each with its key path."""
    table = raw.get("auth", {})
    if not isinstance(table, dict):
        return [(("auth",), "must be a table: [auth]")]
    problems: list[tuple[KeyPath, str]] = [
        (("auth", key), "unknown key") for key in table if key not in AUTH_KEYS
    ]
    value = table.get("users_file", "x")
    if not isinstance(value, str) or not value.strip():
        problems.append((("auth", "users_file"), "must be a file name"))
    if not isinstance(table.get("allow_plaintext", False), bool):
        problems.append((("auth", "allow_plaintext"), "must be true or false"))
    count = table.get("max_failures", 3)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problems.append((("auth", "max_failures"), "must be a positive integer"))
    if "failure_delay" in table:
        try:
            parse_duration(table["failure_delay"])
        except ValueError as error:
            problems.append((("auth", "failure_delay"), str(error)))
    return problems + _sender_problems(table.get("senders", {}))


def _sender_problems(senders: object) -> list[tuple[KeyPath, str]]:
    if not isinstance(senders, dict):
        return [(("auth", "senders"), 'must be a table: user = ["addr@domain", "@domain"]')]
    problems: list[tuple[KeyPath, str]] = []
    for user, patterns in senders.items():
        path: KeyPath = ("auth", "senders", user)
        try:
            normal_name(user)
        except UserError as error:
            problems.append((path, str(error)))
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            problems.append((path, "must be a list of addresses or @domains"))
            continue
        for pattern in patterns:
            try:
                parse_mailbox("x" + pattern if pattern.startswith("@") else pattern)
            except AddressError:
                problems.append((path, f"{pattern!r} is neither an address nor @domain"))
    return problems



def check_implicit_tls(raw: Mapping[str, Any]) -> list[tuple[KeyPath, str]]:
    """The submissions profile adds TLS itself; an ssl: endpoint would wrap it twice."""
    listeners = raw.get("listener", [])
    if not isinstance(listeners, list):
        return []
    return [
        (("listener", index, "endpoint"),
         "the submissions profile adds TLS itself (certificate from [tls]): use a tcp: endpoint")
        for index, table in enumerate(listeners)
        if isinstance(table, dict) and table.get("profile") == "submissions"
        and str(table.get("endpoint", "")).startswith("ssl:")
    ]


def register_config() -> None:
    """Declare [auth] and the listener checks to the config loader (run before each load)."""
    register_keys("", "auth")
    register_check(check_auth)
    register_check(check_implicit_tls)


@dataclass
class ServerSecurity:
    """What all secure listeners of one server share."""

    tls: ReloadingTLS
    users: UserDB
    portal: Portal
    auth: AuthConfig
    senders: SenderRules


_SHARED: weakref.WeakKeyDictionary[Any, ServerSecurity] = weakref.WeakKeyDictionary()


def server_security(server: MailServer, reactor: Any) -> ServerSecurity:
    """The server's shared TLS and AUTH parts, made (and the TLS service started) once."""
    shared = _SHARED.get(server)
    if shared is None:
        config = server.config
        auth = auth_config(config)
        tls = ReloadingTLS(tls_config(config), config.hostname)
        TLSService(tls, reactor).setServiceParent(server)  # type: ignore[no-untyped-call]
        users = UserDB(auth.users_file)
        portal = Portal(SubmitterRealm(), [UserDBChecker(users)])
        senders = SenderRules(auth.senders, frozenset(config.domains))
        shared = _SHARED[server] = ServerSecurity(tls, users, portal, auth, senders)
    return shared


def security_for(shared: ServerSecurity, require_auth: bool, implicit_tls: bool) -> Security:
    return Security(
        tls=shared.tls, portal=shared.portal, require_auth=require_auth,
        implicit_tls=implicit_tls, allow_plaintext=shared.auth.allow_plaintext,
        max_failures=shared.auth.max_failures, failure_delay=shared.auth.failure_delay,
        cram_available=shared.users.has_cram_users,
    )


class SecureFactory(ESMTPFactory):
    """An ESMTPFactory whose sessions (a SecureSession class) get the listener's Security."""

    protocol = SecureSession

    def __init__(self, *args: Any, security: Security, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.security = security

    def buildProtocol(self, addr: Any) -> ESMTPSession:
        session = self.protocol(self.settings, self.policy, self.sink, self.clock, self.security)
        session.factory = self
        return session


def _factory(listener: ListenerConfig, server: MailServer, reactor: Any,
             require_auth: bool, implicit_tls: bool) -> SecureFactory:
    from mailplat.listeners import session_settings

    shared = server_security(server, reactor)
    policy = AuthenticatedSenders(shared.senders, server.policy)
    return SecureFactory(session_settings(server.config, listener), policy, server.spool,
                         reactor, security=security_for(shared, require_auth, implicit_tls))


def relay_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """Port 25 role: mail from anyone for local domains; STARTTLS; AUTH lets users relay."""
    return _factory(listener, server, reactor, require_auth=False, implicit_tls=False)


def submission_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """Port 587 role (RFC 6409): STARTTLS, and AUTH before MAIL."""
    return _factory(listener, server, reactor, require_auth=True, implicit_tls=False)


def submissions_profile(listener: ListenerConfig, server: MailServer, reactor: Any) -> Factory:
    """Port 465 role (RFC 8314): the submission profile inside TLS from the first byte."""
    inner = _factory(listener, server, reactor, require_auth=True, implicit_tls=True)
    factory = TLSMemoryBIOFactory(server_security(server, reactor).tls, False, inner)
    factory.noisy = False
    return cast(Factory, factory)

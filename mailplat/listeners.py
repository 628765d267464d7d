"""Listener profiles: which session class and settings each kind of listener gets.

A profile is the only thing that differs between the relay port, submission, LMTP and ODMR:
they all share the one engine, policy chain, spool and queue of the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.protocol import Factory

from mailplat.config import Config, ListenerConfig
from mailplat.listener_security import submission_profile, submissions_profile
from mailplat.lmtp import lmtp_profile
from mailplat.odmr import odmr_profile, relay_etrn_profile
from mailplat.session import ESMTPFactory, ESMTPSession, SessionSettings

if TYPE_CHECKING:
    from mailplat.server import MailServer


def session_settings(config: Config, listener: ListenerConfig, lmtp: bool = False) -> SessionSettings:
    return SessionSettings(
        hostname=config.hostname,
        max_message_size=config.max_message_size,
        max_recipients=config.max_recipients,
        command_timeout=config.command_timeout,
        data_timeout=config.data_timeout,
        max_received_headers=config.max_received_headers,
        lmtp=lmtp,
        listener=listener.name,
    )


def relay_factory(listener: ListenerConfig, server: "MailServer", reactor: Any) -> Factory:
    settings = session_settings(server.config, listener)
    return ESMTPFactory(settings, server.policy, server.spool, reactor, ESMTPSession)


ProfileBuilder = Callable[[ListenerConfig, "MailServer", Any], Factory]
PROFILES: dict[str, ProfileBuilder] = {
    "relay": relay_etrn_profile,  # relay_profile plus ETRN (RFC 1985)
    "submission": submission_profile,
    "submissions": submissions_profile,
    "lmtp": lmtp_profile,
    "odmr": odmr_profile,
}


def build_factory(listener: ListenerConfig, server: "MailServer", reactor: Any) -> Factory:
    try:
        builder = PROFILES[listener.profile]
    except KeyError:
        raise ValueError(f"listener {listener.name}: profile {listener.profile!r} is not available")
    return builder(listener, server, reactor)

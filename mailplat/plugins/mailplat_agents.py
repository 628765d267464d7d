"""The delivery agents shipped with mailplat, found by ``twisted.plugin.getPlugins``.

Imports stay light (no reactor, no agent module) until ``makeAgent`` is called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.config import register_check
from mailplat.interfaces import AgentContext, IDeliveryAgentFactory


@implementer(IPlugin, IDeliveryAgentFactory)
class MaildirAgentFactory:
    """Builds the ``maildir`` agent; it needs no config of its own."""

    name = "maildir"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.maildir import MaildirAgent

        sync = getattr(context.config, "sync_directories", "auto")  # [queue] sync_directories
        # The daemon's disk helper process, when it has one (diskprocess.py).
        return MaildirAgent(context.hostname, context.reactor, context.run_blocking,
                            sync_directories=sync)


maildir = MaildirAgentFactory()


@implementer(IPlugin, IDeliveryAgentFactory)
class LMTPAgentFactory:
    """Builds the ``lmtp`` agent from ``[agent.lmtp]`` (endpoint, timeouts, idle pool)."""

    name = "lmtp"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.lmtp_agent import make_agent

        return make_agent(config, context.hostname, context.reactor)


def _check_lmtp(raw: Mapping[str, Any]) -> Iterable[tuple[tuple[str | int, ...], str]]:
    from mailplat.lmtp_agent import config_problems

    return list(config_problems(raw))


register_check(_check_lmtp)
lmtp = LMTPAgentFactory()


@implementer(IPlugin, IDeliveryAgentFactory)
class SMTPRelayAgentFactory:
    """Builds the ``smtp`` agent (MX delivery, smarthost); settings: [agent.smtp], [relay],
    [dns], [tls_policy], checked by mailplat.routeconfig."""

    name = "smtp"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.relay_agent import make_agent

        return make_agent(context)


@implementer(IPlugin, IDeliveryAgentFactory)
class ExpandAgentFactory:
    """Builds the ``expand`` agent: list (and late alias) expansion back into the queue."""

    name = "expand"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.aliases import ExpandAgent
        from mailplat.routing import LocalRouter

        router = context.router
        if not hasattr(router, "aliases"):  # wrapped (ODMR) or replaced: the tables are ours
            router = LocalRouter(context.config)
        return ExpandAgent(router, context.sink, context.hostname)


import mailplat.routeconfig  # noqa: E402  registers [aliases], [lists], [relay], [dns] ... keys

smtp = SMTPRelayAgentFactory()
expand = ExpandAgentFactory()

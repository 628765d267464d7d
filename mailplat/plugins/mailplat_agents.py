"""The delivery agents shipped with mailplat, found by ``twisted.plugin.getPlugins``.

Imports stay light (no reactor, no agent module) until ``makeAgent`` is called.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces import AgentContext, IDeliveryAgentFactory


@implementer(IPlugin, IDeliveryAgentFactory)
class MaildirAgentFactory:
    """Builds the ``maildir`` agent; it needs no config of its own."""

    name = "maildir"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.maildir import MaildirAgent

        return MaildirAgent(context.hostname, context.reactor)


maildir = MaildirAgentFactory()

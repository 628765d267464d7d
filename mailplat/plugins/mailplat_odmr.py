"""The ``odmr`` delivery agent (the hold of On-Demand Mail Relay sites) and its [odmr] config.

Imports stay light until ``makeAgent`` is called; the config keys are registered on import,
as every plugin does (see mailplat.odmr_hold for what they mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.config import register_check, register_keys
from mailplat.interfaces import AgentContext, IDeliveryAgentFactory


@implementer(IPlugin, IDeliveryAgentFactory)
class OdmrAgentFactory:
    """Builds the ``odmr`` agent: mail for ODMR domains waits (HELD) until its site collects it."""

    name = "odmr"

    def makeAgent(self, config: dict[str, Any], context: AgentContext) -> Any:
        from mailplat.odmr_hold import HoldAgent

        return HoldAgent()


def _check_odmr(raw: Mapping[str, Any]) -> Iterable[tuple[tuple[str | int, ...], str]]:
    from mailplat.odmr_hold import check_odmr

    return check_odmr(raw)


register_keys("", "odmr")
register_check(_check_odmr)
odmr = OdmrAgentFactory()

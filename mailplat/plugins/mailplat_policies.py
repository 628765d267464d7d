"""The policy plugins shipped with mailplat, found by ``twisted.plugin.getPlugins``.

Each factory imports its policy module only when the plugin is configured or checked, so an
unused plugin costs nothing (not even its library). Importing this module also lets the config
loader accept ``[plugins]`` and ``[plugin.NAME]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat import hooks
from mailplat.interfaces import IPolicyPluginFactory, PluginContext

hooks.register_config()


@implementer(IPlugin, IPolicyPluginFactory)
class BuiltinPolicy:
    """A factory for ``mailplat.policies.<name>``, which has ``settings`` and ``make``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _module(self) -> Any:
        return importlib.import_module(f"mailplat.policies.{self.name}")

    def checkConfig(self, config: dict[str, Any]) -> Iterable[tuple[str, str]]:
        problems: list[tuple[str, str]] = self._module().settings(dict(config))[1]
        return problems

    def makePolicy(self, config: dict[str, Any], context: PluginContext) -> Any:
        return self._module().make(dict(config), context)

    def __repr__(self) -> str:
        return f"<builtin policy plugin {self.name}>"


access = BuiltinPolicy("access")
dnsbl = BuiltinPolicy("dnsbl")
ratelimit = BuiltinPolicy("ratelimit")
greylist = BuiltinPolicy("greylist")
spf = BuiltinPolicy("spf")
dkim = BuiltinPolicy("dkim")
dmarc = BuiltinPolicy("dmarc")

"""The drop-in module mailplat's plugin scan finds: one IPolicyPluginFactory, light imports."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces import IPolicyPluginFactory


@implementer(IPlugin, IPolicyPluginFactory)
class SubjectFilterFactory:
    name = "subject-filter"

    def checkConfig(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        from subjectfilter.policy import check

        return check(config)

    def makePolicy(self, config: dict[str, Any], context: Any) -> Any:
        from subjectfilter.policy import SubjectFilter

        return SubjectFilter(list(config.get("patterns", [])))


subject_filter = SubjectFilterFactory()

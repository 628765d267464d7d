"""The configuration of policy plugins: ``[plugins]`` and ``[plugin.NAME]``, checked for
``mailplat check-config`` together with each plugin's own ``checkConfig``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from twisted.plugin import getPlugins

from mailplat import config as C
from mailplat.interfaces import Action, IPolicyPluginFactory

RESERVED = ("timeout", "on_error")  # keys of [plugin.NAME] that the chain itself reads
ON_ERROR = {"tempfail": Action.TEMPFAIL, "continue": Action.CONTINUE}
PLUGINS_KEYS = ("order", "timeout", "threads")


def factories() -> dict[str, Any]:
    """Every IPolicyPluginFactory in mailplat.plugins, by name."""
    import mailplat.plugins

    return {f.name: f for f in getPlugins(IPolicyPluginFactory, mailplat.plugins)}


def plugin_sections(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """([plugins], [plugin]) tables of the raw config, empty when absent."""
    plugins, sections = raw.get("plugins", {}), raw.get("plugin", {})
    return (plugins if isinstance(plugins, dict) else {},
            sections if isinstance(sections, dict) else {})


def check_plugins(raw: Mapping[str, Any]) -> Iterator[tuple[C.Path, str]]:
    """Problems in [plugins] and [plugin.NAME], including each plugin's own checkConfig."""
    if "plugins" in raw and not isinstance(raw["plugins"], dict):
        yield ("plugins",), "must be a table: [plugins]"
    if "plugin" in raw and not isinstance(raw["plugin"], dict):
        yield ("plugin",), "must be tables: [plugin.NAME]"
    plugins, sections = plugin_sections(raw)
    found = factories()
    yield from _check_plugins_table(plugins, found)
    order = plugins.get("order", [])
    unconfigured = [n for n in order if isinstance(n, str) and n in found and n not in sections]
    for name, section in [*sections.items(), *((n, {}) for n in unconfigured)]:
        if name not in found:
            yield ("plugin", name), f"no plugin named {name!r} is installed"
        elif not isinstance(section, dict):
            yield ("plugin", name), "must be a table"
        else:
            yield from _check_section(name, section, found[name])


def _check_plugins_table(plugins: Mapping[str, Any], found: Mapping[str, Any]) -> Iterator[
    tuple[C.Path, str]
]:
    for key in plugins:
        if key not in PLUGINS_KEYS:
            yield ("plugins", key), "unknown key"
    order = plugins.get("order", [])
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        yield ("plugins", "order"), "must be a list of plugin names"
        order = []
    for name in order:
        if name not in found:
            yield ("plugins", "order"), f"no plugin named {name!r} (have: {', '.join(sorted(found))})"
    if len(set(order)) != len(order):
        yield ("plugins", "order"), "a plugin is listed twice"
    yield from _convert(plugins, ("plugins",), "timeout", C.parse_duration)
    yield from _convert(plugins, ("plugins",), "threads", _positive)


def _check_section(name: str, section: Mapping[str, Any], factory: Any) -> Iterator[
    tuple[C.Path, str]
]:
    path = ("plugin", name)
    yield from _convert(section, path, "timeout", C.parse_duration)
    if section.get("on_error", "tempfail") not in ON_ERROR:
        yield path + ("on_error",), 'must be "tempfail" or "continue"'
    rest = {k: v for k, v in section.items() if k not in RESERVED}
    for key, message in factory.checkConfig(rest):
        yield path + ((key,) if key else ()), message


def _convert(table: Mapping[str, Any], path: C.Path, key: str, convert: Any) -> Iterator[
    tuple[C.Path, str]
]:
    if key in table:
        try:
            convert(table[key])
        except ValueError as error:
            yield path + (key,), str(error)


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def register_config() -> None:
    """Own [plugins] and [plugin.NAME] in the config loader (called by mailplat_policies)."""
    C.register_keys("", "plugins", "plugin")
    C.register_check(check_plugins)

"""mailplat's TOML configuration: loaded into frozen dataclasses, or every problem reported.

Loading is a pure function of the file's text, so ``mailplat check-config`` and the server agree
on what a file means. An operator sees all mistakes at once, each with its dotted key and line
number; unknown keys are errors because a typo in a mail server's config is a silent outage.
Plugins that own keys or sections declare them with ``register_keys`` / ``register_check``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from mailplat.concurrency import ConcurrencyLimits
from mailplat.configlocator import Locator, dotted
from mailplat.configvalues import (
    _client_endpoint, _count, _domain_name, _endpoint, _flag, _hostname, _networks, _path,
    _profile, _text, _users,
)
# Re-exported: other modules reach these through the config module.
from mailplat.configvalues import parse_duration as parse_duration
from mailplat.configvalues import parse_size as parse_size
from mailplat.configvalues import PROFILES as PROFILES
from mailplat.configvalues import client_endpoint_problem as client_endpoint_problem
from mailplat.configvalues import endpoint_problem as endpoint_problem
from mailplat.cpuplacement import MODES
from mailplat.routing import POSTMASTER
from mailplat.schedule import RetrySchedule

EMBEDDED = "<embedded default>"
DEFAULT_DATA_DIR = "./var/mailplat"

Path = tuple[str | int, ...]
Check = Callable[[Mapping[str, Any]], Iterable[tuple[Path, str]]]
T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One mistake in a config file, located well enough for an editor to jump to it."""

    key: str
    line: int | None
    message: str
    file: str = ""

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every reason found, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class ListenerConfig:
    """One listening endpoint; ``options`` holds extra keys registered by plugins."""

    name: str
    endpoint: str
    profile: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DomainConfig:
    """A domain we deliver locally. ``users`` None means catch-all; names are lowercased.

    ``postmaster`` is the user whose Maildir receives postmaster@ mail: "postmaster" when that
    user exists (or the domain is catch-all), otherwise the first listed user, unless set.
    ``lmtp`` (a client endpoint such as "unix:/run/dovecot/lmtp") delivers the domain by LMTP
    instead of into Maildirs.
    """

    name: str
    users: frozenset[str] | None
    maildir_root: str
    postmaster: str = POSTMASTER
    lmtp: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Config:
    """The whole server configuration; durations in seconds, sizes in bytes, paths absolute."""

    hostname: str
    data_dir: str
    queue_dir: str
    maildir_root: str
    listeners: tuple[ListenerConfig, ...]
    domains: dict[str, DomainConfig] = field(hash=False)
    max_message_size: int
    max_recipients: int
    command_timeout: float
    data_timeout: float
    max_received_headers: int
    retry_delay: float
    max_lifetime: float
    trusted_networks: tuple[str, ...]
    raw: dict[str, Any] = field(hash=False, repr=False)
    source: str
    # The rest of [queue], read by mailplat.queueconfig (docs/queue.rst).
    retry_schedule: RetrySchedule = field(default_factory=RetrySchedule)
    concurrency: ConcurrencyLimits = field(default_factory=ConcurrencyLimits)
    bounce_size_limit: int = 1 << 20
    control_socket: str = ""
    sync_directories: bool | str = "auto"  # mailplat.durability
    receivers: int = 0  # extra processes taking SMTP sessions (mailplat.receivers)
    reactor_affinity: str = "auto"  # mailplat.cpuplacement


# ---------------------------------------------------------------- the schema and its extensions

_KNOWN: dict[str, set[str]] = {
    # "agent" holds one [agent.NAME] table per delivery agent, checked by that agent's plugin.
    "": {"hostname", "data_dir", "queue", "limits", "maildir", "relay", "listener", "domains",
         "agent", "receivers", "reactor_affinity"},
    "queue": {"dir", "retry_delay", "max_lifetime", "max_retry_delay", "retry_backoff",
              "retry_jitter", "delay_warning", "agent_concurrency", "destination_concurrency",
              "active_limit", "bounce_size_limit", "control_socket", "sync_directories"},
    "limits": {"message_size", "recipients", "command_timeout", "data_timeout",
               "received_headers"},
    "maildir": {"root"},
    "relay": {"trusted_networks"},
    "listener": {"name", "endpoint", "profile"},
    "domain": {"users", "catch_all", "maildir_root", "postmaster", "lmtp"},
}
_CORE = {table: frozenset(keys) for table, keys in _KNOWN.items()}
_CHECKS: list[Check] = []


def register_keys(table: str, *keys: str) -> None:
    """Let a plugin own extra keys so they are not reported as typos.

    ``table`` is "" for top-level keys and whole sections (e.g. ``register_keys("", "tls")``),
    or one of "queue", "limits", "maildir", "relay", "listener", "domain". Extra listener and
    domain keys are copied into ``options``; everything is in ``Config.raw``. Plugins call this
    when their module in ``mailplat.plugins`` is imported; ``load_config`` imports them all.
    """
    _KNOWN[table].update(keys)


def register_check(check: Check) -> None:
    """Add a validator over the raw TOML that yields (path, message) for each problem found."""
    if check not in _CHECKS:
        _CHECKS.append(check)


# Core modules that own config sections ([tls], [auth]); each has ``register_config()``, run
# before every load (not only at import) so their keys and checks are always in place.
CORE_SECTIONS = ("mailplat.tls", "mailplat.listener_security")


def _import_plugins() -> list[Problem]:
    """Import every module of ``mailplat.plugins`` so each can register its config keys."""
    import mailplat.plugins

    for name in CORE_SECTIONS:
        importlib.import_module(name).register_config()
    problems = []
    for module in pkgutil.iter_modules(mailplat.plugins.__path__, "mailplat.plugins."):
        try:
            importlib.import_module(module.name)
        except Exception as error:
            problems.append(Problem("", None, f"plugin {module.name} failed to import: {error!r}"))
    return problems


# ----------------------------------------------------------------------------- building Config


class _Checker:
    """Collects problems while reading values, so one pass reports every mistake."""

    def __init__(self, locator: Locator, source: str) -> None:
        self.locator = locator
        self.source = source
        self.problems: list[Problem] = []

    def report(self, path: Path, message: str) -> None:
        self.problems.append(Problem(dotted(path), self.locator.line(path), message, self.source))

    def unknown(self, table: Mapping[str, Any], path: Path, kind: str) -> None:
        for key in table:
            if key not in _KNOWN[kind]:
                close = difflib.get_close_matches(key, sorted(_KNOWN[kind]), 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.report(path + (key,), f"unknown key{hint}")

    def section(self, raw: Mapping[str, Any], name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            self.report((name,), f"must be a table: [{name}]")
            return {}
        self.unknown(value, (name,), name)
        return value

    def get(
        self, table: Mapping[str, Any], path: Path, key: str,
        convert: Callable[[object], T], default: T,
    ) -> T:
        if key not in table:
            return default
        try:
            return convert(table[key])
        except ValueError as error:
            self.report(path + (key,), str(error))
            return default


def _build(raw: dict[str, Any], check: _Checker) -> Config:
    check.unknown(raw, (), "")
    data_dir = check.get(raw, (), "data_dir", _path, os.path.abspath(DEFAULT_DATA_DIR))
    queue, limits = check.section(raw, "queue"), check.section(raw, "limits")
    maildir, relay = check.section(raw, "maildir"), check.section(raw, "relay")
    maildir_root = check.get(maildir, ("maildir",), "root", _path, os.path.join(data_dir, "mail"))
    q, lim = ("queue",), ("limits",)
    retry_delay = check.get(queue, q, "retry_delay", parse_duration, 300.0)
    max_lifetime = check.get(queue, q, "max_lifetime", parse_duration, 5 * 86400.0)
    from mailplat.queueconfig import queue_options  # imports this module: not at the top

    return Config(
        hostname=check.get(raw, (), "hostname", _hostname, "") or socket.getfqdn(),
        data_dir=data_dir,
        queue_dir=check.get(queue, q, "dir", _path, os.path.join(data_dir, "queue")),
        maildir_root=maildir_root,
        listeners=_listeners(raw, check),
        domains=_domains(raw, check, maildir_root),
        max_message_size=check.get(limits, lim, "message_size", parse_size, 64 << 20),
        max_recipients=check.get(limits, lim, "recipients", _count, 100),
        command_timeout=check.get(limits, lim, "command_timeout", parse_duration, 300.0),
        data_timeout=check.get(limits, lim, "data_timeout", parse_duration, 180.0),
        max_received_headers=check.get(limits, lim, "received_headers", _count, 50),
        retry_delay=retry_delay,
        max_lifetime=max_lifetime,
        trusted_networks=check.get(relay, ("relay",), "trusted_networks", _networks, ()),
        raw=raw,
        source=check.source,
        receivers=check.get(raw, (), "receivers", _receivers, 0),
        reactor_affinity=check.get(raw, (), "reactor_affinity", _reactor_affinity, "auto"),
        **queue_options(queue, check, data_dir, retry_delay, max_lifetime),
    )


def _receivers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ValueError(f"{value!r} is not a number of processes from 0 to 64")
    return value


def _reactor_affinity(value: object) -> str:
    if value not in MODES:
        raise ValueError(f"{value!r} is not one of " + ", ".join(f'"{m}"' for m in MODES))
    return str(value)


def _listeners(raw: Mapping[str, Any], check: _Checker) -> tuple[ListenerConfig, ...]:
    tables = raw.get("listener", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        check.report(("listener",), "must be an array of tables: [[listener]]")
        return ()
    if not tables:
        check.report(("listener",), "no listeners: add a [[listener]] table")
    listeners: list[ListenerConfig] = []
    first: dict[str, int] = {}
    for index, table in enumerate(tables):
        listener = _listener(table, ("listener", index), check)
        if listener is None:
            continue
        if listener.name in first:
            earlier = f"listener[{first[listener.name]}]"
            message = f"duplicate listener name {listener.name!r} (see {earlier})"
            check.report(("listener", index, "name"), message)
        first.setdefault(listener.name, index)
        listeners.append(listener)
    return tuple(listeners)


def _listener(table: Mapping[str, Any], path: Path, check: _Checker) -> ListenerConfig | None:
    check.unknown(table, path, "listener")
    for key in ("name", "endpoint", "profile"):
        if key not in table:
            check.report(path, f"missing {key!r}")
    name = check.get(table, path, "name", _text, None)
    endpoint = check.get(table, path, "endpoint", _endpoint, None)
    profile = check.get(table, path, "profile", _profile, None)
    if name is None or endpoint is None or profile is None:
        return None
    options = {key: value for key, value in table.items() if key not in _CORE["listener"]}
    return ListenerConfig(name, endpoint, profile, options)


def _domains(raw: Mapping[str, Any], check: _Checker, root: str) -> dict[str, DomainConfig]:
    tables = raw.get("domains", {})
    if not isinstance(tables, dict):
        check.report(("domains",), "must be a table of domains: [domains.\"example.org\"]")
        return {}
    if not tables:
        check.report(("domains",), "no domains: add e.g. [domains.\"localhost\"] catch_all = true")
    domains: dict[str, DomainConfig] = {}
    for name, table in tables.items():
        domain = _domain(name, table, ("domains", name), check, root)
        if domain is not None and domain.name in domains:
            check.report(("domains", name), "duplicate domain (names are case-insensitive)")
        elif domain is not None:
            domains[domain.name] = domain
    return domains


def _domain(
    name: str, table: object, path: Path, check: _Checker, root: str
) -> DomainConfig | None:
    if not isinstance(table, dict):
        check.report(path, "must be a table")
        return None
    check.unknown(table, path, "domain")
    try:
        name = _domain_name(name)
    except ValueError as error:
        check.report(path, str(error))
        return None
    users = check.get(table, path, "users", _users, None)
    catch_all = check.get(table, path, "catch_all", _flag, False)
    if catch_all and "users" in table:
        check.report(path, "set users = [...] or catch_all = true, not both")
    elif not catch_all and "users" not in table:
        check.report(path, "set users = [...] or catch_all = true")
    postmaster = _postmaster(table, path, check, users)
    return DomainConfig(
        name=name,
        users=None if catch_all else (users or frozenset()),
        maildir_root=check.get(table, path, "maildir_root", _path, os.path.join(root, name)),
        postmaster=postmaster,
        lmtp=check.get(table, path, "lmtp", _client_endpoint, None),
        options={key: value for key, value in table.items() if key not in _CORE["domain"]},
    )


def _postmaster(
    table: Mapping[str, Any], path: Path, check: _Checker, users: frozenset[str] | None
) -> str:
    """Whose Maildir gets postmaster@ mail: RFC 5321 §4.5.1 says postmaster must always exist."""
    if "postmaster" in table:
        chosen = check.get(table, path, "postmaster", _text, POSTMASTER).lower()
        if users is not None and chosen not in users:
            check.report(path + ("postmaster",), f"{chosen!r} is not one of this domain's users")
        return chosen
    if users is None or POSTMASTER in users or not users:
        return POSTMASTER
    return str(table["users"][0]).lower()  # users parsed, so this is the first name listed


# ------------------------------------------------------------------------------------ loading


def parse_config(text: str, source: str = "<string>") -> Config:
    """Build a Config from TOML text, or raise ConfigError listing every problem."""
    problems = [Problem(p.key, p.line, p.message, source) for p in _import_plugins()]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(problems + [_syntax_problem(error, text, source)]) from None
    check = _Checker(Locator(text), source)
    config = _build(raw, check)
    for extra in list(_CHECKS):
        try:
            for path, message in extra(raw):
                check.report(path, message)
        except Exception as error:
            check.report((), f"config check {extra!r} failed: {error!r}")
    if problems or check.problems:
        raise ConfigError(problems + check.problems)
    return config


def _syntax_problem(error: tomllib.TOMLDecodeError, text: str, source: str) -> Problem:
    message = str(error)
    where = re.search(r" \(at line (\d+), column \d+\)$", message)
    if where:
        return Problem("", int(where[1]), f"TOML syntax error: {message[: where.start()]}", source)
    message = message.replace(" (at end of document)", "")
    repeated = Locator(text).repeated
    if repeated is not None and message.startswith("Cannot"):  # a key or table set twice
        return Problem("", repeated, f"TOML syntax error: {message}", source)
    return Problem("", text.count("\n") + 1, f"TOML syntax error at end of file: {message}", source)


def load_config(path: str | None) -> Config:
    """Load ``path``, or the embedded default when None; raise ConfigError with every problem."""
    if path is None:
        default = resources.files("mailplat").joinpath("default.toml")
        return parse_config(default.read_text("utf-8"), EMBEDDED)
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else f"not UTF-8: {error}"
        raise ConfigError([Problem("", None, f"cannot read: {reason}", path)]) from None
    return parse_config(text, path)


def check_config(path: str) -> list[Problem]:
    """Every problem in the config file at ``path``; empty when the server would accept it."""
    try:
        load_config(path)
    except ConfigError as error:
        return error.problems
    return []

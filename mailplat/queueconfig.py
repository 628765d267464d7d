"""The ``[queue]`` settings beyond ``dir``, ``retry_delay`` and ``max_lifetime``.

Called by the config loader while it builds a Config, so every mistake is reported with its
line like any other key. Durations and sizes use the loader's own units ("5m", "1M").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mailplat.concurrency import ConcurrencyLimits
from mailplat.configvalues import _count, _path, parse_duration, parse_size
from mailplat.schedule import RetrySchedule

if TYPE_CHECKING:
    from mailplat.config import _Checker

KEYS = (
    "max_retry_delay", "retry_backoff", "retry_jitter", "delay_warning", "agent_concurrency",
    "destination_concurrency", "active_limit", "bounce_size_limit", "control_socket",
    "sync_directories",
)
_AUTO_SYNC: bool | str = "auto"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL (Linux)


def _factor(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
        raise ValueError(f"{value!r} is not a number from 1 to 10")
    return float(value)


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{value!r} is not a fraction from 0 to 1")
    return float(value)


def _warning(value: object) -> float | None:
    """A duration, or false for "never send delay DSNs"."""
    if value is False:
        return None
    return parse_duration(value)


def _per_agent(value: object) -> tuple[int | None, dict[str, int]]:
    """A number for every agent, or a table of agent names (and "default") to numbers."""
    if not isinstance(value, Mapping):
        return _count(value), {}
    numbers = {}
    for agent, number in value.items():
        try:
            numbers[str(agent)] = _count(number)
        except ValueError as error:
            raise ValueError(f"{agent}: {error}") from None
    return numbers.pop("default", None), numbers


def socket_path_problem(path: str) -> str | None:
    """Why the control socket cannot be bound at ``path`` (too long for a UNIX socket)."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        return f"the path is longer than {SOCKET_PATH_MAX} bytes, too long for a UNIX socket"
    return None


# One Maildir takes concurrent deliveries without locks (each its own file in tmp/, then a
# rename): a mailbox that gets a burst should not wait behind 5 at a time while the disk
# could sync 20 together. Postfix's virtual agent allows 20 per domain by default.
LOCAL_DESTINATION_CONCURRENCY = {"maildir": 20}


def queue_options(
    table: Mapping[str, Any], check: "_Checker", data_dir: str, first: float, lifetime: float
) -> dict[str, Any]:
    """The Config fields for the [queue] keys this module owns."""
    q: tuple[str, ...] = ("queue",)
    defaults = RetrySchedule()
    schedule = RetrySchedule(
        first=first,
        factor=check.get(table, q, "retry_backoff", _factor, defaults.factor),
        cap=check.get(table, q, "max_retry_delay", parse_duration, defaults.cap),
        jitter=check.get(table, q, "retry_jitter", _fraction, defaults.jitter),
        max_lifetime=lifetime,
        delay_warning=check.get(table, q, "delay_warning", _warning, defaults.delay_warning),
    )
    limits = ConcurrencyLimits()
    unset: tuple[int | None, dict[str, int]] = (None, {})
    agent, agents = check.get(table, q, "agent_concurrency", _per_agent, unset)
    destination, destinations = check.get(table, q, "destination_concurrency", _per_agent, unset)
    if destination is None:  # no number for every agent: the local agents' own defaults
        destinations = {**LOCAL_DESTINATION_CONCURRENCY, **destinations}
    concurrency = ConcurrencyLimits(
        agent=agent or limits.agent,
        destination=destination or limits.destination,
        agents=agents,
        destinations=destinations,
        active=check.get(table, q, "active_limit", _count, limits.active),
    )
    control = os.path.join(data_dir, "control.sock")
    if "control_socket" in table:
        control = check.get(table, q, "control_socket", _socket_path, control)
    return {
        "retry_schedule": schedule,
        "concurrency": concurrency,
        "bounce_size_limit": check.get(table, q, "bounce_size_limit", parse_size, 1 << 20),
        "control_socket": control,
        "sync_directories": check.get(table, q, "sync_directories", _sync_setting,
                                      _AUTO_SYNC),
    }


def _sync_setting(value: object) -> bool | str:
    """true, false or "auto" (mailplat.durability decides by the filesystem type)."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    raise ValueError(f"{value!r} is not true, false or \"auto\"")


def _socket_path(value: object) -> str:
    path = _path(value)
    problem = socket_path_problem(path)
    if problem:
        raise ValueError(problem)
    return path

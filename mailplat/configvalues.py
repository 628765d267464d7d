"""Values in mailplat's config: sizes, durations, host names, networks, endpoint strings.

Pure converters that raise ValueError with an operator-readable reason; ``config.py`` turns
that reason into a located Problem. Endpoint strings are checked against Twisted's own parser
signatures without binding or connecting anything.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard, cast

from mailplat.routing import local_part_problem

PROFILES = ("relay", "submission", "submissions", "lmtp", "odmr")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([SMHDW]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SECONDS = {"": 1, "S": 1, "M": 60, "H": 3600, "D": 86400, "W": 604800}
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like "10M" (K, M, G, T are powers of 1024)."""
    if _number(value) and int(value) == value and value > 0:
        return int(value)
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match[1]) == 0:
        raise ValueError(f"{value!r} is not a size: use bytes or a string like \"10M\" or \"1G\"")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "30m", "4h", "5d", "1w"."""
    if _number(value) and value > 0:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or float(match[1]) == 0:
        raise ValueError(f"{value!r} is not a duration: use seconds or a string like \"30m\"")
    return float(match[1]) * _SECONDS[match[2].upper()]


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _count(value: object) -> int:
    if not _number(value) or int(value) != value or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return int(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _path(value: object) -> str:
    return os.path.abspath(os.path.expanduser(_text(value)))


def _hostname(value: object) -> str:
    if not _HOSTNAME.fullmatch(_text(value)):
        raise ValueError(f"{value!r} is not a valid host name")
    return str(value).lower()


def _domain_name(name: str) -> str:
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if not _HOSTNAME.fullmatch(ascii_name) or name.endswith("."):
        raise ValueError(f"{name!r} is not a valid domain name")
    return name.lower()


def _users(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(user, str) for user in value):
        raise ValueError("must be a list of user names")
    for user in value:
        problem = local_part_problem(user)
        if problem:
            raise ValueError(f"user name {user!r} {problem}")
    return frozenset(user.lower() for user in value)


def _networks(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of networks like \"192.0.2.0/24\"")
    networks = []
    for item in value:
        try:
            networks.append(str(ipaddress.ip_network(item.strip())))
        except ValueError as error:
            raise ValueError(f"{item!r} is not a network: {error}") from None
    return tuple(networks)


def _profile(value: object) -> str:
    if value not in PROFILES:
        raise ValueError(f"{value!r} is not a profile; use one of {', '.join(PROFILES)}")
    return str(value)


def _endpoint(value: object) -> str:
    problem = endpoint_problem(_text(value))
    if problem:
        raise ValueError(f"bad endpoint {value!r}: {problem}")
    return str(value)


def endpoint_problem(description: str) -> str | None:
    """Why a Twisted server endpoint string is malformed, or None; never binds or opens files."""
    from twisted.internet import endpoints

    try:
        args, kwargs = endpoints._parse(description)
        parser = endpoints._serverParsers.get(args[0])
        if parser is None:  # a plugin type (tcp6, systemd, ...) or an unknown one
            plugin = endpoints._parseServer(description, None)[0]
            parser = getattr(plugin, "_parseServer", None)
        if parser is not None:
            bound = inspect.signature(cast(Callable[..., Any], parser)).bind(None, *args[1:], **kwargs)
            return _endpoint_arguments(bound.arguments)
    except (ValueError, TypeError) as error:
        return f"{error}"
    return None


def _endpoint_arguments(arguments: Mapping[str, object]) -> str | None:
    """Check the values Twisted would convert when listening: ports, backlogs, unix paths."""
    port, backlog = str(arguments.get("port", "0")), str(arguments.get("backlog", "1"))
    if not (port.isdigit() and int(port) < 65536):
        return f"port {port!r} is not a number from 0 to 65535"
    if not backlog.isdigit():
        return f"backlog {backlog!r} is not a number"
    if arguments.get("address", None) == "":
        return "the unix socket path is empty"
    if not re.fullmatch(r"[0-7]{1,4}", str(arguments.get("mode", "666"))):
        return f"mode {arguments['mode']!r} is not an octal file mode"
    return None


def _client_endpoint(value: object) -> str:
    problem = client_endpoint_problem(_text(value))
    if problem:
        raise ValueError(f"bad endpoint {value!r}: {problem}")
    return str(value)


def client_endpoint_problem(description: str) -> str | None:
    """Why a Twisted client endpoint string ("unix:/path", "tcp:host=H:port=P") is malformed,
    or None; never connects."""
    from twisted.internet.endpoints import clientFromString

    try:
        endpoint = clientFromString(None, description)
    except (ValueError, TypeError, KeyError) as error:
        return str(error)
    if getattr(endpoint, "_path", None) == "":
        return "the unix socket path is empty"
    port = getattr(endpoint, "_port", 1)
    if not (isinstance(port, int) and 0 < port < 65536):
        return f"port {port!r} is not a number from 1 to 65535"
    return None

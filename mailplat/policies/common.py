"""What the built-in policies share: reading their config section, DNS through twisted.names,
and client addresses as networks and reverse names."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError

from mailplat import config as C

T = TypeVar("T")
D = TypeVar("D")  # a default may be narrower than what the key converts to: () for a tuple
Problems = list[tuple[str, str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Options:
    """One plugin's config section read with converters; problems are collected, not raised,
    so ``mailplat check-config`` reports them all with their keys."""

    def __init__(self, section: dict[str, Any], known: Iterable[str]) -> None:
        self.section = section
        self.problems: Problems = [(k, "unknown key") for k in section if k not in set(known)]

    def get(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        if key not in self.section:
            return default
        try:
            return convert(self.section[key])
        except (ValueError, TypeError) as error:
            self.problems.append((key, str(error)))
            return default

    def check(self) -> None:
        """Raise ValueError when there were problems (the config was not checked first)."""
        if self.problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in self.problems))


duration = C.parse_duration
size = C.parse_size


def count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(value)


def text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def networks(value: object) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in strings(value))
    except ValueError as error:
        raise ValueError(f"must be a list of networks like \"192.0.2.0/24\": {error}") from None


# ------------------------------------------------------------------------------ addresses


def client_address(host: str) -> Address | None:
    """The peer as an IP address (IPv4-mapped IPv6 as IPv4); None for non-IP peers."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_network(address: Address, v4_prefix: int = 24, v6_prefix: int = 64) -> Network:
    """The network a client is judged by: a mail farm retries from neighbouring addresses."""
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def in_any(address: Address | None, nets: Iterable[Network]) -> bool:
    return address is not None and any(address in net for net in nets)


def reverse_name(address: Address) -> str:
    """Reversed octets (IPv4) or nibbles (IPv6), as DNSBLs and in-addr.arpa want them."""
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def domain_of(address: str) -> str:
    """The lowercased domain of local@domain ("" when there is none)."""
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


# ------------------------------------------------------------------------------------ DNS


class DNSTemporaryError(Exception):
    """A lookup failed in a way that may go away (timeout, SERVFAIL, refused)."""


_METHODS = {
    dns.A: "lookupAddress", dns.AAAA: "lookupIPV6Address", dns.TXT: "lookupText",
    dns.MX: "lookupMailExchange", dns.PTR: "lookupPointer",
}


def lookup(resolver: Any, name: str, qtype: int, timeout: float | None = None
           ) -> Deferred[list[Any]]:
    """The answer records of ``qtype`` for ``name`` as plain values ([] for no such name or
    no such data); DNSTemporaryError for everything that may be retried."""
    method = getattr(resolver, _METHODS[qtype])
    args = (name,) if timeout is None else (name, (max(1, int(timeout)),))
    d: Deferred[Any] = method(*args)
    return d.addCallbacks(_values, _no_data, callbackArgs=(qtype,))


def _values(result: tuple[list[Any], list[Any], list[Any]], qtype: int) -> list[Any]:
    answers = result[0]
    return [_value(rr.payload) for rr in answers if rr.type == qtype]


def _value(payload: Any) -> Any:
    if isinstance(payload, dns.Record_A):
        return payload.dottedQuad()
    if isinstance(payload, dns.Record_AAAA):
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if isinstance(payload, dns.Record_TXT):
        return list(payload.data)
    if isinstance(payload, dns.Record_MX):
        return (payload.preference, str(payload.name))
    return str(payload.name)  # PTR


def _no_data(failure: Any) -> list[Any]:
    # Every twisted.names error is a DomainError; only these three mean "no such name/data".
    if failure.type in (DNSNameError, AuthoritativeDomainError, DomainError):
        return []
    raise DNSTemporaryError(f"{failure.getErrorMessage() or failure.type.__name__}")


def txt_strings(values: list[list[bytes]]) -> list[str]:
    """TXT records with their character-strings joined (RFC 7208 §3.3), decoded leniently."""
    return [b"".join(parts).decode("utf-8", "replace") for parts in values]

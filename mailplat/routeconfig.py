"""The routing and outbound settings: ``[aliases]``, ``[lists]``, ``[relay]`` next hops,
``[dns]``, ``[tls_policy]`` and ``[agent.smtp]``, checked and turned into typed values.

One parser serves ``mailplat check-config`` (through ``register_check``) and the router and
relay agent (through ``routing_settings`` / ``outbound_settings``), so both read a file the
same way. Keys are registered when this module is imported (the ``mailplat.plugins`` package
imports it), as every plugin does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailplat.config import (
    Config,
    parse_duration,
    register_check,
    register_keys,
)

Path = tuple[str | int, ...]
Problems = Iterable[tuple[Path, str]]

TLS_POLICIES = ("none", "may", "encrypt", "verify")
DEFAULT_TLS_POLICY = "may"
DEFAULT_DELIMITER = "+"
AGENT_KEYS = frozenset({
    "port", "connect_timeout", "helo_name", "ca_file", "idle_timeout", "max_per_connection",
    "mta_sts", "mta_sts_port",
})
DNS_KEYS = frozenset({"nameservers", "timeout", "families"})
RELAY_KEYS = ("smarthost", "smarthost_domains", "smarthost_username",
              "smarthost_password_file", "relay_domains")


class SettingError(ValueError):
    """A routing setting cannot be used."""


# ----------------------------------------------------------------------- addresses and hops


def split_address(address: str) -> tuple[str, str]:
    """("local", "domain") of "local@domain"; the domain is lowercased and in A-label form
    when it can be, so that every spelling of one domain gives the same key."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain_key(domain)


def domain_key(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii() or domain.startswith("["):
        return domain
    try:
        import idna

        return idna.encode(domain, uts46=True).decode("ascii")
    except (UnicodeError, ValueError):
        return domain


def address_key(address: str) -> str:
    """The case-insensitive lookup key of an address (local parts of our own mailboxes are
    case-insensitive: RFC 5321 lets the receiving host decide)."""
    local, domain = split_address(address)
    return f"{local.lower()}@{domain}" if domain else local.lower()


@dataclass(frozen=True)
class NextHop:
    """Where to send: ``host`` (a name or an IP address), an optional port, and whether the
    host's MX records are looked up (``name``) or not (``[name]``), as in Postfix."""

    host: str
    port: int | None = None
    mx: bool = True


def parse_nexthop(text: str) -> NextHop:
    """ "example.org", "example.org:2525", "[mail.example.org]:587", "[192.0.2.1]",
    "[::1]:25" or "[ipv6:2001:db8::1]"."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        port = _port(rest[1:]) if rest.startswith(":") else None
        if rest and port is None:
            raise SettingError(f"{text!r}: expected [HOST] or [HOST]:PORT")
        if not host:
            raise SettingError(f"{text!r}: empty host")
        return NextHop(host.lower(), port, mx=False)
    host, colon, port_text = text.partition(":")
    if not host or (colon and _port(port_text) is None):
        raise SettingError(f"{text!r}: expected HOST, HOST:PORT or [HOST]:PORT")
    return NextHop(domain_key(host), _port(port_text) if colon else None, mx=True)


def _port(text: str) -> int | None:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------ typed settings


@dataclass(frozen=True)
class MailingList:
    """A simple list: its expansion is sent with ``owner`` as envelope sender."""

    address: str
    owner: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RoutingSettings:
    """What the router needs beyond the local domains."""

    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    lists: Mapping[str, MailingList] = field(default_factory=dict)
    relay_domains: Mapping[str, str] = field(default_factory=dict)  # domain → next hop or ""
    smarthost: str | None = None
    smarthost_domains: frozenset[str] | None = None  # None: all relayed mail


@dataclass(frozen=True)
class OutboundSettings:
    """What the relay agent needs: DNS, TLS policy, smarthost credentials, test knobs."""

    port: int = 25
    connect_timeout: float = 30.0
    helo_name: str | None = None
    ca_file: str | None = None
    idle_timeout: float = 5.0
    max_per_connection: int = 100
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 10.0
    families: tuple[str, ...] = ("ipv4", "ipv6")
    tls_policy: Mapping[str, str] = field(default_factory=dict)
    smarthost: str | None = None
    smarthost_username: str | None = None
    smarthost_password_file: str | None = None
    mta_sts: bool = False
    mta_sts_port: int = 443


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    return value if isinstance(value, dict) else {}


def routing_settings(config: Config | Mapping[str, Any]) -> RoutingSettings:
    """The router's settings from a checked config (or its raw TOML dict)."""
    raw = config.raw if isinstance(config, Config) else config
    relay = _section(raw, "relay")
    aliases = {
        address_key(key): _strings(value) for key, value in _section(raw, "aliases").items()
    }
    lists = {}
    for address, table in _section(raw, "lists").items():
        lists[address_key(address)] = MailingList(
            address, str(table["owner"]), _strings(table.get("members", []))
        )
    domains = relay.get("smarthost_domains")
    return RoutingSettings(
        aliases=aliases,
        lists=lists,
        relay_domains=_relay_domains(relay.get("relay_domains", [])),
        smarthost=relay.get("smarthost"),
        smarthost_domains=None if domains is None else frozenset(map(domain_key, domains)),
    )


def outbound_settings(config: Config | Mapping[str, Any]) -> OutboundSettings:
    """The relay agent's settings from a checked config (or its raw TOML dict)."""
    raw = config.raw if isinstance(config, Config) else config
    agent = _section(_section(raw, "agent"), "smtp")
    dns, relay = _section(raw, "dns"), _section(raw, "relay")
    base = OutboundSettings()
    return OutboundSettings(
        port=int(agent.get("port", base.port)),
        connect_timeout=parse_duration(agent.get("connect_timeout", base.connect_timeout)),
        helo_name=agent.get("helo_name"),
        ca_file=agent.get("ca_file"),
        idle_timeout=parse_duration(agent.get("idle_timeout", base.idle_timeout)),
        max_per_connection=int(agent.get("max_per_connection", base.max_per_connection)),
        nameservers=tuple(dns.get("nameservers", ())),
        dns_timeout=parse_duration(dns.get("timeout", base.dns_timeout)),
        families=tuple(dns.get("families", base.families)),
        tls_policy={domain_key(k): v for k, v in _section(raw, "tls_policy").items()},
        smarthost=relay.get("smarthost"),
        smarthost_username=relay.get("smarthost_username"),
        smarthost_password_file=relay.get("smarthost_password_file"),
        mta_sts=bool(agent.get("mta_sts", base.mta_sts)),
        mta_sts_port=int(agent.get("mta_sts_port", base.mta_sts_port)),
    )


def _strings(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(item) for item in value)  # type: ignore[attr-defined]


def _relay_domains(value: object) -> dict[str, str]:
    if isinstance(value, dict):
        return {domain_key(k): str(v) for k, v in value.items()}
    return {domain_key(str(domain)): "" for domain in value}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- checks


def check_aliases(raw: Mapping[str, Any]) -> Problems:
    """Keys "local", "local@domain" or "@domain"; values an address or a list of them."""
    table = raw.get("aliases", {})
    if not isinstance(table, dict):
        yield ("aliases",), "must be a table: [aliases]"
        return
    for key, value in table.items():
        path: Path = ("aliases", key)
        problem = _alias_key_problem(key)
        if problem:
            yield path, problem
        yield from _targets_problems(value, path)


def _alias_key_problem(key: str) -> str | None:
    from mailplat.routing import local_part_problem

    local, at, domain = key.rpartition("@")
    if not at:
        local = key
    elif domain and not local:
        return _domain_problem(domain)
    elif not domain:
        return "an alias needs a domain after '@'"
    problem = local_part_problem(local.lower()) or _address_problem(key if at else f"{key}@x.invalid")
    return f"alias name {problem}" if problem else None


def _targets_problems(value: object, path: Path) -> Problems:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        yield path, "must be an address or a non-empty list of addresses"
        return
    for item in items:
        problem = _target_problem(item)
        if problem:
            yield path, f"{item!r}: {problem}"


def _target_problem(target: str) -> str | None:
    if target.startswith("@"):
        return _domain_problem(target[1:])
    return _address_problem(target if "@" in target else f"{target}@x.invalid")


def _address_problem(address: str) -> str | None:
    from mailplat.address import AddressError, parse_mailbox

    try:
        parse_mailbox(address)
    except AddressError as error:
        return f"is not a valid address ({error})"
    return None


def _domain_problem(domain: str) -> str | None:
    return _address_problem(f"x@{domain}")


def check_lists(raw: Mapping[str, Any]) -> Problems:
    """[lists."name@domain"] with a required owner and a list of members."""
    table = raw.get("lists", {})
    if not isinstance(table, dict):
        yield ("lists",), "must be a table of lists: [lists.\"team@example.org\"]"
        return
    for address, entry in table.items():
        path: Path = ("lists", address)
        if "@" not in address or _address_problem(address):
            yield path, "a list is named by its full address, e.g. [lists.\"team@example.org\"]"
        if not isinstance(entry, dict):
            yield path, "must be a table with owner and members"
            continue
        for key in entry:
            if key not in ("owner", "members"):
                yield path + (key,), "unknown key (use owner, members)"
        owner = entry.get("owner")
        if not isinstance(owner, str) or "@" not in owner or _address_problem(owner):
            yield path + ("owner",), "required: the full address that receives the bounces"
        members = entry.get("members", [])
        if members != []:
            yield from _targets_problems(members, path + ("members",))


def check_relay(raw: Mapping[str, Any]) -> Problems:
    """[relay] next hops, smarthost and its credentials."""
    relay = _section(raw, "relay")
    for key in ("smarthost", "smarthost_username", "smarthost_password_file"):
        if key in relay and not (isinstance(relay[key], str) and relay[key].strip()):
            yield ("relay", key), "must be a non-empty string"
    if isinstance(relay.get("smarthost"), str):
        yield from _hop_problem(relay["smarthost"], ("relay", "smarthost"))
    if ("smarthost_username" in relay) != ("smarthost_password_file" in relay):
        yield ("relay",), "set smarthost_username and smarthost_password_file together"
    domains = relay.get("smarthost_domains")
    if domains is not None:
        if "smarthost" not in relay:
            yield ("relay", "smarthost_domains"), "needs relay.smarthost"
        yield from _domain_list(domains, ("relay", "smarthost_domains"))
    value = relay.get("relay_domains", [])
    if isinstance(value, dict):
        for domain, hop in value.items():
            yield from _domain_list([domain], ("relay", "relay_domains", domain))
            if not isinstance(hop, str):
                yield ("relay", "relay_domains", domain), "must be a next hop string"
            elif hop:
                yield from _hop_problem(hop, ("relay", "relay_domains", domain))
    else:
        yield from _domain_list(value, ("relay", "relay_domains"))


def _hop_problem(text: str, path: Path) -> Problems:
    try:
        parse_nexthop(text)
    except SettingError as error:
        yield path, str(error)


def _domain_list(value: object, path: Path) -> Problems:
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        yield path, "must be a list of domains"
        return
    for domain in value:
        problem = _domain_problem(domain)
        if problem:
            yield path, f"{domain!r} {problem}"


def check_dns(raw: Mapping[str, Any]) -> Problems:
    from mailplat.dns import FAMILIES, parse_nameserver

    dns = raw.get("dns", {})
    if not isinstance(dns, dict):
        yield ("dns",), "must be a table: [dns]"
        return
    for key in dns:
        if key not in DNS_KEYS:
            yield ("dns", key), f"unknown key (use {', '.join(sorted(DNS_KEYS))})"
    servers = dns.get("nameservers", [])
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        yield ("dns", "nameservers"), "must be a list like [\"127.0.0.1:53\", \"::1\"]"
        servers = []
    for server in servers:
        try:
            parse_nameserver(server)
        except ValueError as error:
            yield ("dns", "nameservers"), f"{server!r}: {error}"
    families = dns.get("families", ["ipv4"])
    if not (isinstance(families, list) and families and all(f in FAMILIES for f in families)):
        yield ("dns", "families"), "must be a non-empty list of \"ipv4\" and \"ipv6\""
    yield from _duration(dns, "timeout", ("dns", "timeout"))


def _duration(table: Mapping[str, Any], key: str, path: Path) -> Problems:
    if key in table:
        try:
            parse_duration(table[key])
        except ValueError as error:
            yield path, str(error)


def check_tls_policy(raw: Mapping[str, Any]) -> Problems:
    table = raw.get("tls_policy", {})
    if not isinstance(table, dict):
        yield ("tls_policy",), "must be a table: [tls_policy]"
        return
    for destination, policy in table.items():
        if policy not in TLS_POLICIES:
            yield ("tls_policy", destination), f"must be one of {', '.join(TLS_POLICIES)}"


def check_agent(raw: Mapping[str, Any]) -> Problems:
    agent = _section(_section(raw, "agent"), "smtp")
    path: Path = ("agent", "smtp")
    for key in agent:
        if key not in AGENT_KEYS:
            yield path + (key,), f"unknown key (use {', '.join(sorted(AGENT_KEYS))})"
    if not isinstance(agent.get("mta_sts", False), bool):
        yield path + ("mta_sts",), "must be true or false"
    for key in ("port", "max_per_connection", "mta_sts_port"):
        value = agent.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            yield path + (key,), "must be a positive integer (ports up to 65535)"
    for key in ("connect_timeout", "idle_timeout"):
        yield from _duration(agent, key, path + (key,))
    for key in ("helo_name", "ca_file"):
        if key in agent and not isinstance(agent[key], str):
            yield path + (key,), "must be a string"


register_keys("", "aliases", "lists", "dns", "tls_policy")
register_keys("relay", *RELAY_KEYS)
register_keys("domain", "recipient_delimiter")
for _check in (check_aliases, check_lists, check_relay, check_dns, check_tls_policy, check_agent):
    register_check(_check)

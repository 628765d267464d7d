"""Parsing of SMTP reverse- and forward-paths (RFC 5321 §4.1.2, RFC 6531 SMTPUTF8).

Pure functions, no I/O. The engine gets either a ``Mailbox`` or an ``AddressError`` carrying the
exact reply to send. ``Mailbox.domain`` is always the part after the last unquoted "@" of the
mailbox (source routes discarded), because relay policy decides on the domain alone and must not
be fooled by ``user%other@local``, ``other!user@local`` or ``"user@other"@local``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

from mailplat.replies import Reply

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # octets including "<" and ">", RFC 5321 §4.5.3.1.3
MAX_LABEL = 63  # octets, RFC 1035 §2.3.4

SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")

_ATEXT_ASCII = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
# The path nearly every client sends: <dot-atom@ldh.domain>, ASCII, then nothing or a space.
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*)>(?= |\Z)", re.ASCII)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", re.ASCII)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+", re.ASCII)
# Never valid anywhere in a path, not even quoted: controls (C0, DEL, C1) and lone surrogates
# (which the engine may produce when decoding bytes with surrogateescape).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs"})
_SPACE_CATEGORIES = frozenset({"Zs", "Zl", "Zp"})


class AddressError(ValueError):
    """A path the server refuses; ``reply`` is the precise SMTP reply to send.

    ``str(error)`` is a short human detail (for logs); the reply text stays generic.
    """

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or reply.text)
        self.reply = reply
        self.detail = detail


class _Invalid(Exception):
    """Internal: a syntax problem, turned into a sender or recipient reply by the caller."""


@dataclass(frozen=True)
class Mailbox:
    """An envelope mailbox. ``local`` is unquoted; ``domain`` is "" only for <postmaster>."""

    local: str
    domain: str

    def __str__(self) -> str:
        if not self.domain:
            return "postmaster"
        return f"{quote_local_part(self.local)}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """Whether this address can only be transmitted in an SMTPUTF8 transaction."""
        return not (self.local.isascii() and self.domain.isascii())


def parse_reverse_path(text: str) -> tuple[Mailbox | None, str]:
    """Parse what follows "MAIL FROM:"; None stands for the null reverse-path <>.

    Returns the mailbox and the remaining (stripped) ESMTP parameter string.
    """
    try:
        return _parse_path(text, null_ok=True, postmaster_ok=False)
    except _Invalid as exc:
        raise AddressError(SENDER_SYNTAX, str(exc)) from None


def parse_forward_path(text: str) -> tuple[Mailbox, str]:
    """Parse what follows "RCPT TO:"; <Postmaster> (any case) gives Mailbox("postmaster", "")."""
    try:
        mailbox, rest = _parse_path(text, null_ok=False, postmaster_ok=True)
    except _Invalid as exc:
        raise AddressError(RECIPIENT_SYNTAX, str(exc)) from None
    assert mailbox is not None
    return mailbox, rest


def parse_mailbox(text: str) -> Mailbox:
    """Parse a bare "local@domain" (no angle brackets), e.g. from configuration or AUTH=."""
    try:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_PATH - 2:
            raise _Invalid("address too long")
        _reject_forbidden(text)
        return _parse_mailbox(text)
    except _Invalid as exc:
        raise AddressError(RECIPIENT_SYNTAX, str(exc)) from None


def quote_local_part(local: str) -> str:
    """The local part as written on the wire: a Dot-string if possible, else a Quoted-string."""
    if is_dot_string(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def is_dot_string(local: str) -> bool:
    """RFC 5321 Dot-string (with RFC 6531 UTF-8 atext): atoms separated by single dots."""
    atoms = local.split(".")
    return all(atoms) and all(_is_atext(ch) for atom in atoms for ch in atom)


def _parse_path(text: str, null_ok: bool, postmaster_ok: bool) -> tuple[Mailbox | None, str]:
    """Split off the bracketed path, then parse its route and mailbox."""
    text = text.lstrip(" \t")
    plain = _parse_plain_path(text)
    if plain is not None:
        return plain
    return _parse_any_path(text, null_ok, postmaster_ok)


def _parse_plain_path(text: str) -> tuple[Mailbox, str] | None:
    """The common case in one regular expression, where the general parser walks the path
    character by character (a tenth of the reactor's time per message went to the two paths
    of a transaction). None for anything else, or anything near a length limit: the general
    parser then decides, and words the refusal. tests/test_address.py holds the two equal."""
    match = _PLAIN_PATH.match(text)
    if match is None:
        return None
    local, domain = match.groups()
    if (match.end() > MAX_PATH or len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN
            or any(len(label) > MAX_LABEL for label in domain.split("."))):
        return None
    return Mailbox(local, domain.lower()), text[match.end():].strip(" ")


def _parse_any_path(text: str, null_ok: bool, postmaster_ok: bool) -> tuple[Mailbox | None, str]:
    path, rest = _split_path(text)
    _reject_forbidden(path)
    if len(path.encode("utf-8")) > MAX_PATH:
        raise _Invalid("path too long")
    inner = path[1:-1]
    if not inner:
        if not null_ok:
            raise _Invalid("null path not allowed here")
        return None, rest
    if postmaster_ok and inner.lower() == "postmaster":
        return Mailbox("postmaster", ""), rest
    return _parse_mailbox(_strip_route(inner)), rest


def _split_path(text: str) -> tuple[str, str]:
    """Return ("<...>", params) honouring quoted strings, which may contain ">"."""
    if not text.startswith("<"):
        raise _Invalid("angle brackets required")
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            break
        index += 1
    else:
        raise _Invalid("missing closing angle bracket")
    path, rest = text[: index + 1], text[index + 1 :]
    if rest and not rest.startswith(" "):
        raise _Invalid("no space between path and parameters")
    return path, rest.strip(" ")


def _strip_route(inner: str) -> str:
    """Discard an RFC 5321 source route (A-d-l ":"), after checking its syntax (§C)."""
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise _Invalid("source route without colon")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise _Invalid("bad source route")
        _parse_domain(hop[1:])
    return mailbox


def _parse_mailbox(text: str) -> Mailbox:
    """Mailbox = Local-part "@" ( Domain / address-literal )."""
    if text.startswith('"'):
        local, end = _read_quoted(text)
        wire_local, at, domain_text = text[:end], text[end : end + 1], text[end + 1 :]
        if at != "@":
            raise _Invalid("quoted local part must be followed by @")
    else:
        wire_local, at, domain_text = text.rpartition("@")
        if not at:
            raise _Invalid("missing @domain")
        if not is_dot_string(wire_local):
            raise _Invalid("invalid local part")
        local = wire_local
    if len(wire_local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _Invalid("local part too long")
    return Mailbox(local, _parse_domain_or_literal(domain_text))


def _read_quoted(text: str) -> tuple[str, int]:
    """Unquote the Quoted-string at the start of text; return it and the index after it."""
    out: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(out), index + 1
        if char == "\\":
            pair = text[index + 1 : index + 2]
            if not (pair and " " <= pair <= "~"):
                raise _Invalid("invalid quoted pair")
            out.append(pair)
            index += 2
            continue
        if not _is_qtext(char):
            raise _Invalid("invalid character in quoted string")
        out.append(char)
        index += 1
    raise _Invalid("unterminated quoted string")


def _parse_domain_or_literal(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        return _parse_literal(text[1:-1])
    return _parse_domain(text)


def _parse_domain(text: str) -> str:
    """A lowercased domain of LDH labels or IDNA 2008 U-labels; no trailing dot."""
    if not text:
        raise _Invalid("empty domain")
    if len(text.encode("utf-8")) > MAX_DOMAIN:
        raise _Invalid("domain too long")
    labels = text.lower().split(".")
    for label in labels:
        _check_label(label)
    return ".".join(labels)


def _check_label(label: str) -> None:
    if not label:
        raise _Invalid("empty domain label")
    if label.isascii():
        if len(label) > MAX_LABEL or not _LDH_LABEL.fullmatch(label):
            raise _Invalid("invalid domain label")
        return
    try:
        idna.alabel(label)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise _Invalid(f"invalid internationalized domain label: {exc}") from None


def _parse_literal(body: str) -> str:
    """An IPv4 or IPv6 address literal, in canonical form so policy can compare them."""
    if _IPV4.fullmatch(body):
        try:
            return f"[{ipaddress.IPv4Address(body)}]"
        except ValueError:
            raise _Invalid("invalid IPv4 address literal") from None
    tag, colon, address = body.partition(":")
    if colon and tag.lower() == "ipv6" and _IPV6.fullmatch(address):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(address).compressed}]"
        except ValueError:
            pass
    raise _Invalid("invalid or unsupported address literal")


def _reject_forbidden(text: str) -> None:
    for char in text:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise _Invalid("control character in address")


def _is_utf8_text(char: str) -> bool:
    """RFC 6531 UTF8-non-ascii, minus controls and lone surrogates."""
    return not char.isascii() and unicodedata.category(char) not in _FORBIDDEN_CATEGORIES


def _is_atext(char: str) -> bool:
    if char in _ATEXT_ASCII:
        return True
    return _is_utf8_text(char) and unicodedata.category(char) not in _SPACE_CATEGORIES


def _is_qtext(char: str) -> bool:
    """qtextSMTP: printable ASCII except '"' and '\\' (space allowed), or UTF-8 text."""
    if char.isascii():
        return " " <= char <= "~" and char not in '"\\'
    return _is_utf8_text(char)

"""ESMTP MAIL/RCPT parameters: RFC 5321 esmtp-param, SIZE (RFC 1870), BODY (RFC 6152/3030),
SMTPUTF8 (RFC 6531), DSN (RFC 3461), AUTH= (RFC 4954) and xtext.

Pure functions, no I/O. Parsing happens in two steps so the engine can hand the raw dict to
policy hooks: ``parse_params`` checks generic syntax, ``mail_params``/``rcpt_params`` check what
this session advertised and the meaning of each value. Errors carry the reply to send.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from mailplat.replies import Reply

MAIL_UNKNOWN = Reply(555, "5.5.4", "MAIL FROM parameters not recognized or not implemented")
RCPT_UNKNOWN = Reply(555, "5.5.4", "RCPT TO parameters not recognized or not implemented")

MAIL_KEYWORDS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY", "NEVER"})
MAX_SIZE_DIGITS = 20  # RFC 1870 size-value = 1*20DIGIT
MAX_ENVID = 100  # RFC 3461 §4.4, measured as sent (xtext)
MAX_ORCPT = 500  # RFC 3461 §4.2, measured as sent (xtext)

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+", re.ASCII)
_HEX = frozenset("0123456789ABCDEFabcdef")
_T = TypeVar("_T")


class ParamError(ValueError):
    """A parameter the server refuses; ``reply`` is the precise SMTP reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _syntax(text: str) -> ParamError:
    return ParamError(Reply(501, "5.5.4", text))


@dataclass(frozen=True)
class MailParams:
    """The understood MAIL FROM parameters; None/False where the client sent none."""

    size: int | None = None
    body: str | None = None  # "7BIT" / "8BITMIME" / "BINARYMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" / "HDRS"
    envid: str | None = None  # xtext-decoded
    auth: str | None = None  # xtext-decoded mailbox, or "<>"


@dataclass(frozen=True)
class RcptParams:
    """The understood RCPT TO parameters; ``notify`` is () when the client sent no NOTIFY."""

    notify: tuple[str, ...] = ()
    orcpt: str | None = None  # "addr-type;address" with the address xtext-decoded


def parse_params(text: str) -> dict[str, str | None]:
    """Split "KEY=value KEY2" into {"KEY": "value", "KEY2": None}; keywords uppercased."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        keyword, equals, value = token.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise _syntax("Invalid parameter keyword")
        key = keyword.upper()
        if equals and not _valid_value(value):
            raise _syntax(f"Invalid value for {key} parameter")
        if key in params:
            raise _syntax(f"Duplicate {key} parameter")
        params[key] = value if equals else None
    return params


def _valid_value(value: str) -> bool:
    """esmtp-value: 1*(%d33-60 / %d62-126), plus UTF8-non-ascii per RFC 6531 §3.3."""
    return bool(value) and all(_value_char(char) for char in value)


def _value_char(char: str) -> bool:
    if char.isascii():
        return "!" <= char <= "~" and char != "="
    return unicodedata.category(char) not in {"Cc", "Cs", "Zs", "Zl", "Zp"}


def mail_params(params: Mapping[str, str | None], supported: frozenset[str]) -> MailParams:
    """Check MAIL FROM parameters against what this session advertised in ``supported``."""
    _check_known(params, MAIL_KEYWORDS & supported, MAIL_UNKNOWN)
    bodies = {"7BIT", "8BITMIME"} | ({"BINARYMIME"} & supported)
    return MailParams(
        size=_convert(params, "SIZE", _size),
        body=_convert(params, "BODY", lambda value: _choice("BODY", value, bodies)),
        smtputf8=_convert(params, "SMTPUTF8", _flag) or False,
        ret=_convert(params, "RET", lambda value: _choice("RET", value, {"FULL", "HDRS"})),
        envid=_convert(params, "ENVID", _envid),
        auth=_convert(params, "AUTH", _auth),
    )


def rcpt_params(params: Mapping[str, str | None], supported: frozenset[str]) -> RcptParams:
    """Check RCPT TO parameters against what this session advertised in ``supported``."""
    _check_known(params, RCPT_KEYWORDS & supported, RCPT_UNKNOWN)
    return RcptParams(
        notify=_convert(params, "NOTIFY", _notify) or (),
        orcpt=_convert(params, "ORCPT", _orcpt),
    )


def _check_known(params: Mapping[str, str | None], allowed: frozenset[str], reply: Reply) -> None:
    """Unknown parameters are reported first, whatever else is wrong (RFC 5321 §4.1.1.11)."""
    if any(key not in allowed for key in params):
        raise ParamError(reply)


def _convert(
    params: Mapping[str, str | None], key: str, convert: Callable[[str | None], _T]
) -> _T | None:
    return convert(params[key]) if key in params else None


def _value(key: str, value: str | None) -> str:
    if value is None:
        raise _syntax(f"{key} parameter requires a value")
    return value


def _size(value: str | None) -> int:
    text = _value("SIZE", value)
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_SIZE_DIGITS):
        raise _syntax("Invalid SIZE value")
    return int(text)


def _choice(key: str, value: str | None, allowed: set[str] | frozenset[str]) -> str:
    upper = _value(key, value).upper()
    if upper not in allowed:
        raise _syntax(f"Unsupported {key} value")
    return upper


def _flag(value: str | None) -> bool:
    """SMTPUTF8 is a bare keyword (RFC 6531 §3.4)."""
    if value is not None:
        raise _syntax("SMTPUTF8 parameter takes no value")
    return True


def _envid(value: str | None) -> str:
    """ENVID: xtext of printable (graphic) US-ASCII, at most 100 characters as sent."""
    text = _value("ENVID", value)
    decoded = _decode("ENVID", text)
    if len(text) > MAX_ENVID or not all("!" <= char <= "~" for char in decoded):
        raise _syntax("Invalid ENVID value")
    return decoded


def _auth(value: str | None) -> str:
    """AUTH=<mailbox> as xtext, or "<>"; controls refused since it ends up in headers/logs."""
    decoded = _decode("AUTH", _value("AUTH", value))
    if any(unicodedata.category(char) == "Cc" for char in decoded):
        raise _syntax("Invalid AUTH value")
    return decoded


def _notify(value: str | None) -> tuple[str, ...]:
    """NOTIFY=NEVER, or a comma list of SUCCESS/FAILURE/DELAY (RFC 3461 §4.1)."""
    items = _value("NOTIFY", value).upper().split(",")
    if not all(item in NOTIFY_VALUES for item in items):
        raise _syntax("Invalid NOTIFY value")
    if "NEVER" in items and len(items) > 1:
        raise _syntax("NOTIFY=NEVER cannot be combined with other values")
    return tuple(dict.fromkeys(items))


def _orcpt(value: str | None) -> str:
    """ORCPT=addr-type;xtext; the decoded address must be printable US-ASCII (RFC 3461 §4.2)."""
    text = _value("ORCPT", value)
    addr_type, semicolon, encoded = text.partition(";")
    if not (semicolon and encoded and _ATOM.fullmatch(addr_type)) or len(text) > MAX_ORCPT:
        raise _syntax("Invalid ORCPT value")
    decoded = _decode("ORCPT", encoded)
    if not all(" " <= char <= "~" for char in decoded):
        raise _syntax("Invalid ORCPT value")
    return f"{addr_type};{decoded}"


def _decode(key: str, text: str) -> str:
    try:
        return xtext_decode(text)
    except ValueError:
        raise _syntax(f"Invalid xtext in {key} parameter") from None


def xtext_encode(text: str) -> str:
    """RFC 3461 §4 xtext of the UTF-8 octets of text: "+", "=" and non-xchars become "+HH"."""
    out = []
    for octet in text.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in b"+=":
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Inverse of ``xtext_encode``; lowercase hex is tolerated. Raises ValueError if invalid."""
    octets = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char == "+":
            pair = text[index + 1 : index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise ValueError(f"invalid hexchar at offset {index}")
            octets.append(int(pair, 16))
            index += 3
        elif "!" <= char <= "~" and char != "=":
            octets.append(ord(char))
            index += 1
        else:
            raise ValueError(f"invalid xtext character at offset {index}")
    return octets.decode("utf-8")

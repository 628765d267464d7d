"""The Received: trace header we prepend (RFC 5321 §4.4) and the hop count we check against."""

from __future__ import annotations

import functools
from email.utils import formatdate

from mailplat.envelope import SessionInfo


def protocol_name(session: SessionInfo, smtputf8: bool) -> str:
    """The "with" keyword of RFC 3848/6531: ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS, LMTP..."""
    base = session.protocol
    if base in ("SMTP", "LMTP"):
        return base
    name = "UTF8SMTP" if smtputf8 else "ESMTP"
    suffix = ("S" if session.tls else "") + ("A" if session.auth_user else "")
    return name + suffix


def received_header(
    session: SessionInfo,
    hostname: str,
    queue_id: str,
    recipients: list[str],
    smtputf8: bool,
    now: float,
) -> bytes:
    """One Received: field, folded, CRLF-terminated, naming our queue id for log correlation."""
    helo = _clean(session.helo) or "unknown"
    peer = f"[{session.peer_host}]" if session.peer_host else "local"
    lines = [
        f"Received: from {helo} ({peer})",
        f"\tby {hostname} (mailplat) with {protocol_name(session, smtputf8)} id {queue_id}",
    ]
    if len(recipients) == 1:
        lines.append(f"\tfor <{_clean(recipients[0])}>")
    lines[-1] += ";"
    lines.append(f"\t{_date(int(now))}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 date of a whole second: one formatting per second, not per message."""
    return formatdate(second, localtime=False, usegmt=False)


_STRUCTURAL = str.maketrans("", "", "()<>;\\")


def _clean(text: str) -> str:
    """Keep client-supplied text from breaking the header's structure."""
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    return text.translate(_STRUCTURAL)[:255]

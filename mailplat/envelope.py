"""What the server knows about a message besides its bytes, and how that is stored as JSON.

The envelope is the durable record the queue keeps per message: sender, per-recipient state
(attempts, next attempt, last reply) and the DSN parameters, written as JSON, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any


# Recipient states. A message is finished when no recipient is PENDING, DEFERRED or HELD.
PENDING = "pending"
DEFERRED = "deferred"
HELD = "held"
DELIVERED = "delivered"
BOUNCED = "bounced"
UNFINISHED = frozenset({PENDING, DEFERRED, HELD})


@dataclass(frozen=True)
class SessionInfo:
    """Who handed us the message: recorded for Received:, logs and policy."""

    peer_host: str = ""
    peer_port: int = 0
    helo: str = ""
    protocol: str = "ESMTP"  # SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, LMTP ...
    tls: bool = False
    auth_user: str | None = None
    listener: str = ""
    session_id: str = ""  # unique per connection in this process; keys the hooks' notes


@dataclass(frozen=True)
class Recipient:
    """One recipient and its delivery state; retries are tracked per recipient."""

    address: str
    orcpt: str | None = None
    notify: tuple[str, ...] = ()
    state: str = PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_reply: str | None = None
    agent: str | None = None
    history: tuple[str, ...] = ()
    dsn: str | None = None  # a DSN action ("failed", "delivered", ...) still owed to the sender

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED


@dataclass(frozen=True)
class Envelope:
    """The durable envelope of one queued message."""

    queue_id: str
    sender: str  # "" is the null reverse-path <>
    recipients: tuple[Recipient, ...]
    received_at: float
    size: int = 0
    body: str | None = None  # "7BIT" / "8BITMIME" / "BINARYMIME"
    smtputf8: bool = False
    envid: str | None = None
    ret: str | None = None  # "FULL" / "HDRS"
    session: SessionInfo = field(default_factory=SessionInfo)
    delay_notified: bool = False
    # Header fields added by policy hooks at the end of data; agents see them ahead of the
    # stored bytes through IStoredMessage.open() (the data file is never rewritten).
    add_headers: tuple[str, ...] = ()
    # How many bytes of the data file are the message: the envelope committed with it
    # follows them (see store.envelope_trailer). None: the whole file (older queues, tests).
    data_length: int | None = None

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.recipients)

    def with_recipient(self, index: int, **changes: Any) -> "Envelope":
        """A copy with one recipient's fields changed."""
        recipients = list(self.recipients)
        recipients[index] = replace(recipients[index], **changes)
        return replace(self, recipients=tuple(recipients))

    def to_json(self) -> bytes:
        # The C encoder asks ``vars`` for each dataclass it meets: the JSON of
        # ``dataclasses.asdict`` without its deep copies or a Python call per field (the
        # envelope is encoded on every commit).
        return _ENCODER.encode(self).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "Envelope":
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["recipients"] = tuple(_recipient(r) for r in raw["recipients"])
        raw["session"] = SessionInfo(**raw.get("session", {}))
        raw["add_headers"] = tuple(raw.get("add_headers", ()))
        return cls(**raw)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=vars)


def _recipient(raw: dict[str, Any]) -> Recipient:
    known = {f.name for f in fields(Recipient)}
    raw = {k: v for k, v in raw.items() if k in known}
    raw["notify"] = tuple(raw.get("notify", ()))
    raw["history"] = tuple(raw.get("history", ()))
    return Recipient(**raw)


@dataclass
class Transaction:
    """The mail transaction being built by a session between MAIL and the end of data."""

    sender: str
    recipients: list[Recipient] = field(default_factory=list)
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    envid: str | None = None
    ret: str | None = None
    auth: str | None = None
    add_headers: list[str] = field(default_factory=list)  # from the data hook's verdict
    # The IIncomingMessage being written (set at the start of data), so that the data hook
    # can read the whole message through its open(), e.g. to check a DKIM body hash.
    message: Any = field(default=None, repr=False, compare=False)

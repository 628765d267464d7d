"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195).

Each mechanism is a small pure state machine over decoded bytes: it answers a client message
with either a ``Challenge`` to send or ``Done`` with ``twisted.cred`` credentials to check. The
session does the base64 framing (``decode_response``), the replies and the checking, so these
classes never see a socket, a clock or the user database.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass
from typing import ClassVar

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, UsernamePassword
from zope.interface import implementer

from mailplat.replies import Reply

MAX_LINE = 12288  # octets a client response may take (RFC 4954 §4)
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response")
CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")


class SASLError(Exception):
    """The exchange ends with ``reply``; ``failure`` says whether it counts as a failed login."""

    def __init__(self, reply: Reply, failure: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.failure = failure


class Malformed(SASLError):
    """A decoded response that breaks the mechanism's syntax: treated as a failed login."""

    def __init__(self) -> None:
        super().__init__(Reply(535, "5.7.8", "Authentication credentials invalid"), failure=True)


@dataclass(frozen=True)
class Challenge:
    """Send these bytes to the client (base64-encoded, in a 334 reply) and wait."""

    data: bytes


@dataclass(frozen=True)
class Done:
    """The exchange is complete; check ``credentials``."""

    credentials: ICredentials


Step = Challenge | Done


def decode_response(line: bytes) -> bytes:
    """A client's base64 line as bytes; ``*`` cancels (RFC 4954 §4), bad base64 is a 501."""
    text = line.strip()
    if text == b"*":
        raise SASLError(CANCELLED)
    if len(text) % 4:
        raise SASLError(BAD_BASE64)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(BAD_BASE64) from None


def decode_initial(text: str) -> bytes | None:
    """The optional initial response of ``AUTH MECH [response]``: None absent, "=" empty."""
    if not text:
        return None
    if text == "=":
        return b""
    return decode_response(text.encode("ascii", "replace"))


def encode_challenge(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _utf8(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed() from None
    if not text or any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise Malformed()
    return text


class Mechanism:
    """One exchange. ``secret_in_clear``: the password crosses the wire (PLAIN, LOGIN)."""

    name: ClassVar[str]
    secret_in_clear: ClassVar[bool] = True

    def start(self, initial: bytes | None) -> Step:
        raise NotImplementedError

    def respond(self, data: bytes) -> Step:
        raise NotImplementedError


class Plain(Mechanism):
    """RFC 4616: [authzid] NUL authcid NUL passwd, usually as the initial response."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[2]:
            raise Malformed()
        authzid, authcid, password = parts
        user = _utf8(authcid)
        # Acting as somebody else (proxy authorization) is not offered: the identities must agree.
        if authzid and _utf8(authzid) != user:
            raise Malformed()
        return Done(UsernamePassword(user.encode("utf-8"), password))


class Login(Mechanism):
    """The de-facto LOGIN mechanism: user name, then password, each its own line."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._user is None:
            self._user = _utf8(data).encode("utf-8")
            return Challenge(b"Password:")
        if not data:
            raise Malformed()
        return Done(UsernamePassword(self._user, data))


@implementer(IUsernameHashedPassword)
class CramMD5Response:
    """A CRAM-MD5 answer: the user and the HMAC-MD5 of our challenge keyed with their secret."""

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest

    def checkPassword(self, password: bytes) -> bool:
        expected = hmac.new(password, self.challenge, "md5").hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())


class CramMD5(Mechanism):
    """RFC 2195. The secret never crosses the wire, so it is offered without TLS."""

    name = "CRAM-MD5"
    secret_in_clear = False

    def __init__(self, hostname: str, now: float) -> None:
        token = secrets.randbelow(10**12)
        self.challenge = f"<{token}.{int(now)}@{hostname}>".encode("ascii", "replace")

    def start(self, initial: bytes | None) -> Step:
        if initial:  # the server speaks first in CRAM-MD5
            raise Malformed()
        return Challenge(self.challenge)

    def respond(self, data: bytes) -> Step:
        user, _, digest = data.rpartition(b" ")
        if not user or len(digest) != 32:
            raise Malformed()
        try:
            int(digest, 16)
        except ValueError:
            raise Malformed() from None
        return Done(CramMD5Response(_utf8(user).encode("utf-8"), self.challenge, digest))


class ResponseLine:
    """The engine's reader for one SASL response line (kept out of the command parser).

    Fed whatever bytes arrive; ``feed`` returns None until a line is complete, then the bytes
    after it. An over-long line is consumed to its end and marked ``too_long``.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.line = b""
        self.too_long = False

    def feed(self, data: bytes) -> bytes | None:
        end = data.find(b"\n")
        chunk = data if end < 0 else data[:end]
        if not self.too_long:
            self.line += chunk
            if len(self.line) > self.limit:
                self.too_long, self.line = True, b""
        if end < 0:
            return None
        self.line = self.line.rstrip(b"\r")
        return data[end + 1:]

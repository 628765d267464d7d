"""Header fields that policy hooks add at the end of data, and how agents get to see them.

The message bytes in the queue are written once while they arrive and never rewritten, but the
data hook (DKIM-Signature, Authentication-Results) only knows its headers after the body. So
those fields live in the envelope (``Envelope.add_headers``) and ``StoredMessage.open()``
returns a reader that yields them ahead of the stored bytes: every delivery agent sees one
message, added fields first, without copying the body.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from typing import IO

_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable ASCII except ":"
_FOLD = re.compile(r"\r\n(?![ \t])")


class HeaderError(ValueError):
    """A hook tried to add a field that would break the header section."""


def header_field(name: str, value: str) -> str:
    """One field "Name: value", checked; long values are kept as given (fold them yourself
    with CRLF + whitespace), but a line break not followed by whitespace is refused."""
    if not _NAME.fullmatch(name):
        raise HeaderError(f"bad header field name {name!r}")
    return check_field(f"{name}: {value}")


def check_field(field: str) -> str:
    """Refuse text that would end the header section or smuggle in another field."""
    name, colon, _ = field.partition(":")
    if not colon or not _NAME.fullmatch(name):
        raise HeaderError(f"not a header field: {field[:40]!r}")
    if "\x00" in field or _FOLD.search(field) or re.search(r"\r(?!\n)|(?<!\r)\n", field):
        raise HeaderError(f"bad line break in header field {name!r}")
    return field


def encode(fields: Iterable[str]) -> bytes:
    """The wire form: each field CRLF-terminated, UTF-8 (RFC 6532 allows it in headers)."""
    return b"".join(f.encode("utf-8") + b"\r\n" for f in fields)


class _Prefixed(io.RawIOBase):
    """Reads ``prefix`` and then the wrapped file, closing the file with itself."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._rest.close()
        super().close()


def prefixed(fields: Iterable[str], stream: IO[bytes]) -> IO[bytes]:
    """``stream`` itself when there is nothing to add, else a buffered reader over both."""
    prefix = encode(fields)
    if not prefix:
        return stream
    return io.BufferedReader(_Prefixed(prefix, stream), 1 << 20)

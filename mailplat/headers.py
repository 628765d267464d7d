"""Collects a message's header section while the body streams past, within a fixed bound.

Policy (hop counting, later DKIM/DMARC plugins) needs the headers; nobody needs the body in
memory. Only the first ``limit`` bytes are ever kept.
"""

from __future__ import annotations

import re

_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


class HeaderScanner:
    """Feeds on message chunks until the blank line that ends the header section."""

    def __init__(self, limit: int = 256 * 1024) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.complete = False

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return
        # A virtual CRLF before the first byte: a message may start with the blank line.
        tail = self._parts[-1][-3:] if self._parts else b"\r\n"
        if (tail + chunk).find(b"\r\n\r\n") >= 0:
            self.complete = True
        room = self._limit - self._size
        if len(chunk) >= room:
            chunk = chunk[:room]
            self.complete = True
        self._parts.append(chunk)
        self._size += len(chunk)

    @property
    def headers(self) -> bytes:
        """The header section, each field ending in CRLF (the blank line excluded)."""
        data = b"\r\n" + b"".join(self._parts)
        end = data.find(b"\r\n\r\n")
        return data[2 : end + 2] if end >= 0 else data[2:]

    def count_received(self) -> int:
        return len(_RECEIVED.findall(self.headers))

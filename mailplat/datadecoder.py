"""Streaming decoders for message data: DATA's dot-terminated text and BDAT's counted chunks.

They work on whole chunks (mailplat.linescan's compiled scans, bytes methods) rather than a
Python loop per line, so large bodies move at memory speed. The end of DATA is exactly
CRLF.CRLF: a bare LF or bare CR never ends a line (the SMTP-smuggling family, CVE-2023-51764),
and a message that contains one is read to its real end and then rejected (see ``LineChecker``).
"""

from __future__ import annotations

from collections.abc import Callable

from mailplat import linescan

END_OF_DATA = b"\r\n.\r\n"



class LineChecker:
    """Watches raw message bytes for the two things we refuse: bare CR/LF and overlong lines.

    State carries across chunks, so a CRLF or a long line split between two reads is judged as
    one. ``problem`` is None while the data is acceptable, else a short reason.
    """

    def __init__(self) -> None:
        self.problem: str | None = None
        self.bare_newline = False
        self.overlong = False
        self._line_length = 0
        self._pending_cr = False

    def feed(self, raw: bytes) -> None:
        if not raw or (self.bare_newline and self.overlong):
            return
        bare, overlong, self._line_length, self._pending_cr = linescan.check(
            raw, self._line_length, self._pending_cr
        )
        if bare:
            self.bare_newline = True
            self.problem = self.problem or "bare CR or LF in message data"
        if overlong:
            self.overlong = True
            self.problem = self.problem or "message line longer than 1000 octets"


class DotDecoder:
    """Decodes DATA: finds CRLF.CRLF, removes dot-stuffing, hands body bytes to ``sink``.

    ``feed`` returns None while the message continues, or the bytes that followed the end of
    data (which belong to the command stream again). The decoder keeps at most a few bytes
    between calls, so memory stays flat whatever the message size.
    """

    def __init__(self, sink: Callable[[bytes], None], checker: LineChecker | None = None) -> None:
        self._sink = sink
        self.checker = checker if checker is not None else LineChecker()
        # The CRLF that ended the DATA command line: lets a first-line "." be seen as such.
        self._buffer = b"\r\n"
        self._at_start = True
        self.size = 0

    def feed(self, chunk: bytes) -> bytes | None:
        buffer = self._buffer + chunk
        # Both the end of data and every stuffed dot start with CRLF "."; one search finds
        # out whether either is here at all (in bulk data usually not).
        first = linescan.find_line_dot(buffer)
        end = buffer.find(END_OF_DATA, first) if first >= 0 else -1
        if end >= 0:
            self._emit(buffer[: end + 2], stuffed=first < end)
            self._buffer = b""
            return buffer[end + len(END_OF_DATA):]
        split = len(buffer) - (len(END_OF_DATA) - 1)
        # Never end an emitted piece inside "\r\n." so unstuffing sees every line start whole.
        if buffer.endswith(b"\r\n", 0, split):
            split -= 2
        elif buffer.endswith(b"\r", 0, split):
            split -= 1
        if split > 2:
            self._emit(buffer[:split], stuffed=0 <= first < split)
            buffer = buffer[split:]
        self._buffer = buffer
        return None

    def _emit(self, raw: bytes, stuffed: bool) -> None:
        self.checker.feed(raw)
        body = raw.replace(b"\r\n.", b"\r\n") if stuffed else raw
        if self._at_start:
            body = body[2:]
            self._at_start = False
        if body:
            self.size += len(body)
            self._sink(body)


class ChunkReader:
    """Reads one BDAT chunk of a known size (RFC 3030): no dot-stuffing, no terminator."""

    def __init__(
        self, size: int, sink: Callable[[bytes], None], checker: LineChecker, last: bool = False
    ) -> None:
        self.size = size
        self.last = last
        self.remaining = size
        self._sink = sink
        self.checker = checker

    def feed(self, chunk: bytes) -> bytes | None:
        """Consume up to the chunk's size; return the left-over bytes once the chunk is complete."""
        take = chunk[: self.remaining]
        self.remaining -= len(take)
        if take:
            self.checker.feed(take)
            self._sink(take)
        if self.remaining == 0:
            return chunk[len(take):]
        return None

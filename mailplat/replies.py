"""SMTP replies: a three-digit code, an RFC 3463 enhanced status code and human text.

Every reply the server sends is a ``Reply`` so that the enhanced code can never be forgotten and
multi-line replies are always formatted the same way (RFC 5321 §4.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. ``status`` is the enhanced code ("5.1.1") or None where none applies."""

    code: int
    status: str | None
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def encode(self, enhanced: bool = True) -> bytes:
        """The reply as wire bytes; each text line gets the code, and the enhanced code if any."""
        lines = self.text.split("\n") or [""]
        prefix = f"{self.status} " if (enhanced and self.status) else ""
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        return f"{self.code}{status} {' '.join(self.text.splitlines())}"

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """Read back a single-line reply as written by ``__str__`` or seen on the wire."""
        code, _, rest = line.strip().partition(" ")
        first, _, remainder = rest.partition(" ")
        if first.count(".") == 2 and first.replace(".", "").isdigit():
            return cls(int(code[:3]), first, remainder)
        return cls(int(code[:3]), None, rest)


OK = Reply(250, "2.0.0", "OK")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_BYTES = Reply(500, "5.5.2", "Invalid characters in command")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")

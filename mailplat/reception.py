"""One message on its way from the wire to the sink, and the reasons we may refuse it.

The session engine feeds decoded body bytes here; ``Reception`` enforces the size limit,
watches the header section for the hop count, and stops writing at the first spool error —
but keeps swallowing the data, because the client must be allowed to reach the end of data
before it hears the verdict (RFC 5321 §4.1.1.4).
"""

from __future__ import annotations

from mailplat.datadecoder import LineChecker
from mailplat.headers import HeaderScanner
from mailplat.interfaces import IIncomingMessage, SpoolError
from mailplat.replies import Reply

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (Received: headers), mail loop?")


class Reception:
    """Body bytes in, an error reply (or None) out, the incoming message written on the way."""

    def __init__(
        self, incoming: IIncomingMessage, max_size: int, max_received: int
    ) -> None:
        self.incoming = incoming
        self.checker = LineChecker()
        self.scanner = HeaderScanner()
        self.size = 0
        self.error: Reply | None = None
        self._max_size = max_size
        self._max_received = max_received

    def write(self, chunk: bytes) -> None:
        """Take decoded message bytes; after an error, only count them."""
        self.size += len(chunk)
        if self.error is not None:
            return
        if not self.scanner.complete:
            self.scanner.feed(chunk)
        if self.size > self._max_size:
            self._fail(TOO_BIG)
            return
        try:
            self.incoming.write(chunk)
        except SpoolError as e:
            self._fail(e.reply)

    def _fail(self, reply: Reply) -> None:
        self.error = reply
        self.incoming.abort()

    def verdict(self) -> Reply | None:
        """At the end of data: why the message must be refused, or None to go on."""
        if self.error is not None:
            return self.error
        reply = self._content_problem()
        if reply is not None:
            self._fail(reply)
        return reply

    def _content_problem(self) -> Reply | None:
        if self.checker.bare_newline:
            return Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end in CRLF")
        if self.checker.overlong:
            return Reply(550, "5.6.0", "Message contains a line longer than 1000 octets")
        if self.scanner.count_received() > self._max_received:
            return TOO_MANY_HOPS
        return None

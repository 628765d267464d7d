"""Streaming one message from its file to the peer, as DATA or as BDAT chunks.

``BodySender`` is a push producer: it writes large chunks until the transport says its buffer
is full (pauseProducing) and goes on when it drains, so a message of any size moves with flat
memory. It reads one chunk ahead to know which chunk is the last (BDAT ... LAST, or DATA's
terminating dot).
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mailplat.clientwire import Canonical
from mailplat.replies import Reply

if TYPE_CHECKING:
    from mailplat.clienttransaction import ClientTransaction

READ_ERROR = Reply(451, "4.3.0", "Cannot read the queued message")


@implementer(IPushProducer)
class BodySender:
    """Writes the message through ``client.write_frame``; ``run`` fires with None once the
    end of data is written, or with the Reply that stopped it early."""

    def __init__(
        self, client: ClientTransaction, source: IO[bytes], chunk_size: int,
        chunking: bool, pipelining: bool, finals: int,
    ) -> None:
        self.client = client
        self.source = source
        self.chunk_size = chunk_size
        self.chunking = chunking
        self.pipelining = pipelining
        self.finals = finals
        self.final_replies: list[Deferred[Reply]] = []
        self.failure: Reply | None = None  # the first refused BDAT chunk
        self._canonical = Canonical(dot_stuff=not chunking)
        self._next: bytes | None = None
        self._done: Deferred[Reply | None] = Deferred()
        self._finished = self._paused = self._waiting = self._pumping = False

    def run(self) -> Deferred[Reply | None]:
        self.client.transport.registerProducer(self, True)
        self._pump()
        return self._done

    # IPushProducer -----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.stop(Reply(421, "4.4.2", "Connection to the peer was lost"))

    def stop(self, why: Reply) -> None:
        self._finish(why)

    # the loop ----------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self._finished or self._paused or self._waiting):
                self._step()
        finally:
            self._pumping = False

    def _step(self) -> None:
        try:
            chunk = self._read() if self._next is None else self._next
            self._next = self._read() if chunk else b""
        except OSError:
            self._finish(READ_ERROR)
            return
        last = not self._next
        if self.chunking:
            self._bdat(chunk, last)
        else:
            self._data(chunk, last)
        if last:
            self._finish(None)

    def _read(self) -> bytes:
        return self.source.read(self.chunk_size)

    def _data(self, chunk: bytes, last: bool) -> None:
        body = self._canonical.feed(chunk)
        if last:
            body += self._canonical.end() + b".\r\n"
            timeouts = [self.client.timeouts.data_final] * self.finals
            self.final_replies = self.client.write_frame(body, timeouts)
        elif body:
            self.client.write_frame(body, [])

    def _bdat(self, chunk: bytes, last: bool) -> None:
        body = self._canonical.feed(chunk)
        if last:
            body += self._canonical.end()
            header = b"BDAT %d LAST\r\n" % len(body)
            timeouts = [self.client.timeouts.data_final] * self.finals
            self.final_replies = self.client.write_frame(header + body, timeouts)
            return
        if not body:
            return
        header = b"BDAT %d\r\n" % len(body)
        reply = self.client.write_frame(header + body, [self.client.timeouts.data_block])[0]
        if not self.pipelining:
            self._waiting = True  # RFC 3030 §4.2: wait for each chunk's reply
        reply.addCallback(self._chunk_reply)

    def _chunk_reply(self, reply: Reply) -> None:
        if not reply.positive and self.failure is None:
            self.failure = reply
            self._finish(reply)
            return
        if self._waiting:
            self._waiting = False
            self._pump()

    def _finish(self, why: Reply | None) -> None:
        if self._finished:
            return
        self._finished = True
        transport = self.client.transport
        if transport is not None and getattr(transport, "producer", self) is self:
            transport.unregisterProducer()
        self._done.callback(why)

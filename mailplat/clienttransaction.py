"""One mail transaction on the client side: MAIL, RCPTs, DATA or BDAT, and the outcomes.

Mixed into ``SMTPClient`` (as transaction.py is mixed into the server session). With PIPELINING,
MAIL, every RCPT and DATA go out in one write (RFC 2920 §3.1); with CHUNKING the message goes as
BDAT chunks once a recipient is accepted, otherwise the envelope waits for each reply. What
comes back is one Reply per recipient: its RCPT refusal, or the reply to the end of data (LMTP:
its own reply, RFC 2033 §4.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed

from mailplat import clientwire as W
from mailplat.clientbody import READ_ERROR, BodySender
from mailplat.clientstate import State, Timeouts
from mailplat.clientwire import MessageParams
from mailplat.replies import Reply


class ClientParts(Protocol):
    """What SMTPClient provides to the transaction mixed into it. (SMTPClient itself cannot
    be its base for the type checker: it inherits from it.)"""

    transport: Any  # as SMTPClient declares it
    state: State
    extensions: dict[str, str]
    lmtp: bool
    timeouts: Timeouts
    chunk_size: int
    _needs_rset: bool

    def _abandon(self, why: Reply) -> None: ...

    def _busy_reply(self) -> Reply: ...

    def _move(self, new: State) -> None: ...

    def _rearm(self) -> None: ...

    def _write(self, data: bytes, *timeouts: float) -> list[Deferred[Reply]]: ...


if TYPE_CHECKING:
    _Base = ClientParts
else:
    _Base = object

Outcomes = dict[str, Reply]
Line = tuple[str | None, bytes, float]  # (recipient or None, command line, reply timeout)


class ClientTransaction(_Base):
    """``send`` and its steps; the connection, timers and state live in SMTPClient."""

    _sender: BodySender | None

    def send(
        self, sender: str, recipients: Sequence[str], source: IO[bytes],
        params: MessageParams | None = None,
    ) -> Deferred[Outcomes]:
        """Deliver one message; fires with each recipient's Reply (for SMTP the shared final
        reply, for LMTP each recipient's own). Connection trouble shows as 421 replies, so the
        Deferred only fails for programming errors. ``source`` is read from where it is."""
        if self.state is not State.READY:
            reply = self._busy_reply()
            return succeed({r: reply for r in recipients})
        unique = list(dict.fromkeys(recipients))
        return Deferred.fromCoroutine(self._transaction(sender, unique, source, params))

    async def _transaction(
        self, sender: str, recipients: list[str], source: IO[bytes], params: MessageParams | None
    ) -> Outcomes:
        params = params or MessageParams(size=_remaining(source))
        chunking = "CHUNKING" in self.extensions
        refused = W.refusal(params, self.extensions, chunking)
        if refused is not None:
            return {r: refused for r in recipients}
        try:
            mail = W.mail_line(sender, params, self.extensions)
        except ValueError:
            return {r: W.BAD_SENDER for r in recipients}
        self._move(State.ENVELOPE)
        outcomes, accepted, data_reply = await self._envelope(mail, recipients, params, chunking)
        if accepted:
            finals = await self._body(source, len(accepted), chunking, data_reply)
            outcomes.update(zip(accepted, finals))
        elif data_reply is not None and data_reply.code == 354:
            await self._empty_data()  # the peer said 354 although no recipient was accepted
        if accepted and not any(r.positive for r in finals):
            self._needs_rset = True
        if self.state is not State.CLOSED:
            self._move(State.READY)
        return outcomes

    async def _envelope(
        self, mail: bytes, recipients: list[str], params: MessageParams, chunking: bool
    ) -> tuple[Outcomes, list[str], Reply | None]:
        """MAIL and RCPTs (and DATA when pipelining without CHUNKING); per-recipient refusals,
        the accepted recipients in order, and DATA's reply if it was sent."""
        outcomes: Outcomes = {}
        lines: list[Line] = []
        if self._needs_rset:
            self._needs_rset = False
            lines.append((None, b"RSET\r\n", self.timeouts.command))
        lines.append((None, mail, self.timeouts.mail))
        for rcpt in recipients:
            try:
                lines.append((rcpt, W.rcpt_line(rcpt, params, self.extensions), self.timeouts.rcpt))
            except ValueError:
                outcomes[rcpt] = W.BAD_RECIPIENT
        pipelined_data = "PIPELINING" in self.extensions and not chunking
        if pipelined_data:
            lines.append((None, b"DATA\r\n", self.timeouts.data_init))
        replies = await self._commands(lines, "PIPELINING" in self.extensions)
        data_reply = replies.pop() if pipelined_data else None
        failed = next(
            (r for (who, _, _), r in zip(lines, replies) if who is None and not r.positive), None
        )
        accepted = []
        for (who, _, _), reply in zip(lines, replies):
            if who is None:
                continue
            if failed is not None:
                outcomes[who] = failed  # RCPT's own 503 would hide why MAIL failed
            elif reply.positive:
                accepted.append(who)
            else:
                outcomes[who] = reply
        if not accepted:
            self._needs_rset = True
        return outcomes, accepted, data_reply

    async def _commands(self, lines: list[Line], pipelining: bool) -> list[Reply]:
        """All lines in one write when pipelining; else one by one, stopping at a failed
        RSET/MAIL (whose reply then stands for the commands not sent)."""
        if pipelining:
            waits = self._write(b"".join(line for _, line, _ in lines), *(t for _, _, t in lines))
            return [await wait for wait in waits]
        replies: list[Reply] = []
        for index, (who, line, timeout) in enumerate(lines):
            reply = await self._write(line, timeout)[0]
            replies.append(reply)
            if who is None and not reply.positive:
                return replies + [reply] * (len(lines) - index - 1)
        return replies

    async def _body(self, source: IO[bytes], count: int, chunking: bool,
                    data_reply: Reply | None) -> list[Reply]:
        """Send the message; one final reply per accepted recipient (SMTP: the same one)."""
        if chunking:
            return await self._send_body(source, count, chunking=True)
        if data_reply is None:
            self._move(State.DATA)
            data_reply = await self._write(b"DATA\r\n", self.timeouts.data_init)[0]
        if data_reply.code != 354:
            return [data_reply] * count
        return await self._send_body(source, count, chunking=False)

    async def _send_body(self, source: IO[bytes], count: int, chunking: bool) -> list[Reply]:
        """Stream the file; the end of data earns ``finals`` replies (LMTP: one each)."""
        finals = count if self.lmtp else 1
        pipelining = "PIPELINING" in self.extensions
        sender = BodySender(self, source, self.chunk_size, chunking, pipelining, finals)
        self._sender = sender
        self._move(State.SENDING)
        stopped = await sender.run()
        self._sender = None
        if stopped is not None:
            if stopped is READ_ERROR:
                self._abandon(READ_ERROR)  # mid-message: only hanging up cannot deliver a torso
            return [stopped] * count
        self._move(State.FINAL)
        replies = [await wait for wait in sender.final_replies]
        if sender.failure is not None:
            return [sender.failure] * count
        return replies * count if finals == 1 else replies

    async def _empty_data(self) -> None:
        self._move(State.SENDING)
        waits = self._write(b".\r\n", *([self.timeouts.data_final] * (0 if self.lmtp else 1)))
        self._move(State.FINAL)
        for wait in waits:
            await wait

    # -- what the body sender uses --------------------------------------------------------

    def write_frame(self, data: bytes, replies: Sequence[float]) -> list[Deferred[Reply]]:
        """Write one piece of the message and register the replies it will earn."""
        waits: list[Deferred[Reply]] = self._write(data, *replies)
        self._rearm()
        return waits


def _remaining(source: IO[bytes]) -> int | None:
    """How many bytes are left to read, for SIZE=, when the file can tell."""
    try:
        here = source.tell()
        end = source.seek(0, 2)
        source.seek(here)
    except (OSError, ValueError):
        return None
    return end - here

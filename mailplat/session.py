"""The ESMTP session engine shared by every listener (SMTP, submission, LMTP, ODMR).

It parses commands, keeps replies in order, streams message data to a sink and asks an
``IPolicy`` about every decision. Input is processed strictly in order: while a command waits
for a Deferred (policy, spool), later pipelined input stays buffered, so replies can never
come out of order (RFC 2920). Subclasses add commands by defining ``smtp_<VERB>`` methods and
EHLO keywords through ``extra_keywords``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Any, cast
from typing import Protocol as Structural

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailplat import replies as R
from mailplat.datadecoder import ChunkReader, DotDecoder, LineChecker
from mailplat.envelope import SessionInfo
from mailplat.fastwrite import write_now
from mailplat.interfaces import (
    Action, IDisconnectHook, IMessageSink, IPolicy, SpoolError, Verdict,
)
from mailplat.reception import Reception
from mailplat.transaction import TransactionCommands

log = Logger()

COMMAND_LINE_LIMIT = 512  # RFC 5321 §4.5.3.1.4, CRLF included
# RFC 1870/3461/4954 each let MAIL and RCPT grow by the size of their parameters.
PARAMETER_LINE_LIMIT = 512 + 100 + 8 + 500 + 500
_VERB = re.compile(r"[A-Za-z]{1,16}")
_BAD_COMMAND_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PAUSE_ABOVE = 1024 * 1024
_COMMAND_READ_SIZE = 1 << 16  # Twisted's own default
_DATA_READ_SIZE = 1 << 18
_session_ids = itertools.count(1)


class Connection(Structural):
    """What a session uses of its transport: ITransport's calls plus IPushProducer's (TCP,
    TLS and StringTransport transports have both; no Twisted interface names the pair)."""

    def getPeer(self) -> IAddress: ...

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


@dataclass(frozen=True)
class SessionSettings:
    """What a listener configures about its sessions."""

    hostname: str
    max_message_size: int = 64 * 1024 * 1024
    max_recipients: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    max_received_headers: int = 50
    max_errors: int = 20
    lmtp: bool = False
    listener: str = "smtp"


class ESMTPSession(TransactionCommands, Protocol):
    """One client connection: command loop, data modes, timeouts and reply ordering."""

    def __init__(
        self,
        settings: SessionSettings,
        policy: IPolicy,
        sink: IMessageSink,
        clock: IReactorTime,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.clock = clock
        self.info = SessionInfo(listener=settings.listener)
        self.greeted = False
        self.esmtp = False
        self._inbuf = b""
        self._reader: DotDecoder | ChunkReader | None = None
        self._discarding_line = False
        self._waiting = False
        self._processing = False
        self._replies: list[bytes] = []  # encoded, not yet written (flush_replies)
        self._closing = False
        self._paused = False
        self._errors = 0
        self._timer: IDelayedCall | None = None
        self.reset_transaction()

    # -- connection -----------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The transport: set before connectionMade and kept until the session ends."""
        return cast(Connection, self.transport)

    def connectionMade(self) -> None:
        peer = self.connection.getPeer()
        host = getattr(peer, "host", "") or ""
        self.info = replace(
            self.info, peer_host=host, peer_port=getattr(peer, "port", 0) or 0,
            session_id=f"S{next(_session_ids)}",
        )
        self._arm_timer()
        greeting = R.Reply(220, None, f"{self.settings.hostname} {self.banner_protocol} mailplat")
        d = maybeDeferred(self.policy.connect, self.info)
        self._run(d.addCallback(self.verdict_reply, greeting))

    @property
    def banner_protocol(self) -> str:
        return "LMTP" if self.settings.lmtp else "ESMTP"

    def connectionLost(self, reason: Any = None) -> None:
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.abandon_message()
        hook = IDisconnectHook(self.policy, None)
        if hook is not None:  # per-connection state in plugins (rate limits, notes) ends here
            maybeDeferred(hook.disconnect, self.info).addErrback(
                lambda f: log.failure("disconnect hook failed", f)
            )

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._arm_timer()
        self._inbuf += data
        self._process()

    def hand_over(self) -> None:
        """End the session but keep the connection, for a protocol that takes it over (ODMR's
        turnaround): input still buffered is dropped, no more replies are written, the timer
        stops and the policies hear of the session's end as if the connection was lost."""
        self.flush_replies()
        self.discard_buffered_input()
        if self._paused:
            self._paused = False
            self.connection.resumeProducing()
        self.connectionLost(None)

    def close(self) -> None:
        """Stop reading and close after the replies already written are sent."""
        self.flush_replies()
        self._closing = True
        self._inbuf = b""
        self.connection.loseConnection()

    # -- input loop -----------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._inbuf and not self._waiting and not self._closing:
                if self._reader is not None:
                    self._feed_reader()
                elif not self._next_command():
                    break
        finally:
            self._processing = False
        self.flush_replies()
        self._flow_control()

    def _flow_control(self) -> None:
        """Stop reading from a client that pipelines far ahead of our answers."""
        should_pause = self._waiting and len(self._inbuf) > _PAUSE_ABOVE
        if should_pause != self._paused and not self._closing:
            self._paused = should_pause
            if should_pause:
                self.connection.pauseProducing()
            else:
                self.connection.resumeProducing()

    def _feed_reader(self) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(self._inbuf)
        if rest is None:
            self._inbuf = b""
            return
        self._inbuf = rest
        self._reader = None
        self._read_size(_COMMAND_READ_SIZE)
        self._arm_timer()
        self._run(self.reader_finished(reader))

    def _next_command(self) -> bool:
        """Take one line off the buffer and run it; False when no whole line is there."""
        end = self._inbuf.find(b"\n")
        if end < 0:
            if len(self._inbuf) > PARAMETER_LINE_LIMIT and not self._discarding_line:
                self._discarding_line = True
                self.reply(R.LINE_TOO_LONG)
            if self._discarding_line:
                self._inbuf = b""
            return False
        line, self._inbuf = self._inbuf[:end], self._inbuf[end + 1:]
        if self._discarding_line:
            self._discarding_line = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        self._run(self._command(line))
        return True

    def _command(self, raw: bytes) -> Any:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.BAD_BYTES
        verb, _, args = line.partition(" ")
        if not _VERB.fullmatch(verb):
            return R.UNKNOWN_COMMAND
        verb = verb.upper()
        limit = PARAMETER_LINE_LIMIT if verb in ("MAIL", "RCPT") else COMMAND_LINE_LIMIT
        if len(raw) + 2 > limit:
            return R.LINE_TOO_LONG
        if _BAD_COMMAND_CHARS.search(line):
            return R.Reply(501, "5.5.2", "Invalid characters in command")
        handler = getattr(self, "smtp_" + verb, None)
        if handler is None:
            return R.UNKNOWN_COMMAND
        return handler(args.strip(" "))

    # -- replies ----------------------------------------------------------------------------

    def _run(self, result: Any) -> None:
        """Send a handler's reply now, or once its Deferred fires, holding back later input."""
        if isinstance(result, Deferred):
            self._waiting = True
            result.addCallback(self._resume).addErrback(self._internal_error)
        elif result is not None:
            self.reply(result)

    def _resume(self, result: Any) -> None:
        self._waiting = False
        self._run(result)
        if not self._waiting:
            self._process()

    def _internal_error(self, failure: Any) -> None:
        log.failure("internal error in session", failure)
        self._waiting = False
        self.reset_transaction()
        self.reply(R.LOCAL_ERROR)
        self._process()

    def reply(self, reply: R.Reply | list[R.Reply]) -> None:
        """Queue the reply; it leaves at the end of the input being processed (pipelined
        commands' replies together, RFC 2920), or at once when nothing is being processed."""
        if self._closing:
            return
        for one in reply if isinstance(reply, list) else [reply]:
            self._replies.append(one.encode(enhanced=True))
            if one.code in (500, 501, 503):
                self._errors += 1
        if self._errors >= self.settings.max_errors:
            self._replies.append(R.Reply(421, "4.7.0", "Too many errors, closing").encode())
            self.close()
        elif not self._processing:
            self.flush_replies()

    def flush_replies(self) -> None:
        """Send the queued replies: before anything that changes the connection (STARTTLS,
        close, ODMR's turnaround) and whenever the session waits for input."""
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            write_now(self.connection, data)

    def verdict_reply(self, verdict: Verdict, default: R.Reply) -> R.Reply:
        """Map a policy verdict to the reply we send; DISCONNECT also closes the session."""
        if verdict.action in (Action.CONTINUE, Action.ACCEPT):
            return default
        if verdict.action is Action.DISCONNECT:
            self.clock.callLater(0, self.close)
            return verdict.reply or R.Reply(421, "4.7.0", "Closing connection")
        if verdict.action is Action.TEMPFAIL:
            return verdict.reply or R.Reply(451, "4.7.1", "Try again later")
        return verdict.reply or R.Reply(550, "5.7.1", "Rejected by policy")

    # -- timeouts ---------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        timeout = self.settings.data_timeout if self._reader else self.settings.command_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        if self._waiting:  # we are the slow one; the client is waiting for us
            self._timer = None
            self._arm_timer()
            return
        self.reply(R.TIMEOUT)
        self.abandon_message()
        self.close()

    # -- data modes -------------------------------------------------------------------------

    def start_reader(self, reader: DotDecoder | ChunkReader) -> None:
        self._reader = reader
        self._arm_timer()
        self._read_size(_DATA_READ_SIZE)

    def _read_size(self, size: int) -> None:
        """Bigger reads while message data streams: the decoder's per-chunk work then runs a
        few times per megabyte instead of sixteen (Twisted reads 64 KB by default)."""
        transport = self.connection
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = size

    def discard_buffered_input(self) -> None:
        """Forget what the client sent ahead (STARTTLS: RFC 3207 §4.2, CVE-2011-0411)."""
        self._inbuf = b""

    # -- session commands -------------------------------------------------------------------

    def smtp_HELO(self, args: str) -> Any:
        return self._greet(args, esmtp=False)

    def smtp_EHLO(self, args: str) -> Any:
        return self._greet(args, esmtp=True)

    def smtp_LHLO(self, args: str) -> Any:
        if not self.settings.lmtp:
            return R.UNKNOWN_COMMAND
        return self.greet(args, esmtp=True)

    def _greet(self, name: str, esmtp: bool) -> Any:
        if self.settings.lmtp:
            return R.Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
        return self.greet(name, esmtp)

    def greet(self, name: str, esmtp: bool) -> Any:
        if not name or " " in name:
            return R.Reply(501, "5.5.4", "Syntax: EHLO hostname")
        self.abandon_message()
        self.reset_transaction()
        d = maybeDeferred(self.policy.helo, self.info, name)
        return d.addCallback(self._greeted, name, esmtp)

    def _greeted(self, verdict: Verdict, name: str, esmtp: bool) -> R.Reply:
        reply = self.verdict_reply(verdict, R.OK)
        if not reply.positive:
            return reply
        protocol = "LMTP" if self.settings.lmtp else ("ESMTP" if esmtp else "SMTP")
        self.info = replace(self.info, helo=name, protocol=protocol)
        self.greeted, self.esmtp = True, esmtp
        hello = f"{self.settings.hostname} Hello {name} [{self.info.peer_host}]"
        if not esmtp:
            return R.Reply(250, None, hello)
        return R.Reply(250, None, "\n".join([hello, *self.ehlo_keywords()]))

    def ehlo_keywords(self) -> list[str]:
        return [
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
            *self.extra_keywords(),
            "HELP",
        ]

    def extra_keywords(self) -> list[str]:
        """EHLO keywords added by subclasses (STARTTLS, AUTH, DSN, ETRN...)."""
        return []

    def smtp_NOOP(self, args: str) -> R.Reply:
        return R.OK

    def smtp_RSET(self, args: str) -> R.Reply:
        if args:
            return R.SYNTAX_ERROR
        self.abandon_message()
        self.reset_transaction()
        return R.Reply(250, "2.0.0", "Reset OK")

    def smtp_VRFY(self, args: str) -> R.Reply:
        if not args:
            return R.Reply(501, "5.5.4", "Syntax: VRFY address")
        return R.Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, args: str) -> R.Reply:
        return R.Reply(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, args: str) -> R.Reply:
        verbs = sorted(n[5:] for n in dir(self) if n.startswith("smtp_") and n[5:].isupper())
        return R.Reply(214, "2.0.0", "Commands: " + " ".join(verbs) + "\nSee RFC 5321")

    def smtp_QUIT(self, args: str) -> None:
        self.reply(R.Reply(221, "2.0.0", f"{self.settings.hostname} closing connection"))
        self.abandon_message()
        self.close()


class ESMTPFactory(Factory):
    """Builds sessions of one listener, all sharing its policy, sink and settings."""

    protocol = ESMTPSession
    noisy = False

    def __init__(
        self,
        settings: SessionSettings,
        policy: IPolicy,
        sink: IMessageSink,
        clock: IReactorTime,
        session_class: type[ESMTPSession] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.clock = clock
        if session_class is not None:
            self.protocol = session_class

    def buildProtocol(self, addr: Any) -> ESMTPSession:
        session = self.protocol(self.settings, self.policy, self.sink, self.clock)
        session.factory = self
        return session


__all__ = ["ESMTPSession", "ESMTPFactory", "SessionSettings", "LineChecker", "SpoolError", "Reception"]

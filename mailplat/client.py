"""The one ESMTP/LMTP client: used by the LMTP and relay delivery agents and by ODMR.

``SMTPClient`` is a Protocol over any connected transport; it never connects by itself
(``connect`` does that through an endpoint), so ODMR can run it on a server connection after
the turnaround. Its life is the explicit state machine of clientstate.py.

Every command's reply is awaited with the RFC 5321 §4.5.3.2 timeout for that step, on the
injected clock. Replies are matched to commands by order (a FIFO of expectations), which is
what makes PIPELINING (RFC 2920) natural. The transaction itself is in clienttransaction.py,
the message streaming in clientbody.py, the pure wire formats in clientwire.py.

Running it over a connection that already exists (ODMR after ATRN): point the transport at a
new ``SMTPClient`` and call ``client.makeConnection(transport)``; it then waits for the 220.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplat import clientwire as W
from mailplat.clientbody import BodySender
from mailplat.clientstate import (
    BAD_REPLY, CONNECTION_LOST, TIMED_OUT, TRANSITIONS, ClientError, State, Timeouts,
)
from mailplat.clienttransaction import ClientTransaction, Outcomes
from mailplat.clientwire import MessageParams
from mailplat.replies import Reply

log = Logger()


class _Expectation:
    """One reply we wait for, and how long the peer may take to send it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deferred: Deferred[Reply] = Deferred()


class SMTPClient(ClientTransaction, Protocol):
    """An ESMTP (or, with ``lmtp=True``, LMTP) client session on one connection."""

    chunk_size = 1 << 18
    # Any: ITransport lacks what we use of real transports (abortConnection, startTLS,
    # registerProducer), and StringTransport/iosim stand in for them in tests.
    transport: Any

    def __init__(
        self, hostname: str, clock: IReactorTime, lmtp: bool = False,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.hostname = hostname
        self.clock = clock
        self.lmtp = lmtp
        self.timeouts = timeouts or Timeouts()
        self.state = State.GREETING
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.last_error: Reply | None = None  # why the connection ended, if it did badly
        self.replies_seen = 0  # lets a pool tell "died before answering" from a real outcome
        self._parser = W.ReplyParser()
        self._pending: list[_Expectation] = []
        self._timer: IDelayedCall | None = None
        self._sender: BodySender | None = None
        self._needs_rset = False
        self._ready: list[Deferred[SMTPClient]] = []
        self._was_ready = False
        self._setup_error: ClientError | None = None
        self._input_epoch = 0  # bumped by reset_input: replies parsed before it are dropped

    # -- connection and input --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._expect(self.timeouts.greeting).addCallback(self._greeted)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        try:
            replies = self._parser.feed(data)
        except W.ReplySyntaxError as error:
            log.warn("peer sent a malformed reply: {error}", error=error)
            self._abandon(BAD_REPLY)
            return
        epoch = self._input_epoch
        for reply in replies:
            if not self.is_open or epoch != self._input_epoch:
                return
            self._dispatch(reply)

    def _dispatch(self, reply: Reply) -> None:
        if not self._pending:
            self._unsolicited(reply)
            return
        expectation = self._pending.pop(0)
        self.replies_seen += 1
        self._rearm()
        expectation.deferred.callback(reply)

    def _unsolicited(self, reply: Reply) -> None:
        """A reply to nothing: a 421 on an idle connection, or a peer that gave up early."""
        log.info("unexpected reply from peer in state {state}: {reply}",
                 state=self.state.value, reply=str(reply))
        if reply.code == 421 or self.state is not State.READY:
            self._abandon(reply)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed(self.last_error or CONNECTION_LOST)

    def _closed(self, why: Reply) -> None:
        """Everything still waiting learns ``why``; the session is over for good."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.last_error = why
        self._cancel_timer()
        if self._sender is not None:
            self._sender.stop(why)
        pending, self._pending = self._pending, []
        for expectation in pending:
            expectation.deferred.callback(why)
        self._setup_failed(ClientError(why))

    def _abandon(self, why: Reply) -> None:
        """Drop a connection we can no longer trust to be in step with the peer."""
        if self.state is State.CLOSED:
            return
        self.last_error = why
        self._closed(why)
        self.transport.abortConnection()

    def close(self) -> None:
        """Drop the connection now (no QUIT)."""
        self._abandon(CONNECTION_LOST)

    def reset_input(self) -> None:
        """Discard replies buffered but not read (after STARTTLS: RFC 3207 §4.2), including
        those that arrived in the same read as the reply being handled."""
        self._parser.reset()
        self._input_epoch += 1

    def starttls(self, creator: Any) -> Deferred[dict[str, str]]:
        """STARTTLS (RFC 3207) with ``creator`` (an IOpenSSLClientConnectionCreator, e.g.
        from ``optionsForClientTLS``): on 220 the transport turns to TLS, anything the peer
        sent after the 220 is discarded, and EHLO starts again. Fires with the extensions
        offered over TLS; fails with ClientError when refused or when the handshake (and so
        certificate verification) fails, in which case the connection is gone."""
        return Deferred.fromCoroutine(self._starttls(creator))

    async def _starttls(self, creator: Any) -> dict[str, str]:
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            raise ClientError(reply)
        self.reset_input()
        self.transport.startTLS(creator)
        return await self.hello()

    # -- states and timers -----------------------------------------------------------------

    def _move(self, new: State) -> None:
        if self.state is State.CLOSED:
            return
        if new is not State.CLOSED and new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"SMTP client: {self.state.value} → {new.value} not allowed")
        self.state = new
        self._rearm()

    @property
    def is_open(self) -> bool:
        """False once CLOSED (asked again after each reply, since one may close the session)."""
        return self.state is not State.CLOSED

    @property
    def usable(self) -> bool:
        """Idle and connected: another transaction may start now."""
        return self.state is State.READY

    def _expect(self, timeout: float) -> Deferred[Reply]:
        if self.state is State.CLOSED:
            return succeed(self.last_error or CONNECTION_LOST)
        expectation = _Expectation(timeout)
        self._pending.append(expectation)
        if len(self._pending) == 1:
            self._rearm()
        return expectation.deferred

    def _rearm(self) -> None:
        """One timer: the data-block timeout while sending, else the oldest reply's."""
        if self.state is State.SENDING:
            timeout: float | None = self.timeouts.data_block
        else:
            timeout = self._pending[0].timeout if self._pending else None
        if timeout is None:
            self._cancel_timer()
        elif self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        log.warn("SMTP client timed out in state {state}", state=self.state.value)
        self._abandon(TIMED_OUT)

    def _write(self, data: bytes, *timeouts: float) -> list[Deferred[Reply]]:
        """Write commands and register the replies they will earn, before any can arrive."""
        replies = [self._expect(t) for t in timeouts]
        if self.state is not State.CLOSED:
            self.transport.write(data)
        return replies

    # -- greeting and hello ------------------------------------------------------------------

    def _greeted(self, reply: Reply) -> None:
        self.greeting = reply
        if self.state is State.CLOSED:
            return
        if reply.code != 220:
            self._give_up(reply)
            return
        self.hello().addCallbacks(lambda _: self._setup_done(), lambda f: None)

    def hello(self) -> Deferred[dict[str, str]]:
        """EHLO (HELO when EHLO is refused) or LHLO; fires with the peer's extensions.
        Also the way to start again after STARTTLS."""
        return Deferred.fromCoroutine(self._hello())

    async def _hello(self) -> dict[str, str]:
        self._move(State.HELLO)
        verb = b"LHLO" if self.lmtp else b"EHLO"
        line = verb + b" " + self.hostname.encode("ascii") + b"\r\n"
        reply = await self._write(line, self.timeouts.command)[0]
        esmtp = reply.code == 250
        if not esmtp and not self.lmtp and 500 <= reply.code < 600 and reply.code != 554:
            reply = await self._write(b"HELO " + line[5:], self.timeouts.command)[0]
        if reply.code != 250:
            self._give_up(reply)
            raise ClientError(reply)
        self.esmtp = esmtp
        self.extensions = W.parse_extensions(reply) if esmtp else {}
        self._move(State.READY)
        return self.extensions

    def _give_up(self, reply: Reply) -> None:
        """The peer will not talk to us: say QUIT politely and hang up."""
        self._setup_failed(ClientError(reply))
        if self.state is not State.CLOSED:
            self.transport.write(b"QUIT\r\n")
            self.last_error = reply
            self.transport.loseConnection()

    def _setup_done(self) -> None:
        self._was_ready = True
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            waiter.callback(self)

    def _setup_failed(self, error: ClientError) -> None:
        """Greeting or first hello failed: whoever waits for ``when_ready`` learns why."""
        if self._was_ready or self._setup_error is not None:
            return
        self._setup_error = error
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            waiter.errback(error)

    def when_ready(self) -> Deferred[SMTPClient]:
        """Fires with this client once greeted and hello'd, or fails with ClientError."""
        if self._setup_error is not None:
            return fail(self._setup_error)
        if self.state is State.CLOSED:
            return fail(ClientError(self.last_error or CONNECTION_LOST))
        if not self._was_ready:
            waiter: Deferred[SMTPClient] = Deferred()
            self._ready.append(waiter)
            return waiter
        return succeed(self)

    # -- commands ------------------------------------------------------------------------------

    def command(self, line: str | bytes, timeout: float | None = None) -> Deferred[Reply]:
        """Send one command while idle and fire with its reply (STARTTLS, AUTH, NOOP...)."""
        if self.state is not State.READY:
            return fail(ClientError(self._busy_reply()))
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        self._move(State.COMMAND)
        reply = self._write(data.rstrip(b"\r\n") + b"\r\n", timeout or self.timeouts.command)[0]
        return reply.addCallback(self._command_done)

    def _command_done(self, reply: Reply) -> Reply:
        self._move(State.READY)
        return reply

    def reset(self) -> Deferred[Reply]:
        """RSET: abandon whatever the peer remembers of a transaction."""
        self._needs_rset = False
        return self.command(b"RSET")

    def quit(self) -> Deferred[Reply]:
        """QUIT and close; fires with the peer's reply (or why there was none)."""
        if self.state is State.CLOSED:
            return succeed(self.last_error or CONNECTION_LOST)
        if self.state is not State.READY:
            self.close()
            return succeed(self.last_error or CONNECTION_LOST)
        self._move(State.QUITTING)
        reply = self._write(b"QUIT\r\n", self.timeouts.command)[0]
        return reply.addBoth(self._hang_up)

    def _hang_up(self, result: Any) -> Any:
        if self.state is not State.CLOSED:
            self.transport.loseConnection()
        return result

    def _busy_reply(self) -> Reply:
        if self.state is State.CLOSED:
            return self.last_error or CONNECTION_LOST
        return Reply(451, "4.3.0", f"SMTP client is busy ({self.state.value})")

class SMTPClientFactory(Factory):
    """Builds one client per connection with the same settings."""

    noisy = False

    def __init__(self, hostname: str, clock: IReactorTime, lmtp: bool = False,
                 timeouts: Timeouts | None = None) -> None:
        self.hostname, self.clock, self.lmtp, self.timeouts = hostname, clock, lmtp, timeouts

    def buildProtocol(self, addr: Any) -> SMTPClient:
        client = SMTPClient(self.hostname, self.clock, self.lmtp, self.timeouts)
        client.factory = self
        return client


def connect(
    endpoint: IStreamClientEndpoint, hostname: str, clock: IReactorTime, lmtp: bool = False,
    timeouts: Timeouts | None = None,
) -> Deferred[SMTPClient]:
    """Connect, wait for the greeting and EHLO/LHLO; fires with a READY client, or fails with
    ClientError (the peer refused us) or the endpoint's connection error."""
    factory = SMTPClientFactory(hostname, clock, lmtp, timeouts)
    d: Deferred[SMTPClient] = endpoint.connect(factory)  # type: ignore[assignment]
    return d.addCallback(lambda client: client.when_ready())




__all__ = [
    "ClientError", "MessageParams", "Outcomes", "SMTPClient", "SMTPClientFactory", "State",
    "Timeouts", "connect",
]

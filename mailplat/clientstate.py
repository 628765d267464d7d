"""The SMTP/LMTP client's state machine, its RFC 5321 timeouts and the replies it makes up.

A client session moves along ``TRANSITIONS``::

    GREETING → HELLO → READY ⇄ (ENVELOPE → [DATA →] SENDING → FINAL) | COMMAND | HELLO
                       READY → QUITTING;  any state → CLOSED (loss, timeout, QUIT done)

Replies the client invents itself (lost connection, timeout, garbage from the peer) are 421s,
so whoever maps replies to queue outcomes treats them as "try again later".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mailplat.replies import Reply

CONNECTION_LOST = Reply(421, "4.4.2", "Connection to the peer was lost")
TIMED_OUT = Reply(421, "4.4.2", "Timed out waiting for the peer")
BAD_REPLY = Reply(421, "4.5.0", "The peer sent a malformed reply")


class State(Enum):
    """Where a client session is; CLOSED is final."""

    GREETING = "greeting"  # waiting for 220
    HELLO = "hello"  # EHLO/HELO/LHLO sent
    READY = "ready"  # idle between transactions
    COMMAND = "command"  # one caller's command (STARTTLS, AUTH, RSET, NOOP...) in flight
    ENVELOPE = "envelope"  # MAIL/RCPT (and pipelined DATA) replies pending
    DATA = "data"  # waiting for 354
    SENDING = "sending"  # message bytes streaming
    FINAL = "final"  # waiting for the reply (LMTP: replies) to the end of data
    QUITTING = "quitting"
    CLOSED = "closed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.GREETING: frozenset({State.HELLO}),
    State.HELLO: frozenset({State.READY}),
    State.READY: frozenset({State.COMMAND, State.HELLO, State.ENVELOPE, State.QUITTING}),
    State.COMMAND: frozenset({State.READY}),
    State.ENVELOPE: frozenset({State.READY, State.DATA, State.SENDING}),
    State.DATA: frozenset({State.READY, State.SENDING}),
    State.SENDING: frozenset({State.FINAL, State.READY}),
    State.FINAL: frozenset({State.READY}),
    State.QUITTING: frozenset(),
    State.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 client timeouts, in seconds."""

    greeting: float = 300.0
    command: float = 300.0  # EHLO, RSET, QUIT and caller commands
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0  # no progress while sending the message
    data_final: float = 600.0  # waiting for the reply to the end of data


class ClientError(Exception):
    """The session could not be set up or used; ``reply`` says why, SMTP style."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply



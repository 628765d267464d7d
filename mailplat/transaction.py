"""The mail transaction commands: MAIL, RCPT, DATA, BDAT — and the state machine behind them.

A transaction moves IDLE → MAIL (sender accepted; recipients collect here) → DATA or BDAT
(message bytes streaming) → IDLE. ``ALLOWED`` is the whole transition table: a command in any
other stage gets 503 5.5.1.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from mailplat import replies as R
from mailplat.address import AddressError, parse_forward_path, parse_reverse_path
from mailplat.aliases import expanded_recipients
from mailplat.datadecoder import ChunkReader, DotDecoder, LineChecker
from mailplat.envelope import Recipient, SessionInfo, Transaction
from mailplat.interfaces import Action, IMessageSink, IPolicy, SpoolError, Verdict
from mailplat.params import ParamError, mail_params, parse_params, rcpt_params
from mailplat.reception import Reception
from mailplat.trace import received_header

if TYPE_CHECKING:
    from mailplat.session import SessionSettings


class SessionParts(Protocol):
    """What ESMTPSession provides to the commands mixed into it. (The session class itself
    cannot be their base for the type checker: it inherits from them.)"""

    settings: SessionSettings
    policy: IPolicy
    sink: IMessageSink
    clock: IReactorTime
    info: SessionInfo
    greeted: bool
    esmtp: bool

    def verdict_reply(self, verdict: Verdict, default: R.Reply) -> R.Reply: ...

    def start_reader(self, reader: DotDecoder | ChunkReader) -> None: ...


if TYPE_CHECKING:
    _Base = SessionParts
else:
    _Base = object


class Stage(Enum):
    IDLE = "idle"
    MAIL = "mail"
    DATA = "data"
    BDAT = "bdat"


ALLOWED = {
    "MAIL": {Stage.IDLE},
    "RCPT": {Stage.MAIL},
    "DATA": {Stage.MAIL},
    "BDAT": {Stage.MAIL, Stage.BDAT},
}
_BDAT_ARGS = re.compile(r"(\d{1,15})(?: +(LAST))?", re.IGNORECASE)
NEED_UTF8 = R.Reply(553, "5.6.7", "UTF-8 address requires the SMTPUTF8 parameter")
NO_RECIPIENTS = R.Reply(554, "5.5.1", "No valid recipients")
BASE_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"})
BASE_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


class TransactionCommands(_Base):
    """Mixed into the session: everything between MAIL FROM and the final reply."""

    stage: Stage
    transaction: Transaction | None
    reception: Reception | None

    def reset_transaction(self) -> None:
        self.stage = Stage.IDLE
        self.transaction = None
        self.reception = None

    def abandon_message(self) -> None:
        """Drop a half-received message (RSET, EHLO, QUIT, lost connection, timeout)."""
        if self.reception is not None and self.reception.error is None:
            self.reception.incoming.abort()
        self.reception = None

    def _out_of_sequence(self, verb: str) -> R.Reply | None:
        if not self.greeted:
            return R.Reply(503, "5.5.1", "Send EHLO/HELO first")
        if self.stage not in ALLOWED[verb]:
            if verb in ("DATA", "RCPT") and self.stage is Stage.IDLE:
                return R.Reply(503, "5.5.1", "Need MAIL command first")
            return R.BAD_SEQUENCE
        return None

    def mail_parameters_supported(self) -> frozenset[str]:
        """ESMTP MAIL parameters this session accepts (subclasses add AUTH, RET, ENVID)."""
        return BASE_MAIL_PARAMS if self.esmtp else frozenset()

    def rcpt_parameters_supported(self) -> frozenset[str]:
        return BASE_RCPT_PARAMS if self.esmtp else frozenset()

    # -- MAIL / RCPT ---------------------------------------------------------------------

    def smtp_MAIL(self, args: str) -> Any:
        refusal = self._out_of_sequence("MAIL") or self.mail_refusal()
        if refusal is not None:
            return refusal
        if not args[:5].upper() == "FROM:":
            return R.Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            sender, rest = parse_reverse_path(args[5:])
            params = mail_params(parse_params(rest), self.mail_parameters_supported())
        except (AddressError, ParamError) as e:
            return e.reply
        if sender is not None and sender.needs_smtputf8 and not params.smtputf8:
            return NEED_UTF8
        if params.size is not None and params.size > self.settings.max_message_size:
            return R.Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        transaction = Transaction(
            sender=str(sender) if sender else "",
            size=params.size, body=params.body, smtputf8=params.smtputf8,
            envid=params.envid, ret=params.ret, auth=params.auth,
        )
        d = maybeDeferred(self.policy.mail, self.info, sender, params)
        return d.addCallback(self._mail_verdict, transaction)

    def mail_refusal(self) -> R.Reply | None:
        """Hook for profiles that refuse MAIL in some states (submission before AUTH)."""
        return None

    def _mail_verdict(self, verdict: Verdict, transaction: Transaction) -> R.Reply:
        reply = self.verdict_reply(verdict, R.Reply(250, "2.1.0", "Sender OK"))
        if reply.positive:
            self.transaction, self.stage = transaction, Stage.MAIL
        return reply

    def smtp_RCPT(self, args: str) -> Any:
        refusal = self._out_of_sequence("RCPT")
        if refusal is not None:
            return refusal
        if not args[:3].upper() == "TO:":
            return R.Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        transaction = self.transaction
        assert transaction is not None
        if len(transaction.recipients) >= self.settings.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        try:
            recipient, rest = parse_forward_path(args[3:])
            params = rcpt_params(parse_params(rest), self.rcpt_parameters_supported())
        except (AddressError, ParamError) as e:
            return e.reply
        if recipient.needs_smtputf8 and not transaction.smtputf8:
            return NEED_UTF8
        entry = Recipient(address=str(recipient), orcpt=params.orcpt, notify=params.notify)
        d = maybeDeferred(self.policy.rcpt, self.info, transaction, recipient, params)
        return d.addCallback(self._rcpt_verdict, transaction, entry)

    def _rcpt_verdict(self, verdict: Verdict, transaction: Transaction, entry: Recipient) -> R.Reply:
        reply = self.verdict_reply(verdict, R.Reply(250, "2.1.5", "Recipient OK"))
        if reply.positive and transaction is self.transaction:
            if verdict.recipients and not self.settings.lmtp:  # LMTP: one reply per RCPT
                transaction.recipients.extend(
                    expanded_recipients(entry, verdict.recipients, transaction.recipients)
                )
            else:
                transaction.recipients.append(entry)
        return reply

    # -- DATA / BDAT -----------------------------------------------------------------------

    def _begin_message(self) -> R.Reply | None:
        """Open the sink and write our trace header; a reply when the spool refuses."""
        transaction = self.transaction
        assert transaction is not None
        try:
            incoming = self.sink.begin(self.info, transaction)
        except SpoolError as e:
            return e.reply
        transaction.message = incoming  # the data hook may read the message back
        try:
            incoming.write(received_header(
                self.info, self.settings.hostname, incoming.queue_id,
                [r.address for r in transaction.recipients], transaction.smtputf8,
                self.clock.seconds(),
            ))
        except SpoolError as e:
            incoming.abort()
            return e.reply
        self.reception = Reception(
            incoming, self.settings.max_message_size, self.settings.max_received_headers
        )
        return None

    def smtp_DATA(self, args: str) -> R.Reply:
        refusal = self._out_of_sequence("DATA")
        if refusal is not None:
            return refusal
        if args:
            return R.SYNTAX_ERROR
        if not self.transaction or not self.transaction.recipients:
            return NO_RECIPIENTS
        refusal = self._begin_message()
        if refusal is not None:
            return refusal
        assert self.reception is not None
        self.stage = Stage.DATA
        self.start_reader(DotDecoder(self.reception.write, self.reception.checker))
        return R.Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def smtp_BDAT(self, args: str) -> Any:
        match = _BDAT_ARGS.fullmatch(args)
        if match is None:
            return R.Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
        size, last = int(match.group(1)), bool(match.group(2))
        refusal = self._out_of_sequence("BDAT")
        if refusal is None and not (self.transaction and self.transaction.recipients):
            refusal = NO_RECIPIENTS
        if refusal is None and self.stage is Stage.MAIL:
            refusal = self._begin_message()
        if refusal is not None:
            # RFC 3030 §2: the chunk's octets are read (and dropped) before the refusal.
            return self._read_chunk(_RefusedChunk(size, refusal))
        assert self.reception is not None
        self.stage = Stage.BDAT
        return self._read_chunk(
            ChunkReader(size, self.reception.write, self.reception.checker, last))

    def _read_chunk(self, reader: ChunkReader) -> Any:
        """Read the chunk's octets; an empty chunk ("BDAT 0 LAST") has none to wait for."""
        if reader.size == 0:
            return self.reader_finished(reader)
        self.start_reader(reader)
        return None

    def reader_finished(self, reader: Any) -> Any:
        """A data mode ended: the end of DATA, or one BDAT chunk."""
        if isinstance(reader, _RefusedChunk):
            return reader.refusal
        if isinstance(reader, ChunkReader) and not reader.last:
            reception = self.reception
            if reception is not None and reception.error is not None:
                self.reset_transaction()
                return reception.error
            return R.Reply(250, "2.0.0", f"{reader.size} octets received")
        return self._end_of_message()

    def _end_of_message(self) -> Any:
        reception, transaction = self.reception, self.transaction
        assert reception is not None and transaction is not None
        self.reset_transaction()
        refusal = reception.verdict()
        if refusal is not None:
            return self._per_recipient(refusal, transaction)
        d = maybeDeferred(self.policy.data, self.info, transaction, reception.scanner.headers)
        return d.addCallback(self._data_verdict, reception, transaction)

    def _data_verdict(self, verdict: Verdict, reception: Reception, transaction: Transaction) -> Any:
        if verdict.action not in (Action.CONTINUE, Action.ACCEPT):
            reception.incoming.abort()
            return self._per_recipient(self.verdict_reply(verdict, R.OK), transaction)
        transaction.add_headers.extend(verdict.add_headers)
        d: Deferred[Any] = reception.incoming.finish(transaction)
        return d.addCallback(self._final_replies)

    def _final_replies(self, replies: list[R.Reply]) -> Any:
        return replies if self.settings.lmtp else replies[0]

    def _per_recipient(self, reply: R.Reply, transaction: Transaction) -> Any:
        """LMTP answers once per accepted recipient even when all share one fate."""
        if self.settings.lmtp:
            return [reply] * len(transaction.recipients)
        return reply


class _RefusedChunk(ChunkReader):
    """A BDAT chunk we must read to stay in sync with the client, then refuse."""

    def __init__(self, size: int, refusal: R.Reply) -> None:
        super().__init__(size, lambda data: None, LineChecker(), last=True)
        self.refusal = refusal


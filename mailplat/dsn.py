"""Delivery status notifications (RFC 3461/3464): who gets one, what it says, how it is queued.

A DSN is an ordinary message from ``<>`` to the original sender, written through the one spool
into the one queue (``Notifier.send``), so it is as durable as any other mail and is retried
the same way. Its body is a ``multipart/report; report-type=delivery-status`` built with the
stdlib ``email`` package; the original message is streamed from the queue file in a thread and
never held in memory, and it is only included whole for failures, when the sender did not ask
for headers only (RET=HDRS), and when it is small enough.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.utils import formatdate
from typing import IO, Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from mailplat.envelope import Envelope, Recipient, SessionInfo, Transaction
from mailplat.groupsync import RunInThread
from mailplat.interfaces import IIncomingMessage, IStoredMessage
from mailplat.replies import Reply

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"

CHUNK = 1 << 16
HEADER_LIMIT = 256 * 1024  # what we copy of an original header section at most

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Mail Relay Report",
}
LOG_KINDS = {
    FAILED: "non-delivery",
    DELAYED: "delay",
    DELIVERED: "delivery status",
    RELAYED: "delivery status",
}
_EXPLANATIONS = {
    FAILED: "Your message could not be delivered to the recipients listed below; the mail\n"
    "system has given up. The reasons are shown with each recipient. The original\n"
    "message, or its header, is attached.",
    DELAYED: "Your message has not yet been delivered to the recipients listed below. This is\n"
    "only a warning: you do not need to send it again. The mail system keeps trying\n"
    "until {until}, and will tell you if it gives up.",
    DELIVERED: "Your message was delivered to the recipients listed below, as you asked.",
    RELAYED: "Your message was passed on to another mail system for the recipients listed\n"
    "below. That system may not report delivery status, so you may hear nothing more.",
}


@dataclass(frozen=True)
class PassedOn(Reply):
    """A 2xx an agent may return when the next hop accepted our NOTIFY/ORCPT (it announced
    DSN): that MTA reports from now on, so we send no "relayed" DSN (RFC 3461 §5.2.2)."""


class NotificationError(Exception):
    """The DSN could not be queued; the queue keeps it owed and tries again later."""


def wants(recipient: Recipient, action: str) -> bool:
    """Does this recipient's NOTIFY (RFC 3461 §4.1) ask for a DSN with ``action``?

    Without NOTIFY, failures and delays are reported and successes are not.
    """
    notify = {word.upper() for word in recipient.notify}
    if "NEVER" in notify:
        return False
    if action == FAILED:
        return not notify or "FAILURE" in notify
    if action == DELAYED:
        return not notify or "DELAY" in notify
    return "SUCCESS" in notify


@dataclass(frozen=True)
class Report:
    """Everything a DSN says, besides the original message."""

    envelope: Envelope
    action: str
    recipients: tuple[Recipient, ...]
    hostname: str
    queue_id: str  # the DSN's own queue id, for its Message-ID
    now: float
    retry_until: float | None = None
    full_limit: int = 1 << 20

    @property
    def utf8(self) -> bool:
        """RFC 6533 types when the original needed SMTPUTF8."""
        return self.envelope.smtputf8

    @property
    def returns_full(self) -> bool:
        """The whole original goes back only with a failure, and only a modest one."""
        env = self.envelope
        return (
            self.action == FAILED
            and (env.ret or "FULL").upper() == "FULL"
            and env.size <= self.full_limit
            and (env.body or "").upper() != "BINARYMIME"
        )

    @property
    def eight_bit(self) -> bool:
        return self.utf8 or (self.returns_full and (self.envelope.body or "").upper() == "8BITMIME")


def _date(when: float) -> str:
    return formatdate(when, localtime=False, usegmt=True)


def _ascii(text: str) -> str:
    """message/delivery-status is ASCII; replace anything else rather than break the part."""
    return text.encode("ascii", "replace").decode("ascii")


def _unchanged(text: str) -> str:
    return text


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def human_part(report: Report) -> MIMEPart:
    """The first part: what happened, in words, with one line per recipient."""
    until = _date(report.retry_until) if report.retry_until else "the message expires"
    lines = [
        f"This is the mail system at host {report.hostname}.",
        "",
        _EXPLANATIONS[report.action].format(until=until),
        "",
    ]
    for recipient in report.recipients:
        reason = recipient.last_reply or ""
        lines.append(f"<{recipient.address}>: {reason}".rstrip(": "))
    text = "\n".join(lines) + "\n"
    part = MIMEPart(policy=policy.SMTP)
    # Quoted-printable keeps a non-ASCII address readable without needing 8BITMIME.
    part.set_content(text, charset="utf-8", cte=None if text.isascii() else "quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def message_fields(report: Report) -> Message:
    """The per-message block of RFC 3464 §2.2."""
    env, block = report.envelope, Message(policy=policy.SMTP)
    block["Reporting-MTA"] = f"dns; {report.hostname}"
    if env.envid:
        block["Original-Envelope-Id"] = _ascii(env.envid)
    session = env.session
    if session.helo:
        peer = f" ([{session.peer_host}])" if session.peer_host else ""
        block["Received-From-MTA"] = _ascii(f"dns; {session.helo}{peer}")
    block["Arrival-Date"] = _date(env.received_at)
    return block


def recipient_fields(report: Report, recipient: Recipient) -> Message:
    """One per-recipient block of RFC 3464 §2.3."""
    text = _unchanged if report.utf8 else _ascii
    reply = Reply.parse(recipient.last_reply) if recipient.last_reply else None
    block = Message(policy=policy.SMTPUTF8 if report.utf8 else policy.SMTP)
    if recipient.orcpt:
        block["Original-Recipient"] = text(recipient.orcpt)
    address = recipient.address
    block["Final-Recipient"] = text(f"{_address_type(address)}; {address}")
    block["Action"] = report.action
    block["Status"] = status_of(report.action, reply)
    if reply is not None:
        block["Diagnostic-Code"] = text(f"smtp; {reply}")
    block["Last-Attempt-Date"] = _date(report.now)
    if report.action == DELAYED and report.retry_until:
        block["Will-Retry-Until"] = _date(report.retry_until)
    return block


def status_of(action: str, reply: Reply | None) -> str:
    """The RFC 3463 code of a recipient: the reply's own when it agrees with the action."""
    wanted = {FAILED: "5", DELAYED: "4"}.get(action, "2")
    status = reply.status if reply is not None else None
    if status and status[0] == wanted:
        return status
    if action == FAILED and reply is not None and reply.transient:
        return "5.4.7"  # still failing temporarily when its time ran out: delivery time expired
    return f"{wanted}.0.0"


def status_part(report: Report) -> bytes:
    """The machine-readable part: one block per message, then one per recipient, each block
    serialized by ``email`` (the generator only knows how to join them for the ASCII type)."""
    use = policy.SMTPUTF8 if report.utf8 else policy.SMTP
    subtype = "global-delivery-status" if report.utf8 else "delivery-status"
    encoding = "8bit" if report.utf8 else "7bit"
    blocks = [message_fields(report)] + [recipient_fields(report, r) for r in report.recipients]
    head = f"Content-Type: message/{subtype}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n"
    body = b"".join(block.as_bytes(policy=use) for block in blocks)
    return head.encode("ascii") + body[:-2]  # blank lines between blocks, none after the last


def top_headers(report: Report, boundary: str) -> bytes:
    """The DSN's own header section (RFC 3834 Auto-Submitted: so vacation replies stay quiet)."""
    use = policy.SMTPUTF8 if report.utf8 else policy.SMTP
    top = EmailMessage(policy=use)
    top["From"] = f"Mail Delivery System <MAILER-DAEMON@{report.hostname}>"
    top["To"] = report.envelope.sender
    top["Subject"] = SUBJECTS[report.action]
    top["Date"] = _date(report.now)
    top["Message-ID"] = f"<{report.queue_id}.dsn@{report.hostname}>"
    top["Auto-Submitted"] = "auto-replied"
    top["MIME-Version"] = "1.0"
    top["Content-Type"] = (
        f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
    )
    data = top.as_bytes(policy=use)
    return data[: data.index(b"\r\n\r\n") + 4]


def report_chunks(report: Report, original: IO[bytes]) -> Iterator[bytes]:
    """The whole DSN, in chunks; blocking reads of ``original``, so run it in a thread."""
    boundary = f"=_mailplat_{uuid.uuid4().hex}"
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    yield top_headers(report, boundary)
    yield b"This is a MIME-encapsulated message (RFC 3464 delivery status notification).\r\n"
    yield delimiter + human_part(report).as_bytes(policy=policy.SMTP)
    yield delimiter + status_part(report)
    yield delimiter + _original_part_header(report)
    if report.returns_full:
        yield from iter(lambda: original.read(CHUNK), b"")
    else:
        yield header_section(original)
    yield f"\r\n--{boundary}--\r\n".encode("ascii")


def _original_part_header(report: Report) -> bytes:
    if report.returns_full:
        kind = "message/global" if report.utf8 else "message/rfc822"
    else:
        kind = "message/global-headers" if report.utf8 else "text/rfc822-headers"
    encoding = "8bit" if report.eight_bit else "7bit"
    return (
        f"Content-Type: {kind}\r\nContent-Description: Undelivered Message"
        f"{' Headers' if not report.returns_full else ''}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii")


def header_section(source: IO[bytes]) -> bytes:
    """The header section of a stored message (up to HEADER_LIMIT), ending with its CRLF."""
    data = source.read(HEADER_LIMIT)
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data


class Notifier:
    """Builds DSNs and injects them into the queue through the spool, from ``<>``."""

    def __init__(
        self,
        spool: Any,
        hostname: str,
        runInThread: RunInThread,
        full_limit: int = 1 << 20,
    ) -> None:
        self.spool = spool
        self.hostname = hostname
        self.run = runInThread
        self.full_limit = full_limit

    def send(
        self,
        message: IStoredMessage,
        action: str,
        recipients: Sequence[Recipient],
        retry_until: float | None = None,
    ) -> "Deferred[str]":
        """Queue one DSN about ``recipients``; fires with its queue id once it is durable."""
        envelope: Envelope = message.envelope
        if not envelope.sender:
            raise NotificationError("never notify the null sender <>")
        transaction = Transaction(
            sender="",
            recipients=[Recipient(envelope.sender, notify=("NEVER",))],
            smtputf8=envelope.smtputf8 or not envelope.sender.isascii(),
        )
        try:
            incoming = self.spool.begin(SessionInfo(protocol="LOCAL", listener="dsn"), transaction)
        except Exception:
            return fail()
        report = Report(
            envelope, action, tuple(recipients), self.hostname, incoming.queue_id,
            self.spool.reactor.seconds(), retry_until, self.full_limit,
        )
        if report.eight_bit:
            transaction.body = "8BITMIME"
        d = self.run(_write_report, incoming, report, message)
        d.addCallback(lambda _: incoming.finish(transaction))
        d.addCallbacks(_queued, _abort, callbackArgs=(incoming,), errbackArgs=(incoming,))
        return d


def _write_report(incoming: IIncomingMessage, report: Report, message: IStoredMessage) -> None:
    """Blocking: stream the report into the spool file."""
    with message.open() as original:
        for chunk in report_chunks(report, original):
            incoming.write(chunk)


def _queued(replies: list[Reply], incoming: IIncomingMessage) -> str:
    if not replies or not replies[0].positive:
        raise NotificationError(f"the spool refused the DSN: {replies[0] if replies else None}")
    return str(incoming.queue_id)


def _abort(failure: Failure, incoming: IIncomingMessage) -> Failure:
    incoming.abort()
    return failure


__all__ = [
    "DELAYED",
    "DELIVERED",
    "FAILED",
    "RELAYED",
    "NotificationError",
    "Notifier",
    "PassedOn",
    "Report",
    "report_chunks",
    "wants",
]

"""Delivery status notifications (RFC 3461 NOTIFY, RFC 3464 format), parsed back with email."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailplat import dsn
from mailplat.envelope import Envelope, Recipient, SessionInfo
from mailplat.interfaces import SpoolError
from mailplat.queue import StoredMessage
from mailplat.replies import Reply
from mailplat.spool import Spool
from mailplat.store import INCOMING, QueueStore
from mailplat.testing import run_synchronously

ORIGINAL = (
    b"Received: from client.test by mx.test\r\n"
    b"From: Alice <alice@example.org>\r\nSubject: the report\r\n"
    b"Message-ID: <orig@example.org>\r\n\r\nbody line 1\r\nbody line 2\r\n"
)
ARRIVED = 1_700_000_000.0
SESSION = SessionInfo(peer_host="192.0.2.7", helo="client.test", protocol="ESMTP")


def parse(data: bytes) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(data, policy=email.policy.default))


class WantsTests(SynchronousTestCase):
    def test_notify_rules(self) -> None:
        """NOTIFY decides: none means failures and delays, NEVER means nothing, SUCCESS adds
        delivered/relayed reports (RFC 3461 §4.1)."""
        cases: dict[tuple[str, ...], set[str]] = {
            (): {"failed", "delayed"},
            ("NEVER",): set(),
            ("SUCCESS",): {"delivered", "relayed"},
            ("FAILURE",): {"failed"},
            ("DELAY",): {"delayed"},
            ("SUCCESS", "FAILURE", "DELAY"): {"failed", "delayed", "delivered", "relayed"},
        }
        actions = ("failed", "delayed", "delivered", "relayed")
        for notify, expected in cases.items():
            got = {a for a in actions if dsn.wants(Recipient("b@x.test", notify=notify), a)}
            self.assertEqual(got, expected, notify)


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(ARRIVED + 3600)
        self.store = QueueStore(self.mktemp(), runInThread=run_synchronously)
        self.committed: list[Envelope] = []
        self.spool = Spool(self.store, None, self.committed.append, self.clock, run_synchronously)
        self.notifier = dsn.Notifier(self.spool, "mx.test", run_synchronously, full_limit=4096)

    def original(self, data: bytes = ORIGINAL, **fields: Any) -> StoredMessage:
        qid = self.store.new_queue_id()
        with self.store.open_data_for_write(qid) as f:
            f.write(data)
        rcpts = (
            Recipient("bob@example.com", orcpt="rfc822;Bob@Example.COM", state="bounced",
                      last_reply="550 5.1.1 No such user"),
            Recipient("carol@example.net", state="bounced",
                      last_reply="451 4.4.1 Connection timed out"),
        )
        values: dict[str, Any] = dict(sender="alice@example.org", recipients=rcpts,
                                      received_at=ARRIVED, size=len(data), envid="ENV-42",
                                      session=SESSION)
        values.update(fields)
        return StoredMessage(Envelope(qid, **values), self.store.data_path(qid))

    def send(self, message: StoredMessage, action: str = "failed", **kwargs: Any) -> EmailMessage:
        qid = self.successResultOf(self.notifier.send(
            message, action, message.envelope.recipients, **kwargs))
        self.clock.advance(0)
        with open(self.store.data_path(qid), "rb") as f:
            self.raw = f.read()
        return parse(self.raw)

    def blocks(self, report: EmailMessage) -> list[Message]:
        part = report.get_payload()[1]
        return cast(list[Message], part.get_payload())

    def test_failure_report_fields(self) -> None:
        """A failure DSN is multipart/report with the human part, a delivery-status part whose
        fields follow RFC 3464 for each recipient, and the whole original message."""
        report = self.send(self.original())
        self.assertEqual(report["From"], "Mail Delivery System <MAILER-DAEMON@mx.test>")
        self.assertEqual(report["To"], "alice@example.org")
        self.assertEqual(report["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(report["Auto-Submitted"], "auto-replied")
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        human, status, returned = report.get_payload()
        self.assertEqual(human.get_content_type(), "text/plain")
        self.assertIn("<bob@example.com>: 550 5.1.1 No such user", human.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        per_message, bob, carol = self.blocks(report)
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(per_message["Original-Envelope-Id"], "ENV-42")
        self.assertEqual(per_message["Received-From-MTA"], "dns; client.test ([192.0.2.7])")
        arrival = parsedate_to_datetime(per_message["Arrival-Date"])
        self.assertEqual(arrival.timestamp(), ARRIVED)
        self.assertEqual(bob["Original-Recipient"], "rfc822;Bob@Example.COM")
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.com")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        self.assertIsNotNone(parsedate_to_datetime(bob["Last-Attempt-Date"]))
        self.assertIsNone(carol["Original-Recipient"])
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertEqual(returned.get_payload()[0].as_bytes(policy=email.policy.SMTP), ORIGINAL)

    def test_expired_temporary_failure_status(self) -> None:
        """A recipient that was still failing temporarily when its time ran out is reported
        as failed with 5.4.7 (delivery time expired) and the last reply as diagnostic."""
        report = self.send(self.original())
        carol = self.blocks(report)[2]
        self.assertEqual((carol["Action"], carol["Status"]), ("failed", "5.4.7"))
        self.assertEqual(carol["Diagnostic-Code"], "smtp; 451 4.4.1 Connection timed out")

    def test_ret_hdrs_returns_headers_only(self) -> None:
        """RET=HDRS returns the original header section as text/rfc822-headers."""
        report = self.send(self.original(ret="HDRS"))
        returned = report.get_payload()[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        headers = returned.get_payload(decode=True)
        self.assertEqual(headers, ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2])
        self.assertNotIn(b"body line", report.as_bytes())

    def test_large_message_returns_headers_only(self) -> None:
        """A message larger than the limit comes back as headers only, even with RET=FULL."""
        big = ORIGINAL + b"x" * 78 + b"\r\n" * 100 + (b"y" * 78 + b"\r\n") * 100
        report = self.send(self.original(big, ret="FULL"))
        self.assertEqual(report.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"yyyy", report.as_bytes())

    def test_delay_report(self) -> None:
        """A delay DSN says "delayed" with a 4.x.x status and until when we keep trying, and
        carries only the headers."""
        message = self.original()
        message.envelope = Envelope(**{**message.envelope.__dict__, "recipients": (
            Recipient("bob@example.com", state="deferred", last_reply="451 4.2.0 Try again"),)})
        report = self.send(message, "delayed", retry_until=ARRIVED + 5 * 86400)
        self.assertEqual(report["Subject"], "Delayed Mail (still being retried)")
        bob = self.blocks(report)[1]
        self.assertEqual((bob["Action"], bob["Status"]), ("delayed", "4.2.0"))
        until = parsedate_to_datetime(bob["Will-Retry-Until"])
        self.assertEqual(until.timestamp(), ARRIVED + 5 * 86400)
        self.assertEqual(report.get_payload()[2].get_content_type(), "text/rfc822-headers")

    def test_delivered_report(self) -> None:
        """A success DSN says "delivered" with status 2.0.0 and returns headers only."""
        message = self.original()
        message.envelope = Envelope(**{**message.envelope.__dict__, "recipients": (
            Recipient("bob@example.com", state="delivered", notify=("SUCCESS",),
                      last_reply="250 2.0.0 delivered to maildir"),)})
        report = self.send(message, "delivered")
        bob = self.blocks(report)[1]
        self.assertEqual((bob["Action"], bob["Status"]), ("delivered", "2.0.0"))
        self.assertEqual(report.get_payload()[2].get_content_type(), "text/rfc822-headers")

    def test_utf8_uses_global_types(self) -> None:
        """A message that needed SMTPUTF8 gets RFC 6533 types and utf-8 addresses."""
        message = self.original(smtputf8=True, recipients=(
            Recipient("jürgen@example.com", state="bounced", last_reply="550 5.1.1 Unknown"),))
        report = self.send(message)
        status, returned = report.get_payload()[1:]
        self.assertEqual(status.get_content_type(), "message/global-delivery-status")
        self.assertIn("\r\nFinal-Recipient: utf-8; jürgen@example.com\r\n".encode(), self.raw)
        self.assertEqual(returned.get_content_type(), "message/global")
        self.assertTrue(self.committed[-1].smtputf8)

    def test_injected_as_null_sender_message(self) -> None:
        """The DSN is committed through the spool from <> to the original sender, who gets
        no DSN about the DSN (NOTIFY=NEVER)."""
        self.send(self.original())
        [envelope] = self.committed
        self.assertEqual(envelope.sender, "")
        self.assertEqual([(r.address, r.notify) for r in envelope.recipients],
                         [("alice@example.org", ("NEVER",))])
        self.assertEqual(self.store.list_ids(INCOMING), [envelope.queue_id])

    def test_null_sender_is_refused(self) -> None:
        """The notifier itself refuses to notify <> (never bounce a bounce)."""
        with self.assertRaises(dsn.NotificationError):
            self.notifier.send(self.original(sender=""), "failed", [])

    def test_spool_failure_leaves_nothing(self) -> None:
        """When the spool cannot take the DSN the Deferred fails and no file is left."""
        message = self.original()

        def full(*args: object) -> None:
            raise SpoolError(Reply(452, "4.3.1", "full"))

        self.patch(self.spool.store, "open_data_for_write", full)
        self.failureResultOf(self.notifier.send(message, "failed", []), SpoolError)
        self.assertEqual(self.store.list_ids(INCOMING), [])

    def test_status_of(self) -> None:
        """The status code agrees with the action, falling back to a generic class code."""
        self.assertEqual(dsn.status_of("failed", Reply(550, "5.7.1", "no")), "5.7.1")
        self.assertEqual(dsn.status_of("failed", Reply(550, None, "no")), "5.0.0")
        self.assertEqual(dsn.status_of("delayed", Reply(451, "4.4.1", "x")), "4.4.1")
        self.assertEqual(dsn.status_of("delivered", None), "2.0.0")

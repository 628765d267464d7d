"""The assembled MailServer, in-process on the real reactor, spoken to over loopback sockets.

Each test builds the server from a throwaway TOML config (the same one the daemon tests run
with) and drives smtplib in a thread, so the reactor keeps serving while the client blocks.
"""

from __future__ import annotations

import os
import smtplib
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.daemon import HOST, Daemon, delivered_body, read_reply, wait_for_files, wait_until

T = TypeVar("T")
MESSAGE = b"Subject: in-process\r\nMessage-Id: <server@localhost>\r\n\r\n.dot\r\nbody\r\n"


class ServerTestCase(TestCase):
    listeners: dict[str, Any] = {"smtp": "relay"}
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp(), listeners=self.listeners, config=self.config)
        self.server = self.daemon.in_process(self)

    def in_thread(self, client: Callable[[], T]) -> "Deferred[T]":
        return deferToThread(client)

    def smtp(self, port: int | None = None) -> smtplib.SMTP:
        return smtplib.SMTP(HOST, port or self.daemon.port, local_hostname="client.test",
                            timeout=10)


class AssemblyTests(ServerTestCase):
    listeners = {"smtp": "relay", "second": "relay"}

    def test_listeners_share_one_spool_and_queue(self) -> None:
        """Every listener's sessions write into the server's one spool, and both ports
        deliver through the one queue."""
        factories = [self.server.listeners[name].factory for name in self.listeners]
        self.assertEqual({id(f.sink) for f in factories}, {id(self.server.spool)})

        def client() -> None:
            for user, name in (("una", "smtp"), ("vic", "second")):
                with self.smtp(self.daemon.ports[name]) as smtp:
                    self.assertEqual(smtp.sendmail("a@localhost", [f"{user}@localhost"], MESSAGE), {})
                [path] = wait_for_files(self.daemon.maildir(user), 1)
                self.assertEqual(delivered_body(path), MESSAGE)

        return self.in_thread(client)

    def test_received_header_names_the_queue_id(self) -> None:
        """The Received: field names the client's HELO and address, our host name, the
        protocol, the queue id from the 250 reply and the single recipient."""

        def client() -> None:
            with self.smtp() as smtp:
                smtp.ehlo()
                smtp.mail("a@localhost")
                smtp.rcpt("walt@localhost")
                code, text = smtp.data(MESSAGE)
            self.assertEqual(code, 250)
            queue_id = text.decode().rsplit(" ", 1)[1]
            [path] = wait_for_files(self.daemon.maildir("walt"), 1)
            with open(path, "rb") as f:
                head = f.read(400).decode()
            self.assertRegex(head, r"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
                             rf"\tby mx\.test \(mailplat\) with ESMTP id {queue_id}\r\n"
                             r"\tfor <walt@localhost>;\r\n\t[A-Z][a-z]{2}, \d")

        return self.in_thread(client)

    def test_stop_closes_every_listener(self) -> None:
        """After stopService no listener accepts connections any more."""
        d = self.server.stopService()

        def refused(_: object) -> None:
            for port in self.daemon.ports.values():
                self.assertRaises(ConnectionRefusedError, socket.create_connection,
                                  (HOST, port), 2)

        return d.addCallback(refused)


class LimitTests(ServerTestCase):
    config = {"limits": {"message_size": "10K", "recipients": 2, "received_headers": 3}}

    def test_size_limit_from_config(self) -> None:
        """EHLO announces the configured SIZE; a larger SIZE= is refused at MAIL and a larger
        message at the end of data, with 552 5.3.4; nothing is delivered or left queued."""
        big = b"Subject: big\r\n\r\n" + b"0123456789" * 1100 + b"\r\n"

        def client() -> None:
            with self.smtp() as smtp:
                smtp.ehlo()
                self.assertEqual(smtp.esmtp_features["size"], "10240")
                self.assertEqual(smtp.mail("a@localhost", ["SIZE=20000"])[0], 552)
                smtp.mail("a@localhost")
                smtp.rcpt("xena@localhost")
                code, text = smtp.data(big)
                self.assertEqual((code, text[:5]), (552, b"5.3.4"))
                self.assertEqual(smtp.noop()[0], 250)
            self.assertEqual(self.daemon.queue_files(), [])

        return self.in_thread(client).addCallback(self.nothing_delivered, "xena")

    def test_recipient_limit_from_config(self) -> None:
        """The third recipient gets 452 4.5.3 with recipients = 2; the first two get mail."""

        def client() -> None:
            with self.smtp() as smtp:
                refused = smtp.sendmail("a@localhost", ["r1@localhost", "r2@localhost",
                                                        "r3@localhost"], MESSAGE)
            self.assertEqual(refused, {"r3@localhost": (452, b"4.5.3 Too many recipients")})
            for user in ("r1", "r2"):
                wait_for_files(self.daemon.maildir(user), 1)

        return self.in_thread(client).addCallback(self.nothing_delivered, "r3")

    def test_mail_loop_refused(self) -> None:
        """More Received: fields than received_headers allows: 554 5.4.6 after the data."""
        looped = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 4 + MESSAGE

        def client() -> None:
            with self.smtp() as smtp:
                smtp.ehlo()
                smtp.mail("a@localhost")
                smtp.rcpt("yves@localhost")
                self.assertEqual(smtp.data(looped)[:1], (554,))

        return self.in_thread(client).addCallback(self.nothing_delivered, "yves")

    def nothing_delivered(self, _: object, user: str) -> None:
        self.assertFalse(os.path.exists(self.daemon.maildir(user)))


class ContentTests(ServerTestCase):
    config = {"domains": {"example.org": {"users": ["alice"]}}}

    def test_bare_lf_refused_and_session_goes_on(self) -> None:
        """A message with a bare LF is read to its end, refused with 550 5.6.0, never
        delivered, and the next command works (no smuggling through the lone LF)."""
        smuggled = (b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<evil@localhost>\r\n"
                    b"RCPT TO:<zoe@localhost>\r\nDATA\r\nsmuggled\r\n.\r\n")

        def client() -> list[str]:
            with socket.create_connection((HOST, self.daemon.port), timeout=10) as sock:
                replies = sock.makefile("rb")
                read_reply(replies)
                sock.sendall(b"EHLO client.test\r\n")
                read_reply(replies)
                sock.sendall(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<zoe@localhost>\r\nDATA\r\n")
                heads = [read_reply(replies)[0] for _ in range(3)]
                sock.sendall(smuggled + b"NOOP\r\n")
                final = read_reply(replies)
                self.assertEqual(read_reply(replies)[0], 250)
                sock.sendall(b"QUIT\r\n")
                read_reply(replies)
            return [*map(str, heads), f"{final[0]} {final[1][-1][:5].decode()}"]

        d = self.in_thread(client)
        d.addCallback(self.assertEqual, ["250", "250", "354", "550 5.6.0"])
        return d.addCallback(lambda _: self.assertEqual(self.daemon.queue_files(), []))

    def test_users_and_postmaster(self) -> None:
        """A listed user gets mail, an unlisted one 550 5.1.1, and postmaster@ (which always
        exists) is the first listed user: one copy for both recipients of that Maildir."""

        def client() -> None:
            with self.smtp() as smtp:
                refused = smtp.sendmail("a@localhost", ["alice@example.org", "bob@example.org",
                                                        "Postmaster@example.org"], MESSAGE)
            self.assertEqual(refused, {"bob@example.org": (550, b"5.1.1 User unknown")})
            wait_until(lambda: not self.daemon.queue_files(), 10, "the queue to empty")
            paths = wait_for_files(self.daemon.maildir("alice", "example.org"), 1)
            self.assertEqual([delivered_body(p) for p in paths], [MESSAGE])

        return self.in_thread(client)


class TimeoutTests(ServerTestCase):
    config = {"limits": {"command_timeout": 1}}

    def test_idle_client_gets_421_and_is_disconnected(self) -> None:
        """A client silent for longer than command_timeout gets 421 4.4.2 and is closed."""

        def client() -> tuple[int, bytes]:
            with socket.create_connection((HOST, self.daemon.port), timeout=10) as sock:
                replies = sock.makefile("rb")
                read_reply(replies)
                code, texts = read_reply(replies)
                wait_until(lambda: replies.read(1) == b"", 5, "the server to close")
                return code, texts[0][:5]

        return self.in_thread(client).addCallback(self.assertEqual, (421, b"4.4.2"))


"""Python's smtplib (and raw sockets) against the real daemon: every message must reach the
Maildir byte for byte, apart from the Received: field mailplat prepends."""

from __future__ import annotations

import hashlib
import os
import smtplib
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import HOST, Daemon, delivered_body, read_reply, received_length, wait_for_files

# Lines that need dot-stuffing, a lone "." line, long and empty lines, trailing spaces.
MESSAGE = (
    b"From: Alice <alice@localhost>\r\n"
    b"To: Bob <bob@localhost>\r\n"
    b"Subject: interop\r\n"
    b"Message-Id: <interop-1@localhost>\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"\r\n"
    b"trailing space \r\n" + b"x" * 998 + b"\r\n"
    b"last line\r\n"
)
BIG_SIZE = 50 * 1000 * 1000


class SmtplibTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = Daemon.started(self)

    def smtp(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP(HOST, self.daemon.port, local_hostname="client.test", timeout=30)
        self.addCleanup(smtp.close)
        return smtp

    def assertDelivered(self, user: str, expected: bytes) -> str:
        """Exactly one message in ``user``'s Maildir and it is ``expected`` after our header."""
        [path] = wait_for_files(self.daemon.maildir(user), 1)
        self.assertEqual(delivered_body(path), expected)
        return path

    def test_ehlo_announces_extensions(self) -> None:
        """EHLO lists PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING and ENHANCEDSTATUSCODES."""
        smtp = self.smtp()
        code, _ = smtp.ehlo()
        self.assertEqual(code, 250)
        for keyword in ("pipelining", "8bitmime", "smtputf8", "chunking", "enhancedstatuscodes"):
            self.assertTrue(smtp.has_extn(keyword), keyword)
        self.assertEqual(smtp.esmtp_features["size"], str(64 * 1024 * 1024))

    def test_sendmail_byte_for_byte_to_two_recipients(self) -> None:
        """sendmail's dot-stuffed message reaches both Maildirs exactly as given."""
        refused = self.smtp().sendmail("alice@localhost", ["bob@localhost", "carol@localhost"],
                                       MESSAGE)
        self.assertEqual(refused, {})
        self.assertDelivered("bob", MESSAGE)
        self.assertDelivered("carol", MESSAGE)

    def test_pipelined_transaction_replies_in_order(self) -> None:
        """MAIL, three RCPTs (one refused as relaying) and DATA sent in one write are answered
        in order, and the message and QUIT sent in one write too."""
        with socket.create_connection((HOST, self.daemon.port), timeout=10) as sock:
            replies = sock.makefile("rb")
            self.assertEqual(read_reply(replies)[0], 220)
            sock.sendall(b"EHLO client.test\r\n")
            self.assertIn(b"PIPELINING", read_reply(replies)[1])
            sock.sendall(b"MAIL FROM:<alice@localhost>\r\nRCPT TO:<dave@localhost>\r\n"
                         b"RCPT TO:<victim@example.com>\r\nRCPT TO:<erin@localhost>\r\nDATA\r\n")
            heads = [_head(read_reply(replies)) for _ in range(5)]
            self.assertEqual(heads, ["250 2.1.0", "250 2.1.5", "554 5.7.1", "250 2.1.5", "354"])
            sock.sendall(_stuffed(MESSAGE) + b".\r\nQUIT\r\n")
            self.assertEqual([_head(read_reply(replies)) for _ in range(2)],
                             ["250 2.0.0", "221 2.0.0"])
        self.assertDelivered("dave", MESSAGE)
        self.assertDelivered("erin", MESSAGE)

    def test_bdat_chunks(self) -> None:
        """BDAT chunks split between CR and LF and inside a dot line arrive unaltered (no
        dot-unstuffing in BDAT), whether the last chunk has data or is "BDAT 0 LAST"."""
        cuts = [0, MESSAGE.index(b"\r\n") + 1, MESSAGE.index(b"..two") + 1, len(MESSAGE) - 3,
                len(MESSAGE)]
        chunks = [MESSAGE[start:end] for start, end in zip(cuts, cuts[1:])]
        for user, sent in (("frank", chunks), ("fred", chunks + [b""])):
            smtp = self.smtp()
            smtp.ehlo()
            self.assertEqual(smtp.mail("alice@localhost")[0], 250)
            self.assertEqual(smtp.rcpt(f"{user}@localhost")[0], 250)
            for number, chunk in enumerate(sent, 1):
                smtp.putcmd("BDAT", f"{len(chunk)}{' LAST' if number == len(sent) else ''}")
                smtp.send(chunk)
                code, text = smtp.getreply()
                self.assertEqual(code, 250, text)
            self.assertIn(b"queued as", text)
            self.assertDelivered(user, MESSAGE)

    def test_smtputf8_address(self) -> None:
        """A UTF-8 local part with SMTPUTF8 is delivered to a Maildir of that UTF-8 name."""
        message = "From: søren@localhost\r\nSubject: Grüße\r\n\r\nÆble, ½ kg\r\n".encode()
        refused = self.smtp().sendmail("søren@localhost", ["jörg@localhost"], message,
                                       mail_options=["SMTPUTF8"])
        self.assertEqual(refused, {})
        path = self.assertDelivered("jörg", message)
        self.assertIn("jörg", os.listdir(os.path.join(self.daemon.maildir_root, "localhost")))
        with open(path, "rb") as f:
            head = f.read(4096)
        received = head[: received_length(head)]
        self.assertIn("with UTF8SMTP".encode(), received)
        self.assertIn("for <jörg@localhost>".encode(), received)

    def test_8bitmime_body(self) -> None:
        """An 8-bit body sent with BODY=8BITMIME keeps every octet (all 128..255 values)."""
        eight = bytes(range(128, 256))
        message = (b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin1\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\n" + eight + b"\r\n" + eight[::-1] + b"\r\n")
        refused = self.smtp().sendmail("alice@localhost", ["gina@localhost"], message,
                                       mail_options=["BODY=8BITMIME"])
        self.assertEqual(refused, {})
        self.assertDelivered("gina", message)


class LargeMessageTests(SynchronousTestCase):
    def test_50_megabytes(self) -> None:
        """A 50 MB message, streamed from a file with a SIZE declaration, arrives intact
        (compared by SHA-256) under a configured 60M limit."""
        daemon = Daemon.started(self, config={"limits": {"message_size": "60M"}})
        source = self.mktemp()
        digest = _write_big_message(source, BIG_SIZE)
        smtp = smtplib.SMTP(HOST, daemon.port, local_hostname="client.test", timeout=60)
        self.addCleanup(smtp.close)
        self.assertEqual(smtp.ehlo()[0], 250)
        self.assertEqual(smtp.esmtp_features["size"], str(60 * 1024 * 1024))
        self.assertEqual(smtp.mail("alice@localhost", [f"SIZE={BIG_SIZE}"])[0], 250)
        self.assertEqual(smtp.rcpt("hugo@localhost")[0], 250)
        self.assertEqual(smtp.docmd("DATA")[0], 354)
        with open(source, "rb") as f:
            _stream_stuffed(f, smtp.sock)
        smtp.send(b".\r\n")
        code, text = smtp.getreply()
        self.assertEqual(code, 250, text)
        [path] = wait_for_files(daemon.maildir("hugo"), 1, timeout=30)
        self.assertEqual(_stripped_sha256(path), digest)


def _head(reply: tuple[int, list[bytes]]) -> str:
    """"250 2.1.0" style: the code and the enhanced status code of a reply's last line."""
    code, texts = reply
    status = texts[-1].split(b" ", 1)[0].decode()
    return f"{code} {status}" if status[:1].isdigit() and "." in status else str(code)


def _stuffed(message: bytes) -> bytes:
    """SMTP DATA transparency (RFC 5321 §4.5.2) for a CRLF-terminated message."""
    return b"\r\n".join(b"." + line if line.startswith(b".") else line
                        for line in message.split(b"\r\n"))


def _write_big_message(path: str, size: int) -> str:
    """Write a ``size``-byte message of 1000-octet lines, some starting with a dot, in 1 MB
    pieces; return its SHA-256."""
    digest = hashlib.sha256()
    header = b"Subject: big\r\nMessage-Id: <big@localhost>\r\n\r\n"
    with open(path, "wb") as f:
        f.write(header)
        digest.update(header)
        written, number = len(header), 0
        while written < size:
            lines = []
            for _ in range(1000):
                prefix = b"." if number % 97 == 0 else b"L"
                lines.append(prefix + b"%09d " % number + b"abcdefghij" * 98 + b"\r\n")
                number += 1
            piece = b"".join(lines)[: size - written]
            if written + len(piece) == size and not piece.endswith(b"\r\n"):
                piece = piece[:-2] + b"\r\n"
            f.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


def _stream_stuffed(source: object, sock: socket.socket) -> None:
    """Send a file's lines dot-stuffed, about 1 MB per write, never the whole file in memory."""
    batch: list[bytes] = []
    pending = 0
    for line in source:  # type: ignore[attr-defined]
        if line.startswith(b"."):
            line = b"." + line
        batch.append(line)
        pending += len(line)
        if pending >= 1 << 20:
            sock.sendall(b"".join(batch))
            batch, pending = [], 0
    sock.sendall(b"".join(batch))


def _stripped_sha256(path: str) -> str:
    """SHA-256 of a delivered file minus our Received: field, read 1 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(4096)
        digest.update(head[received_length(head):])
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

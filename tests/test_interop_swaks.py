"""swaks (Debian's /usr/bin/swaks) against the real daemon.

What swaks put on the wire is read back from its transcript (the `` -> `` lines between the 354
reply and the final dot), so every delivery is compared byte for byte with what was sent.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import HOST, Daemon, delivered_body, wait_for_files

SWAKS_TIMEOUT = 30
NO_RCPTS_ACCEPTED = 24  # swaks(1), EXIT CODES
BODY = b"Subject: swaks\r\nX-Test: one\r\n\r\n.leading dot\r\nbody\r\n"


def swaks_path() -> str:
    """The swaks binary; interop tests fail (not skip) when it is missing."""
    path = shutil.which("swaks") or ("/usr/bin/swaks" if os.path.exists("/usr/bin/swaks") else None)
    if path is None:
        raise AssertionError("swaks is not installed (Debian: apt-get install swaks); "
                             "the swaks interop tests need it")
    return path


def sent_data(transcript: str) -> bytes:
    """The message swaks sent, rebuilt from its transcript and un-dot-stuffed."""
    lines = transcript.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354"))
    data = []
    for line in lines[start + 1:]:
        if line == " -> .":
            return "".join(text + "\r\n" for text in data).encode("utf-8")
        if line.startswith(" -> "):
            text = line[4:]
            data.append(text[1:] if text.startswith("..") else text)
    raise AssertionError(f"no end of data in the swaks transcript:\n{transcript}")


class SwaksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.swaks = swaks_path()
        self.daemon = Daemon.started(self)

    def run_swaks(self, *args: str, to: str = "sam@localhost") -> subprocess.CompletedProcess[str]:
        command = [self.swaks, "--server", f"{HOST}:{self.daemon.port}", "--helo", "client.test",
                   "--from", "alice@localhost", "--to", to, "--timeout", "20", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=SWAKS_TIMEOUT,
                              stdin=subprocess.DEVNULL)

    def data_file(self) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(BODY)
        return path

    def assertDeliveredAsSent(self, result: subprocess.CompletedProcess[str], user: str) -> bytes:
        """swaks succeeded and ``user`` got exactly the bytes swaks sent."""
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("<-  250 2.0.0 Ok: queued as ", result.stdout)
        [path] = wait_for_files(self.daemon.maildir(user), 1)
        sent = sent_data(result.stdout)
        self.assertEqual(delivered_body(path), sent)
        return sent

    def test_plain_delivery(self) -> None:
        """A message from a file is delivered as sent (swaks adds one CRLF before the dot)."""
        result = self.run_swaks("--data", "@" + self.data_file())
        sent = self.assertDeliveredAsSent(result, "sam")
        self.assertEqual(sent, BODY + b"\r\n")

    def test_pipeline(self) -> None:
        """With --pipeline swaks sends MAIL, RCPT and DATA at once and gets the three replies
        in order; the message is delivered as sent."""
        result = self.run_swaks("--pipeline", "--data", "@" + self.data_file())
        self.assertIn(" -> MAIL FROM:<alice@localhost>\n -> RCPT TO:<sam@localhost>\n"
                      " -> DATA\n<-  250 2.1.0 Sender OK\n<-  250 2.1.5 Recipient OK\n<-  354 ",
                      result.stdout)
        self.assertDeliveredAsSent(result, "sam")

    def test_attachment(self) -> None:
        """A MIME message with a binary attachment is delivered as sent and the attachment
        decodes to the original bytes."""
        attachment = self.mktemp()
        payload = bytes(range(256)) * 40
        with open(attachment, "wb") as f:
            f.write(payload)
        result = self.run_swaks("--attach", "@" + attachment)
        sent = self.assertDeliveredAsSent(result, "sam")
        message = email.message_from_bytes(sent, policy=email.policy.default)
        parts = [p for p in message.walk() if p.get_content_type() == "application/octet-stream"]
        self.assertEqual([p.get_payload(decode=True) for p in parts], [payload])

    def test_refused_relay(self) -> None:
        """Mail for a foreign domain is refused with 554 5.7.1 at RCPT; swaks exits 24 (no
        recipients accepted) and nothing is queued or delivered."""
        result = self.run_swaks(to="victim@example.com")
        self.assertEqual(result.returncode, NO_RCPTS_ACCEPTED, result.stdout + result.stderr)
        self.assertIn("<** 554 5.7.1 Relay access denied", result.stdout)
        self.assertNotIn(" -> DATA", result.stdout)
        self.assertEqual(self.daemon.queue_files(), [])
        self.assertFalse(os.path.exists(os.path.join(self.daemon.maildir_root, "example.com")))

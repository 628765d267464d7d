"""Fixtures for the ODMR and ETRN tests: accounts, held mail, and an ODMR site.

``SiteProtocol`` is an ODMR customer on a real connection: it speaks the initial ODMR dialogue
line by line (``await site.command(b"ATRN ...")``) and, once it has read "250 ... reversing",
becomes an SMTP server built from our own session engine over a ``MemorySink``, just as
fetchmail hands the reversed connection to its local MTA.
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import Any

from argon2 import PasswordHasher
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from mailplat.envelope import HELD, Envelope, Recipient
from mailplat.session import ESMTPSession, SessionSettings
from mailplat.store import DEFERRED, QueueStore
from mailplat.submission import SubmitterRealm
from mailplat.testing import MemorySink, run_synchronously
from mailplat.turnaround import swap_protocol
from mailplat.userdb import UserDB, UserDBChecker
from tests.support import ScriptedPolicy

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = b"site password"
DATA = b"Subject: held\r\nMessage-ID: <held@example.org>\r\n\r\nfor the site\r\n"
SENDER = "alice@example.org"


def accounts(test: SynchronousTestCase, threads: Any = run_synchronously
             ) -> tuple[Portal, dict[str, bytes], str]:
    """A portal over a users file with ``siteuser`` and ``other``, both with CRAM-MD5
    secrets (returned by name), and the file's path."""
    path = os.path.join(os.path.abspath(test.mktemp()), "users")
    os.makedirs(os.path.dirname(path))
    db = UserDB(path, FAST)
    secrets = {}
    for name in ("siteuser", "other"):
        secret = db.add(name, PASSWORD, cram=True)
        assert secret is not None
        secrets[name] = secret
    return Portal(SubmitterRealm(), [UserDBChecker(db, threads)]), secrets, path


def cram_answer(user: str, secret: bytes, challenge_line: bytes) -> bytes:
    """The client's CRAM-MD5 response line to a "334 <base64 challenge>" line."""
    challenge = base64.b64decode(challenge_line.split(b" ", 1)[1])
    digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
    return base64.b64encode(user.encode() + b" " + digest) + b"\r\n"


def hold(store: QueueStore, *addresses: str, data: bytes = DATA, now: float = 0.0,
         sender: str = SENDER) -> Envelope:
    """A message whose recipients are HELD, as the odmr agent leaves them."""
    qid = store.new_queue_id()
    with store.open_data_for_write(qid) as f:
        f.write(data)
    recipients = tuple(Recipient(a, state=HELD, attempts=1, next_attempt=now + 86400,
                                 agent="odmr") for a in addresses)
    envelope = Envelope(qid, sender, recipients, received_at=now, size=len(data))
    with open(store.envelope_path(qid, DEFERRED), "wb") as f:
        f.write(envelope.to_json())
    return envelope


class SiteSession(ESMTPSession):
    """The site's SMTP server after the turnaround; ``done`` fires when the link closes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.done: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.done.called:
            self.done.callback(None)


class SiteProtocol(Protocol):
    """An ODMR customer: scripted commands first, then an SMTP server on the same link."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.buffer = b""
        self.waiter: Deferred[bytes] | None = None
        self.lost: Deferred[None] = Deferred()
        self.sink = MemorySink()
        self.server: SiteSession | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._deliver()

    def _deliver(self) -> None:
        if self.waiter is None:
            return
        at = 0
        while True:
            end = self.buffer.find(b"\r\n", at)
            if end < 0:
                return
            if self.buffer[at + 3:at + 4] == b" ":
                reply, self.buffer = self.buffer[:end + 2], self.buffer[end + 2:]
                waiter, self.waiter = self.waiter, None
                waiter.callback(reply)
                return
            at = end + 2

    def reply(self) -> Deferred[bytes]:
        """The next complete (possibly multi-line) reply."""
        self.waiter = Deferred()
        waiter = self.waiter
        self._deliver()
        return waiter

    def command(self, line: bytes) -> Deferred[bytes]:
        self.transport.write(line if line.endswith(b"\r\n") else line + b"\r\n")
        return self.reply()

    def become_server(self) -> SiteSession:
        """Turn around: our engine answers from now on, starting with its 220."""
        settings = SessionSettings(hostname="site.test", listener="site")
        self.server = SiteSession(settings, ScriptedPolicy(), self.sink, self.clock)
        swap_protocol(self.transport, self, self.server)
        self.server.makeConnection(self.transport)
        return self.server

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)

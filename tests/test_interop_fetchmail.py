"""Interop with the real ODMR client: Debian's ``fetchmail --protocol ODMR`` against a running
mailplat daemon, relaying the reversed session into a local SMTP server (our own session
engine over a MemorySink, in this test process).

fetchmail's outcomes, as its ODMR driver (odmr.c) maps our RFC 2645 replies:
250 and a clean QUIT exit 0; 453 "You have no mail." also exits 0 (doODMR turns PS_NOMAIL
into success); 450 exits 4 (PS_PROTOCOL); a 535 to its CRAM-MD5 exits 128 (its CRAM-MD5
helper returns the SMTP reader's SM_ERROR as the status, not PS_AUTHFAIL).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from mailplat.envelope import HELD
from mailplat.session import ESMTPFactory, SessionSettings
from mailplat.store import STATES, QueueStore
from mailplat.testing import MemorySink
from mailplat.userdb import UserDB
from tests.daemon import Daemon, read_reply, strip_received, wait_until
from tests.odmr_support import FAST, PASSWORD, cram_answer
from tests.support import ScriptedPolicy

PEER_TIMEOUT = 60
SITES = {"site1.example": ["siteuser"], "site2.example": ["siteuser"],
         "site3.example": ["other"]}


def message(domain: str) -> bytes:
    return (f"From: alice@example.org\r\nTo: user@{domain}\r\nSubject: for {domain}\r\n"
            f"Message-ID: <{domain}@example.org>\r\n\r\nheld for {domain}\r\n"
            f"..a line that starts with a dot\r\n").encode()


class FetchmailTests(TestCase):
    def setUp(self) -> Any:
        self.fetchmail = shutil.which("fetchmail")
        if self.fetchmail is None:
            self.fail("fetchmail is not installed (apt-get install fetchmail); interop needs it")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        users = os.path.join(self.workdir, "users")
        db = UserDB(users, FAST)
        self.secrets = {name: db.add(name, PASSWORD, cram=True) for name in ("siteuser", "other")}
        config = {"auth": {"users_file": users, "failure_delay": 0.1},
                  "odmr": {"domains": {d: {"accounts": a} for d, a in SITES.items()}}}
        self.daemon = Daemon(self.workdir, listeners={"smtp": "relay", "odmr": "odmr"},
                             config=config)
        self.addCleanup(self.daemon.kill)
        self.daemon.start()
        self.sink = MemorySink()
        factory = ESMTPFactory(SessionSettings(hostname="site.test", listener="site"),
                               ScriptedPolicy(), self.sink, global_reactor)
        endpoint = TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1")
        return endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.local_port = port.getHost().port
        self.addCleanup(port.stopListening)

    # -- helpers -------------------------------------------------------------------------

    def send(self, *domains: str) -> None:
        """Mail to each domain through the relay listener, then wait until it is held."""
        with smtplib.SMTP("127.0.0.1", self.daemon.ports["smtp"], timeout=10) as smtp:
            for domain in domains:
                smtp.sendmail("alice@example.org", [f"user@{domain}"], message(domain))
        wait_until(lambda: len(self.held()) >= len(domains), 15, "the mail to be held")

    def held(self) -> list[str]:
        """Every recipient HELD in the daemon's queue."""
        store = QueueStore(self.daemon.queue_dir)
        found = []
        for state in STATES:
            for qid in store.list_ids(state):
                try:
                    envelope = store.read_envelope(qid)[1]
                except (OSError, ValueError):
                    continue
                found += [r.address for r in envelope.recipients if r.state == HELD]
        return sorted(found)

    async def run_fetchmail(self, user: str, secret: bytes, domains: str) -> tuple[int, str]:
        rc = os.path.join(self.workdir, "fetchmailrc")
        with open(os.open(rc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f"poll 127.0.0.1 service {self.daemon.ports['odmr']} protocol ODMR "
                    f"user {user} password {secret.decode()} fetchdomains {domains}\n")
        args = ["--kill-after=5", str(PEER_TIMEOUT), self.fetchmail, "-N", "-v", "-f", rc,
                "--idfile", os.path.join(self.workdir, "fetchids"),
                "--pidfile", os.path.join(self.workdir, "fetchmail.pid"),
                "--smtphost", f"127.0.0.1/{self.local_port}"]
        env = {"HOME": self.workdir, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        out, err, code = await getProcessOutputAndValue(
            shutil.which("timeout") or "timeout", args, env=env, path=self.workdir)
        return code, (out + err).decode("utf-8", "replace")

    def received(self) -> dict[str, bytes]:
        """What the local SMTP server got, by recipient, with both trace fields removed."""
        return {m.transaction.recipients[0].address: strip_received(strip_received(m.data))
                for m in self.sink.messages}

    # -- the tests -----------------------------------------------------------------------

    async def test_two_domains_byte_exact(self) -> None:
        """fetchmail collects site1 and site2 through the ODMR listener and exits 0; the
        messages arrive byte for byte; site3's mail (another account's) stays held."""
        self.send("site1.example", "site2.example", "site3.example")
        code, output = await self.run_fetchmail(
            "siteuser", self.secrets["siteuser"], "site1.example,site2.example")
        self.assertEqual(code, 0, output)
        self.assertIn("Turnaround now", output)
        self.assertEqual(self.received(), {"user@site1.example": message("site1.example"),
                                           "user@site2.example": message("site2.example")})
        self.assertEqual(self.held(), ["user@site3.example"])

    async def test_unowned_domain(self) -> None:
        """Asking for another account's domain: 450, fetchmail exits 4, nothing released."""
        self.send("site1.example", "site3.example")
        code, output = await self.run_fetchmail(
            "siteuser", self.secrets["siteuser"], "site1.example,site3.example")
        self.assertEqual(code, 4, output)
        self.assertIn("ATRN request refused", output)
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.held(), ["user@site1.example", "user@site3.example"])

    async def test_empty_hold(self) -> None:
        """No mail waiting: 453, fetchmail says "You have no mail." and exits 0."""
        code, output = await self.run_fetchmail(
            "siteuser", self.secrets["siteuser"], "site1.example")
        self.assertEqual(code, 0, output)
        self.assertIn("You have no mail", output)
        self.assertEqual(self.sink.messages, [])

    async def test_wrong_password(self) -> None:
        """A wrong CRAM-MD5 secret: 535, fetchmail gives up (exit 128), nothing released."""
        self.send("site1.example")
        code, output = await self.run_fetchmail("siteuser", b"not-the-secret", "site1.example")
        self.assertEqual(code, 128, output)
        self.assertIn("535 5.7.8", output)
        self.assertEqual(self.held(), ["user@site1.example"])

    def atrn(self, domains: bytes) -> tuple[socket.socket, Any]:
        """A raw ODMR session as siteuser up to the reply to ATRN (returned open)."""
        raw = socket.create_connection(("127.0.0.1", self.daemon.ports["odmr"]), 10)
        stream = raw.makefile("rb")
        read_reply(stream)
        for line in (b"EHLO site.test\r\n", b"AUTH CRAM-MD5\r\n"):
            raw.sendall(line)
            code, texts = read_reply(stream)
        raw.sendall(cram_answer("siteuser", self.secrets["siteuser"], b"334 " + texts[0]))
        self.assertEqual(read_reply(stream)[0], 235)
        raw.sendall(b"ATRN " + domains + b"\r\n")
        self.assertEqual(read_reply(stream)[0], 250)
        return raw, stream

    async def test_domain_being_collected(self) -> None:
        """While another connection collects site1, fetchmail gets 451 and gives up."""
        self.send("site1.example")
        raw, stream = self.atrn(b"site1.example")
        try:
            code, output = await self.run_fetchmail(
                "siteuser", self.secrets["siteuser"], "site1.example")
        finally:
            stream.close()
            raw.close()
        self.assertIn("Unable to process ATRN request now", output)
        self.assertEqual(code, 8, output)
        self.assertEqual(self.sink.messages, [])

    async def test_site_drops_after_250(self) -> None:
        """A site that hangs up right after "250 reversing" loses no mail: fetchmail later
        collects it, exactly once."""
        self.send("site1.example")
        raw, stream = self.atrn(b"site1.example")
        stream.close()  # the socket only really closes once its file is closed too
        raw.close()
        wait_until(lambda: "site did not take its mail" in self.daemon.log(), 15,
                   "the daemon to notice the hang-up")
        self.assertEqual(self.held(), ["user@site1.example"])
        code, output = await self.run_fetchmail(
            "siteuser", self.secrets["siteuser"], "site1.example")
        self.assertEqual(code, 0, output)
        self.assertEqual(self.received(), {"user@site1.example": message("site1.example")})
        self.assertEqual(self.held(), [])

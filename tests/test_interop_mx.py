"""Outbound delivery by MX, end to end: a sending mailplat, a DNS server, two kinds of peers.

Everything runs on loopback: a ``twisted.names`` server on 127.0.0.1 answers MX/A/null-MX
records from a dict zone; the MX targets are a second mailplat (127.0.0.2, with a certificate
from a throwaway CA for ``mx1.example.org``) and Postfix's ``smtp-sink`` (127.0.0.3, and a
copy on 127.0.0.5 that answers 4xx to RCPT). The sending mailplat relays for 127.0.0.0/8 and
finds the peers through the test DNS server; its queue events tell each recipient's fate.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailplat.interfaces import IQueueObserver
from mailplat.replies import Reply
from tests.daemon import HOST, Daemon, free_port, wait_for_files, wait_for_port
from tests.dns_support import MX, A, DictAuthority, null_mx, serve_dns
from tests.relay_support import TestCA

SMTP_SINK = "/usr/sbin/smtp-sink"
MAILPLAT_MX, SINK_MX, DEAD_MX, SOFT_MX = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
RECEIVING_DOMAINS = ("pref.example", "verify.example", "wrongcert.example")
ZONE = {
    "mx1.example.org": [A(MAILPLAT_MX)],
    "impostor.example.org": [A(MAILPLAT_MX)],  # same host, but its certificate is not for us
    "sink.example.org": [A(SINK_MX)],
    "dead.example.org": [A(DEAD_MX)],
    "soft.example.org": [A(SOFT_MX)],
    "pref.example": [MX(20, "sink.example.org"), MX(10, "mx1.example.org")],
    "sinkfirst.example": [MX(10, "sink.example.org"), MX(20, "mx1.example.org")],
    "failover.example": [MX(5, "dead.example.org"), MX(10, "sink.example.org")],
    "soft.example": [MX(10, "soft.example.org")],
    "null.example": [null_mx()],
    "verify.example": [MX(10, "mx1.example.org")],
    "wrongcert.example": [MX(10, "impostor.example.org")],
}


@implementer(IQueueObserver)
class Outcomes:
    """Each recipient's latest queue event: (event, reply)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, Reply]] = {}

    def queued(self, envelope: Any) -> None:
        pass

    def delivered(self, envelope: Any, recipient: Any, reply: Reply) -> None:
        self.seen[recipient.address] = ("delivered", reply)

    def deferred(self, envelope: Any, recipient: Any, reply: Reply) -> None:
        self.seen[recipient.address] = ("deferred", reply)

    def bounced(self, envelope: Any, recipient: Any, reply: Reply) -> None:
        self.seen[recipient.address] = ("bounced", reply)


class SmtpSink:
    """Postfix's smtp-sink on ``address:port``, one file per message in ``directory``."""

    def __init__(self, testcase: TestCase, address: str, port: int, *options: str) -> None:
        if not os.access(SMTP_SINK, os.X_OK):
            testcase.fail(f"{SMTP_SINK} is missing: install Debian's postfix package")
        # Outside trial's private temp tree: smtp-sink writes as nobody when started as root.
        self.directory = tempfile.mkdtemp(prefix="mailplat-sink-")
        os.chmod(self.directory, 0o777)
        testcase.addCleanup(shutil.rmtree, self.directory, True)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [SMTP_SINK, *user, "-d", f"{self.directory}/%M.", *options,
                   f"{address}:{port}", "10"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        testcase.addCleanup(self.stop)
        wait_for_port(port, 10, host=address)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def messages(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                out.append(f.read())
        return out


class MXInteropTests(TestCase):
    """The sending mailplat against the DNS server, a mailplat MX and smtp-sink MXes."""

    def setUp(self) -> None:
        self.ca = TestCA(self.make_dir())
        dns_port, dns_number = serve_dns(DictAuthority(ZONE), reactor)
        self.addCleanup(dns_port.stopListening)
        self.port = free_port(MAILPLAT_MX)
        self.receiver = self.receiving_mailplat()
        self.sink = SmtpSink(self, SINK_MX, self.port)
        self.soft = SmtpSink(self, SOFT_MX, self.port, "-r", "RCPT")
        self.sender = Daemon(self.make_dir(), config={
            "relay": {"trusted_networks": ["127.0.0.0/8"]},
            "dns": {"nameservers": [f"127.0.0.1:{dns_number}"], "timeout": 5},
            "agent": {"smtp": {"port": self.port, "ca_file": self.ca.ca_file,
                               "connect_timeout": 5}},
            "tls_policy": {"verify.example": "verify", "wrongcert.example": "verify"},
        })
        server = self.sender.in_process(self)
        self.addCleanup(server.agents["smtp"].close)
        self.outcomes = Outcomes()
        server.queue.observers.append(self.outcomes)

    def make_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def receiving_mailplat(self) -> Daemon:
        """The second mailplat: MX for the receiving domains, certificate for mx1."""
        workdir = self.make_dir()
        cert = self.ca.ca.issue_cert("mx1.example.org")
        cert.cert_chain_pems[0].write_to_path(os.path.join(workdir, "cert.pem"))
        cert.private_key_pem.write_to_path(os.path.join(workdir, "key.pem"))
        endpoint = f"tcp:{self.port}:interface={MAILPLAT_MX}"
        daemon = Daemon(workdir, listeners={"mx": {"profile": "relay", "endpoint": endpoint}},
                        config={
                            "domains": {d: {"users": ["alice"]} for d in RECEIVING_DOMAINS},
                            "tls": {"certificate": os.path.join(workdir, "cert.pem"),
                                    "key": os.path.join(workdir, "key.pem")},
                        })
        server = daemon.in_process(self)
        self.addCleanup(server.agents["smtp"].close)
        return daemon

    def send(self, *recipients: str) -> "Deferred[dict[str, Any]]":
        message = b"Subject: by MX\r\n\r\n.dot-stuffed line\r\nbody\r\n"

        def client() -> dict[str, Any]:
            with smtplib.SMTP(HOST, self.sender.port, timeout=10) as smtp:
                return smtp.sendmail("sender@localhost", list(recipients), message)

        return deferToThread(client)

    async def fates(self, *recipients: str) -> dict[str, tuple[str, str]]:
        """Wait (at most 20 s) until every recipient has an outcome; (event, "code status")."""
        for _ in range(400):
            if all(r in self.outcomes.seen for r in recipients):
                break
            await deferLater(reactor, 0.05)
        return {r: (self.outcomes.seen[r][0], f"{self.outcomes.seen[r][1].code} "
                                              f"{self.outcomes.seen[r][1].status}")
                for r in recipients if r in self.outcomes.seen}

    def mailbox(self, domain: str) -> str:
        return self.receiver.maildir("alice", domain)

    async def test_preference_order(self) -> None:
        """Each domain's most preferred MX gets its mail: the mailplat MX for one domain,
        smtp-sink for the other, whose records are in the opposite order."""
        await self.send("alice@pref.example", "bob@sinkfirst.example")
        fates = await self.fates("alice@pref.example", "bob@sinkfirst.example")
        self.assertEqual({r: f[0] for r, f in fates.items()},
                         {"alice@pref.example": "delivered", "bob@sinkfirst.example": "delivered"})
        [path] = await deferToThread(wait_for_files, self.mailbox("pref.example"), 1)
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(b"\r\n\r\n.dot-stuffed line\r\nbody\r\n"))
        [dump] = self.sink.messages()
        self.assertIn(b"X-Rcpt-Args: <bob@sinkfirst.example>", dump)

    async def test_failover_deferral_and_bounces(self) -> None:
        """A refused connection fails over to the next MX; a 4xx defers; a 5xx from the
        peer and a null MX bounce."""
        await self.send("x@failover.example", "y@soft.example", "nobody@pref.example",
                        "z@null.example")
        fates = await self.fates("x@failover.example", "y@soft.example",
                                 "nobody@pref.example", "z@null.example")
        self.assertEqual(fates, {
            "x@failover.example": ("delivered", "250 2.0.0"),
            "y@soft.example": ("deferred", "450 4.3.0"),
            "nobody@pref.example": ("bounced", "550 5.1.1"),
            "z@null.example": ("bounced", "556 5.1.10"),
        })
        self.assertIn(b"<x@failover.example>", self.sink.messages()[0])
        self.assertEqual(b"".join(self.soft.messages()), b"")  # it opens a file at MAIL

    async def test_starttls_verified_with_test_ca(self) -> None:
        """Under "verify" the certificate from the test CA naming mx1.example.org is
        accepted and the message arrives over TLS (ESMTPS in the peer's Received:)."""
        await self.send("alice@verify.example")
        fates = await self.fates("alice@verify.example")
        self.assertEqual(fates["alice@verify.example"][0], "delivered")
        [path] = await deferToThread(wait_for_files, self.mailbox("verify.example"), 1)
        with open(path, "rb") as f:
            self.assertIn(b"by mx.test (mailplat) with ESMTPS id", f.read())

    async def test_wrong_certificate_refused_under_verify(self) -> None:
        """An MX whose certificate does not name it is refused under "verify": the message
        is deferred (4.7.5) and nothing reaches the peer, not even in the clear."""
        await self.send("alice@wrongcert.example")
        fates = await self.fates("alice@wrongcert.example")
        self.assertEqual(fates["alice@wrongcert.example"], ("deferred", "451 4.7.5"))
        self.assertFalse(os.path.exists(self.mailbox("wrongcert.example")))

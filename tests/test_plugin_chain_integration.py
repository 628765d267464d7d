"""Policy plugins in a running daemon (twistd in a subprocess): greylisting with a real retry,
a DNSBL served by a twisted.names server on loopback, Authentication-Results on delivery."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor, task, threads
from twisted.names import dns, server
from twisted.trial.unittest import TestCase

from mailplat.testing import FakeResolver
from tests.daemon import Daemon, wait_for_files

MESSAGE = b"From: a@example.net\r\nTo: bob@localhost\r\nSubject: hi\r\n\r\nHello\r\n"


def serve_dns(testcase: TestCase, resolver: FakeResolver) -> int:
    """A DNS server on 127.0.0.1 (UDP, a port the OS picks) answering from ``resolver``."""
    factory = server.DNSServerFactory(clients=[resolver])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory),
                             interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return int(port.getHost().port)


def send(port: int) -> dict[str, Any]:
    """Blocking: one message by SMTP; the refused recipients (empty when accepted)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        try:
            return dict(smtp.sendmail("a@example.net", ["bob@localhost"], MESSAGE))
        except smtplib.SMTPRecipientsRefused as refused:
            return dict(refused.recipients)


class PluginChainTests(TestCase):
    timeout = 60

    def daemon(self, order: list[str], dns_port: int, **sections: Any) -> Daemon:
        config = {"plugins": {"order": order}, "dns": {"nameservers": [f"127.0.0.1:{dns_port}"]},
                  "plugin": sections}
        return Daemon.started(self, config=config)

    async def test_greylisted_sender_delivered_after_retry(self) -> None:
        """The first attempt gets 450 4.7.1; a retry after the 1 s delay is accepted and
        delivered, with an Authentication-Results field from the spf plugin on top."""
        port = serve_dns(self, FakeResolver())  # no SPF record anywhere: spf=none
        daemon = self.daemon(["spf", "greylist"], port, greylist={"delay": "1s"})
        refused = await threads.deferToThread(send, daemon.port)
        code, text = refused["bob@localhost"]
        self.assertEqual(code, 450)
        self.assertIn(b"4.7.1 Greylisted", text)
        await task.deferLater(reactor, 1.2, lambda: None)
        self.assertEqual(await threads.deferToThread(send, daemon.port), {})
        [path] = await threads.deferToThread(wait_for_files, daemon.maildir("bob"), 1, 15.0)
        with open(path, "rb") as f:
            delivered = f.read()
        self.assertTrue(delivered.startswith(
            b"Authentication-Results: mx.test;\r\n\tspf=none smtp.mailfrom=a@example.net\r\n"
            b"Received: from "), delivered[:200])
        self.assertTrue(delivered.endswith(MESSAGE))

    async def test_dnsbl_listed_client_refused(self) -> None:
        """A client listed in the test DNSBL gets 554 5.7.1 with the list's TXT text."""
        resolver = FakeResolver()
        resolver.add_a("1.0.0.127.bl.test", "127.0.0.2")
        resolver.add_txt("1.0.0.127.bl.test", "Listed for testing")
        port = serve_dns(self, resolver)
        daemon = self.daemon(["dnsbl"], port, dnsbl={"zones": ["bl.test"]})
        refused = await threads.deferToThread(send, daemon.port)
        code, text = refused["bob@localhost"]
        self.assertEqual(code, 554)
        self.assertEqual(text, b"5.7.1 Service unavailable; client [127.0.0.1] blocked using "
                               b"bl.test; Listed for testing")
        self.assertIn(("1.0.0.127.bl.test", dns.A), resolver.queries)

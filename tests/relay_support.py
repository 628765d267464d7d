"""Receiving SMTP servers on loopback for relay tests, built from mailplat's own engine, and a
test CA (trustme) for STARTTLS.

A ``Receiver`` listens on one 127.0.0.x (or ::1) address, records messages in a MemorySink
with the SessionInfo of the session that sent them (so a test can see whether TLS was on),
answers as a ScriptedPolicy says, and counts connections.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import trustme
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.error import CannotListenError

from mailplat.session import ESMTPFactory, ESMTPSession, SessionSettings
from mailplat.submission import SecureSession, Security, SubmitterRealm
from mailplat.testing import MemorySink
from tests.support import ScriptedPolicy


class CountingFactory(ESMTPFactory):
    """Counts the connections it served."""

    connections = 0

    def buildProtocol(self, addr: Any) -> ESMTPSession:
        self.connections += 1
        return super().buildProtocol(addr)


class NoUTF8Session(ESMTPSession):
    """A peer that does not offer SMTPUTF8 (nor 8BITMIME)."""

    def ehlo_keywords(self) -> list[str]:
        return [k for k in super().ehlo_keywords() if k not in ("SMTPUTF8", "8BITMIME")]


class Receiver:
    """One receiving server; ``tls`` is a server TLS creator (offers STARTTLS), ``users``
    a {name: password} dict (offers AUTH PLAIN/LOGIN after STARTTLS)."""

    def __init__(
        self, reactor: Any, address: str, port: int = 0, tls: Any = None,
        users: dict[bytes, bytes] | None = None, session_class: Any = None,
    ) -> None:
        self.sink = MemorySink()
        self.policy = ScriptedPolicy()
        settings = SessionSettings(hostname=f"rx-{address}")
        if tls is not None or users:
            portal = None
            if users:
                portal = Portal(SubmitterRealm(), [InMemoryUsernamePasswordDatabaseDontUse(**{
                    k.decode(): v for k, v in users.items()})])
            session_class = partial(SecureSession, security=Security(tls=tls, portal=portal))
        self.factory = CountingFactory(settings, self.policy, self.sink, reactor,
                                       session_class or ESMTPSession)
        self.port = reactor.listenTCP(port, self.factory, interface=address)
        self.number = self.port.getHost().port

    @property
    def messages(self) -> list[Any]:
        return self.sink.messages

    def stop(self) -> Any:
        return self.port.stopListening()


def receivers_on_one_port(reactor: Any, addresses: list[str], **options: Any) -> list[Receiver]:
    """Receivers on several loopback addresses sharing one port number (MX targets differ
    by address only, the agent's port being one setting); retried a few times if taken."""
    for _ in range(20):
        first = Receiver(reactor, addresses[0], **options)
        started = [first]
        try:
            for address in addresses[1:]:
                started.append(Receiver(reactor, address, first.number, **options))
        except CannotListenError:
            for receiver in started:
                receiver.stop()
            continue
        return started
    raise RuntimeError("no common free port found")


class TestCA:
    """A throwaway CA; server certificates for any names, and the CA file clients trust."""

    def __init__(self, directory: str) -> None:
        self.ca = trustme.CA()
        self.ca_file = f"{directory}/ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server_tls(self, *names: str) -> Any:
        """Server options for a certificate naming ``names``."""
        cert = self.ca.issue_cert(*names)
        pem = cert.private_key_and_cert_chain_pem.bytes()
        return ssl.PrivateCertificate.loadPEM(pem).options()

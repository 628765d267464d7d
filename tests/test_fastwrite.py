"""write_now: on a plain TCP connection with nothing queued the bytes are in the kernel before
the reactor turns again; every other case goes through transport.write, in order."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.fastwrite import write_now


class _Keep(Protocol):
    def __init__(self, made: "Deferred[Any]") -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self.transport)


class RealConnectionTests(TestCase):
    async def connected(self) -> tuple[Any, socket.socket]:
        """A server-side Twisted transport and the blocking client socket at its other end."""
        made: Deferred[Any] = Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Keep(made)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        transport = await made
        self.addCleanup(transport.loseConnection)
        return transport, client

    async def test_sent_without_the_reactor(self) -> None:
        transport, client = await self.connected()
        write_now(transport, b"250 ok\r\n")
        # No reactor turn between the write and the read: the bytes left in write_now.
        self.assertEqual(client.recv(100), b"250 ok\r\n")
        self.assertEqual(transport._tempDataLen, 0)
        self.assertNotIn(transport, reactor.getWriters())

    async def test_behind_queued_bytes_it_queues_too(self) -> None:
        """Bytes already waiting in Twisted's buffer go first: order is kept."""
        transport, client = await self.connected()
        transport.write(b"first ")
        write_now(transport, b"second\r\n")
        self.assertEqual(transport._tempDataLen, len(b"first second\r\n"))
        received = await receive(client, 14)
        self.assertEqual(received, b"first second\r\n")

    async def test_after_lose_connection_as_twisted_does(self) -> None:
        """A closing connection is Twisted's business: the bytes are queued as by
        transport.write (which still sends them before the close)."""
        transport, client = await self.connected()
        transport.loseConnection()
        write_now(transport, b"late\r\n")
        self.assertEqual(transport._tempDataLen, len(b"late\r\n"))
        self.assertEqual(await receive(client, None), b"late\r\n")


class OtherTransportTests(SynchronousTestCase):
    def test_other_transports_use_write(self) -> None:
        """A TLS layer, a test transport...: plain transport.write."""
        transport = StringTransport()
        write_now(transport, b"220 hello\r\n")
        self.assertEqual(transport.value(), b"220 hello\r\n")


async def receive(client: socket.socket, count: int | None) -> bytes:
    """Read ``count`` bytes (None: until the end), letting the reactor turn meanwhile."""
    client.setblocking(False)
    received = b""
    for _ in range(500):  # 5 s at most
        try:
            chunk = client.recv(100)
        except BlockingIOError:
            chunk = None
        if chunk == b"" or (count is not None and len(received) >= count):
            break
        received += chunk or b""
        if count is not None and len(received) >= count:
            break
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    return received

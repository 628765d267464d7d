"""How ``mailplat queue`` talks to a running daemon: AMP over a UNIX socket in the data dir.

The daemon itself carries out hold, release, flush, delete and bounce (mailplat.queuecommands),
because only it knows which messages are being delivered at this moment; a command for a
message in flight waits until that attempt has settled. The socket is mode 0600 (only the
daemon's user, or root, may command the queue) and guarded by a pid lock file, so a second
daemon cannot steal it and a stale one left by a crash is replaced.

The client side needs no reactor: it speaks the same AMP protocol over a blocking socket, so
the command line tool stays a plain synchronous program.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailplat.queueconfig import socket_path_problem

log = Logger()


class _OneMessage(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"count", amp.Integer())]


class Hold(_OneMessage):
    """Put a message on hold."""


class Release(_OneMessage):
    """Release a held message."""


class Delete(_OneMessage):
    """Delete a message."""


class Bounce(_OneMessage):
    """Return a message to its sender now."""


class Flush(amp.Command):
    """Retry now: everything, one message, or the messages with recipients at a domain."""

    arguments = [
        (b"queue_id", amp.Unicode(optional=True)),
        (b"domain", amp.Unicode(optional=True)),
    ]
    response = [(b"count", amp.Integer())]


class DeleteDeferred(amp.Command):
    """Delete every deferred message."""

    arguments = []
    response = [(b"count", amp.Integer())]


def _count(result: bool | int) -> dict[str, int]:
    return {"count": int(result)}


class ControlProtocol(amp.AMP):
    """The daemon's side: each command is one queue operation."""

    def __init__(self, queue: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.queue = queue

    @Hold.responder
    def hold(self, queue_id: str) -> Any:
        return self.queue.hold(queue_id).addCallback(_count)

    @Release.responder
    def release(self, queue_id: str) -> Any:
        return self.queue.release(queue_id).addCallback(_count)

    @Delete.responder
    def delete(self, queue_id: str) -> Any:
        return self.queue.delete(queue_id).addCallback(_count)

    @Bounce.responder
    def bounce(self, queue_id: str) -> Any:
        return self.queue.bounce(queue_id).addCallback(_count)

    @Flush.responder
    def flush(self, queue_id: str | None = None, domain: str | None = None) -> Any:
        return self.queue.flush(queue_id, domain).addCallback(_count)

    @DeleteDeferred.responder
    def delete_deferred(self) -> Any:
        return self.queue.delete_deferred().addCallback(_count)


class ControlFactory(Factory):
    """Serves the operator's queue commands on the control socket."""

    noisy = False

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.queue)


def control_service(queue: Any, path: str, reactor: Any) -> StreamServerEndpointService | None:
    """The control socket's service, or None (logged) when ``path`` cannot be a socket."""
    problem = socket_path_problem(path)
    if problem:
        log.error("no control socket at {path}: {problem}; set [queue] control_socket",
                  path=path, problem=problem)
        return None
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
    service = StreamServerEndpointService(endpoint, ControlFactory(queue))
    service.setName("control")
    return service


class ControlError(Exception):
    """The daemon could not be asked, or it failed to carry out the command."""


class NoDaemon(ControlError):
    """Nothing listens on the control socket: the daemon is not running."""


class _SocketTransport:
    """Just enough of ITransport for AMP to write to a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.sock.sendall(b"".join(data))

    def loseConnection(self) -> None:
        self.sock.close()

    def getPeer(self) -> str:
        return "daemon"

    def getHost(self) -> str:
        return "client"


def call(path: str, command: type[amp.Command], timeout: float = 60.0, **arguments: Any) -> Any:
    """Run one command in the daemon and return its response (a dict); blocking."""
    if socket_path_problem(path):
        raise ControlError(f"{path}: {socket_path_problem(path)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoDaemon(f"no daemon is listening on {path}") from e
        return _exchange(sock, command, arguments)
    except OSError as e:
        raise ControlError(f"talking to the daemon on {path} failed: {e}") from e
    finally:
        sock.close()


def _exchange(sock: socket.socket, command: type[amp.Command], arguments: Any) -> Any:
    """Send the command and feed the replies to AMP until the answer is in (the socket's
    timeout bounds each wait)."""
    protocol = amp.AMP()
    protocol.makeConnection(_SocketTransport(sock))
    results: list[Any] = []
    protocol.callRemote(command, **arguments).addBoth(results.append)
    while not results:
        data = sock.recv(1 << 16)
        if not data:
            raise ControlError("the daemon closed the connection without an answer")
        protocol.dataReceived(data)
    result = results[0]
    if isinstance(result, Failure):
        raise ControlError(f"the daemon failed: {result.getErrorMessage()}")
    return result


__all__ = [
    "Bounce", "ControlError", "ControlProtocol", "Delete", "DeleteDeferred", "Flush", "Hold",
    "NoDaemon", "Release", "call", "control_service",
]

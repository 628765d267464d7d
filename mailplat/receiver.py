"""One receiver process (see mailplat.receivers): sessions and spool, no queue.

Started by the daemon as ``python -m mailplat.receiver [--config FILE] --listen NAME=FD ...``
with the listening sockets it hands over as inherited file descriptors, its pipes on stdin,
stdout (protocol lines) and stderr (the log, relayed by the daemon). It builds the same
router, policy chain, TLS and AUTH and spool as the daemon, from the same config, adopts the
sockets and runs until the daemon closes its stdin or sends TERM.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from itertools import count
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver

from mailplat.config import Config, load_config
from mailplat.envelope import Envelope
from mailplat.listeners import build_factory
from mailplat.replies import Reply
from mailplat.server import ReceptionService

log = Logger()


class ParentLink(LineOnlyReceiver):
    """The receiver's end of its pipes to the daemon."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._questions: dict[int, Deferred[Reply]] = {}
        self._ids = count(1)

    def committed(self, envelope: Envelope) -> None:
        """The spool's on_commit: the message is durable; the daemon's queue takes it."""
        self.sendLine(b"C " + envelope.to_json())  # type: ignore[no-untyped-call]

    def listening(self) -> None:
        self.sendLine(b"U")  # type: ignore[no-untyped-call]

    def etrn(self, node: str, peer_host: str, auth_user: str | None) -> Deferred[Reply]:
        """EtrnDesk.etrn, answered by the daemon's desk."""
        request = next(self._ids)
        answer: Deferred[Reply] = Deferred()
        self._questions[request] = answer
        question = {"id": request, "node": node, "peer": peer_host, "user": auth_user}
        self.sendLine(b"E " + json.dumps(question).encode("utf-8"))  # type: ignore[no-untyped-call]
        return answer

    def lineReceived(self, line: bytes) -> None:
        kind, _, body = line.partition(b" ")
        if kind != b"R":
            log.error("unknown line from the daemon: {line!r}", line=line[:80])
            return
        answer = json.loads(body)
        waiting = self._questions.pop(answer["id"], None)
        if waiting is not None:
            waiting.callback(Reply(answer["code"], answer["status"], answer["text"]))

    def connectionLost(self, reason: Any = None) -> None:
        """The daemon is gone (or closed our stdin): stop."""
        for waiting in self._questions.values():
            waiting.callback(Reply(458, "4.3.0", "Unable to queue messages now"))
        self._questions.clear()
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping (TERM)


class ReceiverServer(ReceptionService):
    """What the handed-over listeners need: the daemon's reception parts, without its queue.

    ``agents`` is empty and ``queue`` None: the relay listener's ETRN goes to ``etrn_desk``.
    """

    def __init__(self, config: Config, reactor: Any, link: ParentLink) -> None:
        super().__init__(config, reactor, link.committed)
        self.agents: dict[str, Any] = {}
        self.queue = None
        self.etrn_desk = link


def _log_to_stderr(event: Any) -> None:
    """One event per line, without timestamp (the daemon's log adds its own)."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if text:
        sys.stderr.write(text.replace("\n", "\n\t") + "\n")
        sys.stderr.flush()


def adopt(server: ReceiverServer, listens: list[tuple[str, int]], reactor: Any) -> list[Any]:
    """Take over the daemon's listening sockets with the listeners' own factories."""
    by_name = {listener.name: listener for listener in server.config.listeners}
    ports = []
    for name, fd in listens:
        probe = socket.socket(fileno=os.dup(fd))  # its own descriptor: closing it keeps fd
        family = probe.family
        probe.close()
        factory = build_factory(by_name[name], server, reactor)  # type: ignore[arg-type]
        ports.append(reactor.adoptStreamPort(fd, family, factory))
        os.close(fd)  # the port works on its own duplicate
        server.listeners[name] = ports[-1]
    return ports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailplat.receiver")
    parser.add_argument("--config", default=None)
    parser.add_argument("--listen", action="append", default=[], metavar="NAME=FD")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    observer: Any = _log_to_stderr  # a plain callable is an ILogObserver
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    config = load_config(args.config)
    link = ParentLink(reactor)
    StandardIO(link, reactor=reactor)  # type: ignore[no-untyped-call]
    server = ReceiverServer(config, reactor, link)
    listens = [(name, int(fd)) for name, _, fd in (item.partition("=") for item in args.listen)]
    reactor.callWhenRunning(server.startService)
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)

    def listen() -> None:
        adopt(server, listens, reactor)
        link.listening()

    reactor.callWhenRunning(listen)
    reactor.run()


if __name__ == "__main__":
    main()

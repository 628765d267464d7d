"""Receiver processes: SMTP sessions on more than one core, feeding the one queue.

One Python process runs one reactor thread at a time; with many sessions at once that thread
is the limit while the machine's other cores sit idle. With ``receivers = N`` in the config,
the daemon starts N receiver processes (``mailplat.receiver``) after binding its ports. They
inherit the listening sockets of the relay, submission and submissions listeners, accept the
connections on them and run the same sessions, policies and spool as the main process: a
message is committed into the same queue directory by the receiver, exactly as the main
process would, and only then is the client told 250. The receiver then sends the envelope up
its pipe, and the main process's one QueueManager delivers it. LMTP and ODMR listeners, the
queue, the agents, the DSNs and the control socket stay in the main process; ETRN received by
a receiver is decided here (``EtrnDesk``) and the answer sent back down.

While at least one receiver is up, the main process stops accepting on the sockets it handed
over (its reactor is left to the queue); when none is, it accepts again itself. A receiver
that dies is started again after a pause; a message it committed but could not announce is
found in ``incoming/`` by a sweep and handed to the queue.

The pipe carries lines: ``C <envelope JSON>`` (committed), ``E <json>`` (an ETRN question,
``{"id", "node", "peer", "user"}``) and ``U`` (up, listening) from the receiver; ``R <json>``
(``{"id", "code", "status", "text"}``) from the main process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from mailplat.config import EMBEDDED
from mailplat.diskprocess import child_environment
from mailplat.envelope import Envelope
from mailplat.replies import Reply
from mailplat.store import INCOMING

if TYPE_CHECKING:
    from mailplat.server import MailServer

log = Logger()

HANDED_PROFILES = ("relay", "submission", "submissions")
RESPAWN_DELAY = 1.0
MAX_RESPAWN_DELAY = 60.0
QUICK_DEATH = 5.0  # a receiver ending sooner than this after its start died at once
STOP_TIMEOUT = 10.0
ORPHAN_AGE = 2.0  # an incoming envelope older than this, unknown to the queue, was orphaned
MAX_LINE = 1 << 24  # an envelope with many recipients and long histories is still far below


def listening_port(service: Any) -> Any:
    """The IListeningPort of a started endpoint service (None when it has none yet)."""
    found: list[Any] = []

    def keep(port: Any) -> Any:
        found.append(port)
        return port

    waiting = getattr(service, "_waitingForPort", None)
    if waiting is not None:
        waiting.addCallback(keep)
    return found[0] if found else None


def handed_ports(server: MailServer) -> list[tuple[str, Any]]:
    """(listener name, port) for every listener receivers take over: TCP ones of the
    session profiles that need no queue in their process."""
    ports = []
    for listener in server.config.listeners:
        if listener.profile not in HANDED_PROFILES:
            continue
        port = listening_port(server.listeners.get(listener.name))
        if port is not None and hasattr(port, "fileno") and hasattr(port, "stopReading"):
            ports.append((listener.name, port))
    return ports


class Receivers(Service):
    """Starts, watches and stops the receiver processes of one MailServer."""

    name = "receivers"

    def __init__(self, server: MailServer, count: int, reactor: Any,
                 executable: str = sys.executable) -> None:
        self.server = server
        self.count = count
        self.reactor = reactor
        self.executable = executable
        self.children: list[ReceiverProtocol] = []
        self.ports: list[tuple[str, Any]] = []
        self._accepting_here = True
        self._sweep: Any = None
        self._delay = RESPAWN_DELAY

    @property
    def up(self) -> list[ReceiverProtocol]:
        return [child for child in self.children if child.up]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.ports = handed_ports(self.server)
        if not self.ports:
            log.info("receivers: no relay or submission listener to hand over")
            return
        for _ in range(self.count):
            self._spawn()

    def _spawn(self) -> None:
        if not self.running:
            return
        child = ReceiverProtocol(self)
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        args = [self.executable, "-m", "mailplat.receiver"]
        source = self.server.config.source
        if source != EMBEDDED:
            args += ["--config", os.path.abspath(source)]
        for name, port in self.ports:
            fd = port.fileno()
            fds[fd] = fd
            args += ["--listen", f"{name}={fd}"]
        self.children.append(child)
        child.started = self.reactor.seconds()
        self.reactor.spawnProcess(child, self.executable, args, env=child_environment(),
                                  childFDs=fds)

    def child_up(self, child: ReceiverProtocol) -> None:
        log.info("receiver {pid} is up", pid=child.pid)
        if self._accepting_here:
            self._accepting_here = False
            for _, port in self.ports:
                port.stopReading()  # the receivers accept; this reactor is the queue's

    def child_ended(self, child: ReceiverProtocol, reason: Any) -> None:
        if child in self.children:
            self.children.remove(child)
        if not self.running:
            return  # shutting down: the ports are being closed
        if not self.up and not self._accepting_here:
            self._accepting_here = True
            for _, port in self.ports:
                port.startReading()  # nobody else takes the connections now
        # One that dies at once (a broken install, a bad plugin) is retried ever more slowly.
        quick = self.reactor.seconds() - child.started < QUICK_DEATH
        self._delay = min(self._delay * 2, MAX_RESPAWN_DELAY) if quick else RESPAWN_DELAY
        log.warn("receiver {pid} ended ({reason}); starting another in {delay:.0f} s",
                 pid=child.pid, reason=getattr(reason, "value", reason), delay=self._delay)
        self.reactor.callLater(self._delay, self._spawn)
        if self._sweep is None or not self._sweep.active():
            self._sweep = self.reactor.callLater(ORPHAN_AGE, self.sweep_orphans)

    def sweep_orphans(self) -> Deferred[list[str]]:
        """Hand the queue the messages a receiver committed but did not get to announce."""
        queue = self.server.queue
        store = self.server.store
        cutoff = time.time() - ORPHAN_AGE

        def orphans() -> list[Envelope]:
            found = []
            for qid in store.list_ids(INCOMING):
                if queue.knows(qid):
                    continue
                try:
                    if os.path.getmtime(store.data_path(qid)) > cutoff:
                        continue
                    found.append(store.read_envelope(qid)[1])
                except (OSError, ValueError, TypeError, KeyError):
                    continue
            return found

        def submit(envelopes: list[Envelope]) -> list[str]:
            submitted = []
            for envelope in envelopes:
                if not queue.knows(envelope.queue_id):
                    log.info("{qid}: committed by a receiver that ended; queued now",
                             qid=envelope.queue_id)
                    queue.submit(envelope)
                    submitted.append(envelope.queue_id)
            return submitted

        return store.in_thread(orphans).addCallback(submit)

    def committed(self, envelope: Envelope) -> None:
        """A receiver committed a message: the queue takes it as from our own spool."""
        try:
            self.server.queue.submit(envelope)
        except Exception:
            log.failure("{qid}: queue refused committed message", qid=envelope.queue_id)

    def etrn(self, question: dict[str, Any]) -> Deferred[Reply]:
        from mailplat.odmr import EtrnDesk, odmr_context

        desk = EtrnDesk(odmr_context(self.server, self.reactor))
        return maybeDeferred(desk.etrn, question["node"], question["peer"], question["user"])

    def stopService(self) -> Deferred[None]:
        """Stop the receivers (TERM, then KILL after a while) and take the sockets back."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        waits = []
        for child in list(self.children):
            waits.append(child.ended)
            child.stop()
        return DeferredList(waits).addCallback(lambda _: None)


class ReceiverProtocol(ProcessProtocol):
    """The main process's end of one receiver's pipes."""

    def __init__(self, pool: Receivers) -> None:
        self.pool = pool
        self.pid: int | None = None
        self.started = 0.0
        self.up = False
        self.ended: Deferred[None] = Deferred()
        self._out = b""
        self._err = b""
        self._kill: Any = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" not in data:
            if len(self._out) > MAX_LINE:
                log.error("receiver {pid}: line too long, stopping it", pid=self.pid)
                self.stop()
            return
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        kind, _, body = line.partition(b" ")
        try:
            if kind == b"C":
                self.pool.committed(Envelope.from_json(body))
            elif kind == b"E":
                question = json.loads(body)
                d = self.pool.etrn(question)
                d.addCallback(self._answer, question["id"])
                d.addErrback(self._answer_failure, question)
            elif kind == b"U":
                self.up = True
                self.pool.child_up(self)
            else:
                log.error("receiver {pid}: unknown line {line!r}", pid=self.pid, line=line[:80])
        except (ValueError, TypeError, KeyError):
            log.failure("receiver {pid}: bad line {line!r}", pid=self.pid, line=line[:80])

    def _answer(self, reply: Reply, request: int) -> None:
        text = json.dumps({"id": request, "code": reply.code, "status": reply.status,
                           "text": reply.text})
        if self.transport is not None:
            self.transport.write(b"R " + text.encode("utf-8") + b"\n")

    def _answer_failure(self, failure: Any, question: dict[str, Any]) -> None:
        log.failure("etrn from a receiver failed", failure)
        from mailplat.odmr import etrn_reply

        reply = etrn_reply(458, str(question.get("node", "")),
                           "Unable to queue messages for node {node}")
        self._answer(reply, question["id"])

    def errReceived(self, data: bytes) -> None:
        """The receiver's log, one event per line (tracebacks continue with a tab)."""
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line:
                log.info("receiver {pid}: {line}", pid=self.pid,
                         line=line.decode("utf-8", "replace"))

    def stop(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            return  # already gone
        self._kill = self.pool.reactor.callLater(STOP_TIMEOUT, self._force)

    def _force(self) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:
            pass

    def processEnded(self, reason: Any) -> None:
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self.up = False
        try:
            self.pool.child_ended(self, reason)
        finally:
            self.ended.callback(None)


__all__ = ["HANDED_PROFILES", "ReceiverProtocol", "Receivers", "handed_ports",
           "listening_port"]

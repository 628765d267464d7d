"""A helper process for the blocking disk work of the hot path: commit fsyncs and Maildir copies.

Disk workers in the daemon's own process share its GIL with the reactor: every fsync, rename
or sendfile a worker returns from takes the GIL back, and when the reactor wants it at that
moment both wait on a futex and the scheduler (docs/performance.rst). On two cores the
reactor spent ~40 % of its wall time so, runnable but not running. Here the same jobs run in
a second process with its own interpreter, and its threads contend only with each other.

A job is a module-level function and picklable arguments (``run(f, *args)``, the signature
of ``workers.thread_runner``); its result or exception comes back pickled. The two processes
share ``SOCK_SEQPACKET`` socket pairs: one packet per job and one per answer, so the
helper's threads all wait on the socket itself and the kernel wakes one per job (no reader
or writer thread in between), and the reactor pays one ``send`` per job. Jobs a client waits
for (``urgent``: the commit's fsync before its 250) have a socket and four threads of their
own, so that they never queue behind the Maildir copies on the other eight.

The helper's own end is ``diskhelper.py``, which imports no Twisted. The helper starts after
twistd drops privileges (``startService``), so it runs as the daemon's user. If it dies, a
job in flight that may simply run again (``idempotent``: the commit's fsync, unlinks, file
creation) runs again on a thread; any other (a Maildir copy) fails with ``DiskProcessLost``,
an OSError, and the queue retries it; another helper is started. While none is up (before
start, after stop, between a death and the restart) jobs run on threads here, as do jobs
whose arguments do not pickle or are too large for one packet.
"""

from __future__ import annotations

import collections
import errno
import os
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

# The helper's own end (diskhelper.py, no Twisted): its descriptors and largest packet.
from mailplat.diskhelper import CHANNEL_FD, MAX_PACKET, URGENT_FD
from mailplat.workers import RunInThread, thread_runner

log = Logger()
T = TypeVar("T")

SOCKET_BUFFER = 1 << 22  # room for a backlog of jobs before send() would block
RESTART_DELAY = 1.0


class DiskProcessLost(OSError):
    """The helper process ended with this job in flight: its outcome is unknown."""


def child_environment() -> dict[str, str]:
    """Ours, for a Python child of the daemon (the helper, a receiver): this mailplat
    importable however the daemon found it (a checkout on sys.path, twistd in a tree)."""
    import mailplat

    env = os.environ.copy()
    here = os.path.dirname(os.path.dirname(os.path.abspath(mailplat.__file__)))
    paths = [here, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    ours.setblocking(False)
    return ours, theirs


class DiskProcess(Service):
    """The reactor's end: starts the helper, sends it jobs, fires their Deferreds."""

    name = "disk-process"

    def __init__(self, reactor: Any, executable: str = sys.executable,
                 fallback: RunInThread | None = None) -> None:
        self.reactor = reactor
        self.executable = executable
        self.fallback = fallback or thread_runner(reactor, pool="delivery")
        self.channel: _Channel | None = None  # background jobs
        self.urgent_channel: _Channel | None = None  # jobs marked @urgent
        self.started = 0  # helpers started: lets tests see a restart
        self._process: _HelperProcess | None = None
        self._restart: Any = None

    def run(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        """``f(*args)`` in the helper process (on a thread while there is none)."""
        channel = self.urgent_channel if getattr(f, "urgent", False) else self.channel
        if channel is not None and channel.open and not channel.finishing:
            d = channel.send(f, args)
            if d is not None:
                if getattr(f, "idempotent", False):
                    d.addErrback(self._again_on_a_thread, f, args)
                return d
        return self.fallback(f, *args)

    def _again_on_a_thread(self, failure: Failure, f: Callable[..., T],
                           args: tuple[Any, ...]) -> "Deferred[T]":
        failure.trap(DiskProcessLost)
        return self.fallback(f, *args)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._spawn()

    def _spawn(self) -> None:
        if not self.running:
            return
        ours, theirs = socket_pair()
        urgent_ours, urgent_theirs = socket_pair()
        channel = _Channel(ours, self.reactor)
        urgent_channel = _Channel(urgent_ours, self.reactor)
        process = _HelperProcess(self, [channel, urgent_channel])
        try:
            self.reactor.spawnProcess(
                process, self.executable,
                [self.executable, "-m", "mailplat.diskhelper"], env=child_environment(),
                childFDs={0: "w", 1: "r", 2: "r", CHANNEL_FD: theirs.fileno(),
                          URGENT_FD: urgent_theirs.fileno()},
            )
        except OSError as e:
            # E.g. an interpreter the mail user may not execute (after --uid): the daemon
            # still works, with its disk work on threads as before the helper existed.
            log.error("cannot start the disk helper ({error}); disk work stays on threads "
                      "in the daemon", error=e)
            for each in process.channels:
                each.close()
            return
        finally:
            theirs.close()  # the helper has its copies; ours must not keep its ends alive
            urgent_theirs.close()
        self.started += 1
        self.channel, self.urgent_channel, self._process = channel, urgent_channel, process
        for each in process.channels:
            each.start()

    def helper_ended(self, process: _HelperProcess, reason: Any) -> None:
        for channel in process.channels:
            channel.close()
        if process is self._process:
            self._process = None
        if self.running:
            log.warn("disk helper ended ({reason}); starting another",
                     reason=getattr(reason, "value", reason))
            self._restart = self.reactor.callLater(RESTART_DELAY, self._spawn)

    def stopService(self) -> "Deferred[None]":
        """Tell the helper no more jobs come: it finishes and answers those it has, then
        exits."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        process = self._process
        if process is None:
            return succeed(None)
        for channel in process.channels:
            channel.finish()
        return process.ended


class _Channel:
    """Our end of the socket pair, read by the reactor (IReadDescriptor, IWriteDescriptor)."""

    def __init__(self, sock: socket.socket, reactor: Any) -> None:
        self.sock = sock
        self.reactor = reactor
        self.open = True
        self.pending: dict[int, Deferred[Any]] = {}
        self._next_id = 0
        self._backlog: collections.deque[bytes] = collections.deque()
        self._buffer = bytearray(MAX_PACKET)
        self.finishing = False

    def start(self) -> None:
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno() if self.open else -1

    def logPrefix(self) -> str:
        return "disk-helper"

    def send(self, f: Callable[..., Any], args: tuple[Any, ...]) -> "Deferred[Any] | None":
        """None when the job cannot go (not picklable, too large): run it elsewhere."""
        self._next_id += 1
        job = self._next_id
        try:
            packet = pickle.dumps((job, f, args), pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None
        if len(packet) > MAX_PACKET:
            return None
        d: Deferred[Any] = Deferred()
        self.pending[job] = d
        if self._backlog:
            self._backlog.append(packet)
        else:
            self._send_now(packet)
        return d

    def _send_now(self, packet: bytes) -> None:
        try:
            self.sock.send(packet)
        except BlockingIOError:
            self._backlog.append(packet)  # the helper is behind: send when there is room
            self.reactor.addWriter(self)
        except OSError as e:
            self.lost(e)

    def doWrite(self) -> None:
        for _ in range(len(self._backlog)):
            try:
                self.sock.send(self._backlog[0])
            except BlockingIOError:
                return
            except OSError as e:
                self.lost(e)
                return
            self._backlog.popleft()
        self.reactor.removeWriter(self)
        if self.finishing:
            self._shut_down_sending()

    def doRead(self) -> None:
        view = memoryview(self._buffer)
        for _ in range(4096):  # bounded: then the reactor serves others first
            try:
                size = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as e:
                self.lost(e)
                return
            if size == 0:
                self.lost(None)
                return
            job, ok, value = pickle.loads(view[:size])
            d = self.pending.pop(job, None)
            if d is None:
                continue
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))

    def finish(self) -> None:
        """No more jobs: the helper sees the end once the backlog is sent."""
        self.finishing = True
        if not self._backlog:
            self._shut_down_sending()

    def _shut_down_sending(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def lost(self, error: BaseException | None) -> None:
        """The helper is gone: nothing in flight will be answered."""
        self.close(DiskProcessLost(errno.EPIPE, f"disk helper process ended: {error or 'EOF'}"))

    def close(self, reason: BaseException | None = None) -> None:
        if self.open:
            self.open = False
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            self.sock.close()
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(Failure(reason or DiskProcessLost(errno.EPIPE, "disk helper ended")))

    def connectionLost(self, reason: Any) -> None:
        self.lost(getattr(reason, "value", None))


class _HelperProcess(ProcessProtocol):
    """The helper's pipes: its stderr (tracebacks, should it fail) goes to our log."""

    def __init__(self, owner: DiskProcess, channels: list[_Channel]) -> None:
        self.owner = owner
        self.channels = channels
        self.ended: Deferred[None] = Deferred()
        self._err = b""

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line:
                log.error("disk helper: {line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Any) -> None:
        try:
            self.owner.helper_ended(self, reason)
        finally:
            self.ended.callback(None)

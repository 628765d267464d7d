"""The disk helper process itself (``python -m mailplat.diskhelper``), and what its jobs need.

``diskprocess.py`` is the daemon's end: it starts this process and sends it jobs. This end
imports no Twisted, and neither do the modules of the functions it runs (``fsyncs``,
``store``, ``maildir``): the process then holds about 13 MB instead of 33, which counts in
the daemon's memory while it takes a 100 MB message or a thousand idle connections
(docs/performance.rst). ``tests/test_diskhelper.py`` keeps it so.

Each of its threads waits on a ``SOCK_SEQPACKET`` socket shared with the daemon, takes one
packet (a pickled ``(job, function, arguments)``), runs it and sends back one packet with
``(job, True, result)`` or ``(job, False, exception)``.
"""

from __future__ import annotations

import pickle
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mailplat.cpuplacement import place_helper

THREADS = 8  # concurrent fsyncs share journal commits; these threads' GIL is not the reactor's
URGENT_THREADS = 4
MAX_PACKET = 1 << 18  # an envelope with thousands of recipients; larger jobs stay on threads
CHANNEL_FD = 3  # the helper's end of the socket pair for background jobs
URGENT_FD = 4  # and of the one for jobs a client waits for (the commit's fsync)

F = TypeVar("F", bound=Callable[..., Any])


def urgent(f: F) -> F:
    """Mark a job a client is waiting for (the commit before its 250): it goes through a
    socket and threads of its own, never queued behind Maildir copies."""
    f.urgent = True  # type: ignore[attr-defined]
    return f


def idempotent(f: F) -> F:
    """Mark a job that may simply run again (an fsync, an unlink): if the helper dies with
    it in flight, it is run again on a thread instead of failing."""
    f.idempotent = True  # type: ignore[attr-defined]
    return f


class Failed:
    """One job of a batch raised this (``run_batch``); the others still ran."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_batch(jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Blocking: each job's result, or ``Failed`` with its exception; one failing job does not
    stop the rest (workers.Batcher's hop)."""
    results: list[Any] = []
    for f, args in jobs:
        try:
            results.append(f(*args))
        except BaseException as e:
            results.append(Failed(e))
    return results


def answer(job: int, f: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """One job run: ``(job, True, result)`` or ``(job, False, exception)``, pickled."""
    try:
        outcome: tuple[int, bool, Any] = (job, True, f(*args))
    except BaseException as e:
        outcome = (job, False, e)
    try:
        return pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # an unpicklable result or exception: its text still comes back
        return pickle.dumps((job, False, OSError(f"{type(e).__name__}: {e}")),
                            pickle.HIGHEST_PROTOCOL)


def serve(sock: socket.socket, threads: int = THREADS) -> None:
    """Run jobs from ``sock`` on ``threads`` threads until the daemon's end stops sending."""
    for thread in start_workers(sock, threads):
        thread.join()


def start_workers(sock: socket.socket, threads: int, name: str = "disk") -> list[threading.Thread]:
    """Threads that each take a job from ``sock``, run it and send its answer back."""

    def work() -> None:
        buffer = bytearray(MAX_PACKET)
        view = memoryview(buffer)
        for _ in iter(int, 1):  # until the end of input
            size = sock.recv_into(buffer)
            if size == 0:
                return
            job, f, args = pickle.loads(view[:size])
            sock.sendall(answer(job, f, args))

    workers = [threading.Thread(target=work, name=f"{name}-{n}") for n in range(threads)]
    for thread in workers:
        thread.start()
    return workers


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon says when to stop (end of input)
    place_helper()  # off the reactor's CPU, near the disk's interrupts
    for worker in [*start_workers(socket.socket(fileno=CHANNEL_FD), THREADS),
                   *start_workers(socket.socket(fileno=URGENT_FD), URGENT_THREADS, "urgent")]:
        worker.join()


if __name__ == "__main__":
    main()

"""Log file writes off the reactor thread.

twistd's text log observer writes and flushes its file for every event, in the thread that
logs: the reactor. While the queue's fsyncs keep the filesystem journal busy, such a write
can wait for the journal, and the whole server waits with it (a fifth of the reactor's time
in the 8-session benchmark, docs/performance.rst). ``offload_log_files`` leaves the observer
and its format alone and only gives it a file whose ``write`` queues the text for a writer
thread; lines keep their order, and ``close`` (at shutdown) writes what is left. A daemon
killed outright (SIGKILL) can lose the last few milliseconds of lines, never mail. The
timestamp of twistd's default format, which Twisted computes with a timezone lookup for every
line, is computed once per second (``SecondCache``): the same text, a twentieth of the work.
"""

from __future__ import annotations

import atexit
import threading
from string import Formatter
from typing import Any

from twisted.logger import formatEventAsClassicLogText, formatTime, globalLogPublisher


GATHER_SECONDS = 0.01  # under load, lines reach the file at most this late
FLUSH_LINES = 512  # ... or as soon as this many are waiting


class BackgroundWriter:
    """A file-like object: ``write`` queues, a daemon thread writes and flushes ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self._pending: list[Any] = []
        self._cond = threading.Condition()
        self._idle = False  # the thread waits for work: only then does a write wake it
        self._closing = False
        self.original_format: Any = None  # the observer's formatter, when we replaced it
        self._thread = threading.Thread(target=self._run, name="mailplat-log", daemon=True)
        self._thread.start()
        # A daemon that dies (a traceback at start-up) still gets its last lines written.
        atexit.register(self.close)

    def write(self, text: Any) -> None:
        with self._cond:
            if self._closing:
                self.target.write(text)  # after close: the caller's thread, as before
                return
            self._pending.append(text)
            if self._idle or len(self._pending) >= FLUSH_LINES:
                self._cond.notify()

    def flush(self) -> None:
        """Nothing here: the writer thread flushes after each batch."""

    def close(self, timeout: float = 10.0) -> None:
        """Write out everything queued, then stop the thread."""
        atexit.unregister(self.close)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        for _ in iter(int, 1):  # until closed: each round writes one batch
            with self._cond:
                while not self._pending and not self._closing:
                    self._idle = True  # the next line wakes us at once
                    self._cond.wait()
                self._idle = False
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                self._write(batch)
            if closing and not batch:
                return
            if not closing:
                # Busy: let lines gather instead of being woken for each one (a wake-up
                # costs the reactor a futex call and a GIL hand-off).
                with self._cond:
                    if len(self._pending) < FLUSH_LINES:
                        self._cond.wait(GATHER_SECONDS)

    def _write(self, batch: list[Any]) -> None:
        try:
            joined = (b"" if isinstance(batch[0], bytes) else "").join(batch)
            self.target.write(joined)
            self.target.flush()
        except Exception:  # a full disk must not kill the thread; the lines are lost
            pass


class SecondCache:
    """``formatTime`` for twistd's default (RFC 3339, whole seconds), computed once a second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text

    def format_event(self, event: Any) -> str | None:
        """Twisted's classic line. Plain events (no traceback, no "{f()}" calls in the format)
        are formatted by ``str.format_map``, in C, instead of Twisted's pure-Python
        formatter; anything else, or anything that fails, goes Twisted's way."""
        fmt = event.get("log_format")
        if (type(fmt) is not str or not _plain(fmt) or "log_failure" in event
                or "log_flattened" in event):
            return formatEventAsClassicLogText(event, formatTime=self)
        try:
            text = fmt.format_map(event)
        except Exception:
            return formatEventAsClassicLogText(event, formatTime=self)
        if not text:
            return None
        line = f"{self(event.get('log_time'))} [{_system(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"


_PLAIN: dict[str, bool] = {}


def _plain(fmt: str) -> bool:
    """No "{f()}" call in a field (Twisted's own extension to str.format); remembered per
    format string, since the formats are the constants in the code."""
    known = _PLAIN.get(fmt)
    if known is None:
        try:
            fields = [field for _, field, _, _ in Formatter().parse(fmt) if field]
            known = not any("(" in field for field in fields)
        except ValueError:
            known = False
        if len(_PLAIN) < 10_000:
            _PLAIN[fmt] = known
    return known


def _system(event: Any) -> str:
    """The "[system]" part, as Twisted writes it."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def _is_twistd_default(format_event: Any) -> bool:
    """twistd's observer formats with textFileLogObserver's default time format."""
    return getattr(format_event, "__qualname__", "") == "textFileLogObserver.<locals>.formatEvent"


def offload_log_files(publisher: Any = globalLogPublisher) -> list[BackgroundWriter]:
    """Give every file-writing log observer of ``publisher`` a BackgroundWriter; returns
    them for ``restore``. Observers without a file (or of another kind) are left as they
    are, so a Twisted without the expected attribute simply keeps writing in place."""
    writers = []
    for observer in list(getattr(publisher, "_observers", ())):
        target = getattr(observer, "_outFile", None)
        if target is None or isinstance(target, BackgroundWriter):
            continue
        writer = BackgroundWriter(target)
        observer._outFile = writer
        if _is_twistd_default(getattr(observer, "formatEvent", None)):
            writer.original_format = observer.formatEvent
            observer.formatEvent = SecondCache().format_event
        writers.append(writer)
    return writers


def restore(publisher: Any, writers: list[BackgroundWriter]) -> None:
    """Write out what is queued and give the observers their files back."""
    for writer in writers:
        writer.close()  # from now on it writes in place, in the caller's thread
    for observer in list(getattr(publisher, "_observers", ())):
        ours: Any = getattr(observer, "_outFile", None)
        if ours in writers:
            observer._outFile = ours.target
            if ours.original_format is not None:
                observer.formatEvent = ours.original_format


__all__ = ["BackgroundWriter", "SecondCache", "offload_log_files", "restore"]

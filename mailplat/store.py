"""The queue on disk: message data files and envelopes whose directory is their state.

Layout under the queue root::

    data/<qid>              message bytes, then the envelope as committed (the trailer)
    tmp/                    envelopes being written
    incoming/ active/ deferred/ hold/   <qid>.json, one directory per state

A new message is committed by one fsync of its data file, which ends with the envelope
(``envelope_trailer``): one journal commit before 250, as Postfix's one queue file, and no
other file. Such an *unfiled* message is in state ``incoming``: ``read_envelope``,
``state_of`` and ``list_ids`` read its trailer. Its first delivery attempt usually finishes
it (only its data file is removed); otherwise its envelope is filed, written whole and
synced, into a state directory (``deferred/``, or ``active/`` when it waits for a delivery
slot, ``hold/``...), and from then on a state change is one ``rename``. Only envelopes are ever read into memory, never message data, so a
queue with tens of thousands of deferred messages stays cheap.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred

from mailplat.durability import AUTO, needs_directory_sync
from mailplat.envelope import Envelope
from mailplat.fsyncs import fsync_dir
from mailplat.groupsync import GroupSyncer, RunInThread, thread_runner
# Defined in queuefiles (no Twisted) for the disk helper's sake; used and re-exported here.
from mailplat.queuefiles import open_data, recycle_files, remove_files, unlink_quietly

INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
HOLD = "hold"
STATES = (INCOMING, ACTIVE, DEFERRED, HOLD)

_SUFFIX = ".json"
T = TypeVar("T")

_MAGIC = b"MAILPLAT-ENVELOPE"
_TAIL_SIZE = len(_MAGIC) + 12  # magic, space, ten digits of length, LF


def envelope_trailer(envelope: Envelope) -> bytes:
    """What follows the message bytes in a data file: the envelope as committed, then a
    fixed-size tail naming its length. Message data ends in CRLF, so it can never end like
    a tail; a torn trailer does not parse and marks a message that was never acknowledged."""
    body = envelope.to_json()
    return body + b"%s %010d\n" % (_MAGIC, len(body))


def read_trailer(path: str) -> Envelope | None:
    """The envelope a data file was committed with; None when it has none (never committed,
    or torn by a crash) or the trailer disagrees with the file."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TAIL_SIZE:
                return None
            tail = os.pread(f.fileno(), _TAIL_SIZE, size - _TAIL_SIZE)
            magic, _, digits = tail[:-1].partition(b" ")
            if magic != _MAGIC or not digits.isdigit() or not tail.endswith(b"\n"):
                return None
            length = int(digits)
            start = size - _TAIL_SIZE - length
            if start < 0:
                return None
            envelope = Envelope.from_json(os.pread(f.fileno(), length, start))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return envelope if envelope.data_length == start else None


class _QueueIds:
    """Uppercase hex of the time in microseconds plus a counter: sortable, unique, file-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._counter = itertools.count()

    def next(self) -> str:
        with self._lock:
            now = max(time.time_ns() // 1000, self._last)
            if now != self._last:
                self._last, self._counter = now, itertools.count()
            return f"{now:014X}{next(self._counter):04X}"


_ids = _QueueIds()


class QueueStore:
    """The durable queue directories and the few operations the queue needs on them."""

    def __init__(
        self,
        root: str,
        syncer: GroupSyncer | None = None,
        runInThread: RunInThread | None = None,
        sync_directories: bool | str = AUTO,
    ) -> None:
        self.root = root
        self._run = runInThread or thread_runner()
        self.syncer = syncer or GroupSyncer(runInThread=self._run)
        self.data_dir = os.path.join(root, "data")
        self.tmp_dir = os.path.join(root, "tmp")
        for path in (self.data_dir, self.tmp_dir, *map(self.state_dir, STATES)):
            os.makedirs(path, mode=0o700, exist_ok=True)
        # False where the filesystem makes a new file's name durable with the file's fsync.
        self.sync_directories = needs_directory_sync(root, sync_directories)

    def state_dir(self, state: str) -> str:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}")
        return os.path.join(self.root, state)

    def envelope_path(self, qid: str, state: str) -> str:
        return os.path.join(self.state_dir(state), qid + _SUFFIX)

    def new_queue_id(self) -> str:
        return _ids.next()

    def data_path(self, qid: str) -> str:
        return os.path.join(self.data_dir, qid)

    def open_data_for_write(self, qid: str, create: bool = True) -> IO[bytes]:
        """Create the data file (O_EXCL: a queue id is never reused), or open the empty one
        made ahead for it (``create=False``)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL if create else os.O_WRONLY
        fd = os.open(self.data_path(qid), flags, 0o600)
        try:
            return os.fdopen(fd, "wb", buffering=1 << 16)
        except BaseException:
            os.close(fd)
            raise

    def write_envelope(
        self, envelope: Envelope, state: str, sync: bool = True, also_sync: Iterable[str] = ()
    ) -> "Deferred[None]":
        """Durably (re)write an envelope into ``state``, replacing one already there.

        The file is written and fsync'd in a thread, renamed into place, and then the state
        directory (plus ``also_sync``) is fsync'd in a shared round. With ``sync=False`` the
        caller takes care of the directory sync itself.
        """
        d = self._run(self._write_envelope_file, envelope, state)
        if sync and self.sync_directories:
            dirs = [self.state_dir(state), *also_sync]
            d.addCallback(lambda _: self.syncer.sync_dirs(dirs))
        return d

    def _write_envelope_file(self, envelope: Envelope, state: str) -> None:
        """Blocking part of write_envelope: tmp file, fsync, atomic rename."""
        tmp = os.path.join(self.tmp_dir, f"{envelope.queue_id}.{threading.get_ident()}")
        try:
            # os-level calls: a buffered file object would add fstat, isatty and lseek calls.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, envelope.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.envelope_path(envelope.queue_id, state))
        except BaseException:
            unlink_quietly(tmp)
            raise

    def move(self, qid: str, src: str, dst: str) -> None:
        """Change a message's state with one rename (not synced: a lost rename only means the
        message is retried from its earlier state, which at-least-once delivery allows). An
        unfiled message gets its envelope filed into ``dst``, from its trailer."""
        try:
            os.rename(self.envelope_path(qid, src), self.envelope_path(qid, dst))
        except FileNotFoundError:
            envelope = read_trailer(self.data_path(qid)) if src == INCOMING else None
            if envelope is None:
                raise
            self._write_envelope_file(envelope, dst)

    def read_envelope(self, qid: str) -> tuple[str, Envelope]:
        """The message's current state and envelope; FileNotFoundError when it is gone."""
        for state in STATES:
            try:
                with open(self.envelope_path(qid, state), "rb") as f:
                    return state, Envelope.from_json(f.read())
            except FileNotFoundError:
                continue
        envelope = read_trailer(self.data_path(qid))
        if envelope is not None:
            return INCOMING, envelope  # unfiled
        raise FileNotFoundError(errno.ENOENT, "no such queue id", qid)

    def state_of(self, qid: str) -> str | None:
        """Which state the message is in now, or None when it is gone."""
        for state in STATES:
            if os.path.exists(self.envelope_path(qid, state)):
                return state
        return INCOMING if read_trailer(self.data_path(qid)) is not None else None

    def select(self, ids: Iterable[str], predicate: Callable[[Envelope], bool]) -> list[str]:
        """Blocking: the ids whose envelope satisfies ``predicate`` (gone or unreadable: no)."""
        chosen = []
        for qid in ids:
            try:
                if predicate(self.read_envelope(qid)[1]):
                    chosen.append(qid)
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return chosen

    def in_thread(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run blocking queue reads off the reactor thread."""
        return self._run(f, *args)

    def remove(self, qid: str, state: str | None = None, filed: bool = True) -> None:
        """Forget a message: envelope first, then the data. ``state``, when the caller knows
        it, spares the look into every other state directory (unless the envelope is not
        there after all); ``filed=False`` says there is no envelope file at all."""
        remove_files(*self.removal(qid, state, filed))

    def removal(self, qid: str, state: str | None = None,
                filed: bool = True) -> tuple[str | None, list[str], str]:
        """``remove``'s arguments for ``remove_files``, which a process without this store
        (the disk helper) can run: where the envelope should be, where else it may be, the
        data file."""
        envelopes = [self.envelope_path(qid, each) for each in STATES] if filed else []
        expected = self.envelope_path(qid, state) if filed and state is not None else None
        return expected, envelopes, self.data_path(qid)

    def discard_data(self, qid: str) -> None:
        """Delete a data file that never got an envelope (and never will)."""
        unlink_quietly(self.data_path(qid))

    def list_ids(self, state: str) -> list[str]:
        """Queue ids in ``state``, oldest first (incoming: unfiled messages too)."""
        ids = self._filed(state)
        if state == INCOMING:
            ids += self.unfiled_ids()
        return sorted(ids)

    def _filed(self, state: str) -> list[str]:
        names = os.listdir(self.state_dir(state))
        return [n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX)]

    def unfiled_ids(self) -> list[str]:
        """Committed messages with no envelope file yet (their trailer is the envelope);
        data files being received, or never committed, have no complete trailer."""
        filed = {qid for state in STATES for qid in self._filed(state)}
        names = [n for n in os.listdir(self.data_dir) if n not in filed]
        return [n for n in names if read_trailer(self.data_path(n)) is not None]

    def _intact_or_rebuilt(self, qid: str) -> bool:
        """True when the incoming envelope parses or was rebuilt from the data file's
        trailer; a torn one with no committed data behind it is deleted here."""
        path = self.envelope_path(qid, INCOMING)
        if _parses(path):
            return True
        unlink_quietly(path)
        return self._rebuild(qid)

    def _rebuild(self, qid: str) -> bool:
        """Blocking: recreate ``incoming/<qid>.json`` from the trailer of a committed data
        file (its unsynced copy was lost in a crash); False when the data was never
        committed."""
        envelope = read_trailer(self.data_path(qid))
        if envelope is None or envelope.queue_id != qid:
            return False
        self._write_envelope_file(envelope, INCOMING)
        fsync_dir(self.state_dir(INCOMING))
        return True

    def recover(self) -> dict[str, list[str]]:
        """Clean up after a crash and return the queue ids found in each state.

        Envelope temp files are dropped. An envelope in incoming/ that does not parse, or a
        data file without any envelope, is rebuilt from the data file's trailer when the
        message was committed, and deleted when it was not (never acknowledged). A message
        found in two states (only possible after outside interference) is kept in the later
        one.
        """
        for name in os.listdir(self.tmp_dir):
            unlink_quietly(os.path.join(self.tmp_dir, name))
        found: dict[str, list[str]] = {}
        seen: dict[str, str] = {}
        for state in STATES:
            found[state] = sorted(self._filed(state))
            if state == INCOMING:
                found[state] = [qid for qid in found[state] if self._intact_or_rebuilt(qid)]
            for qid in found[state]:
                if qid in seen:
                    unlink_quietly(self.envelope_path(qid, seen[qid]))
                    found[seen[qid]].remove(qid)
                seen[qid] = state
        for name in sorted(os.listdir(self.data_dir)):
            if name in seen:
                continue
            if self._rebuild(name):
                found[INCOMING].append(name)
            else:
                unlink_quietly(self.data_path(name))
        return found


def _parses(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            Envelope.from_json(f.read())
        return True
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def is_disk_full(error: BaseException | None) -> bool:
    """Out of space or quota: worth a distinct reply, since only waiting helps."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


__all__ = [
    "ACTIVE",
    "recycle_files",
    "remove_files",
    "envelope_trailer",
    "open_data",
    "read_trailer",
    "DEFERRED",
    "HOLD",
    "INCOMING",
    "STATES",
    "QueueStore",
    "is_disk_full",
]

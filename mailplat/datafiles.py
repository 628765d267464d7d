"""Data files created ahead of need, in a worker thread.

Creating a file is a journal operation: while the queue's fsyncs keep the journal busy, the
``open(O_CREAT)`` at the start of every message can wait for it, and the reactor (every
session) waits with it (a tenth of its time with 8 sessions, docs/performance.rst). While mail
keeps coming, the spool takes its data files from a few created beforehand by a worker; when
there are none (the first message after a quiet spell) it creates one in place as before.

A file waiting here is empty and has no envelope: a crash leaves it to recovery, which deletes
data files that were never committed. Files older than ``max_age`` are not used (the queue
id, taken from the creation time, should tell when the message came) and are deleted.
"""

from __future__ import annotations

from collections import deque
from typing import IO, Any

from twisted.logger import Logger

from mailplat.groupsync import RunInThread
from mailplat.store import QueueStore

log = Logger()

Created = tuple[float, str, IO[bytes]]  # (reactor time created, queue id, open file)


class DataFilePool:
    """Hands out (queue id, open data file) pairs; refills itself while mail is arriving."""

    def __init__(
        self, store: QueueStore, runInThread: RunInThread, reactor: Any,
        batch: int = 32, max_age: float = 2.0,
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.batch = batch
        self.max_age = max_age
        self._run = runInThread
        self._ready: deque[Created] = deque()
        self._refilling = False
        self._last_take = float("-inf")
        self._expiry: Any = None  # the timer that deletes spare files once mail stops

    def take(self) -> tuple[str, IO[bytes]] | None:
        """A fresh file from the pool, or None (the caller creates one itself)."""
        now = self.reactor.seconds()
        busy = now - self._last_take < self.max_age
        self._last_take = now
        stale: list[Created] = []
        found = None
        while self._ready and found is None:
            entry = self._ready.popleft()
            if now - entry[0] <= self.max_age:
                found = entry[1], entry[2]
            else:
                stale.append(entry)
        if stale:
            self._run(_discard, self.store, stale)
        if busy and len(self._ready) < self.batch // 2:
            self._refill()
        return found

    def _refill(self) -> None:
        if self._refilling:
            return
        self._refilling = True
        d = self._run(_create, self.store, self.batch)
        d.addCallbacks(self._filled, self._failed)

    def _filled(self, files: list[tuple[str, IO[bytes]]]) -> None:
        self._refilling = False
        now = self.reactor.seconds()
        self._ready.extend((now, qid, f) for qid, f in files)
        if self._expiry is None or not self._expiry.active():
            self._expiry = self.reactor.callLater(self.max_age, self._expire)

    def _expire(self) -> None:
        """Mail stopped coming: spare files too old to be used are deleted, not left lying
        in the queue directory."""
        now = self.reactor.seconds()
        stale = []
        while self._ready and now - self._ready[0][0] > self.max_age / 2:
            stale.append(self._ready.popleft())
        if stale:
            self._run(_discard, self.store, stale)
        if self._ready:
            self._expiry = self.reactor.callLater(self.max_age, self._expire)

    def _failed(self, failure: Any) -> None:
        """A full or broken disk: the sessions create their files themselves and get the
        precise 451/452 for it."""
        self._refilling = False
        log.warn("cannot create data files ahead: {error}", error=failure.value)

    def close(self) -> None:
        """Blocking: delete the files nobody took (shutdown)."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        stale, self._ready = list(self._ready), deque()
        _discard(self.store, stale)


def _create(store: QueueStore, count: int) -> list[tuple[str, IO[bytes]]]:
    """Blocking: ``count`` new data files; as many as could be made before an error."""
    files = []
    for _ in range(count):
        qid = store.new_queue_id()
        try:
            files.append((qid, store.open_data_for_write(qid)))
        except OSError:
            if not files:
                raise
            break
    return files


def _discard(store: QueueStore, entries: list[Created]) -> None:
    """Blocking: close and delete files that were never used."""
    for _, qid, f in entries:
        try:
            f.close()
        except OSError:
            pass
        store.discard_data(qid)


__all__ = ["DataFilePool"]

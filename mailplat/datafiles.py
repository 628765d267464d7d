"""Data files created ahead of need, off the reactor.

Creating a file is a journal operation: while the queue's fsyncs keep the journal busy, the
``open(O_CREAT)`` at the start of every message can wait for it, and the reactor (every
session) waits with it (a tenth of its time with 8 sessions, docs/performance.rst). While mail
keeps coming, the spool takes its data files from a few created beforehand (by the daemon's
disk helper process, else a thread), empty and closed; the reactor opens one without
``O_CREAT`` (no journal operation) when a message starts. When there are none (the first
message after a quiet spell) it creates one in place as before.

Files also come back from the queue: a delivered message's data file is emptied and renamed
to a new queue id (``queuefiles.recycle_files``) instead of unlinked, while mail keeps coming and
the pool has room. Why: ext4 (without a journal, as on our benchmark machine) will not reuse an
inode freed in the last minutes and walks past each such inode, reading its inode table block,
for every file it creates; with a thousand messages a second that walk grew to a sixth of the
disk helper's time (docs/performance.rst). A recycled file frees no inode and needs none.

A file waiting here is empty and has no envelope: a crash leaves it to recovery, which deletes
data files that were never committed. Files older than ``max_age`` are not used (the queue
id, taken from the creation time, should tell when the message came) and are deleted.
"""

from __future__ import annotations

from collections import deque
from typing import IO, Any

from twisted.logger import Logger

from mailplat.groupsync import RunInThread
from mailplat.queuefiles import create_files, unlink_files
from mailplat.store import QueueStore

log = Logger()

Created = tuple[float, str]  # (reactor time created, queue id of an empty file)


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
        # The daemon gives its disk helper's ``run`` (diskprocess.py): then no thread of
        # the daemon competes with the reactor for the GIL.
        self._run = runInThread
        self._ready: deque[Created] = deque()
        self.capacity = 2 * batch  # files waiting, at most; beyond, delivered ones are unlinked
        self._promised = 0  # spare ids given to the queue whose files have not come back
        self._refilling = False
        self._last_take = float("-inf")
        self._expiry: Any = None  # the timer that deletes spare files once mail stops

    def take(self) -> tuple[str, IO[bytes]] | None:
        """A fresh file from the pool, or None (the caller creates one itself)."""
        now = self.reactor.seconds()
        busy = self._mail_arriving(now)
        self._last_take = now
        stale: list[Created] = []
        found = None
        while self._ready and found is None:
            entry = self._ready.popleft()
            if now - entry[0] > self.max_age:
                stale.append(entry)
            else:
                found = self._open(entry[1])
        if stale:
            self._discard(stale)
        if busy and len(self._ready) < self.batch // 2:
            self._refill()
        return found

    def spare(self) -> str | None:
        """A new queue id for the data file of a message leaving the queue, when the pool
        wants it back (mail is arriving and there is room); else None: unlink it."""
        if not self._mail_arriving(self.reactor.seconds()):
            return None
        if len(self._ready) + self._promised >= self.capacity:
            return None
        self._promised += 1
        return self.store.new_queue_id()

    def returned(self, qid: str, kept: bool) -> None:
        """``spare``'s file is back (``kept``: emptied and renamed, ready for use)."""
        self._promised -= 1
        if kept:
            self._add_ready([qid])

    def _mail_arriving(self, now: float) -> bool:
        """A message began within ``max_age``: files made or kept now will be used."""
        return now - self._last_take < self.max_age

    def _open(self, qid: str) -> tuple[str, IO[bytes]] | None:
        """A file made ahead, opened for writing; None if it is gone."""
        try:
            return qid, self.store.open_data_for_write(qid, create=False)
        except OSError as e:
            log.warn("{qid}: data file made ahead cannot be opened: {error}", qid=qid, error=e)
            return None

    def _discard(self, stale: list[Created]) -> None:
        self._run(unlink_files, [self.store.data_path(qid) for _, qid in stale])

    def _refill(self) -> None:
        if self._refilling:
            return
        self._refilling = True
        qids = [self.store.new_queue_id() for _ in range(self.batch)]
        d = self._run(create_files, [self.store.data_path(qid) for qid in qids])
        d.addCallbacks(lambda made: self._filled(qids[:made]), self._failed)

    def _filled(self, qids: list[str]) -> None:
        self._refilling = False
        self._add_ready(qids)

    def _add_ready(self, qids: list[str]) -> None:
        now = self.reactor.seconds()
        self._ready.extend((now, qid) for qid in qids)
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
            self._discard(stale)
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
        unlink_files([self.store.data_path(qid) for _, qid in stale])


__all__ = ["DataFilePool"]

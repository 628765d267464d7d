"""The spool writer: where SMTP sessions stream a message into the queue.

The bytes go straight to ``data/<qid>`` while they arrive. At the end of data the envelope is
appended to the file as its trailer and the file is fsync'd: one journal commit, one file, and
the message is durable (``store``: an unfiled message, in state incoming). Only on filesystems
that need it is the directory fsync'd too (in a round shared with concurrent commits, if any).
Then the client gets 250. Any failure answers 451/452, never 250 or 5xx, since the client still holds
the message and can simply try again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.datafiles import DataFilePool
from mailplat.envelope import Envelope, SessionInfo, Transaction
from mailplat.fsyncs import fsync_dirs, sync_file
from mailplat.groupsync import GroupSyncer, RunInThread, thread_runner
from mailplat.interfaces import IIncomingMessage, IMessageSink, SpoolError
from mailplat.replies import LOCAL_ERROR, SPOOL_FULL, Reply
from mailplat.store import QueueStore, envelope_trailer, is_disk_full

log = Logger()


def error_reply(error: BaseException | None) -> Reply:
    """452 4.3.1 when the disk is full (waiting helps), 451 4.3.0 for anything else."""
    return SPOOL_FULL if is_disk_full(error) else LOCAL_ERROR


@implementer(IMessageSink)
class Spool:
    """Accepts messages into the durable queue and hands each committed one to ``on_commit``."""

    def __init__(
        self,
        store: QueueStore,
        syncer: GroupSyncer | None,
        on_commit: Callable[[Envelope], object],
        reactor: Any = None,
        runInThread: RunInThread | None = None,
        data_files: DataFilePool | None = None,
        run_blocking: RunInThread | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.syncer = syncer or store.syncer
        self.on_commit = on_commit
        self.reactor = reactor
        self.runInThread = runInThread or thread_runner(reactor)
        self.committing = 0  # commits in flight: a lone one needs no shared sync round
        self.data_files = data_files  # files created ahead by a worker (the daemon's spool)
        # The daemon's disk helper process (diskprocess.py): commits fsync there, by path.
        self.run_blocking = run_blocking

    def begin(self, session: SessionInfo, transaction: Transaction) -> "IncomingMessage":
        """Open the data file of a new message; SpoolError when the disk refuses."""
        taken = self.data_files.take() if self.data_files is not None else None
        qid, data = taken or open_data_file(self.store)
        return IncomingMessage(self, qid, data, session, transaction)


def open_data_file(store: QueueStore) -> tuple[str, IO[bytes]]:
    """A new queue id and its data file, open for writing; SpoolError (451/452) if refused."""
    qid = store.new_queue_id()
    try:
        return qid, store.open_data_for_write(qid)
    except OSError as e:
        log.error("{qid}: cannot create data file: {error}", qid=qid, error=e)
        raise SpoolError(error_reply(e)) from e


@implementer(IIncomingMessage)
class SpooledMessage:
    """A message streaming into ``data/<qid>``: what the queue's spool and LMTP share.

    Subclasses say what the end of data means in ``complete``: a durable commit into the
    queue, or an immediate delivery. ``finish`` guards against finishing twice, after an
    abort or after a failed write; ``abort`` discards, but never once ``finish`` began.
    """

    def __init__(
        self,
        store: QueueStore,
        queue_id: str,
        data: IO[bytes],
        session: SessionInfo,
        transaction: Transaction,
        reactor: Any,
    ) -> None:
        self.queue_id = queue_id
        self.size = 0
        self.store = store
        self.reactor = reactor
        self._data = data
        self._session = session
        self._transaction = transaction
        self._error: OSError | None = None
        self._closed = False  # finish or abort has begun; nothing may be written any more

    def write(self, data: bytes) -> None:
        """Append bytes; after a failed write every later write fails the same way."""
        if self._error is not None:
            raise SpoolError(error_reply(self._error))
        try:
            self._data.write(data)
        except OSError as e:
            self._error = e
            log.error("{qid}: writing data failed: {error}", qid=self.queue_id, error=e)
            raise SpoolError(error_reply(e)) from e
        self.size += len(data)

    def finish(self, transaction: Transaction | None = None) -> "Deferred[list[Reply]]":
        """End of data: ``complete`` it, unless it was finished or aborted already (451) or
        a write failed (that write's 451/452)."""
        if self._closed:
            # Finishing twice (or after abort) must never touch a message already committed.
            return succeed([LOCAL_ERROR] * self.reply_count())
        if transaction is not None:
            self._transaction = transaction
        self._closed = True
        if self._error is not None:
            self._discard()
            return succeed([error_reply(self._error)] * self.reply_count())
        return self.complete()

    def complete(self) -> "Deferred[list[Reply]]":
        raise NotImplementedError

    def reply_count(self) -> int:
        """LMTP wants one reply per recipient after the data, SMTP a single one."""
        if self._session.protocol.upper().startswith("LMTP"):
            return max(1, len(self._transaction.recipients))
        return 1

    def envelope(self) -> Envelope:
        """The envelope of this message as received now (fields added by hooks counted)."""
        t = self._transaction
        added = tuple(t.add_headers)
        return Envelope(
            queue_id=self.queue_id,
            sender=t.sender,
            recipients=tuple(t.recipients),
            received_at=self.reactor.seconds(),
            size=self.size + sum(len(h.encode("utf-8")) + 2 for h in added),
            add_headers=added,
            body=t.body,
            smtputf8=t.smtputf8,
            envid=t.envid,
            ret=t.ret,
            session=self._session,
            data_length=self.size,
        )

    def open(self) -> IO[bytes]:
        """Read back what was written so far (for the data hook, before finish)."""
        self._data.flush()
        return open(self.store.data_path(self.queue_id), "rb")

    def abort(self) -> None:
        """Discard the message; too late once finish began (the commit cannot be recalled)."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        try:
            self._data.close()
        except OSError:
            pass  # a buffered write failing again on close changes nothing: we delete it
        try:
            self.store.remove(self.queue_id)
        except OSError as e:
            # Never fatal: the client still gets its 4xx; recovery deletes what is left.
            log.error("{qid}: cannot remove discarded message: {error}", qid=self.queue_id,
                      error=e)


class IncomingMessage(SpooledMessage):
    """One message for the queue; ``complete`` commits it durably before the 250."""

    def __init__(
        self,
        spool: Spool,
        queue_id: str,
        data: IO[bytes],
        session: SessionInfo,
        transaction: Transaction,
    ) -> None:
        super().__init__(spool.store, queue_id, data, session, transaction, spool.reactor)
        self._spool = spool

    def complete(self) -> "Deferred[list[Reply]]":
        return Deferred.fromCoroutine(self._commit()).addCallbacks(self._committed, self._failed)

    async def _commit(self) -> Envelope:
        """The commit: trailer appended and the data file fsync'd (durable now), in one
        thread hop; where the filesystem needs it, one shared round then syncs data/."""
        spool, store = self._spool, self._spool.store
        envelope = self.envelope()
        dirs = [store.data_dir] if store.sync_directories else []
        # A lone commit syncs the directory in its own hop: there is nobody to share a round
        # with, and a second hop would only add latency. Concurrent ones share rounds.
        alone = spool.committing == 0
        spool.committing += 1
        try:
            if spool.run_blocking is not None:
                # The bytes reach the page cache here; the helper makes them durable.
                self._data.write(envelope_trailer(envelope))
                self._data.close()
                await spool.run_blocking(sync_file, store.data_path(self.queue_id),
                                         dirs if alone else [])
            else:
                await spool.runInThread(_store_files, self._data, envelope,
                                        dirs if alone else [])
            if dirs and not alone:
                await spool.syncer.sync_dirs(dirs)
        finally:
            spool.committing -= 1
        return envelope

    def _committed(self, envelope: Envelope) -> list[Reply]:
        """The message is durable: say so, then let the queue take it (after our reply is
        on its way, since the queue's first delivery attempt is no business of the client)."""
        reply = Reply(250, "2.0.0", f"Ok: queued as {self.queue_id}")
        self._spool.reactor.callLater(0, self._hand_over, envelope)
        return [reply] * self.reply_count()

    def _hand_over(self, envelope: Envelope) -> None:
        try:
            self._spool.on_commit(envelope)
        except Exception:
            log.failure("{qid}: queue refused committed message", qid=self.queue_id)

    def _failed(self, failure: Failure) -> list[Reply]:
        """Undo whatever reached the disk: the client was not told 250 and will retry."""
        log.failure("{qid}: commit failed", failure, qid=self.queue_id)
        self._discard()
        return [error_reply(failure.value)] * self.reply_count()


def _store_files(data: IO[bytes], envelope: Envelope, dirs: list[str]) -> None:
    """Blocking: the data and its trailer made durable, then (when given) the directory."""
    data.write(envelope_trailer(envelope))
    _fsync_and_close(data)
    fsync_dirs(dirs)


def _fsync_and_close(data: IO[bytes]) -> None:
    """Blocking: push the buffered bytes to the disk before anyone is told they are safe."""
    try:
        data.flush()
        os.fsync(data.fileno())
    finally:
        data.close()

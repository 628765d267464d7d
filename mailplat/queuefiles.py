"""The queue's files as plain functions of paths: a message read back from its data file
(``open_data``, ``StoredMessage``) and the removals and creations of files that run in the
disk helper. No Twisted here (see diskhelper.py): the helper imports this module to run them
and to unpickle the ``StoredMessage`` a Maildir delivery job carries."""

from __future__ import annotations

import io
import os
from typing import IO

from zope.interface import implementer

from mailplat.addheaders import prefixed
from mailplat.diskhelper import idempotent
from mailplat.envelope import Envelope
from mailplat.interfaces import IStoredMessage


class _Bounded(io.RawIOBase):
    """The first ``length`` bytes of a file: the message without its trailer."""

    def __init__(self, raw: IO[bytes], length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._left)
        if count <= 0:
            return 0
        got = self._raw.readinto(memoryview(buffer).cast("B")[:count])  # type: ignore[attr-defined]
        self._left -= got or 0
        return got or 0

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_data(path: str, length: int | None) -> IO[bytes]:
    """Read a message's stored bytes: ``length`` of them (None: the whole file)."""
    if length is None:
        return open(path, "rb")
    raw = open(path, "rb", buffering=0)
    try:
        return io.BufferedReader(_Bounded(raw, length), 1 << 16)
    except BaseException:
        raw.close()
        raise


@implementer(IStoredMessage)
class StoredMessage:
    """A queued message as agents see it: its envelope and a way to read its bytes."""

    def __init__(self, envelope: Envelope, path: str) -> None:
        self.envelope = envelope
        # Not in IStoredMessage: the data file, without envelope.add_headers and followed by
        # the committed envelope, so an agent may sendfile its first envelope.data_length
        # bytes only when add_headers is empty.
        self.path = path

    def open(self) -> IO[bytes]:
        """The message as delivered: fields added by hooks, then the stored bytes."""
        envelope = self.envelope
        return prefixed(envelope.add_headers, open_data(self.path, envelope.data_length))


@idempotent
def remove_files(expected: str | None, envelopes: list[str], data: str) -> None:
    """Blocking: unlink the envelope where expected (or, not there, wherever it is among
    ``envelopes``), then the data file; what is already gone is no error."""
    _remove_envelope(expected, envelopes)
    unlink_quietly(data)


@idempotent
def recycle_files(expected: str | None, envelopes: list[str], data: str, spare: str) -> bool:
    """Blocking: ``remove_files``, except that the data file is emptied and renamed to
    ``spare`` (the data path of a new queue id) for a message still to come, instead of
    unlinked; whether ``spare`` now exists, empty. Why: a freed inode is costly to the next
    file created (see datafiles.py); an emptied file in the pool has no trailer, so recovery
    deletes it like any data file that was never committed."""
    _remove_envelope(expected, envelopes)
    try:
        _empty(data)
    except FileNotFoundError:
        return os.path.exists(spare)  # run a second time (its helper died): already done
    try:
        os.rename(data, spare)
        return True
    except OSError:
        unlink_quietly(data)
        return False


def _empty(path: str) -> None:
    """Truncate through a descriptor of our own, not by path: ext4 marks a file truncated to
    zero for a flush at its next close (auto_da_alloc), and this close takes the mark here,
    where it costs nothing. By path, the mark waited for the reactor's close after the next
    message was written, and cost it about 25 microseconds of writeback per message."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _remove_envelope(expected: str | None, envelopes: list[str]) -> None:
    if expected is None or not unlink_quietly(expected):
        for path in envelopes:
            unlink_quietly(path)


def unlink_quietly(path: str) -> bool:
    """Remove a file that may be gone (False then); ENOTDIR too means no file can be there
    (its directory was replaced by a file), and must not stop the caller from removing the rest."""
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


@idempotent
def create_files(paths: list[str]) -> int:
    """Blocking (in the disk helper): create these files, empty, mode 0600, never reusing
    one that exists; how many were made, in order, before an error (none: the error)."""
    for made, path in enumerate(paths):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            if not made:
                raise
            return made
    return len(paths)


@idempotent
def unlink_files(paths: list[str]) -> None:
    """Blocking: delete files that were never used (already gone is fine)."""
    for path in paths:
        unlink_quietly(path)

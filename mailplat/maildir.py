"""Maildir delivery (https://cr.yp.to/proto/maildir.html, with Dovecot's ``,S=<size>``).

A message is written to ``tmp/`` under a unique name, fsync'd and renamed into ``new/``: a
reader never sees a partial file. ``new/`` itself is fsync'd only where the filesystem does not
keep that rename ahead of the queue's later unlink of its copy (``mailplat.durability``), so a
crash never loses a delivered message. Further recipients of the same message get a hard link to the file already
delivered, so a message to a thousand local users is written once.

Everything here blocks; ``MaildirAgent`` runs it in the disk helper (or a thread). The
module imports no Twisted at load time, so that the helper stays small (diskhelper.py).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from zope.interface import implementer

from mailplat.addheaders import encode
from mailplat.durability import AUTO, needs_directory_sync
from mailplat.envelope import Envelope, Recipient
from mailplat.fsyncs import fsync_dir
from mailplat.interfaces import IDeliveryAgent, IStoredMessage, Route
from mailplat.replies import Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from mailplat.workers import RunInThread

CHUNK = 1 << 20  # large copies: few syscalls per message
DELIVERED = Reply(250, "2.0.0", "delivered to maildir")
MAILBOX_FULL = Reply(452, "4.2.2", "mailbox full")

_counter = itertools.count()
_pid = [os.getpid()]  # one system call less per delivery; a forked child learns its own
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
_counter_lock = threading.Lock()


def unique_name(hostname: str) -> str:
    """``<sec>.M<usec>P<pid>Q<n>.<host>``: unique per process thanks to the counter, per host
    thanks to pid and hostname (with '/' and ':' escaped as the spec asks)."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{seconds}.M{micros}P{_pid[0]}Q{n}.{host}"


def ensure_maildir(maildir: str) -> None:
    """Create tmp/, new/ and cur/ (mode 0700) on first delivery, durably."""
    subdirs = [os.path.join(maildir, sub) for sub in ("tmp", "new", "cur")]
    if all(os.path.isdir(path) for path in subdirs):
        return
    os.makedirs(maildir, mode=0o700, exist_ok=True)
    for path in subdirs:
        os.makedirs(path, mode=0o700, exist_ok=True)
    fsync_dir(maildir)
    fsync_dir(os.path.dirname(os.path.abspath(maildir)))


# Maildirs seen complete: three stat calls per delivery spared. One removed meanwhile fails
# the delivery with ENOENT (a 4xx), is forgotten here and recreated on the retry.
_known: set[str] = set()
_KNOWN_MAX = 10_000


def _ensure_known(maildir: str) -> None:
    if maildir not in _known:
        ensure_maildir(maildir)
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known.add(maildir)


def deliver_stream(
    source: IO[bytes], maildir: str, hostname: str, length: int | None = None,
    sync_directories: bool | str = AUTO,
) -> str:
    """Copy a message (``length`` bytes of ``source``, None: all) into the maildir; returns
    the path of the file in new/."""
    _ensure_known(maildir)
    base = unique_name(hostname)
    tmp = os.path.join(maildir, "tmp", base)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        _known.discard(maildir)
        raise
    try:
        try:
            size = _copy(source, fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)
        return _publish(tmp, maildir, f"{base},S={size}", sync_directories)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _copy(source: IO[bytes], fd: int, length: int | None = None) -> int:
    """Copy ``source`` to ``fd``: inside the kernel (sendfile) when the source is a plain
    file, else in large chunks; at most ``length`` bytes when given. Returns the number of
    bytes written."""
    try:
        source_fd, offset = source.fileno(), source.tell()
    except (OSError, ValueError, AttributeError):  # a stream with added header fields
        source_fd = -1
    if source_fd >= 0:
        try:
            return _sendfile(source_fd, offset, fd, length)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
    size = 0
    for _ in range(1 << 40):  # bounded: one round per CHUNK bytes
        chunk = source.read(CHUNK if length is None else min(CHUNK, length - size))
        if not chunk:
            break
        _write_all(fd, chunk)
        size += len(chunk)
    return size


def _sendfile(source_fd: int, offset: int, fd: int, length: int | None) -> int:
    size = 0
    for _ in range(1 << 40):  # bounded: one round per CHUNK bytes
        count = CHUNK if length is None else min(CHUNK, length - size)
        if count <= 0:
            break
        sent = os.sendfile(fd, source_fd, offset + size, count)
        if sent == 0:
            break
        size += sent
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def deliver_file(source_path: str, maildir: str, hostname: str) -> str:
    """Copy the file at ``source_path`` into the maildir; returns the path in new/."""
    with open(source_path, "rb") as source:
        return deliver_stream(source, maildir, hostname)


def deliver_link(
    delivered: str, maildir: str, hostname: str, sync_directories: bool | str = AUTO
) -> str:
    """Hard-link a file already delivered (hence already durable) into another maildir.
    Raises OSError (EXDEV across filesystems, ...) when the caller must copy instead."""
    _ensure_known(maildir)
    name = f"{unique_name(hostname)},S={os.stat(delivered).st_size}"
    tmp = os.path.join(maildir, "tmp", name)
    os.link(delivered, tmp)
    try:
        return _publish(tmp, maildir, name, sync_directories)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _publish(tmp: str, maildir: str, name: str, sync_directories: bool | str = AUTO) -> str:
    """tmp/ → new/, and fsync new/ where the filesystem needs it for the rename to last."""
    final = os.path.join(maildir, "new", name)
    os.rename(tmp, final)
    if needs_directory_sync(maildir, sync_directories):
        fsync_dir(os.path.join(maildir, "new"))
    return final


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def reply_for(error: OSError) -> Reply:
    """Over quota or out of space is "mailbox full"; anything else a local error; both 4xx,
    since the queue should retry."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return MAILBOX_FULL
    return Reply(451, "4.3.0", f"cannot deliver to maildir: {error.strerror or 'error'}")


class _OneMessage:
    """Delivers one message to several maildirs: copied once, then hard-linked."""

    def __init__(
        self, message: IStoredMessage, hostname: str, sync_directories: bool | str = AUTO
    ) -> None:
        self.message = message
        self.hostname = hostname
        self.sync_directories = sync_directories
        self.first: str | None = None

    def deliver(self, maildir: str) -> str:
        if self.first is not None:
            try:
                return deliver_link(self.first, maildir, self.hostname, self.sync_directories)
            except OSError:
                pass  # other filesystem, link limit, file already moved to cur/: copy
        with _open_source(self.message) as source:
            path = deliver_stream(source, maildir, self.hostname, _length(self.message),
                                  self.sync_directories)
        self.first = self.first or path
        return path


def _open_source(message: IStoredMessage) -> Any:
    """The queue's data file itself when it holds the message as delivered (no fields added
    by hooks): a bare descriptor for sendfile; else the message's own reader."""
    path = getattr(message, "path", None)  # a queue StoredMessage (see its docstring)
    envelope = getattr(message, "envelope", None)
    if path is not None and envelope is not None and not envelope.add_headers \
            and envelope.data_length is not None:
        return _RawFile(path)
    return message.open()


class _RawFile:
    """A file by descriptor, read from its start: what ``_copy`` needs for sendfile, without
    the fstat and lseek calls of a Python file object."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return 0  # sendfile is given offsets; the descriptor's own position never moves

    def read(self, size: int) -> bytes:
        return os.read(self._fd, size)  # only when sendfile is refused: from the start

    def __enter__(self) -> "_RawFile":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def _length(message: IStoredMessage) -> int | None:
    """How many bytes ``message.open()`` yields, when the envelope says (the queue's data
    file goes on with the envelope after the message: a copy in the kernel must stop)."""
    envelope: Envelope = message.envelope
    if envelope.data_length is None:
        return None
    return envelope.data_length + len(encode(envelope.add_headers))


@implementer(IDeliveryAgent)
class MaildirAgent:
    """The ``maildir`` delivery agent: ``route.destination`` is the Maildir directory."""

    name = "maildir"

    def __init__(
        self, hostname: str, reactor: Any, runInThread: RunInThread | None = None,
        sync_directories: bool | str = AUTO,
    ) -> None:
        self.hostname = hostname
        self.reactor = reactor
        self.sync_directories = sync_directories  # [queue] sync_directories
        if runInThread is None:
            from mailplat.workers import thread_runner  # Twisted: only where an agent runs

            runInThread = thread_runner(reactor, pool="delivery")
        self._run = runInThread

    def deliver(
        self, message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> "Deferred[dict[str, Reply]]":
        """All recipients in one blocking call: one hop per message, not per recipient."""
        return self._run(deliver_all, message, list(recipients), self.hostname,
                         self.sync_directories)


def deliver_all(
    message: IStoredMessage, recipients: list[tuple[Recipient, Route]], hostname: str,
    sync_directories: bool | str = AUTO,
) -> dict[str, Reply]:
    """Blocking, and a plain function so that the disk helper process can run it. Two
    recipients routed to the same maildir get the message once."""
    one = _OneMessage(message, hostname, sync_directories)
    by_maildir: dict[str, Reply] = {}
    replies: dict[str, Reply] = {}
    for recipient, route in recipients:
        maildir = route.destination
        if maildir not in by_maildir:
            try:
                one.deliver(maildir)
                by_maildir[maildir] = DELIVERED
            except OSError as e:
                by_maildir[maildir] = reply_for(e)
        replies[recipient.address] = by_maildir[maildir]
    return replies

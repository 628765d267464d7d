"""fsync by path: the durability calls that run in the disk helper (no Twisted here, see
diskhelper.py); ``groupsync`` shares directory rounds of them between sessions."""

from __future__ import annotations

import os
from collections.abc import Iterable

from mailplat.diskhelper import idempotent, urgent


def fsync_dir(path: str) -> None:
    """Make the entries (creations, renames, unlinks) of one directory durable."""
    fsync_path(path, os.O_DIRECTORY)


def fsync_path(path: str, flags: int = 0) -> None:
    """fsync by path: what another descriptor (or process) wrote becomes durable too."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str]) -> None:
    """fsync each directory once."""
    for path in paths:
        fsync_dir(path)


@urgent
@idempotent
def sync_file(path: str, dirs: list[str]) -> None:
    """Blocking: fsync a file written and closed by another (the reactor, in the daemon's
    process: fsync makes an inode's data durable whoever wrote it), then the directories."""
    fsync_path(path)
    fsync_dirs(dirs)

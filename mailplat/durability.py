"""Whether a directory must be fsync'd for a new or renamed entry in it to survive a crash.

POSIX only promises a new name is durable once its directory is fsync'd. On the journaling
filesystems Linux mail servers live on, the name is logged in the same journal transaction as
the inode it points to, and transactions commit in order: fsync of a new file makes its name
durable too, and a rename followed by a later, committed unlink can never come back without
the rename. Postfix relies on exactly this (one fsync of the queue file before 250, none of
its directories). Each directory fsync costs a device cache flush or a journal commit per
message, so mailplat skips it where the filesystem makes it redundant ("auto"), and does it
everywhere else (NFS, vfat, unknown filesystems) or when the operator says so.
"""

from __future__ import annotations

import os
import threading

# Filesystems whose fsync of a file also commits the directory entries created or renamed
# with it (journal or log ordering). tmpfs and ramfs lose everything on a crash anyway.
JOURNALED = frozenset({"ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "zfs",
                       "bcachefs", "tmpfs", "ramfs"})

AUTO = "auto"

_cache: dict[str, str] = {}
_lock = threading.Lock()


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding ``path`` ("" when it cannot be told)."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = _unescape(fields[4])
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fstype
    return best_type


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def needs_directory_sync(path: str, setting: bool | str = AUTO) -> bool:
    """Must directories under ``path`` be fsync'd after creating or renaming entries?

    ``setting`` is the operator's ``sync_directories``: true, false or "auto" (decided by the
    filesystem type, looked up once per path)."""
    if setting != AUTO:
        return bool(setting)
    fstype = _cache.get(path)  # a dict read needs no lock; only the writes are serialized
    if fstype is None:
        fstype = filesystem_type(path)
        with _lock:
            _cache[path] = fstype
    return fstype not in JOURNALED


__all__ = ["AUTO", "JOURNALED", "filesystem_type", "needs_directory_sync"]

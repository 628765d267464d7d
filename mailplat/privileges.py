"""Giving the mail user what we created while still root.

``twistd --uid/--gid`` binds the listeners as root and then drops privileges, as Postfix's
master does. The operator makes the data directory belong to the mail user (as Postfix's
queue_directory belongs to postfix); whatever mailplat created in it while still root — queue
and Maildir roots, the generated certificate, the UNIX sockets — is handed to that same owner,
so the daemon can go on writing there once it is no longer root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from twisted.logger import Logger

log = Logger()


def adopt_data_dir(data_dir: str) -> int:
    """When root, chown what lies up to two levels inside ``data_dir`` to its owner, if that
    owner is not root. Deeper levels (queue files, mailboxes) are only ever written by the
    daemon after privileges are dropped. Returns how many entries changed owner."""
    if os.geteuid() != 0:
        return 0
    owner = os.stat(data_dir)
    if owner.st_uid == 0:
        return 0
    changed = 0
    for path in _shallow_entries(data_dir, depth=2):
        status = os.lstat(path)
        if (status.st_uid, status.st_gid) != (owner.st_uid, owner.st_gid):
            os.lchown(path, owner.st_uid, owner.st_gid)
            changed += 1
    if changed:
        log.info("gave {count} entries in {dir} to uid {uid}", count=changed, dir=data_dir,
                 uid=owner.st_uid)
    return changed


def _shallow_entries(top: str, depth: int) -> Iterator[str]:
    try:
        names = os.listdir(top)
    except OSError:
        return
    for name in names:
        path = os.path.join(top, name)
        yield path
        if depth > 1 and os.path.isdir(path) and not os.path.islink(path):
            yield from _shallow_entries(path, depth - 1)

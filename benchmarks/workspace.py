"""Where the runs' throwaway queues and Maildirs go: one directory per benchmark, marked so
that each run's files land in block groups of their own.

Why: on ext4 without a journal (this project's benchmark VM) a new inode is never taken from
one freed in the last minutes; the allocator walks past each of them, reading its inode table
block, before it finds a free one. The previous run's cleanup (thousands of Maildir files) and
the previous server's own queue deletions then tax every file the next run creates: the same
commit measured 1,740 msgs/s in (b) after a quiet spell and 1,230 two runs later. With the
ext4 "top of directory hierarchy" flag (``chattr +T``) on the parent, the Orlov allocator
spreads each run's directory to another group, so a run pays only for the deletions it makes
itself, as it would on a server of its own. For the same reason the runs' files are removed
only at the end (run.py): (b) measured right after the removal of the previous server's
4,000 Maildir files ran at 1,040–1,160 msgs/s, and at 1,580–1,640 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


def make_root(workdir: str | None) -> tuple[str, bool]:
    """A fresh directory for one benchmark invocation and whether runs are spread under it
    (False where the filesystem or the machine has no such flag: nothing changes then)."""
    root = tempfile.mkdtemp(prefix="mailplat-bench-", dir=workdir)
    os.chmod(root, 0o755)  # Postfix's daemons run as postfix and must reach their queue
    chattr = shutil.which("chattr")
    spread = False
    if chattr is not None:
        done = subprocess.run([chattr, "+T", root], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False)
        spread = done.returncode == 0
    return root, spread

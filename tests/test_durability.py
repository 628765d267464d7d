"""When directories need an fsync of their own (mailplat.durability)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailplat.durability import filesystem_type, needs_directory_sync

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,discard
25 22 0:21 / /proc rw - proc proc rw
30 22 0:40 / /var/spool/nfs rw - nfs4 server:/export rw
31 22 0:41 / /srv/with\\040space rw - vfat /dev/vdb1 rw
32 30 0:42 / /var/spool/nfs/local rw - xfs /dev/vdc1 rw
"""


class FilesystemTypeTests(SynchronousTestCase):
    def mountinfo(self) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(MOUNTINFO)
        return path

    def test_longest_mount_point_wins(self) -> None:
        info = self.mountinfo()
        self.assertEqual(filesystem_type("/var/mail", info), "ext4")
        self.assertEqual(filesystem_type("/var/spool/nfs/q", info), "nfs4")
        self.assertEqual(filesystem_type("/var/spool/nfs/local/q", info), "xfs")
        self.assertEqual(filesystem_type("/var/spool/nfsx", info), "ext4")
        self.assertEqual(filesystem_type("/srv/with space/q", info), "vfat")

    def test_unreadable_mountinfo_is_unknown(self) -> None:
        self.assertEqual(filesystem_type("/", self.mktemp()), "")

    def test_operator_setting_wins(self) -> None:
        self.assertTrue(needs_directory_sync("/", True))
        self.assertFalse(needs_directory_sync("/", False))

    def test_auto_follows_the_filesystem(self) -> None:
        """This machine's own root: journaled filesystems need no directory fsync."""
        fstype = filesystem_type(".")
        self.assertEqual(needs_directory_sync(".", "auto"),
                         fstype not in {"ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
                                        "zfs", "bcachefs", "tmpfs", "ramfs"})

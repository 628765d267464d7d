"""Privilege drop: what root created in the data dir goes to the data dir's owner."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mailplat.privileges import adopt_data_dir

NOBODY = 65534


class AdoptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.top = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.top, "queue", "data"))
        os.makedirs(os.path.join(self.top, "mail", "localhost", "bob", "new"))
        with open(os.path.join(self.top, "queue", "data", "MSG"), "w") as f:
            f.write("x")

    def test_entries_follow_the_owner(self) -> None:
        """As root, with the data dir owned by the mail user, the first two levels inside it
        are given to that user; deeper levels (mailboxes, queue files) are left alone."""
        if os.geteuid() != 0:
            self.assertEqual(adopt_data_dir(self.top), 0)
            return
        os.chown(self.top, NOBODY, NOBODY)
        self.assertEqual(adopt_data_dir(self.top), 4)
        for path in ("queue", "queue/data", "mail", "mail/localhost"):
            self.assertEqual(os.stat(os.path.join(self.top, path)).st_uid, NOBODY, path)
        self.assertEqual(os.stat(os.path.join(self.top, "mail/localhost/bob")).st_uid, 0)
        self.assertEqual(os.stat(os.path.join(self.top, "queue/data/MSG")).st_uid, 0)

    def test_root_owned_data_dir_untouched(self) -> None:
        """A data dir that root owns means no privilege drop is planned: nothing changes."""
        self.assertEqual(adopt_data_dir(self.top), 0)
        self.assertEqual(os.stat(os.path.join(self.top, "queue")).st_uid, os.geteuid())

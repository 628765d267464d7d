"""The disk helper stays free of Twisted while it runs every kind of job the daemon sends it
(it would otherwise hold ~20 MB more: docs/performance.rst, "Sixth round")."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.diskprocess import DiskProcess
from mailplat.envelope import Envelope, Recipient
from mailplat.fsyncs import fsync_dirs, sync_file
from mailplat.interfaces import Route
from mailplat.maildir import deliver_all
from mailplat.queuefiles import (StoredMessage, create_files, recycle_files, remove_files,
                                 unlink_files)
from mailplat.workers import Batcher
from tests.helperprobe import loaded_modules

# The modules whose functions and argument classes the daemon sends to the helper.
JOB_MODULES = ["mailplat.diskhelper", "mailplat.fsyncs", "mailplat.queuefiles", "mailplat.maildir"]


def twisted_modules(names: list[str]) -> list[str]:
    return [name for name in names if name == "twisted" or name.startswith("twisted.")]


class ImportTests(SynchronousTestCase):
    def test_job_modules_import_no_twisted(self) -> None:
        code = ("import importlib, json, sys\n"
                f"for name in {JOB_MODULES!r}: importlib.import_module(name)\n"
                "print(json.dumps(sorted(sys.modules)))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True)
        import json

        self.assertEqual(twisted_modules(json.loads(done.stdout)), [])


class HelperTests(TestCase):
    """A real helper, sent the hot path's jobs, then asked what it has loaded."""

    def setUp(self) -> None:
        self.disk = DiskProcess(reactor)
        self.disk.startService()
        self.addCleanup(self.disk.stopService)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "data"))

    def data_file(self, name: str, content: bytes) -> str:
        path = os.path.join(self.root, "data", name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    async def test_jobs_leave_the_helper_without_twisted(self) -> None:
        message = b"Subject: hi\r\n\r\nhello\r\n"
        data = self.data_file("Q1", message + b"trailer")
        await self.disk.run(sync_file, data, [os.path.join(self.root, "data")])
        await self.disk.run(fsync_dirs, [self.root])
        made = [os.path.join(self.root, "data", n) for n in ("P1", "P2")]
        self.assertEqual(await self.disk.run(create_files, made), 2)

        recipient = Recipient("bob@example.com")
        envelope = Envelope("Q1", "alice@example.org", (recipient,), 0.0,
                            data_length=len(message))
        maildir = os.path.join(self.root, "mail", "bob")
        route = Route("maildir", maildir, "bob")
        replies = await self.disk.run(deliver_all, StoredMessage(envelope, data),
                                      [(recipient, route)], "mx.test", True)
        self.assertEqual(replies["bob@example.com"].code, 250)
        [name] = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), message)

        batcher = Batcher(self.disk.run)
        kept = batcher.run(recycle_files, None, [], data, made[0])
        gone = batcher.run(remove_files, None, [], made[1])
        self.assertTrue(await kept)
        await gone
        await self.disk.run(unlink_files, [made[0]])
        self.assertEqual(os.listdir(os.path.join(self.root, "data")), [])

        helper_pid = await self.disk.run(os.getpid)
        self.assertNotEqual(helper_pid, os.getpid())  # the jobs did run over there
        self.assertEqual(twisted_modules(await self.disk.run(loaded_modules)), [])

"""The disk helper process: jobs run there (not here), answers and errors come back, a dead
helper fails what it had and is replaced, a stop lets it finish its jobs."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat import diskhelper, diskprocess
from mailplat.diskhelper import THREADS, answer, idempotent, serve, urgent
from mailplat.diskprocess import DiskProcess, DiskProcessLost
from mailplat.fsyncs import sync_file
from mailplat.store import recycle_files


def process_id() -> int:
    return os.getpid()


def fail_with(code: int) -> None:
    raise OSError(code, os.strerror(code))


def sleep_then_write(path: str, seconds: float) -> str:
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("done")
    return path


def meet(directory: str, name: str, count: int) -> bool:
    """Arrive in ``directory``; True once ``count`` jobs have arrived, False after 10 s."""
    open(os.path.join(directory, name), "w").close()
    for _ in range(1000):
        if len(os.listdir(directory)) >= count:
            return True
        time.sleep(0.01)
    return False


@idempotent
def write_once_slowly(path: str, seconds: float) -> str:
    """Idempotent: the same file with the same content, however often it runs."""
    return sleep_then_write(path, seconds)


@urgent
def urgent_process_id() -> int:
    return os.getpid()


def wait_for_gate(path: str) -> bool:
    """Block a helper thread until ``path`` exists: True, or False after 10 s."""
    for _ in range(1000):
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


def unpicklable_result() -> Any:
    return lambda: None


class HelperTests(TestCase):
    """Against a real helper process, started as the daemon starts it."""

    def setUp(self) -> None:
        self.disk = DiskProcess(reactor)
        self.disk.startService()
        self.addCleanup(self.stop)

    def stop(self) -> Any:
        return self.disk.stopService() if self.disk.running else None

    async def test_runs_in_another_process(self) -> None:
        """The job's answer comes back, computed by a process that is not this one."""
        pid = await self.disk.run(process_id)
        self.assertNotEqual(pid, os.getpid())
        self.assertEqual(pid, self.disk._process.transport.pid)  # type: ignore[union-attr]

    async def test_error_comes_back(self) -> None:
        """An OSError raised there arrives here with its errno (a commit answers 452 by it)."""
        with self.assertRaises(OSError) as raised:
            await self.disk.run(fail_with, errno.ENOSPC)
        self.assertEqual(raised.exception.errno, errno.ENOSPC)

    async def test_unpicklable_result_is_an_error(self) -> None:
        with self.assertRaises(OSError) as raised:
            await self.disk.run(unpicklable_result)
        self.assertIn("pickle", str(raised.exception).lower())

    async def test_unpicklable_job_runs_on_a_thread(self) -> None:
        """A closure cannot travel to the helper: it still runs, here, off the reactor."""
        where: list[str] = []
        await self.disk.run(lambda: where.append(threading.current_thread().name))
        self.assertNotEqual(where, [threading.main_thread().name])

    async def test_sync_file(self) -> None:
        """The spool's commit job: fsync by path, in the helper."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"data")
        self.assertIsNone(await self.disk.run(sync_file, path, []))
        with self.assertRaises(FileNotFoundError):
            await self.disk.run(sync_file, path + ".missing", [])

    async def test_recycle_files(self) -> None:
        """The queue's removal that hands a data file back to the spool, in the helper."""
        data, spare = self.mktemp(), self.mktemp()
        with open(data, "wb") as f:
            f.write(b"delivered message")
        inode = os.stat(data).st_ino
        self.assertTrue(await self.disk.run(recycle_files, None, [], data, spare))
        self.assertFalse(os.path.exists(data))
        self.assertEqual((os.stat(spare).st_ino, os.path.getsize(spare)), (inode, 0))

    async def test_jobs_run_concurrently(self) -> None:
        """Several threads there: four jobs that each wait for the other three all finish
        (run one after another, each would give up waiting)."""
        meeting = self.mktemp()
        os.mkdir(meeting)
        seen = await gatherResults([self.disk.run(meet, meeting, str(n), 4) for n in range(4)])
        self.assertEqual(seen, [True] * 4)

    async def test_dead_helper_fails_its_jobs_and_is_replaced(self) -> None:
        """Killed with a job in flight: that job fails with DiskProcessLost (an OSError, so
        a commit answers 451), and a new helper takes the next jobs."""
        first = await self.disk.run(process_id)
        path = self.mktemp()
        in_flight = self.disk.run(sleep_then_write, path, 5.0)
        os.kill(first, signal.SIGKILL)
        with self.assertRaises(DiskProcessLost) as raised:
            await in_flight
        self.assertIsInstance(raised.exception, OSError)
        self.flushLoggedErrors()
        await _wait(lambda: self.disk.started == 2 and self.disk.channel is not None
                    and self.disk.channel.open)
        second = await self.disk.run(process_id)
        self.assertNotIn(second, (first, os.getpid()))

    async def test_idempotent_job_runs_again_when_the_helper_dies(self) -> None:
        """An fsync or an unlink lost with its helper is simply run again, on a thread: a
        commit in flight then still gets its 250 instead of a 451."""
        first = await self.disk.run(process_id)
        path = self.mktemp()
        in_flight = self.disk.run(write_once_slowly, path, 2.0)
        await _wait(lambda: bool(self.disk.channel and self.disk.channel.pending))
        os.kill(first, signal.SIGKILL)
        self.assertEqual(await in_flight, path)
        with open(path) as f:
            self.assertEqual(f.read(), "done")
        self.flushLoggedErrors()

    async def test_urgent_jobs_pass_busy_background_threads(self) -> None:
        """With every background thread busy (Maildir copies, say), a commit's job still
        runs at once: the gate opens only after its answer, so had it waited for a
        background thread, the blocked jobs would have given up (False)."""
        gate = self.mktemp()
        blocked = [self.disk.run(wait_for_gate, gate) for _ in range(THREADS + 2)]
        pid = await self.disk.run(urgent_process_id)
        self.assertNotEqual(pid, os.getpid())
        open(gate, "w").close()
        self.assertEqual(await gatherResults(blocked), [True] * (THREADS + 2))

    async def test_stop_finishes_jobs_in_flight(self) -> None:
        """Stopping the service lets the helper finish and answer what it has, then exit."""
        path = self.mktemp()
        job = self.disk.run(sleep_then_write, path, 0.3)
        pid = self.disk._process.transport.pid  # type: ignore[union-attr]
        await self.disk.stopService()
        self.assertEqual(await job, path)
        with open(path) as f:
            self.assertEqual(f.read(), "done")
        self.assertFalse(_alive(pid))

    async def test_after_stop_jobs_run_on_threads(self) -> None:
        await self.disk.stopService()
        self.assertEqual(await self.disk.run(process_id), os.getpid())


class ServeTests(SynchronousTestCase):
    """The helper's loop, run here on a socket pair."""

    def test_answers_each_job_then_ends_with_input(self) -> None:
        import pickle

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = threading.Thread(target=serve, args=(theirs, 2))
        server.start()
        for job in (1, 2, 3):
            ours.send(pickle.dumps((job, fail_with if job == 2 else process_id,
                                    (errno.EIO,) if job == 2 else ())))
        ours.shutdown(socket.SHUT_WR)
        server.join(10)
        self.assertFalse(server.is_alive())
        answers = {}
        for _ in range(3):
            job, ok, value = pickle.loads(ours.recv(1 << 16))
            answers[job] = (ok, value)
        self.assertEqual(answers[1], (True, os.getpid()))
        self.assertEqual(answers[3], (True, os.getpid()))
        self.assertFalse(answers[2][0])
        self.assertEqual(answers[2][1].errno, errno.EIO)
        ours.close()
        theirs.close()

    def test_answer_of_unpicklable_exception(self) -> None:
        import pickle

        class Local(Exception):
            pass

        def boom() -> None:
            raise Local("x")

        job, ok, value = pickle.loads(answer(7, boom, ()))
        self.assertEqual((job, ok), (7, False))
        self.assertIsInstance(value, OSError)
        self.assertIn("Local", str(value))

    def test_oversized_job_is_refused_here(self) -> None:
        """A job larger than one packet would not pass the socket: the caller runs it
        elsewhere (None)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        channel = diskprocess._Channel(ours, reactor)
        self.assertIsNone(channel.send(process_id, (b"x" * (diskhelper.MAX_PACKET + 1),)))
        self.assertEqual(channel.pending, {})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie not yet reaped still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _wait(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        d: Deferred[None] = Deferred()
        reactor.callLater(0.05, d.callback, None)
        await d


class DaemonTests(TestCase):
    """The daemon's hot path goes through its helper: a message taken by SMTP is delivered
    into the Maildir by the helper process (its pid is in the Maildir file name)."""

    def test_delivery_by_the_helper(self) -> None:
        import smtplib

        from tests.daemon import HOST, Daemon, wait_for_files

        daemon = Daemon(self.mktemp())
        server = daemon.in_process(self)

        def client() -> list[str]:
            with smtplib.SMTP(HOST, daemon.port, local_hostname="c.test", timeout=10) as smtp:
                refused = smtp.sendmail("alice@localhost", ["rose@localhost"],
                                        b"Subject: helper\r\n\r\nbody\r\n")
                self.assertEqual(refused, {})
            return wait_for_files(daemon.maildir("rose"), 1)

        def check(paths: list[str]) -> None:
            helper = server.disk._process.transport.pid
            self.assertIn(f"P{helper}Q", os.path.basename(paths[0]))
            with open(paths[0], "rb") as f:
                self.assertTrue(f.read().endswith(b"Subject: helper\r\n\r\nbody\r\n"))

        from twisted.internet.threads import deferToThread

        return deferToThread(client).addCallback(check)


class PrivilegeTests(SynchronousTestCase):
    """``twistd --uid/--gid``: the helper is started after the drop, so it too runs as the
    mail user, and the Maildir files it writes belong to that user."""

    def test_helper_runs_as_the_mail_user(self) -> None:
        import pwd
        import smtplib

        from twisted.trial.unittest import SkipTest

        from tests.daemon import HOST, Daemon, wait_for_files, wait_until

        if os.geteuid() != 0:
            raise SkipTest("needs root to drop privileges (CI runs the tests as root)")
        nobody = pwd.getpwnam("nobody")
        workdir = os.path.abspath(self.mktemp())
        daemon = Daemon(workdir)
        for path in (os.path.dirname(workdir), workdir):
            os.chmod(path, 0o755)  # the mail user must reach its data dir
        os.makedirs(daemon.data_dir)
        os.chown(daemon.data_dir, nobody.pw_uid, nobody.pw_gid)
        daemon.twistd_args = ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)]
        daemon.start()
        self.addCleanup(daemon.stop)
        with smtplib.SMTP(HOST, daemon.port, local_hostname="c.test", timeout=10) as smtp:
            self.assertEqual(smtp.sendmail("a@localhost", ["rose@localhost"],
                                           b"Subject: uid\r\n\r\nbody\r\n"), {})
        [path] = wait_for_files(daemon.maildir("rose"), 1)
        self.assertEqual(os.stat(path).st_uid, nobody.pw_uid)
        assert daemon.process is not None
        self.assertEqual(_uid(daemon.process.pid), nobody.pw_uid)
        if _may_run(sys.executable, nobody.pw_uid, nobody.pw_gid):
            helpers = wait_until(lambda: _children(daemon.process.pid), 10, "the disk helper")
            self.assertEqual([_uid(pid) for pid in helpers], [nobody.pw_uid])
            self.assertIn(f"P{helpers[0]}Q", os.path.basename(path))
        else:
            # An interpreter the mail user cannot run (here: a pyenv build under /root):
            # the daemon says so and does the disk work on its own threads.
            self.assertIn("cannot start the disk helper", daemon.log())
            self.assertIn(f"P{daemon.process.pid}Q", os.path.basename(path))
            self.assertEqual(_children(daemon.process.pid), [])


def _may_run(executable: str, uid: int, gid: int) -> bool:
    """Whether ``uid`` can start this Python (its path may lie in a directory of root's)."""
    import subprocess

    try:
        result = subprocess.run([executable, "-c", "pass"], user=uid, group=gid,
                                extra_groups=[], capture_output=True, timeout=30)
    except PermissionError:
        return False
    return result.returncode == 0


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")

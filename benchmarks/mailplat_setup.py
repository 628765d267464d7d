"""Start and stop a throwaway mailplat for one benchmark scenario.

The daemon runs as ``twistd -n --pidfile= mailplat --config FILE`` started through the
interpreter running the harness, so it is the checkout's mailplat that gets measured.
Everything (queue, Maildirs, log) lives in one temp directory removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from benchmarks.measure import count_files, free_port, wait_for_banner

DOMAIN = "bench.example"
USER = "bench"
RECIPIENT = f"{USER}@{DOMAIN}"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twistd itself, run by the harness's interpreter. "python -m twisted.scripts.twistd" would be
# shorter but does nothing: that module has no __main__ block.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def build_compiled_parts(source: str) -> None:
    """Build the checkout's C scanner in place (``setup.py build_ext --inplace``) if it has one
    and it is not built yet: a checkout made by ``git archive`` would otherwise be measured
    with the Python fallback. A failed build is reported and the run goes on without it."""
    if not os.path.exists(os.path.join(source, "mailplat", "_linescan.c")):
        return  # an older checkout: nothing to build
    if any(name.startswith("_linescan.") and name.endswith((".so", ".pyd"))
           for name in os.listdir(os.path.join(source, "mailplat"))):
        return
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=source, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"warning: could not build {source}'s C scanner; it runs with the Python "
              f"fallback:\n{done.stderr.strip()[-800:]}", file=sys.stderr)


def render_config(base: str, port: int, message_size: int, receivers: int = 0) -> str:
    """The throwaway TOML: one relay listener on 127.0.0.1:port, Maildirs under ``base``,
    ``receivers`` more processes for the sessions."""
    return "\n".join([
        'hostname = "bench-mailplat.localdomain"',
        f'data_dir = "{base}/var"',
        f"receivers = {receivers}",
        "",
        "[limits]",
        f"message_size = {message_size}",
        "",
        "[[listener]]",
        'name = "smtp"',
        f'endpoint = "tcp:{port}:interface=127.0.0.1:backlog=1024"',
        'profile = "relay"',
        "",
        f'[domains."{DOMAIN}"]',
        "catch_all = true",
        "",
    ])


class MailplatServer:
    """One mailplat daemon with its own config, queue and Maildir, on a free loopback port."""

    name = "mailplat"

    def __init__(
        self, message_size: int, source: str = REPO, env: dict[str, str] | None = None,
        twistd_args: list[str] | None = None, receivers: int = 0,
    ) -> None:
        self.message_size = message_size
        self.receivers = receivers
        self.tree = True  # CPU and memory summed over the daemon and its helper/receivers
        self.source = source  # the checkout whose mailplat package is measured
        self.extra_env = env or {}
        self.twistd_args = twistd_args or []  # e.g. --profile=FILE --profiler=cprofile
        self.base = ""
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def maildir_new(self) -> str:
        return os.path.join(self.base, "var", "mail", DOMAIN, USER, "new")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "mailplat.log")

    def start(self, workdir: str | None = None) -> None:
        self.base = tempfile.mkdtemp(prefix="bench-mailplat-", dir=workdir)
        self.port = free_port()
        config = os.path.join(self.base, "mailplat.toml")
        with open(config, "w") as f:
            f.write(render_config(self.base, self.port, self.message_size, self.receivers))
        env = dict(os.environ, PYTHONPATH=self.source + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update(self.extra_env)
        command = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile", self.log_path,
                   *self.twistd_args, "mailplat", "--config", config]
        self.process = subprocess.Popen(
            command, cwd=self.base, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.base, "stderr"), "wb"),
        )
        try:
            wait_for_banner(self.port, alive=lambda: self.process is not None and self.process.poll() is None)
        except RuntimeError:
            self.stop(keep=True)
            raise RuntimeError(f"mailplat did not start; see {self.base}/stderr and {self.log_path}")

    def pids(self) -> list[int]:
        if not self.process or self.process.poll() is not None:
            return []
        if not self.tree:
            return [self.process.pid]
        from benchmarks.measure import process_tree

        return [stat.pid for stat in process_tree(self.process.pid)]

    @property
    def root_pid(self) -> int:
        assert self.process is not None
        return self.process.pid


    def delivered(self) -> int:
        return count_files(self.maildir_new)

    def queue_left(self) -> int:
        """Envelopes still in the queue (should be 0 once everything is delivered)."""
        queue = os.path.join(self.base, "var", "queue")
        return sum(count_files(os.path.join(queue, s)) for s in ("incoming", "active", "deferred", "hold"))

    def stop(self, keep: bool = False) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; the temp directory goes unless ``keep``."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.process = None
        if not keep and self.base:
            shutil.rmtree(self.base, ignore_errors=True)


"""A real ``twistd -n mailplat`` in a subprocess, for interop, crash and restart tests.

Usage (from any trial test case; everything is bounded in time)::

    from tests.daemon import Daemon, wait_for_files, strip_received

    daemon = Daemon.started(self, config={"queue": {"retry_delay": "1s"}})
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.sendmail("a@localhost", ["bob@localhost"], b"Subject: x\\r\\n\\r\\nhi\\r\\n")
    [path] = wait_for_files(daemon.maildir("bob"), 1)

API, all of it:

``Daemon(workdir, listeners=None, config=None, extra_toml="")``
    Writes ``<workdir>/mailplat.toml``: hostname ``mx.test``, ``data_dir=<workdir>/data``,
    domain ``localhost`` catch-all, and one ``[[listener]]`` per entry of ``listeners``
    (name → profile, or name → dict of listener keys; default ``{"smtp": "relay"}``). Each
    listener's ``endpoint`` defaults to ``tcp:{port}:interface=127.0.0.1``; wherever an
    endpoint has ``{port}``, a free loopback port (asked of the OS) goes there and into
    ``ports[name]``, and ``start`` waits until it accepts connections.
    ``config`` is a nested dict deep-merged into the generated one (e.g. ``{"limits":
    {"message_size": "60M"}}``, ``{"tls": {...}}``); ``extra_toml`` is raw TOML appended at
    the end (so it must start with a table header and not repeat a generated table).
``start(timeout)``, ``stop(timeout)`` (SIGTERM, then wait), ``kill()`` (SIGKILL, no cleanup),
``restart()``; ``Daemon.started(testcase, ...)`` builds, starts and registers a cleanup;
``in_process(testcase)`` serves the same config from a ``MailServer`` in the test's process.
Attributes: ``port`` (the first listener's), ``ports``, ``workdir``, ``data_dir``,
``queue_dir``, ``maildir_root``, ``config_path``, ``log_path``; ``log()`` returns the log
text; ``maildir(user, domain)`` is a user's ``new/``; ``queue_files()`` lists what is left
in the queue and ``wait_queue_empty(timeout)`` waits until nothing is. Module functions: ``free_port``, ``wait_for_port``, ``wait_for_files``,
``wait_until``, ``strip_received``, ``delivered_body``, ``read_reply``, ``toml_text``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import mailplat

T = TypeVar("T")
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Where the mailplat under test lives: the daemon must run the same code the tests import.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mailplat.__file__)))
# ``python -m twisted.scripts.twistd`` does nothing (the module has no __main__ block).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = HOST) -> int:
    """A port the OS lets us bind right now, chosen below the ephemeral range: between the
    probe and the daemon's bind, no outgoing connection (swaks, smtplib, the daemon's own
    clients) can be given it as its local port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a crowded machine: any port
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something true; AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float = START_TIMEOUT, host: str = HOST) -> None:
    """Wait until something accepts TCP connections on ``port``."""

    def accepts() -> bool:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(accepts, timeout, f"{host}:{port} to accept connections")


def wait_for_files(directory: str, count: int, timeout: float = 15.0) -> list[str]:
    """Paths of the files in ``directory`` once there are at least ``count``, sorted."""

    def files() -> list[str] | None:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return None if count else []
        paths = [os.path.join(directory, n) for n in names]
        paths = [p for p in paths if os.path.isfile(p)]
        return paths if len(paths) >= count else None

    if count == 0:
        return files() or []
    return wait_until(files, timeout, f"{count} file(s) in {directory}")


# The first two lines of the trace field mailplat prepends (mailplat.trace.received_header).
_RECEIVED = re.compile(rb"Received: from [^\r\n]*\r\n\tby [^\r\n]* \(mailplat\) with ")


def received_length(head: bytes) -> int:
    """Length of our Received: field (with its folded lines) at the start of ``head``."""
    if not _RECEIVED.match(head):
        raise AssertionError(f"message does not start with mailplat's Received: {head[:200]!r}")
    end = 0
    while True:
        line_end = head.index(b"\r\n", end) + 2
        end = line_end
        if head[end:end + 1] not in (b"\t", b" "):
            return end


def strip_received(message: bytes) -> bytes:
    """The message as the client sent it: our prepended Received: field removed, exactly."""
    return message[received_length(message[:4096]):]


def delivered_body(path: str) -> bytes:
    """A delivered Maildir file without our Received: field: what the client sent."""
    with open(path, "rb") as f:
        return strip_received(f.read())


def read_reply(stream: Any) -> tuple[int, list[bytes]]:
    """One (possibly multi-line) SMTP reply from a socket's ``makefile("rb")``: code, texts."""
    texts = []
    for _ in range(100):
        line = stream.readline(2048)
        if len(line) < 4 or not line[:3].isdigit():
            raise AssertionError(f"bad or missing reply line {line!r} after {texts!r}")
        texts.append(line[4:].rstrip(b"\r\n"))
        if line[3:4] == b" ":
            return int(line[:3]), texts
    raise AssertionError("reply longer than 100 lines")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(table: Mapping[str, Any], prefix: str = "") -> str:
    """A nested dict as TOML: plain values, tables, and lists of dicts as arrays of tables."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for key, value in table.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, dict):
            plain = any(not isinstance(v, dict) and not _is_table_array(v) for v in value.values())
            lines += ["", f"[{name}]"] if plain or not value else []
            lines.append(toml_text(value, name))
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{name}]]", toml_text(item, name)]
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, descending into tables present in both."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Daemon:
    """One mailplat server process with a throwaway config; see the module docstring."""

    def __init__(
        self,
        workdir: str,
        listeners: Mapping[str, str | Mapping[str, Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        extra_toml: str = "",
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.data_dir = os.path.join(self.workdir, "data")
        self.queue_dir = os.path.join(self.data_dir, "queue")
        self.maildir_root = os.path.join(self.data_dir, "mail")
        self.config_path = os.path.join(self.workdir, "mailplat.toml")
        self.log_path = os.path.join(self.workdir, "mailplat.log")
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.twistd_args: list[str] = []  # e.g. --uid/--gid, before the plugin name
        tables = self._listener_tables(listeners or {"smtp": "relay"})
        base = {
            "hostname": "mx.test",
            "data_dir": self.data_dir,
            "listener": tables,
            "domains": {"localhost": {"catch_all": True}},
        }
        text = toml_text(deep_merge(base, config or {}))
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text + ("\n" + extra_toml if extra_toml else ""))

    def _listener_tables(self, listeners: Mapping[str, Any]) -> list[dict[str, Any]]:
        """[[listener]] tables; only endpoints with a ``{port}`` get (and are waited on at)
        a free loopback port."""
        tables = []
        for name, spec in listeners.items():
            table = {"profile": spec} if isinstance(spec, str) else dict(spec)
            endpoint = table.get("endpoint", "tcp:{port}:interface=" + HOST)
            if "{port}" in endpoint:
                self.ports[name] = free_port()
                endpoint = endpoint.replace("{port}", str(self.ports[name]))
            tables.append({"name": name, **table, "endpoint": endpoint})
        return tables

    @classmethod
    def started(cls, testcase: Any, workdir: str | None = None, **kwargs: Any) -> "Daemon":
        """Build and start a daemon for ``testcase``, killed again in its cleanup."""
        daemon = cls(workdir or testcase.mktemp(), **kwargs)
        testcase.addCleanup(daemon.kill)
        daemon.start()
        return daemon

    def in_process(self, testcase: Any) -> Any:
        """The same config served by a ``MailServer`` in this process on the global reactor
        (for trial ``TestCase``s: faster than a subprocess); stopped in the cleanup."""
        from twisted.internet import reactor

        from mailplat.config import load_config
        from mailplat.server import MailServer

        server = MailServer(load_config(self.config_path), reactor)
        server.startService()
        testcase.addCleanup(lambda: server.stopService() if server.running else None)
        return server

    @property
    def port(self) -> int:
        """The port of the first listener that got one."""
        if not self.ports:
            raise AttributeError("no listener has a {port} endpoint")
        return next(iter(self.ports.values()))

    def maildir(self, user: str, domain: str = "localhost") -> str:
        """The ``new/`` directory of a user's Maildir."""
        return os.path.join(self.maildir_root, domain, user, "new")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def queue_files(self) -> list[str]:
        """Every file still in the queue (envelopes in any state, data, temp files)."""
        found = []
        for top, _, names in os.walk(self.queue_dir):
            found += [os.path.relpath(os.path.join(top, n), self.queue_dir) for n in names]
        return sorted(found)

    def wait_queue_empty(self, timeout: float = 15.0) -> None:
        wait_until(lambda: not self.queue_files(), timeout, "the queue to empty")

    # -- process control -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start twistd and wait until every listener accepts connections."""
        if self.running:
            raise RuntimeError("daemon already running")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [SOURCE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        command = [*TWISTD, "-n", "--pidfile=", *self.twistd_args, "mailplat", "--config",
                   self.config_path]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self._ready, timeout, "mailplat to listen on " + repr(self.ports))
        except AssertionError as e:
            self.kill()
            raise AssertionError(f"{e}\n--- log {self.log_path} ---\n{self.log()[-3000:]}")

    def _ready(self) -> bool:
        if not self.running:
            raise AssertionError("mailplat exited during start-up")
        for port in self.ports.values():
            try:
                socket.create_connection((HOST, port), timeout=1).close()
            except OSError:
                return False
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Shut down cleanly (SIGTERM) and wait; SIGKILL and fail if it takes too long."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"mailplat did not stop within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the crash of a power cut, minus the page cache."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop if running, then start again on the same data dir and ports."""
        self.stop()
        self.start(timeout)


__all__ = [
    "Daemon", "delivered_body", "free_port", "read_reply", "received_length", "strip_received", "toml_text", "wait_for_files",
    "wait_for_port", "wait_until",
]

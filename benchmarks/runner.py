"""One scenario against one freshly started server: load, wait for delivery, check, measure.

A fresh server per scenario keeps the memory figures honest (Python never gives memory back,
so a 100 MB message after the 1 MB ones would otherwise carry their peak along).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any, Protocol

from benchmarks import load
from benchmarks.mailplat_setup import RECIPIENT
from benchmarks.measure import MemorySampler, cpu_seconds, memory_kb, wait_for_count
from benchmarks.scenarios import Scenario

SETTLE = 1.0  # seconds to look for duplicates after the last expected message arrived
IDLE_HOLD = 6.0  # seconds scenario (f) holds its connections idle


class Server(Protocol):
    name: str
    port: int
    tree: bool

    @property
    def root_pid(self) -> int: ...
    def start(self, workdir: str | None = None) -> None: ...
    def stop(self, keep: bool = False) -> None: ...
    def pids(self) -> list[int]: ...
    def delivered(self) -> int: ...
    def queue_left(self) -> int: ...


def run_scenario(
    server: Server, scenario: Scenario, smtp_source: str, workdir: str | None = None,
    profile_dir: str | None = None, keep_files: bool = False,
) -> dict[str, Any]:
    """Start ``server``, run ``scenario`` against it, stop it; the measurements as a dict.
    ``keep_files``: leave its queue and Maildirs for the caller to remove (run.py removes
    them all at the end, so that no run shares the disk with the deletion of another's)."""
    os.sync()  # what earlier runs wrote is on the disk before this one's clock starts
    result: dict[str, Any] = {
        "server": server.name, "scenario": scenario.key, "title": scenario.title,
        "sessions": scenario.sessions, "messages": scenario.messages, "size": scenario.size,
    }
    try:
        server.start(workdir)
    except Exception as e:  # keep its directory: the logs say why
        server.stop(keep=True)
        return dict(result, ok=False, error=f"{server.name} did not start: {e}")
    try:
        result.update(_measure(server, scenario, smtp_source, profile_dir))
    except Exception as e:  # one broken scenario must not lose the others' results
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        server.stop(keep=keep_files)
    return result


def _measure(server: Server, scenario: Scenario, smtp_source: str, profile_dir: str | None) -> dict[str, Any]:
    idle_mem, load_before = _memory(server), os.getloadavg()[0]
    expected = scenario.messages + (1 if scenario.idle else 0)  # (f) probes with one more
    profiler = _start_py_spy(server, scenario, profile_dir)
    cpu_before = cpu_seconds(server.root_pid, server.tree)
    with MemorySampler(server.pids, interval=0.5 if server.tree else 0.1) as sampler:
        outcome, at_idle, deliver_seconds = _timed_load(server, scenario, smtp_source, expected)
        cpu_used = cpu_seconds(server.root_pid, server.tree) - cpu_before
    _stop_py_spy(profiler)
    time.sleep(SETTLE)  # duplicates would show up now
    found = server.delivered()
    measured: dict[str, Any] = {
        "accept_seconds": outcome.seconds,
        "deliver_seconds": deliver_seconds,
        "accepted_per_s": scenario.messages / max(outcome.seconds, 1e-9),
        "delivered_per_s": scenario.messages / max(deliver_seconds, 1e-9),
        "cpu_ms_per_msg": 1000 * cpu_used / expected,
        "peak_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_pss_mb": sampler.peak_pss_kb / 1024,
        "idle_rss_mb": idle_mem["Rss"] / 1024,
        "idle_pss_mb": idle_mem["Pss"] / 1024,
        "delivered": found,
        "expected": expected,
        "queue_left": server.queue_left(),
        # The machine's 1-minute load average around the run: other work skews the figures.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        **outcome.extra,
        **at_idle,
    }
    return dict(measured, **verdict(outcome.error, found, expected))


def _timed_load(
    server: Server, scenario: Scenario, smtp_source: str, expected: int
) -> tuple[load.LoadResult, dict[str, float], float]:
    """Run the load, then wait for every message in new/: (outcome, idle notes, seconds from
    the first message sent until the last one delivered)."""
    start = time.monotonic()
    outcome, at_idle = _load(server, scenario, smtp_source)
    loaded = time.monotonic()
    if scenario.idle:  # the clock starts when the idle connections begin to send
        start = loaded - outcome.seconds
    _, done = wait_for_count(server.delivered, expected, scenario.time_limit)
    return outcome, at_idle, done - start


def verdict(load_error: str | None, found: int, expected: int) -> dict[str, Any]:
    """ok, and why not: a load error, or messages lost or doubled."""
    problems = [load_error] if load_error else []
    if found != expected:
        problems.append(f"{found} messages in new/, expected {expected}")
    return {"ok": not problems, "error": "; ".join(problems) or None}


def _load(server: Server, scenario: Scenario, smtp_source: str) -> tuple[load.LoadResult, dict[str, float]]:
    """Drive the load; for (f) also note the memory while every connection sits idle."""
    at_idle: dict[str, float] = {}
    if not scenario.idle:
        command = load.smtp_source_command(
            smtp_source, server.port, scenario.sessions, scenario.messages, scenario.size, RECIPIENT
        )
        return load.run_smtp_source(command, scenario.time_limit), at_idle

    def note_idle() -> None:
        memory = _memory(server)
        at_idle["connections_rss_mb"] = memory.get("Rss", 0) / 1024
        at_idle["connections_pss_mb"] = memory.get("Pss", 0) / 1024

    outcome = load.run_idle(server.port, scenario.sessions, scenario.size, RECIPIENT,
                            IDLE_HOLD, scenario.time_limit, note_idle)
    return outcome, at_idle


def _memory(server: Server) -> dict[str, int]:
    """Rss and Pss (kB) summed over the server's processes."""
    total = {"Rss": 0, "Pss": 0}
    for pid in server.pids():
        for key, value in memory_kb(pid).items():
            total[key] += value
    return total


def _start_py_spy(server: Server, scenario: Scenario, profile_dir: str | None) -> subprocess.Popen[bytes] | None:
    """Sample the mailplat daemon with py-spy (collapsed stacks) while the scenario runs."""
    if profile_dir is None:
        return None
    os.makedirs(profile_dir, exist_ok=True)
    out = os.path.join(profile_dir, f"{server.name}-{scenario.key}.txt")
    return subprocess.Popen(
        [_py_spy(), "record", "--pid", str(server.root_pid), "--format", "raw", "--rate", "200",
         "--threads", "--subprocesses", "--output", out, "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _py_spy() -> str:
    """py-spy next to the harness's interpreter (a virtualenv's bin/), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else (shutil.which("py-spy") or "py-spy")


def _stop_py_spy(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
    try:
        profiler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(timeout=10)

"""What we measure about a server under load, read from /proc: CPU time and memory.

A server is a tree of processes (mailplat: one; Postfix: master and its children). CPU time is
counted so that children that exit during a scenario are not lost: the sum over live processes
plus the root's ``cutime``/``cstime`` (the time of children it has reaped) only ever grows.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class ProcStat:
    """The few fields of /proc/PID/stat we need, times in clock ticks."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int


def parse_stat(text: str) -> ProcStat:
    """Parse one /proc/PID/stat line; the command name may contain spaces and parentheses."""
    pid = int(text[: text.index(" ")])
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)); utime is field 14, so fields[11].
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def process_tree(root: int) -> list[ProcStat]:
    """The root and all its descendants alive now (one scan of /proc)."""
    stats: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                stats[stat.pid] = stat
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    tree: list[ProcStat] = []
    todo = [root]
    while todo and len(tree) < 100_000:
        pid = todo.pop()
        tree.append(stats[pid])
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int, tree: bool = False) -> float:
    """CPU seconds (user + system) used so far by ``root`` (and, with ``tree``, its children)."""
    stats = process_tree(root) if tree else [s for s in [read_stat(root)] if s is not None]
    if not stats:
        return 0.0
    ticks = sum(s.utime + s.stime for s in stats)
    ticks += stats[0].cutime + stats[0].cstime  # reaped children: counted once they exit
    return ticks / CLOCK_TICKS


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """Rss and Pss (kB) from /proc/PID/smaps_rollup."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0])
    return values


def memory_kb(pid: int) -> dict[str, int]:
    """Rss and Pss of one process in kB ({} if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return parse_smaps_rollup(f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}


class MemorySampler:
    """Polls a server's memory in a thread and keeps the peak of the summed Rss and Pss."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.samples = 0

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        rss = pss = 0
        for pid in self._pids():
            values = memory_kb(pid)
            rss += values.get("Rss", 0)
            pss += values.get("Pss", 0)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.samples += 1


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # root may raise hard
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_banner(
    port: int, timeout: float = 30.0, alive: Callable[[], bool] = lambda: True
) -> float:
    """Wait until a 220 greeting arrives on 127.0.0.1:port; returns the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return time.monotonic() - start
                last_error = RuntimeError(f"unexpected greeting {banner!r}")
        except OSError as e:
            last_error = e
        time.sleep(0.1)
    raise RuntimeError(f"no SMTP greeting on 127.0.0.1:{port} after {timeout}s: {last_error}")


def count_files(directory: str) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0


def wait_for_count(
    count: Callable[[], int], expected: int, timeout: float, interval: float = 0.02
) -> tuple[int, float]:
    """Poll until ``count()`` reaches ``expected`` (or time runs out): (count, when)."""
    deadline = time.monotonic() + timeout
    found = count()
    while found < expected and time.monotonic() < deadline:
        time.sleep(interval)
        found = count()
    return found, time.monotonic()


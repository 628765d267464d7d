"""Turning results into the three outputs: a table on stdout, JSON, and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from typing import Any

METRICS = (
    "accepted_per_s", "delivered_per_s", "cpu_ms_per_msg", "peak_rss_mb", "peak_pss_mb",
    "accept_seconds", "deliver_seconds", "probe_greeting_ms", "probe_transaction_ms",
    "connections_rss_mb", "connections_pss_mb",
)


def machine_info(workdir: str) -> dict[str, Any]:
    """What a reader needs to compare figures: CPUs, kernel, Python, Postfix, filesystem."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": _postfix_version(),
        "workdir": workdir,
        "filesystem": filesystem_type(workdir),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _cpu_model() -> str:
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _postfix_version() -> str | None:
    try:
        done = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True,
                              text=True, timeout=30)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (fsync on tmpfs costs nothing: say so)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in _lines("/proc/mounts"):
        parts = line.split()
        if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
    return kind


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def summarize(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, server): the median of each metric over the repeats."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["scenario"], result["server"]), []).append(result)
    rows = []
    for (scenario, server), runs in sorted(groups.items()):
        row = {k: runs[0][k] for k in ("scenario", "server", "title", "messages", "size")}
        row["runs"] = len(runs)
        row["ok"] = all(r.get("ok") for r in runs)
        row["errors"] = [r["error"] for r in runs if r.get("error")]
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None and r.get("ok")]
            row[metric] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]], server: str = "mailplat") -> dict[str, float]:
    """``server`` / Postfix delivered msgs/s per scenario, where both have a figure."""
    by = {(r["scenario"], r["server"]): r for r in rows}
    out = {}
    for (scenario, name), row in by.items():
        other = by.get((scenario, "postfix"))
        if name == server and other and row["delivered_per_s"] and other["delivered_per_s"]:
            out[scenario] = row["delivered_per_s"] / other["delivered_per_s"]
    return out


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one line per scenario and server, plus the ratio column."""
    ratio = {name: ratios(rows, name) for name in ("mailplat", "baseline")}
    head = (f"{'':2} {'scenario':<42} {'server':<9} {'acc/s':>8} {'del/s':>8} {'cpu ms/msg':>10} "
            f"{'RSS MB':>7} {'PSS MB':>7} {'ratio':>6}  notes")
    lines = [head, "-" * len(head)]
    for row in rows:
        notes = _notes(row)
        r = ratio.get(row["server"], {}).get(row["scenario"])
        lines.append(
            f"{row['scenario']:2} {row['title']:<42} {row['server']:<9} "
            f"{_fmt(row['accepted_per_s'], 1):>8} {_fmt(row['delivered_per_s'], 1):>8} "
            f"{_fmt(row['cpu_ms_per_msg'], 2):>10} {_fmt(row['peak_rss_mb'], 1):>7} "
            f"{_fmt(row['peak_pss_mb'], 1):>7} {_fmt(r, 2) + 'x' if r else '':>6}  {notes}"
        )
    return "\n".join(lines)


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row.get("connections_pss_mb") is not None:
        notes.append(f"idle conns PSS {row['connections_pss_mb']:.0f} MB")
    if row.get("probe_greeting_ms") is not None:
        notes.append(f"probe greeting {row['probe_greeting_ms']:.0f} ms, "
                     f"transaction {row['probe_transaction_ms']:.0f} ms")
    if not row["ok"]:
        notes.append("FAILED: " + " | ".join(row["errors"])[:200])
    return "; ".join(notes)


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.write("\n")


def plot(path: str, rows: list[dict[str, Any]], subtitle: str) -> bool:
    """Bars of delivered msgs/s and of peak PSS per scenario and server (both log scale: (e)
    is one message, Postfix's (f) a thousand processes), the mailplat/Postfix ratio under each
    scenario. False when matplotlib is missing (``pip install '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = sorted({r["scenario"] for r in rows})
    ratio = ratios(rows)
    ticks = [f"({s})" + (f"\n{ratio[s]:.2f}x" if s in ratio else "") for s in scenarios]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, metric, label in ((axes[0], "delivered_per_s", "delivered msgs/s"),
                                (axes[1], "peak_pss_mb", "peak PSS of the server, MB")):
        _bars(axis, rows, scenarios, metric)
        axis.set_xticks(range(len(scenarios)), ticks)
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.set_ylim(bottom=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8)
    fig.suptitle(f"mailplat benchmark: {subtitle}", fontsize=10, x=0.35)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _bars(axis: Any, rows: list[dict[str, Any]], scenarios: list[str], metric: str) -> None:
    """One bar per server and scenario, labelled with its value."""
    servers = [s for s in ("mailplat", "baseline", "postfix") if any(r["server"] == s for r in rows)]
    by = {(r["scenario"], r["server"]): r for r in rows}
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        values = [(by.get((s, server)) or {}).get(metric) or 0 for s in scenarios]
        xs = [k + (i - (len(servers) - 1) / 2) * width for k in range(len(scenarios))]
        bars = axis.bar(xs, values, width, label=server)
        axis.bar_label(bars, [_bar_text(v) for v in values], fontsize=7)


def _bar_text(value: float) -> str:
    """1,512 rather than 1.51e+03: neighbouring bars' labels must not run into each other."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"

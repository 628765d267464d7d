"""Keep the reactor thread off the CPUs that take the queue disk's interrupts.

Every session's protocol work runs on one reactor thread. On a machine whose disk raises its
interrupts on one CPU only (a virtio disk with one request queue, the usual VM disk), the
thread that happens to run on that CPU also handles every I/O completion of the disk helper's
fsyncs and copies. For the reactor that cost about 30 % of its throughput with eight sessions
(docs/performance.rst, "Fifth round"), and which CPU it started on was luck. Postfix does
not see this: its many processes spread around the interrupt.

So, with ``reactor_affinity = "auto"`` (the default; not with ``receivers``, whose processes
the kernel spreads), the daemon finds the interrupts of the device that holds its queue
(sysfs: the block device, then the PCI function's ``msi_irqs``, then each one's
``effective_affinity_list``), and if they land on some but not all of the CPUs it may use,
it keeps its main thread (and the threads it starts) to one of the others, and the disk
helper to every CPU but that one. The two must not share a CPU: left to the kernel, a helper
thread woken by the reactor's job is often put on the waker's CPU and waits there for the
reactor, or delays it (keeping the helper off the reactor's CPU made one session's mail
0–13 % faster and eight sessions' 7–33 %, docs/performance.rst, "Sixth round"). The helper
issues the I/O and is woken by its completion, so the interrupt's CPU suits it. Anything not found
(no sysfs, a device-mapper or network filesystem, an NVMe disk with a queue per CPU) leaves
the placement to the kernel. The interrupts' placement is read once, at start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

SYSFS = "/sys"
PROCFS = "/proc"
# Vectors that fire far less than the device's busiest (a virtio device's "config" vector)
# do not say where its I/O completes.
QUIET_SHARE = 0.01
# The CPUs left for the disk helper (all the daemon had, less the reactor's).
HELPER_CPUS = "MAILPLAT_HELPER_CPUS"
MODES = ("auto", "none")


class Placement(NamedTuple):
    """Where the daemon's threads go: ``reactor`` is one CPU, ``helper`` the rest of
    ``allowed``, and ``interrupts`` the CPUs that take the queue disk's interrupts."""

    allowed: set[int]
    reactor: set[int]
    helper: set[int]
    interrupts: set[int]


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's CPU list format: "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def device_irqs(path: str, sysfs: str = SYSFS) -> list[int]:
    """The interrupt numbers of the hardware holding ``path``'s filesystem ([] if unknown)."""
    st = os.stat(path)
    block = os.path.join(sysfs, "dev", "block", f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not os.path.exists(block):
        return []
    device = os.path.realpath(block)
    devices = os.path.realpath(os.path.join(sysfs, "devices"))
    # From the block device (or its partition) up to the first ancestor that has interrupts:
    # the PCI function of a virtio, NVMe or AHCI disk.
    for _ in range(16):  # bounded: sysfs paths are a dozen levels deep at most
        msi = os.path.join(device, "msi_irqs")
        if os.path.isdir(msi):
            return sorted(int(name) for name in os.listdir(msi) if name.isdigit())
        legacy = os.path.join(device, "irq")
        if os.path.isfile(legacy):
            with open(legacy) as f:
                number = int(f.read().strip() or 0)
            return [number] if number > 0 else []
        parent = os.path.dirname(device)
        if parent == device or not parent.startswith(devices):
            return []
        device = parent
    return []


def irq_cpus(irqs: list[int], procfs: str = PROCFS) -> set[int]:
    """The CPUs that the busy ones among ``irqs`` are delivered to."""
    counts = _interrupt_counts(procfs)
    busiest = max((counts.get(irq, 0) for irq in irqs), default=0)
    cpus: set[int] = set()
    for irq in irqs:
        if busiest == 0 or counts.get(irq, 0) < busiest * QUIET_SHARE:
            continue
        for name in ("effective_affinity_list", "smp_affinity_list"):
            try:
                with open(os.path.join(procfs, "irq", str(irq), name)) as f:
                    cpus |= parse_cpu_list(f.read())
                break
            except (OSError, ValueError):
                continue
    return cpus


def _interrupt_counts(procfs: str) -> dict[int, int]:
    """Interrupts delivered so far per IRQ number, summed over CPUs (/proc/interrupts)."""
    counts: dict[int, int] = {}
    try:
        with open(os.path.join(procfs, "interrupts")) as f:
            lines = f.read().splitlines()
    except OSError:
        return counts
    if not lines:
        return counts
    ncpus = len(lines[0].split())
    for line in lines[1:]:
        label, _, rest = line.partition(":")
        if not label.strip().isdigit():
            continue
        fields = rest.split()[:ncpus]
        counts[int(label)] = sum(int(v) for v in fields if v.isdigit())
    return counts


def cpus_for_reactor(path: str, allowed: set[int], sysfs: str = SYSFS,
                     procfs: str = PROCFS) -> set[int] | None:
    """The CPUs the reactor should keep to, or None to leave it where the kernel puts it."""
    try:
        busy = irq_cpus(device_irqs(path, sysfs), procfs)
    except (OSError, ValueError):
        return None
    others = allowed - busy
    if not busy & allowed or not others:
        return None  # the interrupts are elsewhere already, or everywhere
    return others


def place_reactor(path: str, mode: str) -> Placement | None:
    """Apply ``reactor_affinity`` to the calling thread (the daemon's main thread, before
    it starts others) and leave the helper's share in the environment its children inherit;
    the placement when it moved, else None."""
    if mode != "auto" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the queue directory is made later, on its disk
    quiet = cpus_for_reactor(path, allowed)
    if quiet is None:
        return None
    reactor = {min(quiet)}  # one thread needs one CPU; the helper gets the others
    try:
        os.sched_setaffinity(0, reactor)
    except OSError:
        return None
    helper = allowed - reactor
    os.environ[HELPER_CPUS] = format_cpu_list(helper)
    return Placement(allowed, reactor, helper, allowed - quiet)


def place_helper() -> None:
    """In the disk helper: keep to the CPUs left for it, away from the reactor's."""
    text = os.environ.get(HELPER_CPUS)
    if text and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, parse_cpu_list(text))
        except (OSError, ValueError):
            pass

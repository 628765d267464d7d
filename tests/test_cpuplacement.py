"""mailplat.cpuplacement: the reactor kept off the CPUs that take the queue disk's interrupts.

The sysfs walk is tested on small trees laid out as the kernel lays out a virtio disk and an
NVMe disk; the placement itself on this machine's real sysfs and /proc, in child processes
and in a real ``twistd mailplat``, whatever the machine's interrupts look like.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailplat import cpuplacement
from mailplat.config import ConfigError, parse_config
from mailplat.cpuplacement import (cpus_for_reactor, device_irqs, format_cpu_list, irq_cpus,
                                   parse_cpu_list)


class CpuListTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_cpu_list("0-3,8,10-11\n"), {0, 1, 2, 3, 8, 10, 11})
        self.assertEqual(parse_cpu_list("1"), {1})
        self.assertEqual(parse_cpu_list(""), set())

    def test_format(self) -> None:
        self.assertEqual(format_cpu_list({3, 0, 1}), "0,1,3")


class FakeMachine:
    """A sysfs and a /proc under one directory: a disk at ``device`` (a path under
    devices/) holding ``path``'s filesystem, with MSI vectors ``irqs`` (number → (count per
    CPU, effective affinity))."""

    def __init__(self, root: str, path: str, device: str, irqs: dict[int, tuple[list[int], str]],
                 partition: bool = False) -> None:
        self.sysfs = os.path.join(root, "sys")
        self.procfs = os.path.join(root, "proc")
        function, _, _ = device.partition("/virtio") if "/virtio" in device else (device, "", "")
        block_dir = os.path.join(self.sysfs, "devices", device)
        if partition:
            block_dir = os.path.join(block_dir, "part1")
        os.makedirs(block_dir)
        msi = os.path.join(self.sysfs, "devices", function, "msi_irqs")
        os.makedirs(msi, exist_ok=True)
        st = os.stat(path)
        os.makedirs(os.path.join(self.sysfs, "dev", "block"))
        os.symlink(block_dir, os.path.join(self.sysfs, "dev", "block",
                                           f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        ncpus = max(len(counts) for counts, _ in irqs.values())
        lines = ["  " + " ".join(f"CPU{n}" for n in range(ncpus))]
        for number, (counts, affinity) in irqs.items():
            open(os.path.join(msi, str(number)), "w").close()
            os.makedirs(os.path.join(self.procfs, "irq", str(number)))
            with open(os.path.join(self.procfs, "irq", str(number),
                                   "effective_affinity_list"), "w") as f:
                f.write(affinity + "\n")
            lines.append(f" {number}: " + " ".join(str(c) for c in counts) + "  PCI-MSIX  x")
        lines.append("NMI: " + " ".join("0" for _ in range(ncpus)) + "  Non-maskable interrupts")
        with open(os.path.join(self.procfs, "interrupts"), "w") as f:
            f.write("\n".join(lines) + "\n")


VIRTIO = "pci0000:00/0000:00:02.0/virtio1/block/vda"


class SysfsTests(SynchronousTestCase):
    def machine(self, irqs: dict[int, tuple[list[int], str]], device: str = VIRTIO,
                partition: bool = False) -> tuple[str, FakeMachine]:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        return root, FakeMachine(root, root, device, irqs, partition)

    def test_single_queue_virtio_disk(self) -> None:
        """The usual VM disk: its request vector on CPU 1, so the reactor goes to CPU 0.
        The config vector (a handful of interrupts) does not count."""
        path, m = self.machine({35: ([0, 2], "0"), 36: ([0, 170193], "1")})
        self.assertEqual(device_irqs(path, m.sysfs), [35, 36])
        self.assertEqual(irq_cpus([35, 36], m.procfs), {1})
        self.assertEqual(cpus_for_reactor(path, {0, 1}, m.sysfs, m.procfs), {0})

    def test_partition(self) -> None:
        """A partition's device directory has no interrupts: its disk's has."""
        path, m = self.machine({36: ([5000, 0, 0, 0], "0")}, partition=True)
        self.assertEqual(cpus_for_reactor(path, {0, 1, 2, 3}, m.sysfs, m.procfs), {1, 2, 3})

    def test_queue_per_cpu(self) -> None:
        """An NVMe disk with a queue per CPU: nowhere to go, nothing changes."""
        irqs = {40 + n: ([100 if cpu == n else 0 for cpu in range(2)], str(n)) for n in range(2)}
        path, m = self.machine(irqs, device="pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1")
        self.assertEqual(irq_cpus(device_irqs(path, m.sysfs), m.procfs), {0, 1})
        self.assertIsNone(cpus_for_reactor(path, {0, 1}, m.sysfs, m.procfs))

    def test_interrupts_outside_our_cpus(self) -> None:
        """Already apart (e.g. a cpuset without the interrupt's CPU): nothing to do."""
        path, m = self.machine({36: ([0, 0, 900], "2")})
        self.assertIsNone(cpus_for_reactor(path, {0, 1}, m.sysfs, m.procfs))

    def test_unknown_device(self) -> None:
        """No sysfs entry for the filesystem's device (tmpfs, NFS, a container): nothing."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "sys"))
        self.assertEqual(device_irqs(root, os.path.join(root, "sys")), [])
        self.assertIsNone(cpus_for_reactor(root, {0, 1}, os.path.join(root, "sys"),
                                           os.path.join(root, "proc")))


PLACE = """
import json, os, sys
from mailplat import cpuplacement
before = sorted(os.sched_getaffinity(0))
placed = cpuplacement.place_reactor(sys.argv[1], sys.argv[2])
print(json.dumps({"before": before, "after": sorted(os.sched_getaffinity(0)),
                  "placed": [sorted(s) for s in placed] if placed else None,
                  "env": os.environ.get(cpuplacement.HELPER_CPUS)}))
"""


def _run_child(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    import json

    done = subprocess.run([sys.executable, "-c", PLACE, *args], capture_output=True, text=True,
                          timeout=60, env=env, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


class ThisMachineTests(SynchronousTestCase):
    """The real sysfs and /proc: whatever they say, the placement agrees with them."""

    def setUp(self) -> None:
        if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/sys/dev/block"):
            raise SkipTest("no Linux sysfs here")

    def test_auto(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        allowed = os.sched_getaffinity(0)
        quiet = cpus_for_reactor(path, allowed)
        result = _run_child(path, "auto")
        if quiet is None:
            self.assertIsNone(result["placed"])
            self.assertEqual(result["after"], result["before"])
        else:
            # One CPU without the disk's interrupts for the reactor, the rest for the helper.
            reactor, helper = [min(quiet)], sorted(allowed - {min(quiet)})
            self.assertEqual(result["after"], reactor)
            self.assertEqual(result["placed"], [sorted(allowed), reactor, helper,
                                                sorted(allowed - quiet)])
            self.assertEqual(result["env"], format_cpu_list(helper))

    def test_none_leaves_it_to_the_kernel(self) -> None:
        result = _run_child(os.path.abspath("."), "none")
        self.assertIsNone(result["placed"])
        self.assertEqual(result["after"], result["before"])

    def test_helper_takes_the_cpus_left_for_it(self) -> None:
        """The disk helper leaves the reactor's CPU it inherited for the ones named for it."""
        allowed = os.sched_getaffinity(0)
        if len(allowed) < 2:
            raise SkipTest("one CPU: nothing to place")
        first = min(allowed)
        code = ("import os; os.sched_setaffinity(0, {%d}); "
                "from mailplat.cpuplacement import place_helper; place_helper(); "
                "print(sorted(os.sched_getaffinity(0)))" % first)
        env = dict(os.environ, **{cpuplacement.HELPER_CPUS: format_cpu_list(allowed - {first})})
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env, check=True)
        self.assertEqual(done.stdout.strip(), str(sorted(allowed - {first})))

    def test_helper_without_a_share_stays(self) -> None:
        """Started by a daemon that did not place its reactor: nothing to do."""
        code = ("import os; from mailplat.cpuplacement import place_helper; place_helper(); "
                "print(sorted(os.sched_getaffinity(0)))")
        env = {k: v for k, v in os.environ.items() if k != cpuplacement.HELPER_CPUS}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env, check=True)
        self.assertEqual(done.stdout.strip(), str(sorted(os.sched_getaffinity(0))))


class DaemonPlacementTests(SynchronousTestCase):
    """``twistd mailplat``: its main thread keeps to the CPU chosen for this machine, says
    so in its log, and its disk helper to the other CPUs."""

    def test_daemon(self) -> None:
        from tests.daemon import Daemon, wait_until

        if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/sys/dev/block"):
            raise SkipTest("no Linux sysfs here")
        daemon = Daemon(self.mktemp())
        daemon.start()
        self.addCleanup(daemon.stop)
        assert daemon.process is not None
        pid = daemon.process.pid
        allowed = os.sched_getaffinity(0)
        quiet = cpus_for_reactor(daemon.data_dir, allowed)
        if quiet is None:
            self.assertEqual(os.sched_getaffinity(pid), allowed)
            self.assertNotIn("reactor kept to CPU", daemon.log())
            return
        reactor = {min(quiet)}
        self.assertEqual(os.sched_getaffinity(pid), reactor)
        self.assertIn(f"reactor kept to CPU {min(quiet)} and the disk helper to CPUs "
                      f"{format_cpu_list(allowed - reactor)} (of {format_cpu_list(allowed)})",
                      daemon.log())
        [helper] = wait_until(lambda: _children(pid), 10, "the disk helper")
        wait_until(lambda: os.sched_getaffinity(helper) == allowed - reactor, 10,
                   "the helper's CPUs")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


class ConfigTests(SynchronousTestCase):
    def test_default_and_values(self) -> None:
        base = 'hostname = "mx.test"\n[[listener]]\nname = "smtp"\nendpoint = "tcp:2525"\n' \
               'profile = "relay"\n[domains."localhost"]\ncatch_all = true\n'
        self.assertEqual(parse_config(base).reactor_affinity, "auto")
        self.assertEqual(parse_config('reactor_affinity = "none"\n' + base).reactor_affinity,
                         "none")
        with self.assertRaises(ConfigError) as caught:
            parse_config('reactor_affinity = "cpu0"\n' + base)
        self.assertIn("reactor_affinity", str(caught.exception.problems))

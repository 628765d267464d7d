"""A throwaway Debian Postfix for the comparison: loopback only, virtual Maildir delivery.

Everything lives in one temp directory (config_directory, queue_directory, data_directory,
Maildir base, log file); ``postfix -c DIR start`` runs master without systemd, as root. Nothing
is changed outside that directory. Postfix keeps its normal durability: cleanup fsyncs the
queue file before smtpd says 250, and virtual fsyncs each Maildir file.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time

from benchmarks.mailplat_setup import DOMAIN, USER
from benchmarks.measure import count_files, free_port, wait_for_banner

POSTFIX = "/usr/sbin/postfix"
VMAIL_UID = 65534  # "nobody": the virtual agent writes Maildirs as this user
SMTPD_PROCESSES = 1200  # enough for the 1000 idle connections of scenario (f)

# (service, type, private, unpriv, chroot, wakeup, maxproc, command); chroot off everywhere.
SERVICES = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def render_main_cf(base: str, message_size: int) -> str:
    """main.cf: loopback only, no local delivery, one virtual domain, no DNS, defaults else."""
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": f"{base}/queue",
        "data_directory": f"{base}/data",
        "maillog_file": f"{base}/maillog",
        "maillog_file_prefixes": base,
        "myhostname": "bench-postfix.localdomain",
        "mydomain": "localdomain",
        "mydestination": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relayhost": "",
        "relay_domains": "",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_peername_lookup": "no",
        "smtpd_client_connection_count_limit": "0",
        "smtp_dns_support_level": "disabled",
        "biff": "no",
        "message_size_limit": str(message_size),
        "mailbox_size_limit": "0",
        "virtual_mailbox_limit": "0",
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_base": f"{base}/mail",
        "virtual_mailbox_maps": f"texthash:{base}/config/vmailbox",
        "virtual_uid_maps": f"static:{VMAIL_UID}",
        "virtual_gid_maps": f"static:{VMAIL_UID}",
        "virtual_minimum_uid": "100",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def render_master_cf(port: int) -> str:
    """master.cf: smtpd on 127.0.0.1:port plus the internal services Postfix needs."""
    rows = [(f"127.0.0.1:{port}", "inet", "n", "-", "n", "-", str(SMTPD_PROCESSES), "smtpd")]
    rows += SERVICES
    return "".join(" ".join(row) + "\n" for row in rows)


class PostfixServer:
    """One Postfix instance in its own config and queue directories, on a free loopback port."""

    name = "postfix"
    tree = True  # CPU and memory are summed over master and all its children

    def __init__(self, message_size: int) -> None:
        self.message_size = message_size
        self.base = ""
        self.port = 0
        self._master = 0

    @property
    def config_dir(self) -> str:
        return os.path.join(self.base, "config")

    @property
    def maildir_new(self) -> str:
        return os.path.join(self.base, "mail", USER, "new")

    def start(self, workdir: str | None = None) -> None:
        self.base = tempfile.mkdtemp(prefix="bench-postfix-", dir=workdir)
        os.chmod(self.base, 0o755)  # Postfix daemons run as the postfix user
        self.port = free_port()
        for sub in ("config", "queue", "data", "mail"):
            os.makedirs(os.path.join(self.base, sub), mode=0o755)
        os.chown(os.path.join(self.base, "mail"), VMAIL_UID, VMAIL_UID)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(os.path.join(self.base, "data"), postfix_user.pw_uid, postfix_user.pw_gid)
        self._write("main.cf", render_main_cf(self.base, self.message_size))
        self._write("master.cf", render_master_cf(self.port))
        self._write("vmailbox", f"{USER}@{DOMAIN} {USER}/\n")
        self._postfix("start")
        self._master = self._read_master_pid()
        wait_for_banner(self.port)

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.config_dir, name), "w") as f:
            f.write(text)

    def _postfix(self, action: str) -> None:
        result = subprocess.run(
            [POSTFIX, "-c", self.config_dir, action], capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0 and action == "start":
            raise RuntimeError(f"postfix -c {self.config_dir} start failed:\n{result.stderr}")

    def _read_master_pid(self, timeout: float = 20.0) -> int:
        path = os.path.join(self.base, "queue", "pid", "master.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    return int(f.read().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"postfix master did not write {path}")

    @property
    def root_pid(self) -> int:
        return self._master

    def pids(self) -> list[int]:
        from benchmarks.measure import process_tree

        return [stat.pid for stat in process_tree(self._master)] if self._master else []

    def delivered(self) -> int:
        return count_files(self.maildir_new)

    def queue_left(self) -> int:
        queue = os.path.join(self.base, "queue")
        return sum(
            _count_tree(os.path.join(queue, s)) for s in ("incoming", "active", "deferred", "hold")
        )

    def stop(self, keep: bool = False) -> None:
        """``postfix stop``, a bounded wait for master to exit, then SIGKILL to what is left."""
        if self.base and self._master:
            self._postfix("stop")
            _wait_exit(self._master, 30)
            for pid in self.pids():
                _kill_quietly(pid)
            self._master = 0
        if not keep and self.base:
            shutil.rmtree(self.base, ignore_errors=True)


def _count_tree(path: str) -> int:
    total = 0
    for _, _, files in os.walk(path):
        total += len(files)
    return total


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass

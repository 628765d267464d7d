"""greylist: answer 450 to the first attempt of an unknown (client network, sender, recipient)
triplet and accept its retry after ``delay`` (the idea of Harris' 2003 greylisting paper).

Real mail servers retry; most spam software does not. A triplet that was retried in time is
remembered for ``expiry`` after its last use; one never retried is forgotten after
``retry_window``. A client network (/24 for IPv4, /64 for IPv6, since mail farms retry from
neighbouring addresses) whose triplets passed ``auto_allowlist_after`` times is not greylisted
any more. The state is a JSON file in the data directory, written shortly after changes
(off the reactor thread, atomically) and at shutdown, so it survives restarts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.replies import Reply

log = Logger()
KEYS = ("delay", "retry_window", "expiry", "auto_allowlist_after", "ipv4_prefix",
        "ipv6_prefix", "file", "allow_clients", "save_interval")


@dataclass(frozen=True)
class Settings:
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    expiry: float = 35 * 86400.0
    auto_allowlist_after: int = 5  # 0: never
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    file: str = "greylist.json"  # relative to the data directory
    allow_clients: tuple[common.Network, ...] = ()
    save_interval: float = 5.0


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    result = Settings(
        delay=o.get("delay", common.duration, 300.0),
        retry_window=o.get("retry_window", common.duration, 2 * 86400.0),
        expiry=o.get("expiry", common.duration, 35 * 86400.0),
        auto_allowlist_after=o.get("auto_allowlist_after", common.count, 5),
        ipv4_prefix=o.get("ipv4_prefix", _prefix(32), 24),
        ipv6_prefix=o.get("ipv6_prefix", _prefix(128), 64),
        file=o.get("file", common.text, "greylist.json"),
        allow_clients=o.get("allow_clients", common.networks, ()),
        save_interval=o.get("save_interval", common.duration, 5.0),
    )
    return result, o.problems


def _prefix(bits: int) -> Any:
    def convert(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bits:
            raise ValueError(f"must be a prefix length from 0 to {bits}")
        return value
    return convert


def greylisted(wait: float) -> Verdict:
    return Verdict(Action.TEMPFAIL, Reply(
        450, "4.7.1", f"Greylisted, please try again in {max(1, round(wait))} seconds"))


class GreylistPolicy(hooks.PolicyPlugin):
    """Triplets: key -> [first seen, passed at (0: not yet), last seen]; clients: network ->
    [triplets passed, allowlisted until]."""

    def __init__(self, settings: Settings, context: PluginContext) -> None:
        self.settings = settings
        self.clock = context.reactor
        self.run_in_thread = context.run_in_thread
        self.trusted = common.networks(list(context.trusted_networks))
        self.path = os.path.join(context.data_dir, settings.file)
        self.triplets: dict[str, list[float]] = {}
        self.clients: dict[str, list[float]] = {}
        self._save_call: Any = None
        self._load()

    def rcpt(
        self, session: SessionInfo, transaction: Transaction, recipient: Any, params: Any
    ) -> Deferred[Verdict]:
        address = common.client_address(session.peer_host)
        if (address is None or session.auth_user or hooks.is_allowlisted(session)
                or common.in_any(address, self.settings.allow_clients + self.trusted)):
            return succeed(CONTINUE)
        s = self.settings
        network = str(common.client_network(address, s.ipv4_prefix, s.ipv6_prefix))
        now = self.clock.seconds()
        if self.clients.get(network, [0, 0.0])[1] > now:
            return succeed(CONTINUE)
        sender = transaction.sender.lower() or "<>"
        key = f"{network} {sender} {str(recipient).lower()}"
        return succeed(self._judge(key, network, now))

    def _judge(self, key: str, network: str, now: float) -> Verdict:
        entry = self.triplets.get(key)
        if entry is None or self._expired(entry, now):
            self.triplets[key] = [now, 0.0, now]
            self._changed()
            return greylisted(self.settings.delay)
        first, passed, _ = entry
        if not passed and now - first < self.settings.delay:
            return greylisted(first + self.settings.delay - now)
        entry[2] = now
        if not passed:
            entry[1] = now
            self._passed(network, now)
        self._changed()
        return CONTINUE

    def _expired(self, entry: list[float], now: float) -> bool:
        first, passed, last = entry
        if passed:
            return now - last > self.settings.expiry
        return now - first > self.settings.retry_window

    def _passed(self, network: str, now: float) -> None:
        """One more retried triplet for this network; enough of them allowlist it."""
        client = self.clients.setdefault(network, [0, 0.0])
        client[0] += 1
        limit = self.settings.auto_allowlist_after
        if limit and client[0] >= limit:
            client[1] = now + self.settings.expiry
            log.info("greylist: {network} allowlisted after {n} retried triplets",
                     network=network, n=int(client[0]))

    # -- persistence ------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            self.triplets = {k: list(map(float, v)) for k, v in state["triplets"].items()}
            self.clients = {k: list(map(float, v)) for k, v in state["clients"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("greylist: ignoring unreadable {path}: {error}", path=self.path,
                      error=error)

    def _changed(self) -> None:
        if self._save_call is None or not self._save_call.active():
            self._save_call = self.clock.callLater(self.settings.save_interval, self.save)

    def snapshot(self) -> dict[str, Any]:
        """The state without entries that have run out."""
        now = self.clock.seconds()
        triplets = {k: v for k, v in self.triplets.items() if not self._expired(v, now)}
        networks = {key.split(" ", 1)[0] for key in triplets}
        clients = {k: v for k, v in self.clients.items() if v[1] > now or k in networks}
        self.triplets, self.clients = triplets, clients
        return {"version": 1, "triplets": triplets, "clients": clients}

    def save(self) -> Deferred[Any]:
        """Write the state file: JSON to a temporary file, then rename it into place."""
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode("utf-8")
        d: Deferred[Any] = self.run_in_thread(_write_atomically, self.path, data)
        return d.addErrback(lambda f: log.failure("greylist: cannot save {p}", f, p=self.path))

    def stop(self) -> Deferred[Any]:
        return self.save()


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make(section: dict[str, Any], context: PluginContext) -> GreylistPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return GreylistPolicy(result, context)

"""What the policy plugin tests share: a context with a Clock and a FakeResolver."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from mailplat.address import Mailbox
from mailplat.interfaces import PluginContext
from mailplat.testing import FakeResolver, run_synchronously


def context(clock: Clock | None = None, resolver: Any = None, data_dir: str = "/nonexistent",
            trusted: tuple[str, ...] = ()) -> PluginContext:
    return PluginContext(
        reactor=clock or Clock(), hostname="mx.test", data_dir=data_dir,
        resolver=resolver if resolver is not None else FakeResolver(),
        run_in_thread=run_synchronously, trusted_networks=trusted,
    )


def box(address: str) -> Mailbox:
    local, _, domain = address.rpartition("@")
    return Mailbox(local, domain)

"""``twistd mailplat``: command-line options and the service they make."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage


class Options(usage.Options):
    """Options of ``twistd mailplat``; everything else lives in the config file."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None, "TOML config file (default: the embedded default config)"],
    ]


def makeService(options: Options) -> IService:
    """Load the config and assemble the server; a bad config stops twistd with its problems."""
    from twisted.internet import reactor
    from twisted.logger import Logger

    from mailplat.config import ConfigError, load_config
    from mailplat.cpuplacement import format_cpu_list, place_reactor
    from mailplat.server import build_server

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        raise usage.UsageError(
            "invalid configuration:\n" + "\n".join(str(p) for p in e.problems)
        ) from None
    # With receivers, sessions run in several processes that the kernel spreads itself.
    mode = config.reactor_affinity if config.receivers == 0 else "none"
    placed = place_reactor(config.queue_dir, mode)
    if placed is not None:
        Logger(namespace="mailplat.tap").info(
            "reactor kept to CPU {reactor} and the disk helper to CPUs {helper} (of "
            "{allowed}): the queue disk's interrupts go to {interrupts} "
            "(reactor_affinity = \"none\" leaves it to the kernel)",
            reactor=format_cpu_list(placed.reactor), helper=format_cpu_list(placed.helper),
            allowed=format_cpu_list(placed.allowed),
            interrupts=format_cpu_list(placed.interrupts))
    return build_server(config, reactor, offload_logs=True)

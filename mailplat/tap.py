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

    from mailplat.config import ConfigError, load_config
    from mailplat.server import build_server

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        raise usage.UsageError(
            "invalid configuration:\n" + "\n".join(str(p) for p in e.problems)
        ) from None
    return build_server(config, reactor, offload_logs=True)

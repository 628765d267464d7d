"""The ``mailplat`` command: operator tools beside the server (``twistd mailplat`` runs that).

Subcommands live in their own modules so the queue and user tools can grow without touching
this one: every module ``mailplat/cli_<name>.py`` that defines ``register(subparsers)`` is picked
up. ``register`` adds a parser and sets ``run`` to a function taking the parsed arguments (with
``out`` and ``err`` streams attached) and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import TextIO

from mailplat import config


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``check-config``: the same validation the server runs before it starts."""
    parser = subparsers.add_parser(
        "check-config",
        help="check a configuration file and report every problem with its line number",
        description="Check FILE (default: the embedded default configuration) without "
        "starting anything. Problems go to stderr as FILE:LINE: key: message.",
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="the TOML file to check")
    parser.set_defaults(run=check_config)


def check_config(args: argparse.Namespace) -> int:
    """Print every problem and exit 1, or print ``FILE: OK`` and exit 0."""
    try:
        config.load_config(args.file)
    except config.ConfigError as error:
        for problem in error.problems:
            print(problem, file=args.err)
        return 1
    print(f"{args.file or config.EMBEDDED}: OK", file=args.out)
    return 0


def _command_modules() -> list[object]:
    """This module and every ``mailplat.cli_*`` module, in name order."""
    import mailplat

    modules: list[object] = [sys.modules[__name__]]
    for info in sorted(pkgutil.iter_modules(mailplat.__path__), key=lambda info: info.name):
        if info.name.startswith("cli_"):
            modules.append(importlib.import_module(f"mailplat.{info.name}"))
    return modules


def make_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="mailplat",
        description="Tools for the mailplat mail server. Run the server with: twistd -n mailplat",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _command_modules():
        module.register(subparsers)  # type: ignore[attr-defined]
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one subcommand and return its exit status (the console script exits with it)."""
    args = make_parser().parse_args(argv)
    args.out = out or sys.stdout
    args.err = err or sys.stderr
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())

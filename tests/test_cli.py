"""Tests for the ``mailplat`` command, run in-process."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailplat import cli

REPO = Path(__file__).resolve().parent.parent


class CheckConfigTests(SynchronousTestCase):
    """``mailplat check-config [FILE]`` reports problems the way compilers do."""

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of ``mailplat ARGV``."""
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(list(argv), out=out, err=err)
        return status, out.getvalue(), err.getvalue()

    def test_embedded_default(self) -> None:
        """Without FILE the embedded default is checked, and it is fine."""
        self.assertEqual(self.run_cli("check-config"), (0, "<embedded default>: OK\n", ""))

    def test_example_file(self) -> None:
        """The shipped example configuration checks clean."""
        path = str(REPO / "etc" / "mailplat.toml")
        self.assertEqual(self.run_cli("check-config", path), (0, f"{path}: OK\n", ""))

    def test_problems(self) -> None:
        """Each problem goes to stderr as FILE:LINE: key: message, and the status is 1."""
        path = self.mktemp()
        Path(path).write_text(
            'hostnme = "x"\n[[listener]]\nname = "a"\nendpoint = "tcp:x"\nprofile = "relay"\n'
            '[domains.localhost]\ncatch_all = true\n'
        )
        status, out, err = self.run_cli("check-config", path)
        self.assertEqual((status, out), (1, ""))
        lines = err.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].startswith(f"{path}:1: hostnme: unknown key"))
        self.assertTrue(lines[1].startswith(f"{path}:4: listener[0].endpoint: bad endpoint"))

    def test_missing_file(self) -> None:
        """A file that cannot be read is a problem, not a traceback."""
        status, out, err = self.run_cli("check-config", "/nonexistent.toml")
        self.assertEqual(status, 1)
        self.assertIn("/nonexistent.toml: cannot read", err)

    def test_syntax_error(self) -> None:
        """A TOML syntax error is reported with its line."""
        path = self.mktemp()
        Path(path).write_text('hostname = "x"\nlimits = {\n')
        status, out, err = self.run_cli("check-config", path)
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith(f"{path}:2: TOML syntax error"), err)


class ParserTests(SynchronousTestCase):
    """The command line itself."""

    def test_subcommand_required(self) -> None:
        """Running ``mailplat`` without a subcommand is a usage error (status 2)."""
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as raised:
            cli.main([])
        self.assertEqual(raised.exception.code, 2)

    def test_check_config_listed(self) -> None:
        """``check-config`` is among the registered subcommands."""
        help_text = cli.make_parser().format_help()
        self.assertIn("check-config", help_text)

    def test_command_modules_register(self) -> None:
        """Modules named mailplat/cli_*.py are found and each registers its subcommand."""
        modules = cli._command_modules()
        self.assertIs(modules[0], cli)
        for module in modules:
            self.assertTrue(callable(getattr(module, "register")))

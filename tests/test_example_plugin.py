"""The third-party example under examples/ passes its own trial tests against this mailplat."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

import mailplat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mailplat.__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "subject-filter")


class ExamplePluginTests(TestCase):
    def test_example_tests_pass(self) -> None:
        """With the example on the path, mailplat discovers its plugin and its tests pass."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([EXAMPLE, ROOT]))
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "--temp-directory", os.path.abspath(self.mktemp()),
             "subjectfilter"],
            cwd=EXAMPLE, env=env, capture_output=True, timeout=120,
        )
        output = result.stdout.decode(errors="replace")
        self.assertEqual(result.returncode, 0, output[-2000:])
        self.assertIn("PASSED (successes=5)", output)

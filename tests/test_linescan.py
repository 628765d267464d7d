"""The compiled scans of mailplat._linescan against their Python definitions in mailplat.linescan.

The C code walks 16-byte blocks, so the cases that matter sit at block edges: a CR ending one
block and its LF starting the next, a line reaching 1000 octets inside a block, a chunk
shorter than a block. Hypothesis builds streams from the pieces that move those edges around.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat import linescan

PIECES = [b"\r", b"\n", b"\r\n", b"\r\n.", b".", b"a", b"a" * 7, b"a" * 15, b"a" * 16, b"a" * 333]
streams = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)


def both_checks(
    raw: bytes, line_length: int, pending_cr: bool
) -> tuple[tuple[bool, bool, int, bool], tuple[bool, bool, int, bool]]:
    return (
        linescan.python_check(raw, line_length, pending_cr),
        linescan.check(raw, line_length, pending_cr),
    )


class CompiledTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not linescan.COMPILED:
            self.skipTest("mailplat._linescan was not built (no C compiler): nothing to compare")

    @settings(max_examples=500)
    @given(streams, st.integers(0, 1100), st.booleans())
    def test_check_agrees(self, raw: bytes, line_length: int, pending_cr: bool) -> None:
        python, compiled = both_checks(raw, line_length, pending_cr)
        self.assertEqual(python, compiled)

    @settings(max_examples=300)
    @given(st.binary(max_size=200), st.integers(0, 1100), st.booleans())
    def test_check_agrees_on_any_bytes(self, raw: bytes, line_length: int, pending_cr: bool) -> None:
        python, compiled = both_checks(raw, line_length, pending_cr)
        self.assertEqual(python, compiled)

    def test_line_lengths_at_every_offset(self) -> None:
        """998 octets + CRLF is the longest line allowed, wherever it falls in the blocks."""
        for offset in range(17):
            for length in (998, 999):
                raw = b"x\r\n" * 0 + b"a" * offset + b"\r\n" + b"b" * length + b"\r\nend\r\n"
                python, compiled = both_checks(raw, 0, False)
                self.assertEqual(python, compiled, (offset, length))
                self.assertEqual(compiled[1], length == 999, (offset, length))

    def test_cr_at_block_end(self) -> None:
        """A CR as the 16th byte and its LF as the 17th is one line end; a CR there followed
        by anything else is bare."""
        good = b"a" * 15 + b"\r\nrest\r\n"
        bad = b"a" * 15 + b"\rxrest\r\n"
        self.assertEqual(linescan.check(good, 0, False)[0], False)
        self.assertEqual(linescan.check(bad, 0, False)[0], True)
        self.assertEqual(both_checks(bad, 0, False)[0], both_checks(bad, 0, False)[1])

    def test_pending_cr_from_previous_chunk(self) -> None:
        self.assertEqual(linescan.check(b"\n" + b"a" * 40 + b"\r\n", 5, True)[0], False)
        self.assertEqual(linescan.check(b"a" * 40 + b"\r\n", 5, True)[0], True)

    @settings(max_examples=500)
    @given(streams, st.integers(0, 600))
    def test_find_line_dot_agrees(self, data: bytes, start: int) -> None:
        self.assertEqual(linescan.python_find_line_dot(data, start), linescan.find_line_dot(data, start))

    def test_find_line_dot_at_every_offset(self) -> None:
        for offset in range(40):
            data = b"a" * offset + b"\r\n.x" + b"b" * 20
            self.assertEqual(linescan.find_line_dot(data), offset)
            self.assertEqual(linescan.find_line_dot(data, offset + 1), -1)

    def test_accepts_memoryview(self) -> None:
        """Both take any bytes-like object, as bytes.count does."""
        raw = memoryview(b"ab\r\n\r\n.cd\r\n")
        self.assertEqual(linescan.check(raw, 0, False), linescan.python_check(bytes(raw), 0, False))
        self.assertEqual(linescan.find_line_dot(raw), 4)


class BuildTests(SynchronousTestCase):
    def test_compiled_in_ci(self) -> None:
        """CI installs a compiler, so the scanner must have been built there: a silent fallback
        would leave the compiled code untested."""
        if os.environ.get("CI") != "true":
            self.skipTest("only CI (CI=true) promises a C compiler")
        self.assertTrue(
            linescan.COMPILED,
            f"mailplat._linescan is not importable beside {linescan.__file__}: either it did not"
            " build (see pip's output) or it was built elsewhere (a non-editable install puts it"
            " in site-packages, which the checkout's own mailplat/ shadows; README.rst's test"
            " command installs in editable compat mode for this reason)",
        )

"""RFC 5321 §4.5.2 (transparency), §4.1.1.4 (end of data), §4.5.3.1.6 (line length), RFC 3030."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat.datadecoder import ChunkReader, DotDecoder, LineChecker


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def decode(wire: bytes, cuts: list[int] = []) -> tuple[bytes, bytes | None, DotDecoder]:
    out: list[bytes] = []
    decoder = DotDecoder(out.append)
    rest = None
    for piece in split_at(wire, cuts):
        if rest is not None:
            rest += piece
            continue
        rest = decoder.feed(piece)
    return b"".join(out), rest, decoder


def stuff(body: bytes) -> bytes:
    """What a conforming client sends for ``body`` (CRLF-terminated lines)."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + l if l.startswith(b".") else l for l in lines)


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
)


class DotDecoderTests(SynchronousTestCase):
    def test_end_of_data(self) -> None:
        """The message ends at CRLF.CRLF and the CRLF before the dot belongs to the message."""
        body, rest, _ = decode(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        self.assertEqual(body, b"Subject: x\r\n\r\nhello\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_empty_message(self) -> None:
        """A lone dot right after DATA is an empty message."""
        body, rest, _ = decode(b".\r\n")
        self.assertEqual((body, rest), (b"", b""))

    def test_unstuffing(self) -> None:
        """A leading dot is removed from every line that has one, the first line included."""
        body, _, _ = decode(b"..first\r\nmid\r\n...dots\r\n.x\r\n.\r\n")
        self.assertEqual(body, b".first\r\nmid\r\n..dots\r\nx\r\n")

    def test_bare_lf_dot_is_not_end(self) -> None:
        """LF.LF, CR.CR and LF.CRLF never end the data (SMTP smuggling)."""
        for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"):
            body, rest, decoder = decode(b"a" + fake + b"MAIL FROM:<x@y>\r\n.\r\n")
            self.assertEqual(rest, b"")
            self.assertIn(b"MAIL FROM", body)
            self.assertTrue(decoder.checker.bare_newline, fake)

    def test_clean_message_has_no_problem(self) -> None:
        """A CRLF-only message with short lines raises no problem."""
        _, _, decoder = decode(b"a\r\nb\r\n.\r\n")
        self.assertIsNone(decoder.checker.problem)

    def test_long_line(self) -> None:
        """A line of 1001 octets with its CRLF is flagged; 1000 is allowed."""
        _, _, ok = decode(b"x" * 998 + b"\r\n.\r\n")
        _, _, bad = decode(b"x" * 999 + b"\r\n.\r\n")
        self.assertFalse(ok.checker.overlong)
        self.assertTrue(bad.checker.overlong)

    @settings(max_examples=300)
    @given(lines, st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
    def test_any_chunking(self, body_lines: list[bytes], cuts: list[int]) -> None:
        """However the wire bytes are split (even between CR and LF), the body comes out whole."""
        body = b"".join(line + b"\r\n" for line in body_lines)
        wire = stuff(body) + b".\r\nNEXT"
        if body.endswith(b"\r\n") is False and body:
            return
        out, rest, decoder = decode(wire, cuts)
        self.assertEqual(out, body)
        self.assertEqual(rest, b"NEXT")
        self.assertEqual(decoder.size, len(body))


class LineCheckerTests(SynchronousTestCase):
    @given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6))
    def test_split_invariance(self, data: bytes, cuts: list[int]) -> None:
        """The verdict on a byte stream does not depend on how it is chunked."""
        whole, parts = LineChecker(), LineChecker()
        whole.feed(b"\r\n" + data + b"\r\n")
        for piece in split_at(b"\r\n" + data + b"\r\n", cuts):
            parts.feed(piece)
        self.assertEqual((whole.bare_newline, whole.overlong), (parts.bare_newline, parts.overlong))

    def test_crlf_split_between_chunks(self) -> None:
        """A CR at the end of one chunk and LF at the start of the next is one line end."""
        checker = LineChecker()
        checker.feed(b"abc\r")
        checker.feed(b"\ndef\r\n")
        self.assertIsNone(checker.problem)


class ChunkReaderTests(SynchronousTestCase):
    def test_exact_size(self) -> None:
        """BDAT reads exactly the announced octets, dots and all, and returns the rest."""
        out: list[bytes] = []
        reader = ChunkReader(7, out.append, LineChecker())
        self.assertIsNone(reader.feed(b".\r\n.\r"))
        self.assertEqual(reader.feed(b"\nxRSET\r\n"), b"RSET\r\n")
        self.assertEqual(b"".join(out), b".\r\n.\r\nx")

"""mailplat.trace: the Received: field we prepend (RFC 5321 §4.4)."""

from __future__ import annotations

from email.utils import formatdate

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat.envelope import SessionInfo
from mailplat.trace import _clean, received_header


class CleanTests(SynchronousTestCase):
    @given(st.text(max_size=300))
    def test_keeps_printable_non_structural_characters(self, text: str) -> None:
        """Exactly the printable characters that cannot break the field's comments and
        angle brackets survive, in order, at most 255 of them."""
        expected = "".join(ch for ch in text if ch.isprintable() and ch not in "()<>;\\")[:255]
        self.assertEqual(_clean(text), expected)

    def test_examples(self) -> None:
        self.assertEqual(_clean("mx.example (evil) <x>;\\"), "mx.example evil x")
        self.assertEqual(_clean("a\x00b\r\nc\u2028d"), "abcd")


class ReceivedHeaderTests(SynchronousTestCase):
    def test_field(self) -> None:
        info = SessionInfo(peer_host="192.0.2.1", helo="client(x)", protocol="ESMTP")
        field = received_header(info, "mx.example", "QID1", ["a@b.example"], False, 86400.7)
        self.assertEqual(field, (
            "Received: from clientx ([192.0.2.1])\r\n"
            "\tby mx.example (mailplat) with ESMTP id QID1\r\n"
            "\tfor <a@b.example>;\r\n"
            f"\t{formatdate(86400, localtime=False, usegmt=False)}\r\n"
        ).encode())

"""SASL mechanisms as pure state machines (RFC 4616 PLAIN, LOGIN, RFC 2195 CRAM-MD5, RFC 4954)."""

from __future__ import annotations

import hmac

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailplat.sasl import (
    BAD_BASE64, CANCELLED, Challenge, CramMD5, CramMD5Response, Done, Login, Malformed, Plain,
    ResponseLine, SASLError, decode_initial, decode_response,
)


class FramingTests(SynchronousTestCase):
    def test_decode(self) -> None:
        """A response line is base64; surrounding whitespace and CR are ignored."""
        self.assertEqual(decode_response(b"AGFsaWNlAHNlY3JldA==\r"), b"\0alice\0secret")

    def test_cancel(self) -> None:
        """A lone '*' cancels the exchange with 501 5.7.0."""
        with self.assertRaises(SASLError) as caught:
            decode_response(b"*")
        self.assertEqual((caught.exception.reply, caught.exception.failure), (CANCELLED, False))

    def test_bad_base64(self) -> None:
        """Text that is not base64 is a 501 5.5.2 and not counted as a failed login."""
        for line in (b"not base64!", b"YWJj=", b"YW Jj"):
            with self.assertRaises(SASLError) as caught:
                decode_response(line)
            self.assertEqual(caught.exception.reply, BAD_BASE64)

    def test_initial_response(self) -> None:
        """No initial response is None, '=' is an empty one, anything else is base64."""
        self.assertIsNone(decode_initial(""))
        self.assertEqual(decode_initial("="), b"")
        self.assertEqual(decode_initial("YWJj"), b"abc")


class PlainTests(SynchronousTestCase):
    def test_initial(self) -> None:
        """PLAIN with an initial response completes at once with the user and password."""
        step = Plain().start(b"\0alice\0secret")
        assert isinstance(step, Done)
        self.assertTrue(verifyObject(IUsernamePassword, step.credentials))
        self.assertEqual((step.credentials.username, step.credentials.password),  # type: ignore
                         (b"alice", b"secret"))

    def test_empty_challenge(self) -> None:
        """Without an initial response the server sends an empty challenge first."""
        plain = Plain()
        self.assertEqual(plain.start(None), Challenge(b""))
        self.assertIsInstance(plain.respond(b"alice\0alice\0pw"), Done)

    def test_authzid_must_match(self) -> None:
        """Authorizing as someone else (proxy authorization) is refused as a failed login."""
        self.assertRaises(Malformed, Plain().start, b"bob\0alice\0pw")

    def test_malformed(self) -> None:
        """Missing NULs, an empty user or password, or bad UTF-8 are failed logins."""
        for data in (b"alice", b"\0alice", b"\0\0pw", b"\0alice\0", b"\0\xff\0pw", b"a\0b\0c\0d"):
            self.assertRaises(Malformed, Plain().start, data)


class LoginTests(SynchronousTestCase):
    def test_exchange(self) -> None:
        """LOGIN asks for the user name, then the password."""
        login = Login()
        self.assertEqual(login.start(None), Challenge(b"Username:"))
        self.assertEqual(login.respond(b"alice"), Challenge(b"Password:"))
        step = login.respond(b"secret")
        assert isinstance(step, Done)
        self.assertEqual(step.credentials.password, b"secret")  # type: ignore[attr-defined]

    def test_initial_user(self) -> None:
        """A user name given as initial response skips the first challenge."""
        self.assertEqual(Login().start(b"alice"), Challenge(b"Password:"))

    def test_empty_password(self) -> None:
        """An empty password is a failed login."""
        login = Login()
        login.start(b"alice")
        self.assertRaises(Malformed, login.respond, b"")


class CramMD5Tests(SynchronousTestCase):
    def test_exchange(self) -> None:
        """The challenge is a msg-id naming our host; the answer checks with HMAC-MD5."""
        cram = CramMD5("mx.test", 1700000000.5)
        step = cram.start(None)
        assert isinstance(step, Challenge)
        self.assertRegex(step.data, rb"^<\d+\.1700000000@mx\.test>$")
        digest = hmac.new(b"tanstaaf", step.data, "md5").hexdigest().encode()
        done = cram.respond(b"tim " + digest)
        assert isinstance(done, Done)
        credentials = done.credentials
        self.assertTrue(verifyObject(IUsernameHashedPassword, credentials))
        self.assertEqual(credentials.username, b"tim")  # type: ignore[attr-defined]
        self.assertTrue(credentials.checkPassword(b"tanstaaf"))  # type: ignore[attr-defined]
        self.assertFalse(credentials.checkPassword(b"wrong"))  # type: ignore[attr-defined]

    def test_rfc2195_example(self) -> None:
        """The worked example of RFC 2195 §2 verifies."""
        response = CramMD5Response(b"tim", b"<1896.697170952@postoffice.reston.mci.net>",
                                   b"b913a602c7eda7a495b4e6e7334d3890")
        self.assertTrue(response.checkPassword(b"tanstaaftanstaaf"))

    def test_challenges_differ(self) -> None:
        """Each exchange gets a fresh random challenge, so answers cannot be replayed."""
        challenges = {CramMD5("mx.test", 0).challenge for _ in range(20)}
        self.assertGreater(len(challenges), 15)

    def test_malformed(self) -> None:
        """An answer without a 32-hex-digit digest, or an initial response, is a failure."""
        for data in (b"tim", b"tim xyz", b"tim " + b"g" * 32, b" " + b"0" * 32):
            self.assertRaises(Malformed, CramMD5("mx.test", 0).respond, data)
        self.assertRaises(Malformed, CramMD5("mx.test", 0).start, b"tim")


class ResponseLineTests(SynchronousTestCase):
    def test_line_and_rest(self) -> None:
        """The reader takes one line and gives back what follows it."""
        reader = ResponseLine()
        self.assertIsNone(reader.feed(b"YWJ"))
        self.assertEqual(reader.feed(b"j\r\nNOOP\r\n"), b"NOOP\r\n")
        self.assertEqual(reader.line, b"YWJj")

    def test_too_long(self) -> None:
        """An over-long line is consumed to its end and marked, never kept in memory."""
        reader = ResponseLine(limit=10)
        self.assertIsNone(reader.feed(b"x" * 100))
        self.assertIsNone(reader.feed(b"x" * 100))
        self.assertEqual(reader.feed(b"x\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertTrue(reader.too_long)
        self.assertEqual(reader.line, b"")

    @given(st.binary(max_size=200).filter(lambda b: b"\n" not in b), st.data())
    def test_any_split(self, line: bytes, data: st.DataObject) -> None:
        """However the line is split into reads, the reader sees the same line."""
        wire = line + b"\r\nREST"
        cut = data.draw(st.integers(0, len(wire)))
        reader = ResponseLine()
        rest = reader.feed(wire[:cut])
        rest = reader.feed(wire[cut:]) if rest is None else rest + wire[cut:]
        self.assertEqual((reader.line, rest), (line.rstrip(b"\r"), b"REST"))

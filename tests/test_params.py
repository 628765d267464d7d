"""Tests for mailplat.params: ESMTP parameters of MAIL and RCPT, and xtext."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat.params import (
    MAIL_KEYWORDS,
    RCPT_KEYWORDS,
    MailParams,
    ParamError,
    RcptParams,
    mail_params,
    parse_params,
    rcpt_params,
    xtext_decode,
    xtext_encode,
)

ENHANCED = re.compile(r"5\.\d{1,3}\.\d{1,3}")
MAIL_UNKNOWN = (555, "5.5.4", "MAIL FROM parameters not recognized or not implemented")
RCPT_UNKNOWN = (555, "5.5.4", "RCPT TO parameters not recognized or not implemented")


def mail(text: str, supported: frozenset[str] = MAIL_KEYWORDS) -> MailParams:
    return mail_params(parse_params(text), supported)


def rcpt(text: str, supported: frozenset[str] = RCPT_KEYWORDS) -> RcptParams:
    return rcpt_params(parse_params(text), supported)


class ParamTestCase(SynchronousTestCase):
    def assertSyntax(self, function: object, *args: object) -> ParamError:
        """The call fails with 501 5.5.4."""
        error = self.assertRaises(ParamError, function, *args)
        self.assertEqual((error.reply.code, error.reply.status), (501, "5.5.4"))
        return error

    def assertReply(self, error: ParamError, expected: tuple[int, str, str]) -> None:
        reply = error.reply
        self.assertEqual((reply.code, reply.status, reply.text), expected)


class ParseParamsTests(ParamTestCase):
    """The generic esmtp-param syntax of RFC 5321 §4.1.2."""

    def test_example(self) -> None:
        """Keywords with and without values are split into a dict."""
        self.assertEqual(
            parse_params("SIZE=100 BODY=8BITMIME SMTPUTF8"),
            {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None},
        )

    def test_empty(self) -> None:
        """No text means no parameters."""
        self.assertEqual(parse_params(""), {})

    def test_keyword_uppercased_value_verbatim(self) -> None:
        """Keywords are case-insensitive and uppercased; values are kept as sent."""
        self.assertEqual(parse_params("body=8bitMime"), {"BODY": "8bitMime"})

    def test_extra_spaces(self) -> None:
        """Repeated spaces between parameters are tolerated."""
        self.assertEqual(parse_params(" A=1   B "), {"A": "1", "B": None})

    def test_keyword_syntax(self) -> None:
        """A keyword starts with a letter or digit, then letters, digits and hyphens."""
        self.assertEqual(parse_params("X-FOO-1=2"), {"X-FOO-1": "2"})
        for text in ("-X=1", "X_Y=1", "=1", "X\tY", "KÉY=1"):
            self.assertSyntax(parse_params, text)

    def test_value_syntax(self) -> None:
        """A value is non-empty printable ASCII without "=", or UTF-8 (RFC 6531 §3.3)."""
        self.assertEqual(parse_params("X=a<b>~!"), {"X": "a<b>~!"})
        self.assertEqual(parse_params("X=jörg"), {"X": "jörg"})
        for text in ("X=", "X=a=b", "X=a\x00", "X=\x7f", "X=a\x85", "X=a\u00a0b", "X=\udcff"):
            self.assertSyntax(parse_params, text)

    def test_duplicates(self) -> None:
        """A keyword given twice, in any case, is refused with 501 5.5.4."""
        error = self.assertSyntax(parse_params, "SIZE=1 size=2")
        self.assertIn("SIZE", error.reply.text)


class MailParamsTests(ParamTestCase):
    """MAIL FROM parameters."""

    def test_defaults(self) -> None:
        """Without parameters every field is None or False."""
        self.assertEqual(mail(""), MailParams(None, None, False, None, None, None))

    def test_all(self) -> None:
        """Every supported parameter is understood and normalised."""
        self.assertEqual(
            mail("SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=Q+2B1 AUTH=a+2Bb@c.example"),
            MailParams(1000, "8BITMIME", True, "HDRS", "Q+1", "a+b@c.example"),
        )

    def test_unknown(self) -> None:
        """An unknown keyword is 555 5.5.4."""
        self.assertReply(self.assertRaises(ParamError, mail, "FOO=1"), MAIL_UNKNOWN)

    def test_unadvertised(self) -> None:
        """A known keyword this session did not advertise is 555 5.5.4."""
        error = self.assertRaises(ParamError, mail, "SMTPUTF8", frozenset({"SIZE"}))
        self.assertReply(error, MAIL_UNKNOWN)

    def test_rcpt_keyword_on_mail(self) -> None:
        """RCPT parameters are unknown on MAIL even when advertised."""
        error = self.assertRaises(ParamError, mail, "NOTIFY=NEVER", MAIL_KEYWORDS | RCPT_KEYWORDS)
        self.assertReply(error, MAIL_UNKNOWN)

    def test_unknown_reported_first(self) -> None:
        """An unknown keyword wins over a bad value of a known one."""
        self.assertReply(self.assertRaises(ParamError, mail, "SIZE=x FOO"), MAIL_UNKNOWN)

    def test_size(self) -> None:
        """SIZE is 1 to 20 decimal digits (RFC 1870)."""
        self.assertEqual(mail("SIZE=0").size, 0)
        self.assertEqual(mail(f"SIZE={'9' * 20}").size, int("9" * 20))
        for text in ("SIZE", "SIZE=-1", "SIZE=1k", "SIZE=١", f"SIZE={'9' * 21}", "SIZE=+1"):
            self.assertSyntax(mail, text)

    def test_body(self) -> None:
        """BODY is 7BIT or 8BITMIME, case-insensitively (RFC 6152)."""
        self.assertEqual(mail("BODY=7bit").body, "7BIT")
        for text in ("BODY", "BODY=8BIT", "BODY=BINARYMIME"):
            self.assertSyntax(mail, text)

    def test_binarymime(self) -> None:
        """BODY=BINARYMIME is only accepted when BINARYMIME was advertised (RFC 3030)."""
        self.assertEqual(mail("BODY=BINARYMIME", MAIL_KEYWORDS | {"BINARYMIME"}).body, "BINARYMIME")

    def test_binarymime_is_not_a_parameter(self) -> None:
        """BINARYMIME names an extension, not a MAIL parameter."""
        error = self.assertRaises(ParamError, mail, "BINARYMIME", MAIL_KEYWORDS | {"BINARYMIME"})
        self.assertReply(error, MAIL_UNKNOWN)

    def test_smtputf8_has_no_value(self) -> None:
        """SMTPUTF8 with a value is refused (RFC 6531 §3.4)."""
        self.assertSyntax(mail, "SMTPUTF8=yes")

    def test_ret(self) -> None:
        """RET is FULL or HDRS (RFC 3461 §4.3)."""
        self.assertEqual(mail("RET=Full").ret, "FULL")
        for text in ("RET", "RET=BODY"):
            self.assertSyntax(mail, text)

    def test_envid(self) -> None:
        """ENVID is xtext-decoded (RFC 3461 §4.4)."""
        self.assertEqual(mail("ENVID=abc+2Bdef+3D").envid, "abc+def=")

    def test_envid_length(self) -> None:
        """ENVID is at most 100 characters as sent."""
        self.assertEqual(mail(f"ENVID={'x' * 100}").envid, "x" * 100)
        self.assertSyntax(mail, f"ENVID={'x' * 101}")

    def test_bad_envid(self) -> None:
        """ENVID must be valid xtext of printable ASCII: no controls, spaces or UTF-8."""
        for text in ("ENVID", "ENVID=a+2", "ENVID=a+ZZ", "ENVID=a+0D+0Ab", "ENVID=a+20",
                     "ENVID=jörg", "ENVID=+C3+B6"):
            self.assertSyntax(mail, text)

    def test_auth(self) -> None:
        """AUTH= is an xtext mailbox or "<>" (RFC 4954 §5)."""
        self.assertEqual(mail("AUTH=<>").auth, "<>")
        self.assertEqual(mail("AUTH=+C3+B6@x.example").auth, "ö@x.example")

    def test_bad_auth(self) -> None:
        """AUTH= needs valid xtext without controls."""
        for text in ("AUTH", "AUTH=a+0Ab", "AUTH=a+", "AUTH=+FF"):
            self.assertSyntax(mail, text)


class RcptParamsTests(ParamTestCase):
    """RCPT TO parameters (RFC 3461 DSN)."""

    def test_defaults(self) -> None:
        """Without parameters NOTIFY is empty and ORCPT None."""
        self.assertEqual(rcpt(""), RcptParams((), None))

    def test_notify(self) -> None:
        """NOTIFY is a comma list, case-insensitive, duplicates dropped in order."""
        self.assertEqual(rcpt("NOTIFY=failure,Success,DELAY,FAILURE").notify,
                         ("FAILURE", "SUCCESS", "DELAY"))
        self.assertEqual(rcpt("NOTIFY=never").notify, ("NEVER",))

    def test_notify_never_alone(self) -> None:
        """NOTIFY=NEVER cannot be combined with other values."""
        self.assertSyntax(rcpt, "NOTIFY=NEVER,SUCCESS")

    def test_bad_notify(self) -> None:
        """NOTIFY values are SUCCESS, FAILURE, DELAY or NEVER, with no empty items."""
        for text in ("NOTIFY", "NOTIFY=ALWAYS", "NOTIFY=SUCCESS,", "NOTIFY=,DELAY"):
            self.assertSyntax(rcpt, text)

    def test_orcpt(self) -> None:
        """ORCPT is addr-type ";" xtext, returned with the address decoded."""
        self.assertEqual(rcpt("ORCPT=rfc822;a+2Bb@x.example").orcpt, "rfc822;a+b@x.example")
        self.assertEqual(rcpt("ORCPT=utf-8;j\\x{F6}rg@x").orcpt, "utf-8;j\\x{F6}rg@x")

    def test_bad_orcpt(self) -> None:
        """ORCPT needs an atom addr-type, a semicolon and printable-ASCII xtext."""
        for text in ("ORCPT", "ORCPT=a@b", "ORCPT=rfc822;", "ORCPT=;a@b", "ORCPT=rfc(822);a@b",
                     "ORCPT=rfc822;a+0Db", "ORCPT=rfc822;a+2", "ORCPT=rfc822;+C3+B6"):
            self.assertSyntax(rcpt, text)

    def test_orcpt_length(self) -> None:
        """ORCPT is at most 500 characters as sent."""
        self.assertSyntax(rcpt, f"ORCPT=rfc822;{'a' * 494}")
        self.assertEqual(len(rcpt(f"ORCPT=rfc822;{'a' * 493}").orcpt or ""), 500)

    def test_unknown(self) -> None:
        """Unknown or unadvertised RCPT parameters are 555 5.5.4."""
        self.assertReply(self.assertRaises(ParamError, rcpt, "FOO"), RCPT_UNKNOWN)
        error = self.assertRaises(ParamError, rcpt, "NOTIFY=NEVER", frozenset())
        self.assertReply(error, RCPT_UNKNOWN)
        self.assertReply(self.assertRaises(ParamError, rcpt, "SIZE=1", MAIL_KEYWORDS), RCPT_UNKNOWN)


class XtextTests(SynchronousTestCase):
    """xtext (RFC 3461 §4)."""

    def test_encode(self) -> None:
        """"+", "=", space, controls and non-ASCII octets become "+HH" in uppercase hex."""
        self.assertEqual(xtext_encode("a+b=c d\r\nö"), "a+2Bb+3Dc+20d+0D+0A+C3+B6")

    def test_decode(self) -> None:
        """Hexchars decode to octets, read as UTF-8; lowercase hex is tolerated."""
        self.assertEqual(xtext_decode("a+2Bb+c3+b6"), "a+bö")

    def test_decode_invalid(self) -> None:
        """Truncated or non-hex hexchars, "=", spaces, controls, non-ASCII and bad UTF-8 fail."""
        for text in ("+", "+2", "+G0", "a=b", "a b", "a\x00", "ö", "+FF", "+٣٣"):
            self.assertRaises(ValueError, xtext_decode, text)

    @given(st.text())
    def test_round_trip(self, text: str) -> None:
        """Decoding the encoding of any text gives it back, through printable ASCII only."""
        encoded = xtext_encode(text)
        self.assertTrue(all("!" <= char <= "~" and char != "=" for char in encoded))
        self.assertEqual(xtext_decode(encoded), text)


class PropertyTests(SynchronousTestCase):
    """Arbitrary input only ever produces ParamError with a 5xx enhanced reply."""

    def check(self, text: str) -> None:
        supported = MAIL_KEYWORDS | RCPT_KEYWORDS | {"BINARYMIME"}
        for step in (parse_params, lambda t: mail_params(parse_params(t), supported),
                     lambda t: rcpt_params(parse_params(t), supported)):
            try:
                step(text)
            except ParamError as error:
                self.assertTrue(500 <= error.reply.code < 600)
                self.assertTrue(ENHANCED.fullmatch(error.reply.status or ""))

    @given(st.text())
    def test_arbitrary_text(self, text: str) -> None:
        """parse_params, mail_params and rcpt_params raise nothing but ParamError."""
        self.check(text)

    @given(st.lists(st.sampled_from(sorted(MAIL_KEYWORDS | RCPT_KEYWORDS)) | st.text(max_size=8),
                    max_size=4),
           st.lists(st.text(st.sampled_from("+=;,09AFaf<>@ xö\x00"), max_size=8), max_size=4))
    def test_keyword_like_text(self, keys: list[str], values: list[str]) -> None:
        """Known keywords with odd values raise nothing but ParamError."""
        self.check(" ".join(f"{key}={value}" for key, value in zip(keys, values)))

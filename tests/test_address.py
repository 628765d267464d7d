"""Tests for mailplat.address: RFC 5321 §4.1.2 paths with RFC 6531 UTF-8 addresses."""

from __future__ import annotations

import ipaddress
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat import address as address_module
from mailplat.address import (
    AddressError,
    Mailbox,
    is_dot_string,
    parse_forward_path,
    parse_mailbox,
    parse_reverse_path,
    quote_local_part,
)

ATEXT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
ENHANCED = re.compile(r"5\.\d{1,3}\.\d{1,3}")


class ReversePathTests(SynchronousTestCase):
    """MAIL FROM: reverse-paths."""

    def assertSenderRejected(self, text: str) -> AddressError:
        error = self.assertRaises(AddressError, parse_reverse_path, text)
        self.assertEqual((error.reply.code, error.reply.status), (501, "5.1.7"))
        self.assertEqual(error.reply.text, "Bad sender address syntax")
        return error

    def test_simple(self) -> None:
        """A plain mailbox parses into local part and domain with no parameters left."""
        self.assertEqual(parse_reverse_path("<a@example.com>"), (Mailbox("a", "example.com"), ""))

    def test_null(self) -> None:
        """The null reverse-path <> gives None."""
        self.assertEqual(parse_reverse_path("<>"), (None, ""))

    def test_leading_space(self) -> None:
        """Spaces before the path are tolerated (Postel), as in "MAIL FROM: <a@b>"."""
        self.assertEqual(parse_reverse_path("  <a@b.example>")[0], Mailbox("a", "b.example"))

    def test_rest(self) -> None:
        """Whatever follows the path is returned stripped, as the parameter string."""
        self.assertEqual(
            parse_reverse_path("<a@b.example> SIZE=10  BODY=8BITMIME "),
            (Mailbox("a", "b.example"), "SIZE=10  BODY=8BITMIME"),
        )

    def test_no_space_before_params(self) -> None:
        """Parameters must be separated from the path by a space."""
        self.assertSenderRejected("<a@b.example>SIZE=10")

    def test_brackets_required(self) -> None:
        """A path without angle brackets is a sender syntax error, 501 5.1.7."""
        self.assertSenderRejected("a@b.example")

    def test_unclosed(self) -> None:
        """A path without its closing bracket is refused."""
        self.assertSenderRejected("<a@b.example")

    def test_postmaster_not_a_sender(self) -> None:
        """The domain-less <postmaster> form is only valid as a recipient."""
        self.assertSenderRejected("<postmaster>")

    def test_detail(self) -> None:
        """The error's message explains the problem while the reply text stays generic."""
        self.assertIn("bracket", str(self.assertSenderRejected("a@b.example")))

    def test_control_characters(self) -> None:
        """Control characters are refused in a sender."""
        self.assertSenderRejected("<a\x00b@example.com>")


class ForwardPathTests(SynchronousTestCase):
    """RCPT TO: forward-paths and the address grammar shared with reverse-paths."""

    def assertRejected(self, text: str) -> AddressError:
        error = self.assertRaises(AddressError, parse_forward_path, text)
        self.assertEqual((error.reply.code, error.reply.status), (501, "5.1.3"))
        self.assertEqual(error.reply.text, "Bad recipient address syntax")
        return error

    def parse(self, text: str) -> Mailbox:
        mailbox, rest = parse_forward_path(text)
        self.assertEqual(rest, "")
        return mailbox

    def test_brackets_required(self) -> None:
        """A recipient without angle brackets is a syntax error, 501 5.1.3."""
        self.assertRejected("a@b.example")

    def test_null_refused(self) -> None:
        """<> is not a valid forward-path."""
        self.assertRejected("<>")

    def test_postmaster(self) -> None:
        """<Postmaster> in any case is the special domain-less postmaster mailbox."""
        self.assertEqual(self.parse("<PostMaster>"), Mailbox("postmaster", ""))
        self.assertEqual(str(Mailbox("postmaster", "")), "postmaster")

    def test_postmaster_with_domain(self) -> None:
        """postmaster@domain is an ordinary mailbox, its local part kept as given."""
        self.assertEqual(self.parse("<PostMaster@X.example>"), Mailbox("PostMaster", "x.example"))

    def test_source_route_discarded(self) -> None:
        """A source route is accepted and discarded (RFC 5321 §4.1.2, Appendix C)."""
        mailbox = self.parse("<@a.example,@b.example:user@c.example>")
        self.assertEqual(mailbox, Mailbox("user", "c.example"))

    def test_bad_source_route(self) -> None:
        """A source route must be "@domain" hops ending with a colon."""
        self.assertRejected("<@a.example,b.example:user@c.example>")
        self.assertRejected("<@a.example>")
        self.assertRejected("<@-a.example:user@c.example>")

    def test_domain_lowercased(self) -> None:
        """The domain is lowercased; the local part is case sensitive and kept."""
        self.assertEqual(self.parse("<User@Example.COM>"), Mailbox("User", "example.com"))

    def test_dot_string_rules(self) -> None:
        """A Dot-string has no leading, trailing or double dots."""
        for local in (".a", "a.", "a..b"):
            self.assertRejected(f"<{local}@example.com>")

    def test_atext(self) -> None:
        """Every atext character is valid in a Dot-string."""
        for chunk in (ATEXT[:40], ATEXT[40:]):
            self.assertEqual(self.parse(f"<{chunk}@example.com>").local, chunk)

    def test_quoted_string(self) -> None:
        """A Quoted-string local part is unquoted, quoted-pairs resolved."""
        self.assertEqual(self.parse(r'<"a b\"c\\d\e"@example.com>').local, 'a b"c\\de')

    def test_empty_quoted(self) -> None:
        """An empty Quoted-string is a valid (if unwise) local part."""
        self.assertEqual(self.parse('<""@example.com>'), Mailbox("", "example.com"))

    def test_quoted_angle_bracket(self) -> None:
        """A ">" inside a Quoted-string does not end the path."""
        self.assertEqual(parse_forward_path('<"a>b"@x.example> NOTIFY=NEVER')[1], "NOTIFY=NEVER")

    def test_bad_quoted(self) -> None:
        """Unterminated quotes, bad quoted-pairs and text after the quote are refused."""
        for text in ('<"ab@x.example>', '<"a\\\x01"@x.example>', '<"a"b@x.example>', '<"a">'):
            self.assertRejected(text)

    def test_space_outside_quotes(self) -> None:
        """Spaces are only allowed inside a Quoted-string."""
        self.assertRejected("<a b@example.com>")
        self.assertRejected("<a@exa mple.com>")

    def test_controls(self) -> None:
        """NUL, other C0/C1 controls and DEL are refused, even when quoted."""
        for char in ("\x00", "\t", "\r", "\x7f", "\x85"):
            self.assertRejected(f"<a{char}b@example.com>")
            self.assertRejected(f'<"a{char}b"@example.com>')

    def test_surrogates(self) -> None:
        """Lone surrogates (undecodable bytes) are refused."""
        self.assertRejected("<a\udcffb@example.com>")

    def test_missing_domain(self) -> None:
        """A mailbox needs "@domain"."""
        self.assertRejected("<user>")
        self.assertRejected("<user@>")

    def test_percent_hack(self) -> None:
        """The % relay trick is just part of the local part; the domain is after the @."""
        self.assertEqual(
            self.parse("<user%other.example@local.example>"),
            Mailbox("user%other.example", "local.example"),
        )

    def test_bang_path(self) -> None:
        """A UUCP bang path is just part of the local part."""
        self.assertEqual(
            self.parse("<other!user@local.example>"), Mailbox("other!user", "local.example")
        )

    def test_quoted_at(self) -> None:
        """A quoted "@" belongs to the local part; the domain is after the last unquoted @."""
        self.assertEqual(
            self.parse('<"user@other.example"@local.example>'),
            Mailbox("user@other.example", "local.example"),
        )

    def test_two_unquoted_ats(self) -> None:
        """An unquoted "@" inside the local part is a syntax error."""
        self.assertRejected("<user@other.example@local.example>")

    def test_domain_labels(self) -> None:
        """Labels are letters, digits and inner hyphens; no empty labels or trailing dot."""
        self.assertEqual(self.parse("<a@x-1.a2.example>").domain, "x-1.a2.example")
        for domain in ("-a.example", "a-.example", "a..example", "example.com.", ".example",
                       "a_b.example", "a*.example"):
            self.assertRejected(f"<a@{domain}>")

    def test_label_length(self) -> None:
        """A label has at most 63 octets."""
        self.assertEqual(self.parse(f"<a@{'x' * 63}.example>").domain, f"{'x' * 63}.example")
        self.assertRejected(f"<a@{'x' * 64}.example>")

    def test_ipv4_literal(self) -> None:
        """An IPv4 address literal is accepted and kept in brackets."""
        self.assertEqual(self.parse("<a@[192.0.2.1]>").domain, "[192.0.2.1]")

    def test_bad_ipv4_literal(self) -> None:
        """IPv4 literals must be four decimal octets without leading zeros."""
        for literal in ("[256.0.0.1]", "[1.2.3]", "[01.2.3.4]", "[1.2.3.4.5]"):
            self.assertRejected(f"<a@{literal}>")

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal is accepted, tag in any case, and put in canonical form."""
        self.assertEqual(self.parse("<a@[ipv6:2001:DB8:0::1]>").domain, "[IPv6:2001:db8::1]")

    def test_bad_ipv6_literal(self) -> None:
        """IPv6 literals must be valid addresses without zone ids; other tags are refused."""
        for literal in ("[IPv6:2001:db8::g]", "[IPv6:fe80::1%eth0]", "[2001:db8::1]",
                        "[x-tag:abc]", "[]", "[IPv6:1.2.3.4]"):
            self.assertRejected(f"<a@{literal}>")

    def test_local_part_length(self) -> None:
        """A local part has at most 64 octets, counted in UTF-8."""
        self.assertEqual(self.parse(f"<{'a' * 64}@example.com>").local, "a" * 64)
        self.assertRejected(f"<{'a' * 65}@example.com>")
        self.assertRejected(f"<{'é' * 33}@example.com>")

    def test_domain_length(self) -> None:
        """A domain over 255 octets is refused (the 256-octet path limit implies it too)."""
        domain = ".".join(["x" * 63] * 3 + ["x" * 62, "x"])  # 256 octets
        self.assertRejected(f"<a@{domain}>")
        self.assertRaises(AddressError, parse_mailbox, f"a@{domain}")

    def test_path_length(self) -> None:
        """A path, brackets and source route included, has at most 256 octets."""
        domain = ".".join(["x" * 60] * 4)  # 243 octets
        self.assertEqual(self.parse(f"<{'a' * 10}@{domain}>").domain, domain)
        self.assertRejected(f"<{'a' * 11}@{domain}>")
        self.assertRejected(f"<@{domain}:a@b.example>")

    def test_utf8_local_and_domain(self) -> None:
        """UTF-8 local parts and U-label domains parse (RFC 6531) and need SMTPUTF8."""
        mailbox = self.parse("<jörg@Bücher.example>")
        self.assertEqual(mailbox, Mailbox("jörg", "bücher.example"))
        self.assertTrue(mailbox.needs_smtputf8)
        self.assertFalse(Mailbox("jorg", "xn--bcher-kva.example").needs_smtputf8)
        self.assertTrue(Mailbox("jorg", "bücher.example").needs_smtputf8)

    def test_invalid_idn(self) -> None:
        """A non-ASCII domain that is not valid IDNA 2008 is a syntax error."""
        for domain in ("a\u3002example", "\u2603.example", "-bü.example", "a\u0301b\u200d.x"):
            self.assertRejected(f"<a@{domain}>")

    def test_utf8_space_refused(self) -> None:
        """Non-ASCII spaces are not atext."""
        self.assertRejected("<a\u00a0b@example.com>")

    def test_a_label_lowercased(self) -> None:
        """A-labels are lowercased like any ASCII label."""
        self.assertEqual(self.parse("<a@XN--BCHER-KVA.example>").domain, "xn--bcher-kva.example")


class MailboxTests(SynchronousTestCase):
    """Mailbox formatting and the helpers around it."""

    def test_str_dot_string(self) -> None:
        """A Dot-string local part is written unquoted."""
        self.assertEqual(str(Mailbox("a.b", "example.com")), "a.b@example.com")

    def test_str_quoted(self) -> None:
        """Other local parts are written as a Quoted-string with '"' and '\\' escaped."""
        self.assertEqual(str(Mailbox('a b"\\', "x.example")), '"a b\\"\\\\"@x.example')
        self.assertEqual(str(Mailbox("", "x.example")), '""@x.example')
        self.assertEqual(str(Mailbox("a..b", "x.example")), '"a..b"@x.example')

    def test_quoted_but_dot_string(self) -> None:
        """Needlessly quoted local parts come back unquoted."""
        self.assertEqual(str(parse_forward_path('<"abc"@x.example>')[0]), "abc@x.example")

    def test_is_dot_string(self) -> None:
        """UTF-8 letters count as atext, spaces and specials do not."""
        self.assertTrue(is_dot_string("jörg.x"))
        self.assertFalse(is_dot_string("a b"))
        self.assertFalse(is_dot_string("a@b"))

    def test_quote_local_part(self) -> None:
        """quote_local_part leaves Dot-strings alone."""
        self.assertEqual(quote_local_part("a+b"), "a+b")
        self.assertEqual(quote_local_part("a,b"), '"a,b"')

    def test_parse_mailbox(self) -> None:
        """A bare address without brackets parses the same way."""
        self.assertEqual(parse_mailbox('"x y"@Example.com'), Mailbox("x y", "example.com"))
        error = self.assertRaises(AddressError, parse_mailbox, "<a@b.example>")
        self.assertEqual(error.reply.status, "5.1.3")


LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
U_LABEL = st.sampled_from(["bücher", "пример", "例え", "テスト", "straße", "xn--bcher-kva"])
UTF8_LETTER = st.characters(min_codepoint=0xA1, categories=("Ll", "Lu", "Lo", "Nd", "So"))
ATOM = st.text(st.sampled_from(ATEXT) | UTF8_LETTER, min_size=1, max_size=8)
DOT_STRING = st.lists(ATOM, min_size=1, max_size=4).map(".".join)
QUOTED = st.text(st.characters(min_codepoint=32, max_codepoint=126) | UTF8_LETTER, max_size=20)
NAME = st.lists(LABEL | U_LABEL, min_size=1, max_size=4).map(".".join)
IPV4 = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
IPV6 = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ipaddress.IPv6Address(ip).compressed}]")


def _check_error(test: SynchronousTestCase, error: AddressError) -> None:
    test.assertGreaterEqual(error.reply.code, 500)
    test.assertLess(error.reply.code, 600)
    test.assertTrue(ENHANCED.fullmatch(error.reply.status or ""))


class PropertyTests(SynchronousTestCase):
    """Properties over generated addresses and arbitrary text."""

    @given(DOT_STRING | QUOTED, NAME | IPV4 | IPV6)
    def test_round_trip(self, local: str, domain: str) -> None:
        """str(Mailbox) re-parses to an equal Mailbox."""
        domain = domain.lower() if not domain.startswith("[") else domain
        mailbox = Mailbox(local, domain)
        assume(len(quote_local_part(local).encode()) <= 64)
        self.assertEqual(parse_forward_path(f"<{mailbox}>"), (mailbox, ""))
        self.assertEqual(parse_reverse_path(f"<{mailbox}> X=1"), (mailbox, "X=1"))

    @given(st.text())
    def test_arbitrary_text(self, text: str) -> None:
        """Parsing arbitrary text only ever raises AddressError, with a 5xx enhanced reply."""
        for parse in (parse_reverse_path, parse_forward_path, parse_mailbox):
            for candidate in (text, f"<{text}>", f"<{text}@example.com>", f"<a@{text}>"):
                try:
                    parse(candidate)
                except AddressError as error:
                    _check_error(self, error)

    @given(st.text(st.sampled_from('<>@"\\.:,[]- aZ09%!é\x00\u3002'), max_size=40))
    def test_path_like_text(self, text: str) -> None:
        """Text made of path punctuation only ever raises AddressError."""
        for parse in (parse_reverse_path, parse_forward_path, parse_mailbox):
            try:
                parse(text)
            except AddressError as error:
                _check_error(self, error)


class PlainPathTests(SynchronousTestCase):
    """The regular-expression shortcut for plain paths gives what the general parser gives."""

    def general(self, text: str, null_ok: bool, postmaster_ok: bool) -> object:
        try:
            return address_module._parse_any_path(text.lstrip(" \t"), null_ok, postmaster_ok)
        except address_module._Invalid:
            return "invalid"

    def both(self, text: str) -> None:
        for null_ok, postmaster_ok in ((True, False), (False, True)):
            plain = address_module._parse_plain_path(text.lstrip(" \t"))
            if plain is not None:
                self.assertEqual(plain, self.general(text, null_ok, postmaster_ok), text)

    @settings(max_examples=500)
    @given(st.text(st.sampled_from('<>@"\\.-aZ09%!=+ \té\n'), max_size=30))
    def test_path_like_text(self, text: str) -> None:
        self.both(text)

    @given(DOT_STRING, NAME, st.sampled_from(["", " SIZE=10", "  X=1 ", "\n", " "]))
    def test_generated_paths(self, local: str, domain: str, rest: str) -> None:
        self.both(f"<{local}@{domain}>{rest}")

    def test_limits_left_to_the_general_parser(self) -> None:
        """At a length limit the shortcut steps aside, so the refusal is the general one."""
        for text in (f"<{'a' * 65}@example.com>", f"<a@{'b' * 64}.com>",
                     f"<a@{'.'.join(['b' * 60] * 5)}>"):
            self.assertIsNone(address_module._parse_plain_path(text))
            self.assertRaises(AddressError, parse_forward_path, text)

    def test_taken_for_the_usual_path(self) -> None:
        self.assertEqual(address_module._parse_plain_path("<Bob.Smith@Example.COM> SIZE=5"),
                         (Mailbox("Bob.Smith", "example.com"), "SIZE=5"))

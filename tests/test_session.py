"""The ESMTP engine through its real parser (RFC 5321, 1870, 2034, 2920, 3030, 6152, 6531)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailplat.interfaces import Action, SpoolError, Verdict
from mailplat.replies import Reply
from mailplat.testing import MemorySink
from tests.support import Client

TRANSACTION = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<alice@example.org>\r\n"
    b"RCPT TO:<bob@mx.test>\r\n"
    b"DATA\r\n"
)


def body_of(client: Client, index: int = 0) -> bytes:
    """The stored message minus our Received: header."""
    data = client.sink.messages[index].data
    assert data.startswith(b"Received: ")
    end = data.find(b"\r\n", data.find(b"\r\n\t") + 1)
    while data[end + 2:end + 3] == b"\t":
        end = data.find(b"\r\n", end + 2)
    return data[end + 2:]


class GreetingTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        """The server speaks first with 220 and its hostname."""
        client = Client()
        self.assertEqual(client.take(), [b"220 mx.test ESMTP mailplat"])

    def test_ehlo_keywords(self) -> None:
        """EHLO advertises every extension the engine implements."""
        client = Client(max_message_size=1000)
        client.take()
        lines = client.send(b"EHLO c.test\r\n")
        self.assertEqual(lines[0], b"250-mx.test Hello c.test [192.0.2.7]")
        keywords = {line[4:] for line in lines[1:]}
        self.assertEqual(keywords, {b"PIPELINING", b"SIZE 1000", b"8BITMIME",
                                    b"ENHANCEDSTATUSCODES", b"SMTPUTF8", b"CHUNKING", b"DSN", b"HELP"})
        self.assertTrue(lines[-1].startswith(b"250 "))

    def test_helo(self) -> None:
        """HELO gets a single 250 line and no ESMTP parameters are allowed later."""
        client = Client()
        client.take()
        self.assertEqual(client.codes(b"HELO c.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\n"),
                         ["250", "555 5.5.4"])

    def test_commands_case_insensitive(self) -> None:
        """Verbs are recognised in any case."""
        client = Client()
        client.take()
        self.assertEqual(client.codes(b"ehlo c\r\nmail from:<a@b.test>\r\nrCpT to:<b@mx.test>\r\nnoop\r\n"),
                         ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0"])

    def test_helo_needs_argument(self) -> None:
        """EHLO without a domain is a syntax error."""
        client = Client()
        client.take()
        self.assertEqual(client.codes(b"EHLO\r\n"), ["501 5.5.4"])


class SequenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client()
        self.client.take()

    def test_mail_before_ehlo(self) -> None:
        """A transaction cannot start before the client has introduced itself."""
        self.assertEqual(self.client.codes(b"MAIL FROM:<a@b.test>\r\n"), ["503 5.5.1"])

    def test_rcpt_before_mail(self) -> None:
        """RCPT and DATA without MAIL are out of sequence."""
        self.assertEqual(self.client.codes(b"EHLO c\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"),
                         ["250", "503 5.5.1", "503 5.5.1"])

    def test_nested_mail(self) -> None:
        """A second MAIL inside a transaction is out of sequence."""
        self.assertEqual(self.client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n"),
                         ["250", "250 2.1.0", "503 5.5.1"])

    def test_data_without_recipients(self) -> None:
        """DATA after MAIL but no accepted RCPT gets 554 5.5.1 (RFC 2920 §3.1)."""
        self.assertEqual(self.client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n"),
                         ["250", "250 2.1.0", "554 5.5.1"])

    def test_unknown_command(self) -> None:
        """An unknown verb gets 500 5.5.1 and the session goes on."""
        self.assertEqual(self.client.codes(b"FOO bar\r\nNOOP\r\n"), ["500 5.5.1", "250 2.0.0"])

    def test_syntax_errors(self) -> None:
        """Malformed MAIL and RCPT arguments get 501 with an enhanced code."""
        codes = self.client.codes(b"EHLO c\r\nMAIL TO:<a@b.test>\r\nMAIL FROM:a@b.test\r\n"
                                  b"MAIL FROM:<a@b.test>\r\nRCPT TO:<>\r\nRCPT bob\r\n")
        self.assertEqual(codes, ["250", "501 5.5.4", "501 5.1.7", "250 2.1.0", "501 5.1.3", "501 5.5.4"])

    def test_rset(self) -> None:
        """RSET ends the transaction so MAIL is allowed again."""
        self.assertEqual(self.client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n"),
                         ["250", "250 2.1.0", "250 2.0.0", "250 2.1.0"])

    def test_vrfy_help_noop(self) -> None:
        """VRFY answers 252, HELP 214 and NOOP 250, in any state."""
        self.assertEqual(self.client.codes(b"VRFY bob\r\nHELP\r\nNOOP\r\nEXPN list\r\n"),
                         ["252 2.5.0", "214 2.0.0", "250 2.0.0", "502 5.5.1"])

    def test_quit(self) -> None:
        """QUIT gets 221 and the connection closes; nothing after it is answered."""
        self.assertEqual(self.client.codes(b"QUIT\r\nNOOP\r\n"), ["221 2.0.0"])
        self.assertTrue(self.client.transport.disconnecting)

    def test_too_many_errors(self) -> None:
        """A client that only sends garbage is disconnected with 421."""
        lines = self.client.send(b"X\r\n" * 25)
        self.assertTrue(lines[-1].startswith(b"421 4.7.0"))
        self.assertEqual(len(lines), 21)


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client(max_message_size=2000, max_recipients=3)
        self.client.take()

    def test_command_line_too_long(self) -> None:
        """A command line over 512 octets gets 500 5.5.2 and the next line is read normally."""
        self.assertEqual(self.client.codes(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n"),
                         ["500 5.5.2", "250 2.0.0"])

    def test_endless_line(self) -> None:
        """A line that never ends is refused once and dropped without growing memory."""
        codes = self.client.codes(b"NOOP " + b"x" * 10000)
        codes += self.client.codes(b"x" * 10000 + b"\r\nNOOP\r\n")
        self.assertEqual(codes, ["500 5.5.2", "250 2.0.0"])

    def test_invalid_bytes(self) -> None:
        """Bytes that are not UTF-8 or are control characters get 500/501, not a disconnect."""
        self.assertEqual(self.client.codes(b"NOOP \xff\xfe\r\nNOOP \x01\r\nNOOP\r\n"),
                         ["500 5.5.2", "501 5.5.2", "250 2.0.0"])
        self.assertFalse(self.client.transport.disconnecting)

    def test_size_parameter(self) -> None:
        """SIZE= larger than the limit is refused at MAIL with 552 5.3.4."""
        self.assertEqual(self.client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=5000\r\n"),
                         ["250", "552 5.3.4"])

    def test_size_enforced_in_data(self) -> None:
        """A message bigger than the limit is read to its end and then refused with 552."""
        codes = self.client.codes(TRANSACTION + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n"
                                  + b"z" * 900 + b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(codes, ["250", "250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.0.0"])
        self.assertEqual(self.client.sink.messages, [])

    def test_recipient_limit(self) -> None:
        """Recipients beyond the limit get 452 4.5.3; those accepted still get the message."""
        rcpts = b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(4))
        codes = self.client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts)
        self.assertEqual(codes[-1], "452 4.5.3")
        self.assertEqual(codes.count("250 2.1.5"), 3)

    def test_hundred_recipients_by_default(self) -> None:
        """The default limit allows 100 recipients (RFC 5321 §4.5.3.1.8)."""
        client = Client()
        client.take()
        rcpts = b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(101))
        codes = client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts)
        self.assertEqual(codes.count("250 2.1.5"), 100)
        self.assertEqual(codes[-1], "452 4.5.3")

    def test_command_timeout(self) -> None:
        """An idle client is told 421 4.4.2 and disconnected after the command timeout."""
        self.client.clock.advance(299)
        self.assertEqual(self.client.take(), [])
        self.client.clock.advance(2)
        self.assertEqual(self.client.codes(b""), ["421 4.4.2"])
        self.assertTrue(self.client.transport.disconnecting)

    def test_data_timeout(self) -> None:
        """A client that stalls inside DATA is timed out and its message discarded."""
        client = Client(data_timeout=60)
        client.take()
        client.send(TRANSACTION + b"partial")
        client.clock.advance(61)
        self.assertEqual(client.take(), [b"421 4.4.2 Timeout, closing connection"])
        self.assertEqual(client.sink.aborted, ["MEM000001"])


class DataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client()
        self.client.take()

    def test_message_stored(self) -> None:
        """The message is stored unstuffed behind a Received: header naming the queue id."""
        codes = self.client.codes(TRANSACTION + b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
        self.assertEqual(codes[-1], "250 2.0.0")
        data = self.client.sink.messages[0].data
        self.assertTrue(data.startswith(b"Received: from client.test ([192.0.2.7])\r\n\tby mx.test (mailplat) with ESMTP id MEM000001\r\n\tfor <bob@mx.test>;"))
        self.assertEqual(body_of(self.client), b"Subject: hi\r\n\r\n.dot\r\n")

    def test_transaction_recorded(self) -> None:
        """The sink gets the sender and recipients of the transaction."""
        self.client.send(TRANSACTION + b"x\r\n.\r\n")
        transaction = self.client.sink.messages[0].transaction
        self.assertEqual(transaction.sender, "alice@example.org")
        self.assertEqual([r.address for r in transaction.recipients], ["bob@mx.test"])

    def test_bare_lf_rejected(self) -> None:
        """Bare LF in data is read through to CRLF.CRLF and the message refused with 550 5.6.0."""
        codes = self.client.codes(TRANSACTION + b"a\nb\r\n.\r\nNOOP\r\n")
        self.assertEqual(codes[-2:], ["550 5.6.0", "250 2.0.0"])
        self.assertEqual(self.client.sink.messages, [])

    def test_smuggling(self) -> None:
        """A smuggled '\\n.\\r\\n' end plus a second transaction is one refused message, not two."""
        smuggle = (b"Subject: a\r\n\r\nx\n.\r\nMAIL FROM:<evil@b.test>\r\nRCPT TO:<bob@mx.test>\r\n"
                   b"DATA\r\nSubject: forged\r\n\r\ny\r\n.\r\n")
        codes = self.client.codes(TRANSACTION + smuggle)
        self.assertEqual(codes, ["250", "250 2.1.0", "250 2.1.5", "354", "550 5.6.0"])
        self.assertEqual(self.client.sink.messages, [])

    def test_long_line_in_data(self) -> None:
        """A text line over 1000 octets refuses the message only after the end of data."""
        codes = self.client.codes(TRANSACTION + b"x" * 1200 + b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(codes[-2:], ["550 5.6.0", "250 2.0.0"])

    def test_eight_bit_and_utf8(self) -> None:
        """BODY=8BITMIME and SMTPUTF8 with UTF-8 addresses store 8-bit bytes unchanged."""
        body = "Subject: caf\u00e9\r\n\r\n\u00fcber\r\n".encode()
        codes = self.client.codes(
            "EHLO c\r\nMAIL FROM:<j\u00f6rg@b\u00fccher.test> BODY=8BITMIME SMTPUTF8\r\n"
            "RCPT TO:<\u00e5sa@mx.test>\r\nDATA\r\n".encode() + body + b".\r\n")
        self.assertEqual(codes[-1], "250 2.0.0")
        self.assertEqual(body_of(self.client), body)
        self.assertTrue(self.client.sink.messages[0].transaction.smtputf8)

    def test_utf8_needs_parameter(self) -> None:
        """A UTF-8 address without SMTPUTF8 gets 553 5.6.7."""
        codes = self.client.codes("EHLO c\r\nMAIL FROM:<j\u00f6rg@b.test>\r\nMAIL FROM:<a@b.test>\r\n"
                                  "RCPT TO:<\u00e5sa@mx.test>\r\n".encode())
        self.assertEqual(codes, ["250", "553 5.6.7", "250 2.1.0", "553 5.6.7"])

    def test_mail_loop(self) -> None:
        """Too many Received: headers is a loop: 554 5.4.6."""
        client = Client(max_received_headers=3)
        client.take()
        hops = b"Received: from x by y; now\r\n" * 4
        self.assertEqual(client.codes(TRANSACTION + hops + b"\r\nbody\r\n.\r\n")[-1], "554 5.4.6")

    def test_spool_refuses_at_data(self) -> None:
        """When the spool cannot open a message, DATA gets 452 4.3.1 and the session goes on."""
        client = Client(sink=MemorySink("begin", SpoolError(Reply(452, "4.3.1", "full"))))
        client.take()
        self.assertEqual(client.codes(TRANSACTION + b"NOOP\r\n")[-2:], ["452 4.3.1", "250 2.0.0"])

    def test_spool_fails_while_writing(self) -> None:
        """A write error mid-message is reported after the end of data, never as 250."""
        sink = MemorySink(None, SpoolError(Reply(451, "4.3.0", "I/O error")))
        client = Client(sink=sink)
        client.take()
        self.assertEqual(client.codes(TRANSACTION)[-1], "354")
        sink.fail_on = "write"
        self.assertEqual(client.codes(b"x\r\n.\r\nNOOP\r\n"), ["451 4.3.0", "250 2.0.0"])
        self.assertEqual(sink.aborted, ["MEM000001"])

    def test_spool_fails_writing_trace_header(self) -> None:
        """If even the first write fails, DATA itself is answered 451 and no 354 is sent."""
        client = Client(sink=MemorySink("write", SpoolError(Reply(451, "4.3.0", "I/O error"))))
        client.take()
        self.assertEqual(client.codes(TRANSACTION + b"NOOP\r\n")[-2:], ["451 4.3.0", "250 2.0.0"])
        self.assertEqual(client.sink.aborted, ["MEM000001"])

    def test_policy_rejects_message(self) -> None:
        """A data verdict of reject refuses the message and nothing is stored."""
        self.client.policy.answers[("data", "alice@example.org")] = Verdict(
            Action.REJECT, Reply(550, "5.7.1", "spam"))
        self.assertEqual(self.client.codes(TRANSACTION + b"x\r\n.\r\n")[-1], "550 5.7.1")
        self.assertEqual(self.client.sink.messages, [])


class PipeliningTests(SynchronousTestCase):
    def test_replies_wait_for_slow_policy(self) -> None:
        """Pipelined commands are answered in order even when an earlier one waits on a Deferred."""
        client = Client()
        client.take()
        slow: Deferred[Verdict] = Deferred()
        client.policy.answers[("rcpt", "slow@mx.test")] = slow
        lines = client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<slow@mx.test>\r\n"
                             b"RCPT TO:<fast@mx.test>\r\nDATA\r\nhello\r\n.\r\n")
        self.assertEqual(lines, ["250", "250 2.1.0"])
        slow.callback(Verdict(Action.REJECT, Reply(550, "5.1.1", "no")))
        self.assertEqual(client.codes(b""), ["550 5.1.1", "250 2.1.5", "354", "250 2.0.0"])
        self.assertEqual([r.address for r in client.sink.messages[0].transaction.recipients],
                         ["fast@mx.test"])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
    def test_any_chunking(self, sizes: list[int]) -> None:
        """The same pipelined session gives the same replies and message however it is split."""
        client = Client()
        client.take()
        wire = (TRANSACTION + b"Subject: x\r\n\r\n..a\r\nb\r\n.\r\n"
                b"MAIL FROM:<>\r\nRCPT TO:<c@mx.test>\r\nBDAT 5\r\nab\r\ncBDAT 0 LAST\r\nQUIT\r\n")
        codes = client.codes(wire, sizes)
        self.assertEqual(codes, ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0",
                                 "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "221 2.0.0"])
        self.assertEqual(body_of(client, 0), b"Subject: x\r\n\r\n.a\r\nb\r\n")
        self.assertEqual(body_of(client, 1), b"ab\r\nc")


class DSNParameterTests(SynchronousTestCase):
    def test_dsn_parameters_stored(self) -> None:
        """RET, ENVID, NOTIFY and ORCPT (RFC 3461) are accepted and kept with the transaction."""
        client = Client()
        client.take()
        codes = client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1\r\n"
                             b"RCPT TO:<b@mx.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40mx.test\r\n"
                             b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes[-1], "250 2.0.0")
        transaction = client.sink.messages[0].transaction
        self.assertEqual((transaction.ret, transaction.envid), ("HDRS", "QQ+1"))
        recipient = transaction.recipients[0]
        self.assertEqual(recipient.notify, ("SUCCESS", "DELAY"))
        self.assertEqual(recipient.orcpt, "rfc822;b@mx.test")


class ChunkingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client()
        self.client.take()
        self.client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test>\r\n")

    def test_bdat(self) -> None:
        """BDAT chunks are taken verbatim (dots included) and the last one is queued."""
        codes = self.client.codes(b"BDAT 6\r\nab\r\n.\r")
        codes += self.client.codes(b"BDAT 3 LAST\r\n\nz\n")
        self.assertEqual(codes, ["250 2.0.0", "550 5.6.0"])

    def test_bdat_message(self) -> None:
        """A two-chunk BDAT message is stored byte for byte."""
        codes = self.client.codes(b"BDAT 7\r\nSubj: 1BDAT 4 LAST\r\n\r\n\r\n")
        self.assertEqual(codes, ["250 2.0.0", "250 2.0.0"])
        self.assertEqual(body_of(self.client), b"Subj: 1\r\n\r\n")

    def test_empty_last_chunk_is_answered_at_once(self) -> None:
        """"BDAT 0 LAST" ending a write (nothing follows to read) completes the message."""
        self.assertEqual(self.client.codes(b"BDAT 5\r\nx\r\n\r\n"), ["250 2.0.0"])
        self.assertEqual(self.client.codes(b"BDAT 0 LAST\r\n"), ["250 2.0.0"])
        self.assertEqual(body_of(self.client), b"x\r\n\r\n")

    def test_empty_refused_chunk_is_answered_at_once(self) -> None:
        """An empty BDAT that must be refused is refused without waiting for more input."""
        client = Client()
        client.take()
        self.assertEqual(client.codes(b"EHLO c\r\nBDAT 0 LAST\r\n"), ["250", "503 5.5.1"])

    def test_bdat_without_recipients_is_consumed(self) -> None:
        """A refused BDAT still swallows its octets so the session stays in sync."""
        client = Client()
        client.take()
        codes = client.codes(b"EHLO c\r\nBDAT 10 LAST\r\nNOOP\r\nNOOPNOOP\r\n")
        self.assertEqual(codes, ["250", "503 5.5.1", "250 2.0.0"])

    def test_data_after_bdat(self) -> None:
        """DATA cannot follow BDAT in one transaction."""
        codes = self.client.codes(b"BDAT 3\r\nabcDATA\r\n")
        self.assertEqual(codes, ["250 2.0.0", "503 5.5.1"])

    def test_bdat_syntax(self) -> None:
        """A BDAT without a size is a syntax error."""
        self.assertEqual(self.client.codes(b"BDAT x\r\n"), ["501 5.5.4"])


class LMTPTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client(lmtp=True)
        self.client.take()

    def test_lhlo_only(self) -> None:
        """An LMTP server answers LHLO and refuses HELO and EHLO with 500."""
        self.assertEqual(self.client.codes(b"HELO c\r\nEHLO c\r\nLHLO c\r\n"),
                         ["500 5.5.1", "500 5.5.1", "250"])

    def test_reply_per_recipient(self) -> None:
        """After the data, LMTP gives one reply per accepted recipient."""
        codes = self.client.codes(b"LHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n"
                                  b"RCPT TO:<y@mx.test>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertEqual(codes, ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354",
                                 "250 2.0.0", "250 2.0.0"])

    def test_refusal_per_recipient(self) -> None:
        """A refused LMTP message still gets one reply for each accepted recipient."""
        codes = self.client.codes(b"LHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n"
                                  b"RCPT TO:<y@mx.test>\r\nDATA\r\na\nb\r\n.\r\n")
        self.assertEqual(codes[-2:], ["550 5.6.0", "550 5.6.0"])

    def test_ehlo_unknown_on_smtp(self) -> None:
        """LHLO is not a command on an SMTP listener."""
        client = Client()
        client.take()
        self.assertEqual(client.codes(b"LHLO c\r\n"), ["500 5.5.1"])

"""The SMTP/LMTP client: its state machine over a StringTransport, RFC 5321 client timeouts,
pipelining, CHUNKING, SIZE, canonical dot-stuffed output, per-recipient outcomes; and the pure
wire pieces (reply parser, EHLO keywords, encoder) with random chunk splits."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailplat.client import ClientError, SMTPClient, State, connect
from mailplat.clientstate import CONNECTION_LOST, TIMED_OUT, TRANSITIONS
from mailplat.clientwire import (
    NEEDS_8BITMIME, NEEDS_SMTPUTF8, Canonical, MessageParams, ReplyParser, ReplySyntaxError,
    parse_extensions,
)
from mailplat.datadecoder import DotDecoder
from mailplat.replies import Reply
from mailplat.session import ESMTPSession, SessionSettings
from mailplat.testing import MemorySink
from tests.support import ScriptedPolicy

PLAIN = ["SIZE 1000000", "8BITMIME", "ENHANCEDSTATUSCODES"]
PIPELINING = ["PIPELINING", *PLAIN]
CHUNKING = ["CHUNKING", *PLAIN]
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut at the given sizes (what is left is the last piece)."""
    pieces, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        pieces.append(data[at:at + size])
        at += size
    return [p for p in pieces + [data[at:]] if p]


class Peer:
    """The server end of a StringTransport conversation with one SMTPClient."""

    def __init__(self, lmtp: bool = False, chunk_size: int | None = None) -> None:
        self.clock = Clock()
        self.client = SMTPClient("client.test", self.clock, lmtp=lmtp)
        if chunk_size:
            self.client.chunk_size = chunk_size
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.sizes: list[int] = []  # how to cut what the peer says (empty: all at once)

    def say(self, *lines: str) -> None:
        data = "".join(line + "\r\n" for line in lines).encode()
        for piece in split(data, self.sizes) if self.sizes else [data]:
            self.client.dataReceived(piece)

    def heard(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def ready(self, keywords: list[str], greeting: str = "220 mx.test ESMTP") -> Any:
        """Greet, answer EHLO/LHLO with ``keywords``; the client's ready Deferred."""
        waiting = self.client.when_ready()
        self.say(greeting)
        self.heard()
        self.say(*ehlo_reply(keywords))
        return waiting


def ehlo_reply(keywords: list[str]) -> list[str]:
    lines = ["mx.test Hello", *keywords]
    return [f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)]


class SetupTests(SynchronousTestCase):
    def test_ehlo_after_greeting(self) -> None:
        """The client waits for 220, says EHLO with its name and parses the keywords."""
        peer = Peer()
        self.assertEqual(peer.heard(), b"")
        peer.say("220 mx.test ESMTP")
        self.assertEqual(peer.heard(), b"EHLO client.test\r\n")
        peer.say(*ehlo_reply(["PIPELINING", "SIZE 2048", "auth plain"]))
        self.assertIs(self.successResultOf(peer.client.when_ready()), peer.client)
        self.assertEqual(peer.client.extensions,
                         {"PIPELINING": "", "SIZE": "2048", "AUTH": "plain"})
        self.assertIs(peer.client.state, State.READY)

    def test_helo_fallback(self) -> None:
        """EHLO refused with 5xx: the client falls back to HELO and uses no extensions."""
        peer = Peer()
        peer.say("220 old.test SMTP")
        peer.heard()
        peer.say("502 5.5.1 Command not implemented")
        self.assertEqual(peer.heard(), b"HELO client.test\r\n")
        peer.say("250 old.test")
        self.successResultOf(peer.client.when_ready())
        self.assertEqual((peer.client.esmtp, peer.client.extensions), (False, {}))

    def test_refusing_greeting(self) -> None:
        """A 554 greeting fails setup with that reply; the client says QUIT and hangs up."""
        peer = Peer()
        waiting = peer.client.when_ready()
        peer.say("554 5.7.1 go away")
        error = self.failureResultOf(waiting, ClientError).value
        self.assertEqual(error.reply.code, 554)
        self.assertEqual(peer.heard(), b"QUIT\r\n")
        self.assertTrue(peer.transport.disconnecting)

    def test_lmtp_lhlo_without_fallback(self) -> None:
        """An LMTP client says LHLO, and a refused LHLO is not retried as HELO."""
        peer = Peer(lmtp=True)
        waiting = peer.client.when_ready()
        peer.say("220 lmtp.test LMTP")
        self.assertEqual(peer.heard(), b"LHLO client.test\r\n")
        peer.say("500 5.5.1 what?")
        self.assertEqual(self.failureResultOf(waiting, ClientError).value.reply.code, 500)
        self.assertEqual(peer.heard(), b"QUIT\r\n")

    def test_greeting_timeout(self) -> None:
        """No greeting within 5 minutes (RFC 5321 §4.5.3.2.1): setup fails and the
        connection is dropped."""
        peer = Peer()
        waiting = peer.client.when_ready()
        peer.clock.advance(299)
        self.assertNoResult(waiting)
        peer.clock.advance(2)
        self.assertEqual(self.failureResultOf(waiting, ClientError).value.reply, TIMED_OUT)
        self.assertTrue(peer.transport.disconnected)
        self.assertIs(peer.client.state, State.CLOSED)

    def test_multiline_greeting_in_pieces(self) -> None:
        """A multi-line greeting split into single bytes is read as one reply."""
        peer = Peer()
        peer.sizes = [1] * 100
        peer.say("220-mx.test ESMTP", "220 welcome")
        self.assertEqual(peer.heard(), b"EHLO client.test\r\n")
        self.assertEqual(peer.client.greeting, Reply(220, None, "mx.test ESMTP\nwelcome"))

    def test_garbage_from_peer(self) -> None:
        """Bytes that are no SMTP reply end the session at once."""
        peer = Peer()
        waiting = peer.client.when_ready()
        peer.say("HTTP/1.1 400 Bad Request")
        self.failureResultOf(waiting, ClientError)
        self.assertTrue(peer.transport.disconnected)

    def test_transitions_are_explicit(self) -> None:
        """Every state has an entry in the transition table and CLOSED leads nowhere."""
        self.assertEqual(set(TRANSITIONS), set(State))
        self.assertEqual(TRANSITIONS[State.CLOSED], frozenset())


class TransactionTests(SynchronousTestCase):
    def send(self, peer: Peer, recipients: list[str], data: bytes = MESSAGE,
             params: MessageParams | None = None) -> Any:
        return peer.client.send("a@example.org", recipients, io.BytesIO(data), params)

    def test_pipelined_envelope_in_one_write(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA leave in a single write (RFC 2920)."""
        peer = Peer()
        self.successResultOf(peer.ready(PIPELINING))
        writes: list[bytes] = []
        peer.transport.write = writes.append  # type: ignore[method-assign]
        self.send(peer, ["x@mx.test", "y@mx.test"])
        self.assertEqual(writes, [
            b"MAIL FROM:<a@example.org> SIZE=22\r\nRCPT TO:<x@mx.test>\r\n"
            b"RCPT TO:<y@mx.test>\r\nDATA\r\n"
        ])

    def test_outcomes_per_recipient(self) -> None:
        """A refused RCPT keeps its own reply; the accepted ones get the final reply."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = self.send(peer, ["x@mx.test", "nobody@mx.test", "y@mx.test"])
        peer.heard()
        peer.say("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "250 2.1.5 ok",
                 "354 go ahead")
        self.assertEqual(peer.heard(), MESSAGE + b".\r\n")
        peer.say("250 2.0.0 queued as Q1")
        outcomes = self.successResultOf(result)
        self.assertEqual({a: (r.code, r.status) for a, r in outcomes.items()}, {
            "x@mx.test": (250, "2.0.0"), "nobody@mx.test": (550, "5.1.1"),
            "y@mx.test": (250, "2.0.0"),
        })
        self.assertIs(peer.client.state, State.READY)

    def test_without_pipelining_one_command_at_a_time(self) -> None:
        """Without PIPELINING each command waits for the reply to the one before."""
        peer = Peer()
        peer.ready(PLAIN)
        result = self.send(peer, ["x@mx.test"])
        self.assertEqual(peer.heard(), b"MAIL FROM:<a@example.org> SIZE=22\r\n")
        peer.say("250 ok")
        self.assertEqual(peer.heard(), b"RCPT TO:<x@mx.test>\r\n")
        peer.say("250 ok")
        self.assertEqual(peer.heard(), b"DATA\r\n")
        peer.say("354 go")
        self.assertEqual(peer.heard(), MESSAGE + b".\r\n")
        peer.say("250 done")
        self.assertEqual(self.successResultOf(result)["x@mx.test"].code, 250)

    def test_refused_mail_answers_for_all(self) -> None:
        """A refused MAIL is every recipient's outcome (not the 503s that follow it), no
        data is sent, and the next transaction starts with RSET."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = self.send(peer, ["x@mx.test", "y@mx.test"])
        peer.heard()
        peer.say("451 4.7.1 greylisted", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL",
                 "503 5.5.1 no recipients")
        outcomes = self.successResultOf(result)
        self.assertEqual({r.code for r in outcomes.values()}, {451})
        self.assertEqual(peer.heard(), b"")
        self.send(peer, ["x@mx.test"])
        self.assertTrue(peer.heard().startswith(b"RSET\r\nMAIL FROM:"))

    def test_no_recipient_accepted_after_pipelined_data(self) -> None:
        """A server that says 354 although every RCPT failed gets an empty message and the
        recipients keep their RCPT replies."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = self.send(peer, ["x@mx.test"])
        peer.heard()
        peer.say("250 ok", "550 5.1.1 unknown", "354 go")
        self.assertEqual(peer.heard(), b".\r\n")
        peer.say("554 5.5.1 no valid recipients")
        self.assertEqual(self.successResultOf(result)["x@mx.test"].code, 550)

    def test_data_refused(self) -> None:
        """DATA refused: accepted recipients get DATA's reply."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = self.send(peer, ["x@mx.test"])
        peer.heard()
        peer.say("250 ok", "250 ok", "452 4.3.1 disk full")
        self.assertEqual(self.successResultOf(result)["x@mx.test"].status, "4.3.1")
        self.assertIs(peer.client.state, State.READY)

    def test_lmtp_reply_per_recipient(self) -> None:
        """LMTP: after the data one reply per accepted recipient, in RCPT order."""
        peer = Peer(lmtp=True)
        peer.ready(PIPELINING)
        result = self.send(peer, ["x@mx.test", "bad@mx.test", "full@mx.test", "y@mx.test"])
        peer.heard()
        peer.say("250 ok", "250 ok", "550 5.1.1 unknown", "250 ok", "250 ok", "354 go")
        peer.heard()
        peer.say("250 2.0.0 <x@mx.test> saved", "452 4.2.2 <full@mx.test> mailbox full")
        self.assertNoResult(result)
        peer.say("250 2.0.0 <y@mx.test> saved")
        outcomes = self.successResultOf(result)
        self.assertEqual([outcomes[a].code for a in
                          ("x@mx.test", "bad@mx.test", "full@mx.test", "y@mx.test")],
                         [250, 550, 452, 250])

    def test_duplicate_recipients_sent_once(self) -> None:
        """A recipient listed twice gets one RCPT (LMTP would deliver it twice)."""
        peer = Peer(lmtp=True)
        peer.ready(PIPELINING)
        self.send(peer, ["x@mx.test", "x@mx.test"])
        self.assertEqual(peer.heard().count(b"RCPT TO:<x@mx.test>"), 1)

    def test_several_messages_then_quit(self) -> None:
        """One connection carries several transactions; QUIT waits for 221 and hangs up."""
        peer = Peer()
        peer.ready(PIPELINING)
        for number in range(3):
            result = self.send(peer, ["x@mx.test"], b"message %d\r\n" % number)
            peer.say("250 ok", "250 ok", "354 go")
            peer.say(f"250 queued {number}")
            self.assertIn(b"message %d\r\n.\r\n" % number, peer.heard())
            self.assertEqual(self.successResultOf(result)["x@mx.test"].text, f"queued {number}")
        quitting = peer.client.quit()
        self.assertEqual(peer.heard(), b"QUIT\r\n")
        self.assertFalse(peer.transport.disconnecting)
        peer.say("221 2.0.0 bye")
        self.assertEqual(self.successResultOf(quitting).code, 221)
        self.assertTrue(peer.transport.disconnecting)

    def test_busy_client_refuses_second_send(self) -> None:
        """A second send while one is in flight answers 4xx without writing anything."""
        peer = Peer()
        peer.ready(PIPELINING)
        self.send(peer, ["x@mx.test"])
        peer.heard()
        outcomes = self.successResultOf(self.send(peer, ["y@mx.test"]))
        self.assertEqual(outcomes["y@mx.test"].code, 451)
        self.assertEqual(peer.heard(), b"")

    def test_reset_and_command(self) -> None:
        """RSET and caller commands (NOOP, STARTTLS...) go out while idle and return replies."""
        peer = Peer()
        peer.ready(PLAIN)
        reset = peer.client.reset()
        self.assertEqual(peer.heard(), b"RSET\r\n")
        peer.say("250 2.0.0 reset")
        self.assertEqual(self.successResultOf(reset).status, "2.0.0")
        noop = peer.client.command("NOOP")
        peer.say("250 ok")
        self.assertEqual((peer.heard(), self.successResultOf(noop).code), (b"NOOP\r\n", 250))


class ParameterTests(SynchronousTestCase):
    def outcome(self, keywords: list[str], params: MessageParams, data: bytes = MESSAGE
                ) -> tuple[Reply, bytes]:
        peer = Peer()
        peer.ready(keywords)
        result = peer.client.send("a@example.org", ["x@mx.test"], io.BytesIO(data), params)
        written = peer.heard()
        if result.called:
            return self.successResultOf(result)["x@mx.test"], written
        return Reply(0, None, "pending"), written

    def test_size_over_peer_limit_not_sent(self) -> None:
        """A message larger than the peer's SIZE is refused with 552 5.3.4, nothing sent."""
        reply, written = self.outcome(["SIZE 10"], MessageParams(size=11))
        self.assertEqual((reply.code, reply.status, written), (552, "5.3.4", b""))

    def test_size_unannounced_not_sent(self) -> None:
        """SIZE= only goes to a peer that announced SIZE (here with no limit)."""
        _, with_size = self.outcome(["SIZE"], MessageParams(size=5000))
        _, without = self.outcome([], MessageParams(size=5000))
        self.assertIn(b"SIZE=5000", with_size)
        self.assertNotIn(b"SIZE", without)

    def test_smtputf8_required(self) -> None:
        """An SMTPUTF8 message to a peer without SMTPUTF8 bounces with 5.6.7, unsent."""
        reply, written = self.outcome(PLAIN, MessageParams(smtputf8=True))
        self.assertEqual((reply, written), (NEEDS_SMTPUTF8, b""))

    def test_8bit_to_7bit_peer_deferred(self) -> None:
        """An 8BITMIME body to a peer without 8BITMIME is deferred, not sent."""
        reply, written = self.outcome(["SIZE 0"], MessageParams(body="8BITMIME"))
        self.assertEqual((reply, written), (NEEDS_8BITMIME, b""))

    def test_dsn_parameters_only_to_dsn_peers(self) -> None:
        """RET, ENVID, NOTIFY and ORCPT (xtext) go only to a peer that announced DSN."""
        params = MessageParams(ret="HDRS", envid="id 1", notify={"x@mx.test": ("FAILURE",)},
                               orcpt={"x@mx.test": "rfc822;x+y@mx.test"})
        _, written = self.outcome(["PIPELINING", "DSN"], params)
        self.assertIn(b"RET=HDRS ENVID=id+201\r\n", written)
        self.assertIn(b"RCPT TO:<x@mx.test> NOTIFY=FAILURE ORCPT=rfc822;x+2By@mx.test\r\n",
                      written)
        _, plain = self.outcome(["PIPELINING"], params)
        self.assertNotIn(b"NOTIFY", plain)
        self.assertNotIn(b"RET=", plain)

    def test_unsafe_address_never_sent(self) -> None:
        """An address that would inject a command line is refused locally."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = peer.client.send("a@x\r\nRSET", ["x@mx.test"], io.BytesIO(MESSAGE))
        self.assertEqual(self.successResultOf(result)["x@mx.test"].status, "5.1.7")
        self.assertEqual(peer.heard(), b"")


class BodyTests(SynchronousTestCase):
    def deliver(self, data: bytes, keywords: list[str], chunk_size: int = 7) -> bytes:
        """What the client writes after a 354 (or as BDAT) for ``data``."""
        peer = Peer(chunk_size=chunk_size)
        peer.ready(keywords)
        result = peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(data))
        peer.heard()
        peer.say("250 ok", "250 ok", *(["354 go"] if "CHUNKING" not in keywords else []))
        written = b""
        for _ in range(1000):  # bounded: one BDAT reply per chunk
            more = peer.heard()
            if not more:
                break
            written += more
            if "CHUNKING" in keywords:
                peer.say(*["250 2.0.0 chunk ok"] * more.count(b"BDAT "))
        if "CHUNKING" not in keywords:
            peer.say("250 done")
        self.successResultOf(result)
        return written

    def test_dot_stuffing_and_line_ends(self) -> None:
        """Whatever the stored line ends, the wire gets CRLF lines, leading dots doubled,
        a final CRLF and the terminating dot."""
        stored = b".first\nsecond\r\n.\n..x\rlast"
        self.assertEqual(self.deliver(stored, PIPELINING),
                         b"..first\r\nsecond\r\n..\r\n...x\r\nlast\r\n.\r\n")

    def test_empty_message(self) -> None:
        """An empty file is sent as just the terminating dot."""
        self.assertEqual(self.deliver(b"", PIPELINING), b".\r\n")

    def test_bdat_chunks_without_stuffing(self) -> None:
        """With CHUNKING the message goes as BDAT chunks: canonical CRLF, no dot-stuffing,
        the last one marked LAST."""
        written = self.deliver(b".a\nbc", ["PIPELINING", *CHUNKING], chunk_size=3)
        self.assertEqual(written, b"BDAT 4\r\n.a\r\n" + b"BDAT 4 LAST\r\nbc\r\n")

    def test_bdat_waits_without_pipelining(self) -> None:
        """Without PIPELINING the next BDAT chunk waits for the previous chunk's reply."""
        peer = Peer(chunk_size=4)
        peer.ready(CHUNKING)
        peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(b"abcdefgh\r\n"))
        peer.heard()
        peer.say("250 ok")
        peer.heard()
        peer.say("250 ok")
        self.assertEqual(peer.heard(), b"BDAT 4\r\nabcd")
        peer.say("250 ok")
        self.assertEqual(peer.heard(), b"BDAT 4\r\nefgh")

    def test_refused_chunk_stops_sending(self) -> None:
        """A refused BDAT chunk ends the message: no more chunks, the refusal is the outcome."""
        peer = Peer(chunk_size=4)
        peer.ready(CHUNKING)
        result = peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(b"abcdefgh\r\n"))
        peer.say("250 ok", "250 ok")
        peer.heard()
        peer.say("552 5.3.4 too big")
        self.assertEqual(peer.heard(), b"")
        self.assertEqual(self.successResultOf(result)["x@mx.test"].code, 552)

    def test_flow_control(self) -> None:
        """The client writes no more message data while the transport is paused."""
        peer = Peer(chunk_size=4)
        peer.ready(PIPELINING)
        original = peer.transport.write

        def write_and_pause(data: bytes) -> None:
            original(data)
            if peer.transport.producer is not None:
                peer.transport.producer.pauseProducing()

        peer.transport.write = write_and_pause  # type: ignore[method-assign]
        peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(b"abcdefghijkl\r\n"))
        peer.heard()
        peer.say("250 ok", "250 ok", "354 go")
        self.assertEqual(peer.heard(), b"abcd")
        self.assertEqual(peer.heard(), b"")
        peer.transport.producer.resumeProducing()
        self.assertEqual(peer.heard(), b"efgh")
        self.assertTrue(peer.transport.streaming)

    def test_data_block_timeout(self) -> None:
        """No progress sending data for 3 minutes (§4.5.3.2.5) gives up with 421."""
        peer = Peer(chunk_size=4)
        peer.ready(PIPELINING)
        peer.transport.write = lambda data: peer.transport.producer and \
            peer.transport.producer.pauseProducing()  # type: ignore[method-assign]
        result = peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(b"abcdefgh\r\n"))
        peer.say("250 ok", "250 ok", "354 go")
        peer.clock.advance(179)
        self.assertNoResult(result)
        peer.clock.advance(2)
        self.assertEqual(self.successResultOf(result)["x@mx.test"], TIMED_OUT)

    def test_final_reply_timeout(self) -> None:
        """The reply to the end of data may take 10 minutes (§4.5.3.2.6), not more."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = peer.client.send("a@b.test", ["x@mx.test"], io.BytesIO(MESSAGE))
        peer.say("250 ok", "250 ok", "354 go")
        peer.clock.advance(599)
        self.assertNoResult(result)
        peer.clock.advance(2)
        self.assertEqual(self.successResultOf(result)["x@mx.test"], TIMED_OUT)
        self.assertIs(peer.client.state, State.CLOSED)

    def test_connection_lost_mid_message(self) -> None:
        """A connection lost while sending gives every recipient a 421 to retry on."""
        peer = Peer()
        peer.ready(PIPELINING)
        result = peer.client.send("a@b.test", ["x@mx.test", "y@mx.test"], io.BytesIO(MESSAGE))
        peer.say("250 ok", "250 ok", "250 ok", "354 go")
        peer.client.connectionLost(None)
        self.assertEqual(set(self.successResultOf(result).values()), {CONNECTION_LOST})
        self.assertFalse(peer.client.usable)

    def test_unreadable_message(self) -> None:
        """A read error halfway hangs up rather than end a truncated message with a dot."""

        class Broken(io.BytesIO):
            reads = 0

            def read(self, size: int | None = -1) -> bytes:
                self.reads += 1
                if self.reads > 2:
                    raise OSError(5, "I/O error")
                return super().read(size)

        peer = Peer(chunk_size=4)
        peer.ready(PIPELINING)
        result = peer.client.send("a@b.test", ["x@mx.test"], Broken(b"abcdefghijkl"))
        peer.say("250 ok", "250 ok", "354 go")
        self.assertEqual(self.successResultOf(result)["x@mx.test"].code, 451)
        self.assertNotIn(b"\r\n.\r\n", peer.heard())
        self.assertTrue(peer.transport.disconnected)

    def test_unsolicited_421_when_idle(self) -> None:
        """A 421 on an idle connection closes it; the client is then unusable."""
        peer = Peer()
        peer.ready(PIPELINING)
        peer.say("421 4.4.2 idle too long")
        self.assertIs(peer.client.state, State.CLOSED)
        self.assertEqual(self.successResultOf(peer.client.quit()).code, 421)


class ChunkedRepliesTests(SynchronousTestCase):
    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=9), max_size=60))
    def test_replies_in_any_pieces(self, sizes: list[int]) -> None:
        """A whole LMTP session gives the same outcomes however the server's replies are cut
        into pieces (including between CR and LF)."""
        peer = Peer(lmtp=True)
        peer.sizes = sizes
        peer.ready(PIPELINING)
        result = peer.client.send("a@b.test", ["x@mx.test", "y@mx.test"], io.BytesIO(MESSAGE))
        peer.say("250 ok", "250-2.1.5 first", "250 2.1.5 second", "550 5.1.1 no", "354 go",
                 "250 2.0.0 <x@mx.test> saved")
        outcomes = self.successResultOf(result)
        self.assertEqual({a: r.code for a, r in outcomes.items()},
                         {"x@mx.test": 250, "y@mx.test": 550})
        self.assertEqual(outcomes["x@mx.test"].text, "<x@mx.test> saved")


class WireTests(SynchronousTestCase):
    def test_multiline_enhanced_codes_stripped(self) -> None:
        """Multi-line replies keep their lines; a repeated enhanced code is taken once."""
        [reply] = ReplyParser().feed(b"452-4.2.2 mailbox\r\n452 4.2.2 full\r\n")
        self.assertEqual(reply, Reply(452, "4.2.2", "mailbox\nfull"))

    def test_enhanced_code_of_other_class_is_text(self) -> None:
        """"250 5.0.0 x" has no enhanced code: its class must match the reply's."""
        [reply] = ReplyParser().feed(b"250 5.0.0 x\r\n")
        self.assertEqual(reply, Reply(250, None, "5.0.0 x"))

    def test_code_change_inside_reply_rejected(self) -> None:
        """Lines of one multi-line reply must share the code."""
        with self.assertRaises(ReplySyntaxError):
            ReplyParser().feed(b"250-a\r\n251 b\r\n")

    def test_endless_line_rejected(self) -> None:
        """A reply line that never ends is not buffered forever."""
        with self.assertRaises(ReplySyntaxError):
            ReplyParser().feed(b"250 " + b"x" * 10_000)

    def test_extensions(self) -> None:
        """EHLO keywords are uppercased; their parameters kept."""
        reply = Reply(250, None, "mx Hello\nsize 100\nAUTH PLAIN LOGIN\n8BITMIME")
        self.assertEqual(parse_extensions(reply),
                         {"SIZE": "100", "AUTH": "PLAIN LOGIN", "8BITMIME": ""})

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"")),
           st.lists(st.integers(min_value=1, max_value=40), max_size=20))
    def test_encoding_roundtrip(self, stored: bytes, sizes: list[int]) -> None:
        """Encoded in any chunking, our own DATA decoder reads back the message with every
        line end made CRLF; the output never contains a bare CR or LF."""
        encoder = Canonical(dot_stuff=True)
        wire = b"".join(encoder.feed(piece) for piece in split(stored, sizes))
        wire += encoder.end() + b".\r\n"
        self.assertEqual(wire.count(b"\r"), wire.count(b"\r\n"))
        self.assertEqual(wire.count(b"\n"), wire.count(b"\r\n"))
        received: list[bytes] = []
        rest = DotDecoder(received.append).feed(wire)
        self.assertEqual(rest, b"")
        canonical = stored.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if canonical and not canonical.endswith(b"\r\n"):
            canonical += b"\r\n"
        self.assertEqual(b"".join(received), canonical)


class AgainstOurServerTests(SynchronousTestCase):
    """The client against mailplat's own session engine, in memory (twisted.test.iosim)."""

    def run_session(self, lmtp: bool, chunk_size: int) -> tuple[dict[str, Reply], bytes]:
        clock = Clock()
        sink = MemorySink()
        settings_ = SessionSettings(hostname="mx.test", lmtp=lmtp)
        client = SMTPClient("client.test", clock, lmtp=lmtp)
        client.chunk_size = chunk_size
        _, _, pump = iosim.connectedServerAndClient(
            lambda: ESMTPSession(settings_, ScriptedPolicy(), sink, clock), lambda: client)
        pump.flush()
        body = b"Subject: t\n\n.leading dot\n" + (b"x" * 50 + b"\n") * 100
        result = client.send("a@b.test", ["x@mx.test", "y@mx.test"], io.BytesIO(body))
        pump.flush()
        quitting = client.quit()
        pump.flush()
        self.assertEqual(self.successResultOf(quitting).code, 221)
        [message] = sink.messages
        return self.successResultOf(result), message.data

    def test_smtp_and_lmtp_with_bdat(self) -> None:
        """Our engine receives exactly the canonical message, by BDAT, over SMTP and LMTP."""
        for lmtp in (False, True):
            outcomes, data = self.run_session(lmtp, chunk_size=1000)
            self.assertEqual({r.code for r in outcomes.values()}, {250})
            self.assertTrue(data.endswith(b"Subject: t\r\n\r\n.leading dot\r\n" +
                                          (b"x" * 50 + b"\r\n") * 100))

    def test_connect_through_endpoint(self) -> None:
        """``connect`` fires with a READY client once greeting and EHLO are done."""
        clock = Clock()
        server = ESMTPSession(SessionSettings(hostname="mx.test"), ScriptedPolicy(),
                              MemorySink(), clock)

        class Endpoint:
            def connect(self, factory: Any) -> Any:
                client = factory.buildProtocol(None)
                iosim.connect(server, iosim.makeFakeServer(server),
                              client, iosim.makeFakeClient(client))
                return succeed(client)

        client = self.successResultOf(connect(Endpoint(), "client.test", clock))
        self.assertIsInstance(client, SMTPClient)
        self.assertIs(client.state, State.READY)
        self.assertIn("CHUNKING", client.extensions)

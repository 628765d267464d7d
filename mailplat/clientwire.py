"""The pure parts of the SMTP/LMTP client: reading replies, EHLO keywords, building MAIL/RCPT
lines, and encoding message bytes for the wire.

No I/O here, so every piece can be tested with arbitrary chunk splits. The encoder works on whole
chunks with bytes methods: whatever line ends the stored message has, the peer always gets
canonical CRLF lines, dot-stuffed for DATA (RFC 5321 §4.5.2), never a bare CR or LF.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mailplat.envelope import Envelope
from mailplat.params import xtext_encode
from mailplat.replies import Reply

MAX_REPLY_LINE = 4096  # RFC 5321 says 512; be lenient, but never buffer without bound
MAX_REPLY_LINES = 1000
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# What the client answers itself, without asking the peer, when the message cannot be sent.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "The peer does not support SMTPUTF8 (RFC 6531)")
NEEDS_8BITMIME = Reply(450, "4.6.3", "The peer does not accept 8-bit data (no 8BITMIME)")
NEEDS_BINARYMIME = Reply(450, "4.6.3", "The peer does not accept binary data (no BINARYMIME)")
BAD_SENDER = Reply(553, "5.1.7", "Sender address cannot be sent over SMTP")
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address cannot be sent over SMTP")


class ReplySyntaxError(ValueError):
    """The peer sent something that is not an SMTP reply; the connection cannot go on."""


class ReplyParser:
    """Bytes from the peer in, complete (possibly multi-line) Replies out, in order."""

    def __init__(self) -> None:
        self._buffer = b""
        self._code: bytes | None = None
        self._texts: list[str] = []

    def reset(self) -> None:
        """Forget buffered input (after STARTTLS, RFC 3207 §4.2)."""
        self._buffer, self._code, self._texts = b"", None, []

    def feed(self, data: bytes) -> list[Reply]:
        """Every reply completed by ``data``; raises ReplySyntaxError on garbage."""
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ReplySyntaxError("reply line too long")
                return replies
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            reply = self._line(line[:-1] if line.endswith(b"\r") else line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        code, separator = line[:3], line[3:4]
        if not code.isdigit() or separator not in (b" ", b"-", b"") or code[:1] not in b"2345":
            raise ReplySyntaxError(f"not a reply line: {line[:40]!r}")
        if self._code is not None and code != self._code:
            raise ReplySyntaxError("reply code changed inside a multi-line reply")
        if len(self._texts) >= MAX_REPLY_LINES:
            raise ReplySyntaxError("too many reply lines")
        self._code = code
        self._texts.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            return None
        reply = build_reply(int(code), self._texts)
        self._code, self._texts = None, []
        return reply


def build_reply(code: int, texts: Sequence[str]) -> Reply:
    """A Reply from its lines; the enhanced code is taken when the first line has one of the
    reply's class (RFC 3463 §2), and removed from every line that repeats it."""
    match = _ENHANCED.match(texts[0]) if texts else None
    if match is None or match.group(1) != str(code)[0]:
        return Reply(code, None, "\n".join(texts))
    status = ".".join(match.groups())
    lines = [t[len(status):].lstrip(" ") if t.startswith(status) else t for t in texts]
    return Reply(code, status, "\n".join(lines))


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (uppercased) to their parameters: "SIZE 1000" → {"SIZE": "1000"}."""
    extensions = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def size_limit(extensions: Mapping[str, str]) -> int | None:
    """The peer's fixed message size limit (RFC 1870); None when it announced none."""
    value = extensions.get("SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class MessageParams:
    """What the MAIL and RCPT commands say about a message besides the addresses.

    Parameters the peer did not announce are left out (SIZE, DSN's RET/ENVID/NOTIFY/ORCPT), or
    the client refuses the message itself (SMTPUTF8, 8BITMIME/BINARYMIME bodies). ``extra``
    MAIL parameters (e.g. "AUTH=<>") are sent as given.
    """

    size: int | None = None
    body: str | None = None  # "7BIT" / "8BITMIME" / "BINARYMIME"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    notify: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    orcpt: Mapping[str, str] = field(default_factory=dict)  # "rfc822;addr", addr not xtext
    extra: tuple[str, ...] = ()


def envelope_params(envelope: Envelope, addresses: Mapping[str, str] | None = None
                    ) -> MessageParams:
    """The MAIL/RCPT parameters of a queued message; ``addresses`` maps an envelope recipient
    to the address sent in its RCPT (when routing rewrote it)."""
    rename = addresses or {}
    notify, orcpt = {}, {}
    for r in envelope.recipients:
        sent = rename.get(r.address, r.address)
        if r.notify:
            notify[sent] = r.notify
        if r.orcpt:
            orcpt[sent] = r.orcpt
    return MessageParams(
        size=envelope.size or None, body=envelope.body, smtputf8=envelope.smtputf8,
        ret=envelope.ret, envid=envelope.envid, notify=notify, orcpt=orcpt,
    )


def refusal(params: MessageParams, extensions: Mapping[str, str], chunking: bool) -> Reply | None:
    """Why this message cannot go to this peer at all, before any command is sent."""
    if params.smtputf8 and "SMTPUTF8" not in extensions:
        return NEEDS_SMTPUTF8
    body = (params.body or "").upper()
    if body == "8BITMIME" and "8BITMIME" not in extensions:
        return NEEDS_8BITMIME
    if body == "BINARYMIME" and not (chunking and "BINARYMIME" in extensions):
        return NEEDS_BINARYMIME
    limit = size_limit(extensions)
    if limit is not None and params.size is not None and params.size > limit:
        return Reply(552, "5.3.4", f"Message size {params.size} exceeds the peer's limit {limit}")
    return None


def path(address: str) -> str:
    """<address> for MAIL/RCPT; ValueError when it could break the command line."""
    if _CONTROL.search(address) or "<" in address or ">" in address:
        raise ValueError(f"unsafe address {address!r}")
    return f"<{address}>"


def mail_line(sender: str, params: MessageParams, extensions: Mapping[str, str]) -> bytes:
    """MAIL FROM with only the parameters the peer announced (ValueError: unsafe sender)."""
    words = [f"MAIL FROM:{path(sender)}"]
    if "SIZE" in extensions and params.size is not None:
        words.append(f"SIZE={params.size}")
    if params.body and "8BITMIME" in extensions:
        words.append(f"BODY={params.body.upper()}")
    if params.smtputf8:
        words.append("SMTPUTF8")
    if "DSN" in extensions:
        if params.ret:
            words.append(f"RET={params.ret.upper()}")
        if params.envid:
            words.append(f"ENVID={xtext_encode(params.envid)}")
    words.extend(params.extra)
    return (" ".join(words) + "\r\n").encode("utf-8")


def rcpt_line(recipient: str, params: MessageParams, extensions: Mapping[str, str]) -> bytes:
    """RCPT TO, with the DSN parameters when the peer announced DSN (ValueError: unsafe)."""
    words = [f"RCPT TO:{path(recipient)}"]
    if "DSN" in extensions:
        notify = params.notify.get(recipient)
        if notify:
            words.append("NOTIFY=" + ",".join(notify))
        orcpt = params.orcpt.get(recipient)
        if orcpt:
            kind, _, address = orcpt.partition(";")
            words.append(f"ORCPT={kind};{xtext_encode(address)}")
    return (" ".join(words) + "\r\n").encode("utf-8")


class Canonical:
    """Stored message bytes in, canonical wire bytes out: CRLF line ends, optionally
    dot-stuffed. A CR at the end of a chunk is held back, so CRLF split between two reads
    stays one line end."""

    def __init__(self, dot_stuff: bool) -> None:
        self.dot_stuff = dot_stuff
        self._held_cr = False
        self._line_start = True  # the next byte out starts a line

    def feed(self, data: bytes) -> bytes:
        if self._held_cr:
            data, self._held_cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._held_cr = data[:-1], True
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if self.dot_stuff and data:
            data = data.replace(b"\r\n.", b"\r\n..")
            if self._line_start and data[:1] == b".":
                data = b"." + data
        if data:
            self._line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        """What completes the message: a held CR becomes a line end; a last line without
        one gets CRLF, so that the DATA terminator really starts a line."""
        tail = self.feed(b"\n") if self._held_cr else b""
        return tail if self._line_start else tail + b"\r\n"

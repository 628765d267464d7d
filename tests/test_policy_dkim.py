"""The dkim plugin: signatures it makes verify with dkimpy and with an independent verifier
written here from RFC 6376; incoming signatures are verified with keys from twisted.names."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from mailplat import hooks
from mailplat.envelope import Transaction
from mailplat.interfaces import CONTINUE
from mailplat.policies import dkim
from mailplat.testing import FakeResolver, session_info
from tests.policyfixtures import context

MESSAGE = (
    b"Received: from c.test ([192.0.2.1]) by mx.test (mailplat) id Q1;\r\n"
    b"\tMon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject:  A   test\r\n"
    b"\tmessage\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n"
    b"bye\r\n"
    b"\r\n"
)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC = base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
DNS_NAME = "s2026._domainkey.example.org"


class Readable:
    """Stands in for the IIncomingMessage the data hook reads back."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


def transaction(data: bytes) -> Transaction:
    t = Transaction("alice@example.org")
    t.message = Readable(data)
    return t


def headers_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0] + b"\r\n"


class DKIMTests(SynchronousTestCase):
    def setUp(self) -> None:
        key_file = os.path.join(self.mktemp())
        with open(key_file, "wb") as f:  # PKCS#8, as `openssl genpkey` writes it
            f.write(KEY.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.resolver = FakeResolver()
        self.resolver.add_txt(DNS_NAME, f"v=DKIM1; k=rsa; p={PUBLIC}")
        section = {"sign": [{"domain": "example.org", "selector": "s2026", "key": key_file}]}
        self.policy = dkim.make(section, context(resolver=self.resolver,
                                                 trusted=("10.0.0.0/8",)))

    def sign(self, message: bytes = MESSAGE) -> bytes:
        """Run the data hook as for an authenticated client; the message as delivered."""
        session = session_info(peer_host="192.0.2.1", auth_user="alice")
        verdict = self.successResultOf(
            self.policy.data(session, transaction(message), headers_of(message)))
        [field] = verdict.add_headers
        return field.encode() + b"\r\n" + message

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        self.assertEqual(name, DNS_NAME.encode() + b".")
        return f"v=DKIM1; k=rsa; p={PUBLIC}".encode()

    def test_signature_verifies_with_dkimpy(self) -> None:
        """The signature added for outgoing mail of a configured domain verifies in dkimpy."""
        signed = self.sign()
        self.assertTrue(signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed"))
        self.assertTrue(dkimpy.verify(signed, dnsfunc=self.dnsfunc))

    def test_signature_verifies_with_independent_verifier(self) -> None:
        """The same signature verifies with the RFC 6376 verifier of this test module."""
        self.assertEqual(rfc6376_verify(self.sign(), KEY.public_key()), "pass")

    def test_independent_verifier_detects_tampering(self) -> None:
        """The independent verifier is not a rubber stamp: a changed body or header fails."""
        signed = self.sign()
        self.assertEqual(rfc6376_verify(signed.replace(b"bye", b"BYE"), KEY.public_key()),
                         "body hash mismatch")
        self.assertEqual(rfc6376_verify(signed.replace(b"A   test", b"A   pest"),
                                        KEY.public_key()), "bad signature")

    def test_relaxed_canonicalization_survives_whitespace_changes(self) -> None:
        """Re-folded headers and trailing blanks, which relaxed canonicalization ignores,
        still verify in both verifiers."""
        signed = self.sign().replace(b"Subject:  A   test\r\n\tmessage", b"Subject: A test message")
        signed = signed.replace(b"Hello  Bob, \r\n", b"Hello Bob,\r\n") + b"\r\n\r\n"
        self.assertEqual(rfc6376_verify(signed, KEY.public_key()), "pass")
        self.assertTrue(dkimpy.verify(signed, dnsfunc=self.dnsfunc))

    def test_other_domains_and_incoming_mail_not_signed(self) -> None:
        """Mail from a domain without a key is not signed, nor is mail from strangers."""
        other = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
        session = session_info(peer_host="192.0.2.1", auth_user="alice")
        verdict = self.successResultOf(self.policy.data(session, transaction(other),
                                                        headers_of(other)))
        self.assertEqual(verdict.add_headers, ())
        stranger = session_info(peer_host="203.0.113.1")
        verdict = self.successResultOf(self.policy.data(stranger, transaction(MESSAGE),
                                                        headers_of(MESSAGE)))
        self.assertEqual(verdict.add_headers, ())

    def verify(self, message: bytes) -> list[str]:
        """Run the data hook for incoming mail; the recorded results."""
        session = session_info(peer_host="203.0.113.1")
        verdict = self.successResultOf(
            self.policy.data(session, transaction(message), headers_of(message)))
        self.assertEqual(verdict, CONTINUE)
        return [str(r) for r in hooks.notes(session).results]

    def test_incoming_signature_verified(self) -> None:
        """A good signature on incoming mail is a pass, with d= and s= recorded."""
        self.assertEqual(self.verify(self.sign()),
                         ["dkim=pass header.d=example.org header.s=s2026"])
        self.assertIn((DNS_NAME, dns.TXT), self.resolver.queries)

    def test_incoming_tampered_fails(self) -> None:
        """A changed body makes the signature fail."""
        self.assertEqual(self.verify(self.sign().replace(b"bye", b"BYE")),
                         ["dkim=fail header.d=example.org header.s=s2026"])

    def test_key_lookup_temporary_failure(self) -> None:
        """SERVFAIL for the key is a temperror, not a fail."""
        self.resolver.fail(DNS_NAME, dns.TXT, DNSServerError("servfail"))
        self.assertEqual(self.verify(self.sign()),
                         ["dkim=temperror header.d=example.org header.s=s2026"])

    def test_unsigned_mail(self) -> None:
        """Mail without a signature records dkim=none."""
        self.assertEqual(self.verify(MESSAGE), ["dkim=none"])

    def test_signature_tags(self) -> None:
        """Tags are read from folded DKIM-Signature fields, top to bottom."""
        headers = b"DKIM-Signature: v=1; d=a.test;\r\n\ts=one; b=x y\r\nX: 1\r\n" \
                  b"dkim-signature: d=b.test; s=two\r\n"
        tags = dkim.signature_tags(headers)
        self.assertEqual([(t["d"], t["s"]) for t in tags], [("a.test", "one"), ("b.test", "two")])


# ------------------------------------------------------- an independent verifier (RFC 6376)


def _unfold(message: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def _relaxed_header(field: bytes) -> bytes:
    """RFC 6376 §3.4.2."""
    name, _, value = field.partition(b":")
    value = re.sub(rb"[ \t]+", b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip().lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4."""
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def rfc6376_verify(message: bytes, public_key: rsa.RSAPublicKey) -> str:
    """Verify the first DKIM-Signature (rsa-sha256, relaxed/relaxed only)."""
    fields, body = _unfold(message)
    signature = next(f for f in fields if f.lower().startswith(b"dkim-signature:"))
    tags = {k.strip(): re.sub(rb"\s+", b"", v) for k, _, v in
            (p.partition(b"=") for p in signature.partition(b":")[2].split(b";")) if k.strip()}
    assert tags[b"a"] == b"rsa-sha256" and tags[b"c"] == b"relaxed/relaxed"
    if base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()) != tags[b"bh"]:
        return "body hash mismatch"
    remaining = [f for f in fields if f is not signature]
    signed = b""
    for name in tags[b"h"].split(b":"):
        for field in reversed(remaining):  # the last unused instance first (§5.4.2)
            if field.split(b":", 1)[0].strip().lower() == name.lower():
                signed += _relaxed_header(field) + b"\r\n"
                remaining.remove(field)
                break
    blank = re.sub(rb"(^|;)(\s*b\s*=)[^;]*", rb"\1\2", signature.partition(b":")[2])
    signed += _relaxed_header(b"dkim-signature:" + blank)
    try:
        public_key.verify(base64.b64decode(tags[b"b"]), signed, padding.PKCS1v15(),
                          hashes.SHA256())
    except Exception:
        return "bad signature"
    return "pass"

"""STARTTLS (RFC 3207), SMTP AUTH (RFC 4954), submission rules (RFC 6409) and relay denial."""

from __future__ import annotations

import base64
import hmac
import os
from typing import Any

from argon2 import PasswordHasher
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, alsoProvides

from mailplat.address import parse_forward_path
from mailplat.config import parse_config
from mailplat.policy import DefaultPolicy
from mailplat.routing import LocalRouter
from mailplat.session import SessionSettings
from mailplat.submission import (
    AuthenticatedSenders, SecureSession, Security, SenderRules, SubmitterRealm,
)
from mailplat.testing import MemorySink, run_synchronously
from mailplat.userdb import UserDB, UserDBChecker
from tests.support import Client, ScriptedPolicy

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = b"correct horse battery"
PLAIN_BLOB = base64.b64encode(b"\0alice@example.org\0" + PASSWORD)
CONFIG = '[[listener]]\nname = "smtp"\nendpoint = "tcp:0"\nprofile = "relay"\n' \
         '[domains."example.org"]\ncatch_all = true\n'


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS and what was written before it."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.tls: Any = None
        self.before_tls = b""

    def startTLS(self, context: Any) -> None:
        self.tls, self.before_tls = context, self.value()
        self.clear()


class SecureClient(Client):
    """tests.support.Client for a SecureSession on a TLS-capable transport."""

    def __init__(self, security: Security, policy: Any = None, **settings: Any) -> None:
        self.clock = Clock()
        self.sink = MemorySink()
        self.policy = policy if policy is not None else ScriptedPolicy()
        settings.setdefault("hostname", "mx.test")
        self.session = SecureSession(SessionSettings(**settings), self.policy, self.sink,
                                     self.clock, security)
        self.transport = TLSStringTransport()
        self.session.makeConnection(self.transport)
        self.take()


def user_portal(test: SynchronousTestCase, cram: bool = False) -> tuple[Portal, bytes | None]:
    db = UserDB(os.path.join(test.mktemp(), "users"), FAST)
    db.add("alice@example.org", PASSWORD)
    secret = db.set_cram("alice@example.org", True) if cram else None
    return Portal(SubmitterRealm(), [UserDBChecker(db, run_synchronously)]), secret


def security(test: SynchronousTestCase, **options: Any) -> Security:
    options.setdefault("tls", object())
    options.setdefault("portal", user_portal(test)[0])
    options.setdefault("cram_available", lambda: False)
    return Security(**options)


class StartTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = SecureClient(security(self))

    def keywords(self) -> list[bytes]:
        return [line[4:] for line in self.client.send(b"EHLO c.test\r\n")[1:]]

    def test_advertised_until_active(self) -> None:
        """EHLO offers STARTTLS in plaintext and not once TLS is active."""
        self.assertIn(b"STARTTLS", self.keywords())
        self.client.send(b"STARTTLS\r\n")
        self.assertNotIn(b"STARTTLS", self.keywords())

    def test_reply_then_handshake(self) -> None:
        """220 is written in plaintext, then TLS starts with the listener's certificate."""
        self.client.send(b"EHLO c.test\r\nSTARTTLS\r\n")
        self.assertEqual(self.client.transport.before_tls.splitlines()[-1],
                         b"220 2.0.0 Ready to start TLS")
        self.assertIs(self.client.transport.tls, self.client.session.security.tls)
        self.assertTrue(self.client.session.info.tls)

    def test_pipelined_input_discarded(self) -> None:
        """Commands sent behind STARTTLS in the same read are dropped (CVE-2011-0411)."""
        self.client.send(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<a@b>\r\n")
        self.assertEqual(self.client.transport.before_tls.count(b"\r\n250 "), 1)
        self.assertEqual(self.client.take(), [])
        self.assertEqual(self.client.codes(b"MAIL FROM:<a@x.test>\r\n"), ["503 5.5.1"])

    def test_reset_after_tls(self) -> None:
        """A MAIL given before STARTTLS is forgotten and a new EHLO is needed."""
        self.assertEqual(self.client.codes(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n"),
                         ["250", "250 2.1.0"])
        self.client.send(b"STARTTLS\r\n")
        self.assertEqual(self.client.session.info.helo, "")
        self.assertEqual(self.client.codes(b"RCPT TO:<b@example.org>\r\n"), ["503 5.5.1"])
        self.assertEqual(self.client.codes(b"EHLO c.test\r\nRCPT TO:<b@example.org>\r\n"),
                         ["250", "503 5.5.1"])

    def test_not_twice(self) -> None:
        """STARTTLS inside TLS is a bad sequence."""
        self.client.send(b"EHLO c.test\r\nSTARTTLS\r\n")
        self.assertEqual(self.client.codes(b"EHLO c.test\r\nSTARTTLS\r\n"), ["250", "503 5.5.1"])

    def test_refusals(self) -> None:
        """STARTTLS needs EHLO first and takes no argument; without a certificate it is 502."""
        self.assertEqual(self.client.codes(b"STARTTLS\r\n"), ["503 5.5.1"])
        self.assertEqual(self.client.codes(b"EHLO c\r\nSTARTTLS now\r\n"), ["250", "501 5.5.4"])
        plain = SecureClient(Security())
        self.assertNotIn(b"STARTTLS", b"".join(plain.send(b"EHLO c\r\n")))
        self.assertEqual(plain.codes(b"STARTTLS\r\n"), ["502 5.5.1"])

    def test_received_header_says_esmtps(self) -> None:
        """Mail received after STARTTLS is stamped "with ESMTPS"."""
        self.client.send(b"EHLO c.test\r\nSTARTTLS\r\n")
        self.client.send(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.org>\r\n"
                         b"DATA\r\nhi\r\n.\r\n")
        self.assertIn(b"with ESMTPS id", self.client.sink.messages[0].data)

    def test_implicit_tls(self) -> None:
        """On an implicit-TLS listener the session is secure from the start."""
        client = SecureClient(security(self, implicit_tls=True))
        self.assertTrue(client.session.info.tls)
        keywords = b"\n".join(client.send(b"EHLO c\r\n"))
        self.assertNotIn(b"STARTTLS", keywords)
        self.assertIn(b"AUTH PLAIN LOGIN", keywords)


def secure(test: SynchronousTestCase, **options: Any) -> SecureClient:
    """A client that has done EHLO inside TLS."""
    client = SecureClient(security(test, implicit_tls=True, **options))
    client.send(b"EHLO c.test\r\n")
    return client


class AuthTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """AUTH PLAIN with an initial response succeeds and records the user."""
        client = secure(self)
        self.assertEqual(client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"), ["235 2.7.0"])
        self.assertEqual(client.session.info.auth_user, "alice@example.org")

    def test_plain_after_challenge(self) -> None:
        """AUTH PLAIN without initial response gets an empty 334 challenge first."""
        client = secure(self)
        self.assertEqual(client.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(client.codes(PLAIN_BLOB + b"\r\n"), ["235 2.7.0"])

    def test_login(self) -> None:
        """AUTH LOGIN asks for Username: and Password: in base64."""
        client = secure(self)
        self.assertEqual(client.send(b"AUTH LOGIN\r\n"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(client.send(base64.b64encode(b"alice@example.org") + b"\r\n"),
                         [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(client.codes(base64.b64encode(PASSWORD) + b"\r\n"), ["235 2.7.0"])

    def test_cram_md5_without_tls(self) -> None:
        """CRAM-MD5 is offered and works in plaintext; PLAIN and LOGIN are not offered."""
        portal, secret = user_portal(self, cram=True)
        assert secret is not None
        client = SecureClient(security(self, portal=portal, cram_available=lambda: True))
        self.assertIn(b"250-AUTH CRAM-MD5", client.send(b"EHLO c.test\r\n"))
        [line] = client.send(b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(line[4:])
        digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
        answer = base64.b64encode(b"alice@example.org " + digest)
        self.assertEqual(client.codes(answer + b"\r\n"), ["235 2.7.0"])
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<x@example.org>\r\n"
                    b"DATA\r\nhi\r\n.\r\n")
        self.assertIn(b"with ESMTPA id", client.sink.messages[0].data)

    def test_plaintext_password_refused_before_tls(self) -> None:
        """Before TLS, PLAIN and LOGIN are neither offered nor accepted: 538 5.7.11."""
        client = SecureClient(security(self))
        self.assertNotIn(b"250-AUTH", b"\n".join(client.send(b"EHLO c.test\r\n")))
        self.assertEqual(client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\nAUTH LOGIN\r\n"),
                         ["538 5.7.11", "538 5.7.11"])
        self.assertIsNone(client.session.info.auth_user)

    def test_plaintext_allowed_by_config(self) -> None:
        """allow_plaintext lets PLAIN work without TLS (for trusted private networks)."""
        client = SecureClient(security(self, allow_plaintext=True))
        self.assertIn(b"250-AUTH PLAIN LOGIN", client.send(b"EHLO c.test\r\n"))
        self.assertEqual(client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"), ["235 2.7.0"])

    def test_cancel_and_bad_base64(self) -> None:
        """'*' cancels with 501 5.7.0; a response that is not base64 gets 501 5.5.2."""
        client = secure(self)
        client.send(b"AUTH LOGIN\r\n")
        self.assertEqual(client.codes(b"*\r\n"), ["501 5.7.0"])
        client.send(b"AUTH LOGIN\r\n")
        self.assertEqual(client.codes(b"!!!\r\n"), ["501 5.5.2"])
        self.assertEqual(client.codes(b"NOOP\r\n"), ["250 2.0.0"])

    def test_sequence_refusals(self) -> None:
        """AUTH needs EHLO, a known mechanism, no transaction, and works only once."""
        client = SecureClient(security(self, implicit_tls=True))
        self.assertEqual(client.codes(b"AUTH PLAIN\r\n"), ["503 5.5.1"])
        self.assertEqual(client.codes(b"EHLO c\r\nAUTH\r\nAUTH KERBEROS_V4\r\n"),
                         ["250", "501 5.5.4", "504 5.5.4"])
        client.send(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n")
        self.assertEqual(client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"), ["503 5.5.1"])

    def test_no_auth_in_transaction(self) -> None:
        """AUTH inside a mail transaction is a bad sequence."""
        client = secure(self, require_auth=False)
        self.assertEqual(client.codes(b"MAIL FROM:<a@x.test>\r\nAUTH PLAIN\r\n"),
                         ["250 2.1.0", "503 5.5.1"])

    def test_too_long_line(self) -> None:
        """A response line over 12288 octets gets 500 5.5.6 and is never parsed."""
        client = secure(self)
        client.send(b"AUTH PLAIN\r\n")
        self.assertEqual(client.codes(b"QUIT" * 4000 + b"\r\nNOOP\r\n"), ["500 5.5.6", "250 2.0.0"])

    def test_auth_parameter_on_mail(self) -> None:
        """MAIL accepts the AUTH= parameter (RFC 4954 §5)."""
        client = secure(self, require_auth=False)
        self.assertEqual(client.codes(b"MAIL FROM:<a@x.test> AUTH=<>\r\n"), ["250 2.1.0"])

    def test_checker_trouble_is_temporary(self) -> None:
        """A user database that cannot be read gives 454 4.7.0, not a failed login."""
        portal = Portal(SubmitterRealm(), [Broken()])
        client = secure(self, portal=portal)
        self.assertEqual(client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"), ["454 4.7.0"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class IMarker(Interface):
    """An extra interface a policy may provide (like a disconnect hook)."""


class Broken:
    """A checker whose database is unreadable."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Any:
        return fail(OSError("users file unreadable"))


class FailureTests(SynchronousTestCase):
    """Failed logins: 535 5.7.8 after a growing delay, then 421 and the connection closes."""

    def setUp(self) -> None:
        self.client = secure(self, max_failures=3, failure_delay=1.0)
        self.bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0wrong") + b"\r\n"

    def test_delay_grows(self) -> None:
        """The first failure is answered after 1s, the second after 2s."""
        self.assertEqual(self.client.codes(self.bad), [])
        self.client.clock.advance(0.99)
        self.assertEqual(self.client.take(), [])
        self.client.clock.advance(0.01)
        self.assertEqual(self.client.codes(b""), ["535 5.7.8"])
        self.client.send(self.bad)
        self.client.clock.advance(1.99)
        self.assertEqual(self.client.take(), [])
        self.client.clock.advance(0.01)
        self.assertEqual(self.client.codes(b""), ["535 5.7.8"])

    def test_pipelined_commands_wait(self) -> None:
        """Commands pipelined behind a failing AUTH are answered after its 535, in order."""
        self.client.send(self.bad + b"NOOP\r\n")
        self.client.clock.advance(1)
        self.assertEqual(self.client.codes(b""), ["535 5.7.8", "250 2.0.0"])

    def test_too_many_failures(self) -> None:
        """The third failure is answered with 421 4.7.0 and the connection is closed."""
        codes = []
        for _ in range(3):
            self.client.send(self.bad)
            self.client.clock.advance(10)
            codes += self.client.codes(b"")
        self.assertEqual(codes, ["535 5.7.8", "535 5.7.8", "421 4.7.0"])
        self.assertTrue(self.client.transport.disconnecting)

    def test_malformed_counts(self) -> None:
        """A malformed PLAIN message counts as a failed login."""
        self.client.send(b"AUTH PLAIN " + base64.b64encode(b"no nuls") + b"\r\n")
        self.client.clock.advance(1)
        self.assertEqual(self.client.codes(b""), ["535 5.7.8"])

    def test_success_after_failure(self) -> None:
        """A correct password after a failure still works."""
        self.client.send(self.bad)
        self.client.clock.advance(1)
        self.assertEqual(self.client.codes(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n"), ["535 5.7.8", "235 2.7.0"])


class SecretsNotLoggedTests(SynchronousTestCase):
    def test_no_secrets_in_log(self) -> None:
        """Neither the password nor the base64 blob reaches the log, on failure or success."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = secure(self)
        wrong = base64.b64encode(b"\0alice@example.org\0" + PASSWORD + b"X")
        client.send(b"AUTH PLAIN " + wrong + b"\r\n")
        client.clock.advance(5)
        client.send(b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@example.org") + b"\r\n"
                    + base64.b64encode(PASSWORD) + b"\r\n")
        self.assertEqual(client.session.info.auth_user, "alice@example.org")
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertIn("authentication failed", text)
        self.assertIn("authenticated as alice@example.org", text)
        for secret in (PASSWORD, wrong, base64.b64encode(PASSWORD), PLAIN_BLOB):
            self.assertNotIn(secret.decode(), text)


class SubmissionRuleTests(SynchronousTestCase):
    def test_auth_required_before_mail(self) -> None:
        """On submission, MAIL before AUTH is refused with 530 5.7.0."""
        client = secure(self, require_auth=True)
        self.assertEqual(client.codes(b"MAIL FROM:<alice@example.org>\r\n"), ["530 5.7.0"])
        client.send(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n")
        self.assertEqual(client.codes(b"MAIL FROM:<alice@example.org>\r\n"), ["250 2.1.0"])

    def sender_client(self, rules: SenderRules) -> SecureClient:
        client = SecureClient(security(self, implicit_tls=True, require_auth=True),
                              policy=AuthenticatedSenders(rules, ScriptedPolicy()))
        client.send(b"EHLO c\r\nAUTH PLAIN " + PLAIN_BLOB + b"\r\n")
        return client

    def test_own_address_only(self) -> None:
        """By default a user named by an address may send as that address (and <>) only."""
        client = self.sender_client(SenderRules())
        for sender, code in ((b"<bob@example.org>", "553 5.7.1"), (b"<Alice@Example.ORG>", "250 2.1.0"),
                             (b"<>", "250 2.1.0"), (b'<"alice"@example.org>', "250 2.1.0")):
            self.assertEqual(client.codes(b"MAIL FROM:" + sender + b"\r\nRSET\r\n")[0], code, sender)

    def test_configured_patterns(self) -> None:
        """Configured patterns replace the default: exact addresses and whole @domains."""
        rules = SenderRules({"alice@example.org": ("sales@example.org", "@example.net")})
        client = self.sender_client(rules)
        for sender, code in ((b"<sales@example.org>", "250 2.1.0"), (b"<x@example.net>", "250 2.1.0"),
                             (b"<alice@example.org>", "553 5.7.1"), (b"<x@sub.example.net>", "553 5.7.1")):
            self.assertEqual(client.codes(b"MAIL FROM:" + sender + b"\r\nRSET\r\n")[0], code, sender)

    def test_wrapper_keeps_inner_interfaces(self) -> None:
        """The sender check wraps the server's policy without hiding its extra hooks."""
        inner = ScriptedPolicy()
        alsoProvides(inner, IMarker)
        inner.disconnect = lambda session: "seen"  # type: ignore[attr-defined]
        wrapper = AuthenticatedSenders(SenderRules(), inner)
        self.assertTrue(IMarker.providedBy(wrapper))
        self.assertEqual(wrapper.disconnect(None), "seen")  # type: ignore[attr-defined]

    def test_plain_user_names(self) -> None:
        """A user name without @ may send as name@ each local domain."""
        rules = SenderRules(local_domains=frozenset({"example.org", "example.com"}))
        self.assertEqual(rules.patterns("bob"), ("bob@example.com", "bob@example.org"))


class RelayDenialTests(SynchronousTestCase):
    """Relay policy decides on the real domain, whatever the address looks like."""

    def setUp(self) -> None:
        self.router = LocalRouter(parse_config(CONFIG))
        policy = AuthenticatedSenders(SenderRules(), DefaultPolicy(self.router, ["198.51.100.0/24"]))
        self.client = SecureClient(security(self, implicit_tls=True), policy=policy)
        self.client.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")

    def rcpt(self, path: bytes) -> str:
        return self.client.codes(b"RCPT TO:" + path + b"\r\n")[0]

    def test_remote_forms_denied(self) -> None:
        """Source routes, IP literals, case and quoting never make a remote domain local."""
        for path in (b"<user@other.test>", b"<USER@OTHER.TEST>", b"<@example.org:user@other.test>",
                     b"<@example.org,@example.org:user@other.test>", b"<user@[192.0.2.1]>",
                     b"<user@[127.0.0.1]>", b"<user@[IPv6:::1]>", b'<"user@example.org"@other.test>',
                     b"<user%example.org@other.test>", b"<example.org!user@other.test>",
                     b"<user@192.0.2.1>"):
            self.assertEqual(self.rcpt(path), "554 5.7.1", path)

    def test_local_forms_stay_local(self) -> None:
        """%-hacks, bang paths and quoted @ addressed to a local domain are local mailboxes."""
        for path in (b"<user%other.test@example.org>", b"<other.test!user@example.org>",
                     b'<"user@other.test"@example.org>', b"<@other.test:user@example.org>"):
            mailbox, _ = parse_forward_path(path.decode())
            route = self.router.resolve(mailbox)
            self.assertFalse(getattr(route, "relay", True), path)
            self.assertEqual(self.rcpt(path), "250 2.1.5", path)

    def test_malformed_refused(self) -> None:
        """Trailing dots and a second @ are syntax errors, refused before any routing."""
        for path in (b"<user@other.test.>", b"<user@example.org@other.test>",
                     b"<user@example.org.>", b"<user@[example.org]>"):
            self.assertEqual(self.rcpt(path)[:3], "501", path)

    def test_authenticated_may_relay(self) -> None:
        """After AUTH the same remote recipient is accepted."""
        self.client.send(b"RSET\r\nAUTH PLAIN " + PLAIN_BLOB + b"\r\n")
        self.client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(self.rcpt(b"<user@other.test>"), "250 2.1.5")

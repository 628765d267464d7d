"""Interop: swaks, smtplib and openssl s_client against the real daemon over TLS with AUTH.

Peers missing from the machine make these tests fail, never skip: CI installs them.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import ssl
import subprocess
import uuid
from typing import Any

import trustme
from argon2 import PasswordHasher
from twisted.trial.unittest import SynchronousTestCase

from mailplat.userdb import UserDB
from tests.daemon import Daemon, wait_for_files, wait_until

USER, PASSWORD = "alice@localhost", "s3cret pass phrase"
LISTENERS = {"smtp": "relay", "submission": "submission", "submissions": "submissions"}
PEER_TIMEOUT = 30
# Cheap argon2 parameters keep start-up fast; the server verifies with whatever the hash says.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def need(test: SynchronousTestCase, program: str) -> str:
    path = shutil.which(program)
    if path is None:
        test.fail(f"{program} is not installed (apt-get install {program}); interop needs it")
    return path


def start(test: SynchronousTestCase, cram: bool = False, ca: trustme.CA | None = None
          ) -> tuple[Daemon, bytes | None]:
    """A daemon with the three listeners and one user; its own CA's certificate if given."""
    workdir = os.path.abspath(test.mktemp())
    os.makedirs(workdir)
    users = os.path.join(workdir, "users")
    db = UserDB(users, FAST)
    db.add(USER, PASSWORD.encode())
    secret = db.set_cram(USER, True) if cram else None
    config: dict[str, Any] = {"auth": {"users_file": users, "failure_delay": 0.2}}
    if ca is not None:
        issued = ca.issue_cert("127.0.0.1", "mx.test")
        cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        config["tls"] = {"certificate": cert, "key": key}
    daemon = Daemon(workdir, listeners=LISTENERS, config=config)
    test.addCleanup(daemon.kill)
    daemon.start()
    return daemon, secret


def run(command: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, input=stdin, capture_output=True, timeout=PEER_TIMEOUT)


def delivered(test: SynchronousTestCase, daemon: Daemon, marker: str, count: int) -> bytes:
    """The delivered message carrying ``marker``, once ``count`` messages are in bob's Maildir."""
    paths = wait_for_files(daemon.maildir("bob"), count)
    for path in paths:
        with open(path, "rb") as stream:
            data = stream.read()
        if marker.encode() in data:
            return data
    test.fail(f"no message with {marker} in {paths}")


class SwaksTests(SynchronousTestCase):
    def swaks(self, daemon: Daemon, port: str, tls: str, mechanism: str, password: str) -> str:
        marker = f"swaks-{mechanism}-{uuid.uuid4().hex}"
        result = run([
            need(self, "swaks"), "--server", f"127.0.0.1:{daemon.ports[port]}", tls,
            "--auth", mechanism, "--auth-user", USER, "--auth-password", password,
            "--from", USER, "--to", "bob@localhost", "--header", f"Subject: {marker}",
            "--timeout", "20",
        ])
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace"))
        self.assertIn(b"235 2.7.0", result.stdout)
        return marker

    def check_all_mechanisms(self, port: str, tls: str) -> None:
        daemon, secret = start(self, cram=True)
        assert secret is not None
        passwords = {"PLAIN": PASSWORD, "LOGIN": PASSWORD, "CRAM-MD5": secret.decode()}
        for count, (mechanism, password) in enumerate(passwords.items(), 1):
            marker = self.swaks(daemon, port, tls, mechanism, password)
            self.assertIn(b" with ESMTPSA id ", delivered(self, daemon, marker, count))
        cram_line = f"authenticated as {USER} with CRAM-MD5"
        # Log lines reach the file from a writer thread: wait (bounded) for the last one.
        wait_until(lambda: cram_line in daemon.log() or None, 10.0, "the CRAM-MD5 login logged")
        log = daemon.log()
        for secret_text in (PASSWORD, base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
                            base64.b64encode(PASSWORD.encode()).decode(), secret.decode()):
            self.assertNotIn(secret_text, log)
        self.assertIn(f"authenticated as {USER} with CRAM-MD5", log)

    def test_starttls(self) -> None:
        """swaks --tls on the submission port delivers with PLAIN, LOGIN and CRAM-MD5."""
        self.check_all_mechanisms("submission", "--tls")

    def test_tls_on_connect(self) -> None:
        """swaks --tls-on-connect on the submissions port delivers with every mechanism."""
        self.check_all_mechanisms("submissions", "--tls-on-connect")


class SmtplibTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.daemon, _ = start(self, ca=self.ca)
        self.context = ssl.create_default_context()
        self.ca.configure_trust(self.context)

    def message(self, marker: str) -> bytes:
        return f"From: {USER}\r\nTo: bob@localhost\r\nSubject: {marker}\r\n\r\nhello\r\n".encode()

    def test_starttls_login(self) -> None:
        """smtplib: AUTH is not offered in plaintext; after a verified STARTTLS, login() works."""
        with smtplib.SMTP("127.0.0.1", self.daemon.ports["submission"], timeout=20) as smtp:
            smtp.ehlo("client.test")
            self.assertNotIn("auth", smtp.esmtp_features)
            self.assertEqual(smtp.mail(USER)[0], 530)
            smtp.rset()
            smtp.starttls(context=self.context)
            smtp.ehlo("client.test")
            self.assertNotIn("starttls", smtp.esmtp_features)
            self.assertEqual(smtp.login(USER, PASSWORD)[0], 235)
            smtp.sendmail(USER, ["bob@localhost"], self.message("smtplib-starttls"))
        self.assertIn(b" with ESMTPSA id ", delivered(self, self.daemon, "smtplib-starttls", 1))

    def test_smtp_ssl_login(self) -> None:
        """smtplib.SMTP_SSL on the submissions port: verified certificate, login(), delivery."""
        port = self.daemon.ports["submissions"]
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=self.context) as smtp:
            self.assertEqual(smtp.login(USER, PASSWORD)[0], 235)
            smtp.sendmail(USER, ["bob@localhost"], self.message("smtplib-ssl"))
        self.assertIn(b" with ESMTPSA id ", delivered(self, self.daemon, "smtplib-ssl", 1))

    def test_wrong_password_and_foreign_sender(self) -> None:
        """A wrong password gets 535; an authenticated user cannot send as somebody else."""
        port = self.daemon.ports["submissions"]
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=self.context) as smtp:
            with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                smtp.login(USER, "wrong")
            self.assertEqual(caught.exception.smtp_code, 535)
            smtp.login(USER, PASSWORD)
            self.assertEqual(smtp.mail("mallory@localhost"), (553, b"5.7.1 Sender address not "
                                                              b"owned by the authenticated user"))

    def test_relay_listener_denies_strangers(self) -> None:
        """The relay listener offers STARTTLS but refuses to relay for unauthenticated clients."""
        with smtplib.SMTP("127.0.0.1", self.daemon.ports["smtp"], timeout=20) as smtp:
            smtp.starttls(context=self.context)
            smtp.ehlo("client.test")
            smtp.mail("someone@example.net")
            self.assertEqual(smtp.rcpt("victim@example.com")[0], 554)
            self.assertEqual(smtp.rcpt("bob@localhost")[0], 250)


class OpenSSLTests(SynchronousTestCase):
    def s_client(self, daemon: Daemon, *options: str, stdin: bytes = b"") -> Any:
        return run([need(self, "openssl"), "s_client", "-connect",
                    f"127.0.0.1:{daemon.ports['submission']}", "-starttls", "smtp",
                    "-name", "client.test", "-crlf", *options], stdin)

    def test_starttls_completes(self) -> None:
        """openssl s_client -starttls smtp completes a TLS 1.2+ handshake and can talk SMTP."""
        daemon, _ = start(self)
        result = self.s_client(daemon, "-quiet", stdin=b"EHLO client.test\nQUIT\n")
        output = result.stdout.decode(errors="replace")
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        self.assertIn("250-AUTH PLAIN LOGIN", output)
        self.assertNotIn("STARTTLS", output)
        self.assertIn("221 2.0.0", output)
        brief = self.s_client(daemon, "-brief", stdin=b"QUIT\n")
        self.assertRegex(brief.stderr.decode(errors="replace"), r"Protocol version: TLSv1\.[23]")

    def test_tls11_refused(self) -> None:
        """openssl s_client -tls1_1 is refused by the server (protocol version alert)."""
        daemon, _ = start(self)
        result = self.s_client(daemon, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", stdin=b"QUIT\n")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("alert protocol version", result.stderr.decode(errors="replace"))
        implicit = run(["openssl", "s_client", "-connect",
                        f"127.0.0.1:{daemon.ports['submissions']}", "-tls1_1",
                        "-cipher", "DEFAULT@SECLEVEL=0"], b"QUIT\n")
        self.assertNotEqual(implicit.returncode, 0)
        self.assertIn("alert protocol version", implicit.stderr.decode(errors="replace"))
        refusal = "TLS failed: [('SSL routines', '', 'unsupported protocol')]"
        # The daemon logs after the client has gone: wait (bounded) for both lines.
        wait_until(lambda: daemon.log().count(refusal) >= 2 or None, 10.0, "two TLS refusals logged")
        self.assertEqual(daemon.log().count(refusal), 2)

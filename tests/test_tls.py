"""Server certificates: generation, loading, TLS 1.2 minimum, reload without dropping anything."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailplat.config import ConfigError, parse_config
from mailplat.tls import (
    ReloadingTLS, TLSConfig, TLSError, TLSService, generate_self_signed, load_options, tls_config,
)

BASE = '[[listener]]\nname = "s"\nendpoint = "tcp:0"\nprofile = "relay"\n' \
       '[domains.localhost]\ncatch_all = true\n'


def write_pair(directory: str, ca: trustme.CA, host: str) -> tuple[str, str]:
    """A certificate chain (leaf first) and key for ``host`` signed by ``ca``."""
    issued = ca.issue_cert(host)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    Path(cert).write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    Path(key).write_bytes(issued.private_key_pem.bytes())
    return cert, key


def subject(connection: SSL.Connection) -> str:
    cert = connection.get_certificate(as_cryptography=True)
    assert cert is not None
    return cert.subject.rfc4514_string() + " " + str(cert.serial_number)


def handshake(server: SSL.Connection, client: SSL.Connection, rounds: int = 20) -> None:
    """Run a TLS handshake between two memory-BIO connections; raise SSL.Error on failure."""
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(rounds):
        done = 0
        for side, other in ((client, server), (server, client)):
            try:
                side.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(side.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def client_connection(maximum: int) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(maximum)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # let the client try old versions at all
    return SSL.Connection(context, None)


class GenerateTests(SynchronousTestCase):
    def test_self_signed(self) -> None:
        """The generated key is private (0600) and the certificate names our host."""
        directory = self.mktemp()
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        generate_self_signed(cert, key, "mx.test")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        loaded = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["mx.test"])
        load_options(cert, key)

    def test_defaults_in_data_dir(self) -> None:
        """Without [tls] the pair lives in <data_dir>/tls/ and is ours to generate."""
        config = parse_config('data_dir = "/srv/m"\n' + BASE)
        settings = tls_config(config)
        self.assertEqual((settings.certificate, settings.key, settings.self_signed),
                         ("/srv/m/tls/selfsigned.crt", "/srv/m/tls/selfsigned.key", True))

    def test_configured(self) -> None:
        """[tls] certificate and key name the files; nothing is generated then."""
        config = parse_config(BASE + '[tls]\ncertificate = "/c.pem"\nkey = "/k.pem"\n'
                              'reload_interval = "5m"\n')
        self.assertEqual(tls_config(config), TLSConfig("/c.pem", "/k.pem", False, 300.0))

    def test_config_problems(self) -> None:
        """Half a pair, an unknown key or a bad interval are reported when loading."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + '[tls]\ncertificate = "/c.pem"\nreload_interval = "x"\nfoo = 1\n')
        keys = sorted(problem.key for problem in caught.exception.problems)
        self.assertEqual(keys, ["tls", "tls.foo", "tls.reload_interval"])


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cert, self.key = write_pair(self.directory, self.ca, "mx.test")

    def test_mismatched_key(self) -> None:
        """A key that does not belong to the certificate is refused with both file names."""
        other = trustme.CA().issue_cert("mx.test").private_key_pem.bytes()
        Path(self.key).write_bytes(other)
        with self.assertRaises(TLSError) as caught:
            load_options(self.cert, self.key)
        self.assertIn("does not match", str(caught.exception))

    def test_missing_file(self) -> None:
        """A missing file is named in the error."""
        with self.assertRaises(TLSError) as caught:
            load_options(self.cert, "/nonexistent/key.pem")
        self.assertIn("/nonexistent/key.pem", str(caught.exception))

    def test_tls12_minimum(self) -> None:
        """A TLS 1.1 client is refused; TLS 1.2 and 1.3 clients complete the handshake."""
        permissive = SSL.Context(SSL.TLS_SERVER_METHOD)
        permissive.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        permissive.use_certificate_chain_file(self.cert)
        permissive.use_privatekey_file(self.key)
        # The client really can speak TLS 1.1 here, so the refusal below is our server's.
        handshake(SSL.Connection(permissive, None), client_connection(SSL.TLS1_1_VERSION))
        tls = ReloadingTLS(TLSConfig(self.cert, self.key, False), "mx.test")
        with self.assertRaises(SSL.Error):
            handshake(tls.serverConnectionForTLS(None), client_connection(SSL.TLS1_1_VERSION))
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            client = client_connection(version)
            handshake(tls.serverConnectionForTLS(None), client)
            self.assertIn(client.get_protocol_version_name(), ("TLSv1.2", "TLSv1.3"))

    def test_chain_is_sent(self) -> None:
        """Intermediate certificates in the file are sent, so clients can verify the chain."""
        intermediate = self.ca.create_child_ca()
        cert, key = write_pair(self.directory, intermediate, "mx.test")
        tls = ReloadingTLS(TLSConfig(cert, key, False), "mx.test")
        client = client_connection(SSL.TLS1_3_VERSION)
        handshake(tls.serverConnectionForTLS(None), client)
        chain = client.get_peer_cert_chain(as_cryptography=True)
        assert chain is not None
        self.assertEqual(len(chain), 2)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cert, self.key = write_pair(self.directory, trustme.CA(), "mx.test")
        self.tls = ReloadingTLS(TLSConfig(self.cert, self.key, False, 30.0), "mx.test")
        self.tls.prepare()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def renew(self) -> None:
        """Replace both files the way certbot does: new files renamed over the old names."""
        fresh = os.path.join(self.directory, "fresh")
        os.makedirs(fresh, exist_ok=True)
        cert, key = write_pair(fresh, trustme.CA(), "mx.test")
        os.replace(cert, self.cert)
        os.replace(key, self.key)

    def test_file_change_reloads_new_connections_only(self) -> None:
        """After the files change, new connections get the new certificate, old ones keep theirs."""
        before = self.tls.serverConnectionForTLS(None)
        old_subject = subject(before)
        self.renew()
        self.tls.check_files()
        after = self.tls.serverConnectionForTLS(None)
        self.assertNotEqual(subject(after), old_subject)
        self.assertEqual(subject(before), old_subject)

    def test_half_renewed_then_complete(self) -> None:
        """A certificate written before its key fails once, then loads when the key arrives."""
        old_subject = subject(self.tls.serverConnectionForTLS(None))
        fresh = os.path.join(self.directory, "fresh")
        os.makedirs(fresh)
        cert, key = write_pair(fresh, trustme.CA(), "mx.test")
        os.replace(cert, self.cert)
        self.tls.check_files()
        self.tls.check_files()  # not retried while nothing changes
        self.assertEqual(subject(self.tls.serverConnectionForTLS(None)), old_subject)
        self.assertEqual(sum("not reloaded" in formatEvent(e) for e in self.events), 1)
        os.replace(key, self.key)
        self.tls.check_files()
        self.assertNotEqual(subject(self.tls.serverConnectionForTLS(None)), old_subject)

    def test_unchanged_files_not_reloaded(self) -> None:
        """A check that finds the same files does nothing."""
        self.tls.check_files()
        self.assertFalse(any("loaded" in formatEvent(event) for event in self.events))

    def test_broken_reload_keeps_old(self) -> None:
        """A reload that fails (mismatched key) keeps serving the old certificate and says so."""
        old_subject = subject(self.tls.serverConnectionForTLS(None))
        Path(self.key).write_bytes(trustme.CA().issue_cert("x.test").private_key_pem.bytes())
        self.assertFalse(self.tls.reload())
        self.assertEqual(subject(self.tls.serverConnectionForTLS(None)), old_subject)
        self.assertTrue(any("not reloaded" in formatEvent(event) for event in self.events))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        settings = TLSConfig(os.path.join(self.directory, "s.crt"),
                             os.path.join(self.directory, "s.key"), True, 60.0)
        self.tls = ReloadingTLS(settings, "mx.test")
        self.clock = Clock()
        self.calls: list[Any] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def service(self, **options: Any) -> TLSService:
        service = TLSService(self.tls, self.clock, call_from_thread=self.calls.append, **options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_generates_on_first_start(self) -> None:
        """The first start makes a self-signed pair and says so in the log."""
        self.service(use_signal=False)
        self.assertTrue(os.path.exists(self.tls.settings.key))
        text = "\n".join(formatEvent(event) for event in self.events)
        self.assertIn("generated a self-signed TLS certificate for mx.test", text)

    def test_periodic_check(self) -> None:
        """The files are checked every reload_interval and reloaded when they changed."""
        self.service(use_signal=False)
        old = subject(self.tls.serverConnectionForTLS(None))
        fresh = self.mktemp()
        os.makedirs(fresh)
        cert, key = write_pair(fresh, trustme.CA(), "mx.test")
        os.replace(cert, self.tls.settings.certificate)
        os.replace(key, self.tls.settings.key)
        self.clock.advance(60)
        self.assertNotEqual(subject(self.tls.serverConnectionForTLS(None)), old)

    def test_sighup(self) -> None:
        """SIGHUP asks for a reload (via the reactor thread); stopping restores the old handler."""
        before = signal.getsignal(signal.SIGHUP)
        service = self.service()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.calls, [self.tls.reload])
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

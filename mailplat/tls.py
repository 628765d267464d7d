"""Server TLS: the certificate (configured, or self-signed on first start) and its reloading.

One ``ReloadingTLS`` serves every listener (STARTTLS and implicit TLS). It hands each new
connection an OpenSSL connection built from the current context; a reload (SIGHUP, or the files
changing, as when certbot renews) builds a new context and swaps it in, so established
connections keep theirs and nothing is dropped. A reload that fails keeps the old certificate
and logs why. TLS 1.2 is the minimum; ciphers are Twisted's vetted defaults.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.config import Config, parse_duration, register_check, register_keys
from mailplat.config import Path as KeyPath

log = Logger()
TLS_KEYS = frozenset({"certificate", "key", "reload_interval"})
SELF_SIGNED_DAYS = 825


class TLSError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TLSConfig:
    """Where the certificate chain and key are; ``self_signed``: we make them if missing."""

    certificate: str
    key: str
    self_signed: bool
    reload_interval: float = 60.0


def tls_config(config: Config) -> TLSConfig:
    """The [tls] section, defaulting to a self-signed pair under <data_dir>/tls/."""
    table = config.raw.get("tls", {})
    interval = parse_duration(table.get("reload_interval", 60))
    if "certificate" in table:
        return TLSConfig(_abspath(table["certificate"]), _abspath(table["key"]), False, interval)
    directory = os.path.join(config.data_dir, "tls")
    return TLSConfig(os.path.join(directory, "selfsigned.crt"),
                     os.path.join(directory, "selfsigned.key"), True, interval)


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def check_tls(raw: Mapping[str, Any]) -> list[tuple[KeyPath, str]]:
    """Config problems in [tls]; files are not opened here (they may be root-only)."""
    table = raw.get("tls", {})
    if not isinstance(table, dict):
        return [(("tls",), "must be a table: [tls]")]
    problems: list[tuple[KeyPath, str]] = [
        (("tls", key), "unknown key") for key in table if key not in TLS_KEYS
    ]
    for key in ("certificate", "key"):
        value = table.get(key)
        if key in table and (not isinstance(value, str) or not value.strip()):
            problems.append((("tls", key), "must be a file name"))
    if ("certificate" in table) != ("key" in table):
        problems.append((("tls",), "set both certificate and key, or neither (self-signed)"))
    if "reload_interval" in table:
        try:
            parse_duration(table["reload_interval"])
        except ValueError as error:
            problems.append((("tls", "reload_interval"), str(error)))
    return problems


def register_config() -> None:
    """Declare the [tls] section to the config loader (called by it before each load)."""
    register_keys("", "tls")
    register_check(check_tls)


# ------------------------------------------------------------------------ making and loading


def generate_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    """Write a new RSA key (mode 0600) and a self-signed certificate naming ``hostname``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path), exist_ok=True)
    os.makedirs(os.path.dirname(key_path), exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_new(path: str, data: bytes, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def load_options(cert_path: str, key_path: str) -> CertificateOptions:
    """CertificateOptions for the PEM chain (leaf first) and key, checked to belong together."""
    chain = x509.load_pem_x509_certificates(_read(cert_path))
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as error:
        raise TLSError(f"{key_path}: not a usable unencrypted PEM private key ({error})") from None
    options = CertificateOptions(
        privateKey=cast(Any, key), certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]), raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # builds the context now so a mismatched key fails the load
    except SSL.Error as error:
        raise TLSError(f"{key_path} does not match {cert_path}: {error}") from None
    return options


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise TLSError(f"{path}: {error.strerror}") from None


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# ------------------------------------------------------------------------- the shared creator


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS:
    """Gives each new TLS connection the current certificate; ``reload`` swaps it safely."""

    def __init__(self, settings: TLSConfig, hostname: str) -> None:
        self.settings = settings
        self.hostname = hostname
        self._options: CertificateOptions | None = None
        self._seen: tuple[Any, Any] = (None, None)

    @property
    def loaded(self) -> bool:
        return self._options is not None

    def prepare(self) -> None:
        """Make the self-signed pair if it is ours and missing, then load (raises TLSError)."""
        settings = self.settings
        if settings.self_signed and not (os.path.exists(settings.certificate)
                                         and os.path.exists(settings.key)):
            generate_self_signed(settings.certificate, settings.key, self.hostname)
            log.info("generated a self-signed TLS certificate for {host} in {path}; clients "
                     "will not trust it: set [tls] certificate and key for real use",
                     host=self.hostname, path=settings.certificate)
        self._load()

    def _load(self) -> None:
        seen = (_signature(self.settings.certificate), _signature(self.settings.key))
        self._options = load_options(self.settings.certificate, self.settings.key)
        self._seen = seen
        log.info("TLS certificate loaded from {path}", path=self.settings.certificate)

    def reload(self) -> bool:
        """Load the files again; on any problem keep serving the old certificate."""
        try:
            self._load()
        except TLSError as error:
            log.error("TLS certificate not reloaded, keeping the old one: {error}", error=error)
            return False
        return True

    def check_files(self) -> None:
        """Reload when either file changed (certbot renewals replace them in place).

        A failed attempt is not repeated until a file changes again (or SIGHUP), so a renewal
        that writes the certificate and the key one after the other ends up loaded.
        """
        seen = (_signature(self.settings.certificate), _signature(self.settings.key))
        if seen != self._seen and None not in seen:
            self._seen = seen
            self.reload()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self._options is None:
            self.prepare()
        assert self._options is not None
        return SSL.Connection(self._options.getContext(), None)


class TLSService(Service):
    """Loads the certificate while still privileged; then watches the files and SIGHUP."""

    def __init__(
        self, tls: ReloadingTLS, clock: IReactorTime, use_signal: bool = True,
        call_from_thread: Callable[..., Any] | None = None,
    ) -> None:
        self.tls = tls
        self.clock = clock
        self.use_signal = use_signal
        # A signal handler may interrupt the reactor anywhere: hand the work over safely.
        self.call_from_thread = call_from_thread or getattr(clock, "callFromThread", None)
        self._loop: LoopingCall | None = None
        self._previous: Any = None
        self._installed = False

    def privilegedStartService(self) -> None:
        if not self.tls.loaded:
            self.tls.prepare()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        if not self.tls.loaded:
            self.tls.prepare()
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.tls.check_files)
        self._loop.clock = self.clock
        self._loop.start(self.tls.settings.reload_interval, now=False)
        if self.use_signal and hasattr(signal, "SIGHUP"):
            try:
                self._previous = signal.signal(signal.SIGHUP, self._on_sighup)
                self._installed = True
            except ValueError:  # not the main thread: no signals, the file check still works
                pass

    def _on_sighup(self, signum: int, frame: Any) -> None:
        if self.call_from_thread is not None:
            self.call_from_thread(self.tls.reload)
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGHUP, previous)
            self._installed, self._previous = False, None
        return super().stopService()  # type: ignore[no-untyped-call]

"""dkim: sign outgoing mail for our domains and verify incoming signatures (RFC 6376), with
dkimpy.

Outgoing means sent by an authenticated client or one in the trusted networks, with a From:
domain that has a ``[[plugin.dkim.sign]]`` entry; its signature is added as a header field.
Other mail is verified: the keys of its signatures are fetched with twisted.names first, then
dkimpy runs in the plugin thread pool (hashing a body costs CPU) with a DNS function that only
hands it those keys. Results go to ``notes.transaction["dkim"]`` (for dmarc) and the
Authentication-Results header. DKIM never refuses mail by itself; DMARC decides.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

import dkim as dkimpy
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.names import dns

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, PluginContext, Verdict
from mailplat.policies import common

log = Logger()
KEYS = ("sign", "verify", "max_size", "dns_timeout", "max_signatures")
SIGN_KEYS = ("domain", "selector", "key")
_FOLDING = re.compile(rb"\r?\n[ \t]")


@dataclass(frozen=True)
class Signer:
    domain: str
    selector: str
    key_file: str


@dataclass(frozen=True)
class Settings:
    signers: tuple[Signer, ...] = ()
    verify: bool = True
    max_size: int = 10 << 20
    dns_timeout: float = 10.0
    max_signatures: int = 5


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass fail neutral temperror permerror
    domain: str
    selector: str


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    signers = o.get("sign", _signers, ())
    result = Settings(
        signers=signers,
        verify=o.get("verify", common.flag, True),
        max_size=o.get("max_size", common.size, 10 << 20),
        dns_timeout=o.get("dns_timeout", common.duration, 10.0),
        max_signatures=o.get("max_signatures", common.count, 5),
    )
    for signer in signers:
        if not os.path.isfile(signer.key_file):
            o.problems.append(("sign", f"key file {signer.key_file!r} does not exist"))
    return result, o.problems


def _signers(value: object) -> tuple[Signer, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("must be an array of tables: [[plugin.dkim.sign]]")
    signers = []
    for table in value:
        if set(table) != set(SIGN_KEYS) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError('each [[plugin.dkim.sign]] needs domain, selector and key (strings)')
        path = os.path.abspath(os.path.expanduser(table["key"]))
        signers.append(Signer(table["domain"].lower().rstrip("."), table["selector"], path))
    return tuple(signers)


def load_key(path: str) -> bytes:
    """The private key as the PKCS#1 PEM dkimpy wants, whatever PEM flavour the file has."""
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem


def from_domain(headers: bytes) -> str:
    """The domain of the single From: address ("" if absent or not exactly one address)."""
    values = BytesHeaderParser().parsebytes(headers + b"\r\n").get_all("From") or []
    addresses = getaddresses([str(v) for v in values])
    if len(addresses) != 1:
        return ""
    domain = common.domain_of(addresses[0][1])
    return domain if re.fullmatch(r"[\w-]+(\.[\w-]+)+", domain) else ""


def signature_tags(headers: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field, top to bottom (as dkimpy numbers them)."""
    unfolded = _FOLDING.sub(b" ", headers)
    found = []
    for line in unfolded.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"dkim-signature":
            tags = {}
            for part in value.decode("ascii", "replace").split(";"):
                tag, eq, tag_value = part.partition("=")
                if eq:
                    tags[tag.strip()] = re.sub(r"\s+", "", tag_value)
            found.append(tags)
    return found


class DKIMPolicy(hooks.PolicyPlugin):
    """Signs or verifies at the end of data."""

    def __init__(self, settings: Settings, context: PluginContext) -> None:
        self.settings = settings
        self.resolver = context.resolver
        self.run_in_thread = context.run_in_thread
        self.trusted = common.networks(list(context.trusted_networks))
        self.keys = {s.domain: (s, load_key(s.key_file)) for s in settings.signers}

    def data(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        address = common.client_address(session.peer_host)
        outgoing = bool(session.auth_user) or common.in_any(address, self.trusted)
        if outgoing:
            signer = self.keys.get(from_domain(headers))
            return succeed(CONTINUE) if signer is None else self._sign(transaction, *signer)
        if not self.settings.verify:
            return succeed(CONTINUE)
        return self._verify(session, transaction, headers)

    def _read(self, transaction: Transaction) -> Any:
        """Open the received message on the reactor thread (it flushes the spool file)."""
        return transaction.message.open()

    def _sign(self, transaction: Transaction, signer: Signer, key: bytes) -> Deferred[Verdict]:
        stream, limit = self._read(transaction), self.settings.max_size
        d: Deferred[bytes | None] = self.run_in_thread(_sign, stream, limit, signer, key)
        return d.addCallbacks(_signed, _not_signed, callbackArgs=(signer,), errbackArgs=(signer,))

    def _verify(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        tags = signature_tags(headers)[: self.settings.max_signatures]
        if not tags:
            return succeed(self._record(session, []))
        names = {_key_name(t) for t in tags if _key_name(t)}
        fetches = [self._fetch_key(name) for name in sorted(names)]
        keys = gatherResults(fetches)
        stream, limit = self._read(transaction), self.settings.max_size
        verified = keys.addCallback(lambda found: self.run_in_thread(_verify_all, stream, limit,
                                                                     tags, dict(found)))
        return verified.addCallback(lambda results: self._record(session, results))

    def _fetch_key(self, name: str) -> Deferred[tuple[str, bytes | None | Exception]]:
        d = common.lookup(self.resolver, name, dns.TXT, self.settings.dns_timeout)
        key = d.addCallback(lambda values: (name, b"".join(values[0]) if values else None))
        return key.addErrback(lambda f: (name, common.DNSTemporaryError(f.getErrorMessage())))

    def _record(self, session: SessionInfo, results: list[DKIMResult]) -> Verdict:
        import authres

        hooks.notes(session).transaction["dkim"] = results
        if not results:
            hooks.record_result(session, authres.DKIMAuthenticationResult(result="none"))
        for r in results:
            hooks.record_result(session, authres.DKIMAuthenticationResult(
                result=r.result, header_d=r.domain or None, header_s=r.selector or None))
        return CONTINUE


def _key_name(tags: dict[str, str]) -> str:
    domain, selector = tags.get("d", "").lower().rstrip("."), tags.get("s", "")
    if not domain or not selector:
        return ""
    return f"{selector}._domainkey.{domain}".lower()


def _read_limited(stream: Any, limit: int) -> bytes | None:
    with stream:
        data: bytes = stream.read(limit + 1)
    return None if len(data) > limit else data


def _sign(stream: Any, limit: int, signer: Signer, key: bytes) -> bytes | None:
    """Blocking: the DKIM-Signature field for the message, None when it is too large."""
    message = _read_limited(stream, limit)
    if message is None:
        return None
    return bytes(dkimpy.sign(message, signer.selector.encode(), signer.domain.encode(), key,
                             canonicalize=(b"relaxed", b"relaxed")))


def _signed(field: bytes | None, signer: Signer) -> Verdict:
    if field is None:
        log.warn("dkim: message for {domain} too large to sign", domain=signer.domain)
        return CONTINUE
    text = field.decode("ascii").rstrip("\r\n")
    return Verdict(CONTINUE.action, add_headers=(text,))


def _not_signed(failure: Any, signer: Signer) -> Verdict:
    """A message dkimpy cannot sign (no From:, say) is sent unsigned rather than held up."""
    log.failure("dkim: cannot sign for {domain}", failure, domain=signer.domain)
    return CONTINUE


def _verify_all(stream: Any, limit: int, tags: list[dict[str, str]],
                keys: dict[str, Any]) -> list[DKIMResult]:
    """Blocking: one result per signature, keys only from ``keys``."""
    message = _read_limited(stream, limit)
    results = []
    for index, tag in enumerate(tags):
        domain, selector, name = tag.get("d", ""), tag.get("s", ""), _key_name(tag)
        if message is None:
            result = "neutral"
        elif isinstance(keys.get(name), Exception):
            result = "temperror"
        else:
            result = _verify_one(message, index, keys)
        results.append(DKIMResult(result, domain.lower(), selector))
    return results


def _verify_one(message: bytes, index: int, keys: dict[str, Any]) -> str:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        value = keys.get(name.decode("ascii", "replace").rstrip(".").lower())
        return value if isinstance(value, bytes) else None

    try:
        ok = dkimpy.DKIM(message, minkey=1024).verify(idx=index, dnsfunc=dnsfunc)
    except dkimpy.KeyFormatError:
        return "permerror"
    except dkimpy.DKIMException:
        return "fail"
    return "pass" if ok else "fail"


def make(section: dict[str, Any], context: PluginContext) -> DKIMPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return DKIMPolicy(result, context)

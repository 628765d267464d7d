"""One outbound SMTP session to one address of one mail exchanger, secured as policy says.

The ``smtp`` agent (relay_agent.py) decides where to go; this module gets a READY client there:
connect, greeting and EHLO (client.py), STARTTLS according to the TLS policy, AUTH for a
smarthost. Any failure is a ``SessionFailure`` whose reply tells the agent whether to try the
next host. Under ``encrypt`` and ``verify`` nothing is ever sent in the clear: a missing
STARTTLS or a failed handshake (including a certificate that does not match the MX name)
ends the session before MAIL FROM.

TLS policies (Postfix's levels): ``none`` never uses TLS; ``may`` uses it when offered,
without checking the certificate, and falls back to plaintext; ``encrypt`` requires TLS but
does not check the certificate; ``verify`` requires TLS with a certificate that chains to the
trusted CAs and names the MX host (service-identity, through ``optionsForClientTLS``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import endpoints, ssl
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.error import TimeoutError as ConnectTimeout

from mailplat.client import ClientError, SMTPClient, Timeouts, connect
from mailplat.replies import Reply

NONE, MAY, ENCRYPT, VERIFY = "none", "may", "encrypt", "verify"


@dataclass(frozen=True)
class Target:
    """One address of one mail exchanger; ``name`` is what its certificate must name."""

    name: str
    address: str
    port: int


@dataclass(frozen=True)
class Credentials:
    """Smarthost login; the password never appears in reprs or logs."""

    username: str
    password: str = field(repr=False)


class SessionFailure(Exception):
    """No usable session with this target. ``reply`` is what the recipients would get if no
    other host works; ``refused`` is True when the peer itself said 5xx to greeting or EHLO;
    ``plain_retry`` asks for one more try without TLS (``may`` after a failed handshake)."""

    def __init__(self, reply: Reply, refused: bool = False, plain_retry: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.refused = refused
        self.plain_retry = plain_retry


@dataclass
class RelaySession:
    """A READY client plus what the pool needs to know about it."""

    client: SMTPClient
    target: Target
    tls: bool
    messages: int = 0


class TLSSettings:
    """Client TLS contexts: one unverified for ``may``/``encrypt``, verified ones per name."""

    def __init__(self, ca_file: str | None = None) -> None:
        self._trust: Any = None
        self._ca_file = ca_file

    def trust(self) -> Any:
        if self._trust is None:
            if self._ca_file:
                with open(self._ca_file, "rb") as f:
                    self._trust = ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                        [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())]
                    )
            else:
                self._trust = ssl.platformTrust()  # type: ignore[no-untyped-call]
        return self._trust

    def creator(self, policy: str, name: str) -> Any:
        if policy == VERIFY:
            return ssl.optionsForClientTLS(name, trustRoot=self.trust())
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in data.split(marker) if b"-----BEGIN" in block]


async def open_session(
    target: Target, policy: str, tls: TLSSettings, reactor: Any, helo: str,
    connect_timeout: float, credentials: Credentials | None = None,
    timeouts: Timeouts | None = None,
) -> RelaySession:
    """A READY session with ``target``, TLS and AUTH done as asked; SessionFailure if not."""
    client = await _connect(target, reactor, helo, connect_timeout, timeouts)
    secured = False
    if policy != NONE:
        secured = await _starttls(client, target, policy, tls)
    if credentials is not None:
        if not secured:
            await client.quit()
            raise SessionFailure(Reply(451, "4.7.0", f"{target.name}: no TLS, so no AUTH: "
                                       "credentials are never sent in the clear"))
        await authenticate(client, credentials, target)
    return RelaySession(client, target, secured)


async def _connect(
    target: Target, reactor: Any, helo: str, timeout: float, timeouts: Timeouts | None
) -> SMTPClient:
    kind = endpoints.TCP6ClientEndpoint if ":" in target.address else endpoints.TCP4ClientEndpoint
    endpoint = kind(reactor, target.address, target.port, timeout=timeout)
    try:
        return await connect(endpoint, helo, reactor, timeouts=timeouts)
    except ClientError as error:
        raise SessionFailure(_about(target, error.reply), refused=error.reply.permanent) from None
    except (ConnectError, ConnectionClosed, ConnectTimeout, OSError) as error:
        why = error.__class__.__name__
        raise SessionFailure(Reply(421, "4.4.1", f"connect to {_where(target)}: {why}")) from None


async def _starttls(client: SMTPClient, target: Target, policy: str, tls: TLSSettings) -> bool:
    """True when the session is now encrypted; SessionFailure when policy forbids going on."""
    required = policy in (ENCRYPT, VERIFY)
    if "STARTTLS" not in client.extensions:
        if required:
            await client.quit()
            raise SessionFailure(Reply(451, "4.7.4", f"{_where(target)} does not offer "
                                       f"STARTTLS (TLS policy {policy})"))
        return False
    try:
        await client.starttls(tls.creator(policy, target.name))
    except ClientError as error:
        if client.usable and not required:  # STARTTLS refused with a reply: go on in clear
            return False
        client.close()
        detail = "certificate not verified or " if policy == VERIFY else ""
        reply = Reply(451, "4.7.5", f"TLS with {_where(target)} failed ({detail}handshake "
                      f"error: {error.reply.text}; TLS policy {policy})")
        raise SessionFailure(reply, plain_retry=not required) from None
    return True


async def authenticate(client: SMTPClient, credentials: Credentials, target: Target) -> None:
    """AUTH PLAIN, or LOGIN when that is all the server offers (RFC 4954, 4616)."""
    offered = client.extensions.get("AUTH", "").upper().split()
    user, password = credentials.username.encode(), credentials.password.encode()
    if "PLAIN" in offered:
        reply = await client.command(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password))
    elif "LOGIN" in offered:
        reply = await client.command(b"AUTH LOGIN")
        for answer in (user, password):
            if reply.code != 334:
                break
            reply = await client.command(_b64(answer))
    else:
        await client.quit()
        raise SessionFailure(Reply(451, "4.7.0", f"{target.name} offers no AUTH PLAIN/LOGIN"))
    if reply.code != 235:
        if client.usable:
            await client.quit()
        raise SessionFailure(Reply(451, "4.7.0", f"authentication with {target.name} failed: "
                                   f"{reply}"))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data) or b"="


def _where(target: Target) -> str:
    return f"{target.name}[{target.address}]:{target.port}"


def _about(target: Target, reply: Reply) -> Reply:
    return Reply(reply.code, reply.status, f"{_where(target)} said: {reply.text}")


__all__ = [
    "Credentials", "RelaySession", "SessionFailure", "TLSSettings", "Target", "open_session",
]

"""STARTTLS and SMTP AUTH on the one session engine, and the relay/submission/submissions profiles.

``SecureSession`` is ``ESMTPSession`` plus two commands. STARTTLS (RFC 3207) drops whatever the
client pipelined behind it (CVE-2011-0411) and returns the session to its just-connected state.
AUTH (RFC 4954) runs a ``mailplat.sasl`` mechanism, reading the client's responses through an
engine reader so they never reach the command parser, and checks the result with a
``twisted.cred`` portal. The ``Security`` of a listener says what it offers and demands; the
profiles below differ only in that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from OpenSSL import SSL
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, alsoProvides, implementer, providedBy

from mailplat import replies as R
from mailplat.address import Mailbox
from mailplat.envelope import SessionInfo
from mailplat.interfaces import Action, IMessageSink, IPolicy, Verdict
from mailplat.sasl import (
    Challenge, CramMD5, Done, Login, Mechanism, Plain, ResponseLine, SASLError, Step,
    decode_initial, decode_response, encode_challenge,
)
from mailplat.session import ESMTPSession, SessionSettings
from mailplat.transaction import Stage

log = Logger()

AUTH_REQUIRED = R.Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = R.Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_FAILED = R.Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = R.Reply(235, "2.7.0", "Authentication successful")
AUTH_TEMPFAIL = R.Reply(454, "4.7.0", "Temporary authentication failure")
TOO_MANY_FAILURES = R.Reply(421, "4.7.0", "Too many authentication failures, closing connection")
SENDER_NOT_OWNED = R.Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
LINE_TOO_LONG = R.Reply(500, "5.5.6", "Authentication exchange line is too long")
ALREADY_TLS = R.Reply(503, "5.5.1", "TLS is already active")
MAX_FAILURE_DELAY = 30.0


@dataclass(frozen=True)
class Security:
    """What one listener offers and demands beyond plain ESMTP.

    ``tls`` is None where STARTTLS is not offered; ``portal`` None where AUTH is not;
    ``implicit_tls`` marks a listener whose connections are TLS from the first byte.
    ``cram_available`` says whether advertising CRAM-MD5 is useful (some user has a secret).
    """

    tls: IOpenSSLServerConnectionCreator | None = None
    portal: Portal | None = None
    require_auth: bool = False
    implicit_tls: bool = False
    allow_plaintext: bool = False
    max_failures: int = 3
    failure_delay: float = 1.0
    cram_available: Callable[[], bool] = lambda: True


class SecureSession(ESMTPSession):
    """The session of the relay, submission and submissions listeners."""

    def __init__(
        self,
        settings: SessionSettings,
        policy: IPolicy,
        sink: IMessageSink,
        clock: IReactorTime,
        security: Security | None = None,
    ) -> None:
        super().__init__(settings, policy, sink, clock)
        self.security = security or Security()
        self._exchange: Mechanism | None = None
        self._auth_failures = 0

    def connectionMade(self) -> None:
        if self.security.implicit_tls:
            self.info = replace(self.info, tls=True)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        if isinstance(reason, Failure) and reason.check(SSL.Error):
            log.info("{listener}: [{peer}] TLS failed: {error}", listener=self.info.listener,
                     peer=self.info.peer_host, error=reason.getErrorMessage())
        super().connectionLost(reason)

    # -- advertising ------------------------------------------------------------------------

    def extra_keywords(self) -> list[str]:
        keywords = super().extra_keywords()
        if self.security.tls is not None and not self.info.tls:
            keywords.append("STARTTLS")
        mechanisms = self.offered_mechanisms()
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
        return keywords

    def offered_mechanisms(self) -> list[str]:
        """PLAIN and LOGIN only where the password cannot be sniffed (or the operator says so)."""
        if self.security.portal is None:
            return []
        offered = []
        if self.info.tls or self.security.allow_plaintext:
            offered += ["PLAIN", "LOGIN"]
        if self.security.cram_available():
            offered.append("CRAM-MD5")
        return offered

    def mail_parameters_supported(self) -> frozenset[str]:
        supported = super().mail_parameters_supported()
        return supported | {"AUTH"} if self.esmtp else supported

    def mail_refusal(self) -> R.Reply | None:
        if self.security.require_auth and self.info.auth_user is None:
            return AUTH_REQUIRED
        return super().mail_refusal()

    # -- STARTTLS -----------------------------------------------------------------------------

    def smtp_STARTTLS(self, args: str) -> R.Reply | None:
        if self.security.tls is None:
            return R.Reply(502, "5.5.1", "STARTTLS not available")
        if self.info.tls:
            return ALREADY_TLS
        if args:
            return R.Reply(501, "5.5.4", "Syntax: STARTTLS")
        if not self.greeted:
            return R.Reply(503, "5.5.1", "Send EHLO first")
        # RFC 3207 §4.2: nothing the client sent before the handshake may count afterwards.
        self.discard_buffered_input()
        self.reply(R.Reply(220, "2.0.0", "Ready to start TLS"))
        self.flush_replies()  # in the clear, before the handshake
        try:
            cast(Any, self.transport).startTLS(self.security.tls)
        except Exception:
            log.failure("STARTTLS failed to start")
            self.close()
            return None
        self.abandon_message()
        self.reset_transaction()
        self.greeted = self.esmtp = False
        self.info = replace(self.info, tls=True, helo="", auth_user=None, protocol="ESMTP")
        return None

    # -- AUTH ---------------------------------------------------------------------------------

    def smtp_AUTH(self, args: str) -> Any:
        refusal = self._auth_refusal(args)
        if refusal is not None:
            return refusal
        name, _, initial = args.partition(" ")
        mechanism = self._mechanism(name.upper())
        if mechanism is None:
            return R.Reply(504, "5.5.4", "Unrecognized authentication type")
        if mechanism.secret_in_clear and not (self.info.tls or self.security.allow_plaintext):
            return ENCRYPTION_REQUIRED
        try:
            step = mechanism.start(decode_initial(initial.strip(" ")))
        except SASLError as error:
            return self._sasl_error(error)
        return self._advance(mechanism, step)

    def _auth_refusal(self, args: str) -> R.Reply | None:
        if self.security.portal is None:
            return R.Reply(502, "5.5.1", "AUTH not available")
        if not (self.greeted and self.esmtp):
            return R.Reply(503, "5.5.1", "Send EHLO first")
        if self.info.auth_user is not None:
            return R.Reply(503, "5.5.1", "Already authenticated")
        if self.stage is not Stage.IDLE:
            return R.Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not args:
            return R.Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        return None

    def _mechanism(self, name: str) -> Mechanism | None:
        if name == "PLAIN":
            return Plain()
        if name == "LOGIN":
            return Login()
        if name == "CRAM-MD5":
            return CramMD5(self.settings.hostname, self.clock.seconds())
        return None

    def _advance(self, mechanism: Mechanism, step: Step) -> Any:
        if isinstance(step, Challenge):
            self._exchange = mechanism
            self.start_reader(cast(Any, ResponseLine()))  # a reader like the data decoders
            return R.Reply(334, None, encode_challenge(step.data))
        assert isinstance(step, Done)
        return self._check(mechanism, step)

    def reader_finished(self, reader: Any) -> Any:
        if not isinstance(reader, ResponseLine):
            return super().reader_finished(reader)
        mechanism, self._exchange = self._exchange, None
        assert mechanism is not None
        if reader.too_long:
            return LINE_TOO_LONG
        try:
            step = mechanism.respond(decode_response(reader.line))
        except SASLError as error:
            return self._sasl_error(error)
        return self._advance(mechanism, step)

    def _sasl_error(self, error: SASLError) -> Any:
        return self._failed() if error.failure else error.reply

    def _check(self, mechanism: Mechanism, step: Done) -> Deferred[R.Reply]:
        portal = self.security.portal
        assert portal is not None
        d: Deferred[Any] = portal.login(step.credentials, None, IAuthenticatedUser)
        return d.addCallbacks(self._authenticated, self._rejected, (mechanism.name,))

    def _authenticated(self, login: tuple[Any, str, Callable[[], None]], mechanism: str) -> R.Reply:
        user = login[1]
        self.info = replace(self.info, auth_user=user)
        log.info("{listener}: [{peer}] authenticated as {user} with {mechanism}",
                 listener=self.info.listener, peer=self.info.peer_host, user=user,
                 mechanism=mechanism)
        return AUTH_OK

    def _rejected(self, failure: Failure) -> Any:
        if failure.check(UnauthorizedLogin):
            return self._failed()
        log.failure("authentication could not be checked", failure)
        return AUTH_TEMPFAIL

    def _failed(self) -> Deferred[R.Reply]:
        """535 after a delay that doubles per failure; the last allowed failure closes with 421.

        The Deferred holds back later pipelined input, so replies stay in order.
        """
        self._auth_failures += 1
        count = self._auth_failures
        log.info("{listener}: [{peer}] authentication failed ({count} of {limit})",
                 listener=self.info.listener, peer=self.info.peer_host, count=count,
                 limit=self.security.max_failures)
        delay = min(self.security.failure_delay * 2 ** (count - 1), MAX_FAILURE_DELAY)
        if count >= self.security.max_failures:
            return deferLater(self.clock, delay, self._give_up)
        return deferLater(self.clock, delay, lambda: AUTH_FAILED)

    def _give_up(self) -> R.Reply:
        self.clock.callLater(0, self.close)
        return TOO_MANY_FAILURES


# ----------------------------------------------------------------- who may use which sender


def _domain_key(domain: str) -> str:
    """Compare domains by their A-label, so bücher.example and xn--bcher-kva.example agree."""
    try:
        return domain.lower().encode("idna").decode("ascii")
    except UnicodeError:
        return domain.lower()


@dataclass(frozen=True)
class SenderRules:
    """The envelope senders each authenticated user may use (RFC 6409 §6.1).

    ``explicit`` maps a user to patterns: "addr@domain" for one address, "@domain" for any
    address in a domain. A user without an entry may use its own name if that is an address,
    or name@D for each local domain D. The null sender <> is always allowed.
    """

    explicit: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    local_domains: frozenset[str] = frozenset()

    def patterns(self, user: str) -> tuple[str, ...]:
        if user in self.explicit:
            return self.explicit[user]
        if "@" in user:
            return (user,)
        return tuple(f"{user}@{domain}" for domain in sorted(self.local_domains))

    def allows(self, user: str, sender: Mailbox | None) -> bool:
        if sender is None:
            return True
        local, domain = sender.local.lower(), _domain_key(sender.domain)
        for pattern in self.patterns(user):
            wanted_local, _, wanted_domain = pattern.lower().rpartition("@")
            if _domain_key(wanted_domain) == domain and wanted_local in ("", local):
                return True
        return False


class AuthenticatedSenders:
    """A listener's policy: the server's, plus the sender check for authenticated users.

    Everything but ``mail`` is the inner policy's, including any extra interfaces it provides
    (disconnect hooks and the like), so wrapping changes nothing else.
    """

    def __init__(self, rules: SenderRules, inner: IPolicy) -> None:
        self.rules = rules
        self.inner = inner
        alsoProvides(self, providedBy(inner))

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def mail(self, session: SessionInfo, sender: Mailbox | None, params: Any) -> Deferred[Verdict]:
        user = session.auth_user
        if user is not None and not self.rules.allows(user, sender):
            log.info("{listener}: [{peer}] user {user} may not send as <{sender}>",
                     listener=session.listener, peer=session.peer_host, user=user, sender=sender)
            return succeed(Verdict(Action.REJECT, SENDER_NOT_OWNED))
        return maybeDeferred(self.inner.mail, session, sender, params)


# ------------------------------------------------------------------------- the cred realm


class IAuthenticatedUser(Interface):
    """The avatar of a successful SMTP AUTH: the user name, as the user database spells it."""


@implementer(IRealm)
class SubmitterRealm:
    """An authenticated SMTP client is just a name; there is nothing else to hand out."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, str, Any]:
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("only IAuthenticatedUser avatars")
        return IAuthenticatedUser, str(avatarId), lambda: None

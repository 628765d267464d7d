"""spf: check the envelope sender (RFC 7208) with pyspf, fed with records from twisted.names.

pyspf evaluates synchronously and asks its own DNS code for records. Here it only gets records
we already fetched: every record it asks for and we do not have yet is noted, the evaluation
ends early with a temporary error, we fetch the noted records asynchronously, and evaluate
again. pyspf's own lookup limits bound the rounds, and the reactor never waits on DNS.

The result goes into the transaction notes (``notes.transaction["spf"]``, for dmarc) and the
Authentication-Results header; only with ``reject_fail`` does a "fail" refuse the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import spf as pyspf
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.names import dns

from mailplat import hooks
from mailplat.envelope import SessionInfo
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.replies import Reply

KEYS = ("reject_fail", "defer_temperror", "dns_timeout", "allow_clients")
QTYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "TXT": dns.TXT}
MAX_ROUNDS = 40  # far above what pyspf's 10-lookup limit needs; guards against surprises


@dataclass(frozen=True)
class Settings:
    reject_fail: bool = False
    defer_temperror: bool = False
    dns_timeout: float = 10.0
    allow_clients: tuple[common.Network, ...] = ()


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    result = Settings(
        reject_fail=o.get("reject_fail", common.flag, False),
        defer_temperror=o.get("defer_temperror", common.flag, False),
        dns_timeout=o.get("dns_timeout", common.duration, 10.0),
        allow_clients=o.get("allow_clients", common.networks, ()),
    )
    return result, o.problems


@dataclass(frozen=True)
class SPFResult:
    """What dmarc and the Authentication-Results header need from the check."""

    result: str  # pass fail softfail neutral none temperror permerror
    domain: str  # the domain checked: the sender's, or the HELO name for <>
    identity: str  # "mailfrom" or "helo"
    explanation: str = ""


class FedQuery(pyspf.query):  # type: ignore[misc]
    """A pyspf query that answers DNS questions from ``answers`` and notes what is missing."""

    def __init__(self, answers: dict[tuple[str, str], Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers = answers
        self.missing: set[tuple[str, str]] = set()

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Any:
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # as pyspf: an invalid name has no records
        key = (name, qtype)
        if key not in self.answers:
            self.missing.add(key)
            raise pyspf.TempError(f"waiting for {qtype} {name}")
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        if not answer and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return list(answer)


class SPFChecker:
    """Runs pyspf rounds until it asks for nothing new."""

    def __init__(self, resolver: Any, timeout: float) -> None:
        self.resolver = resolver
        self.timeout = timeout

    def check(self, ip: str, sender: str, helo: str) -> Deferred[tuple[str, str]]:
        """(result, explanation) for this client, sender ("" for <>) and HELO name."""
        answers: dict[tuple[str, str], Any] = {}
        first = self._round(answers, ip, sender, helo, 1)
        return first if isinstance(first, Deferred) else succeed(first)  # settled without DNS

    def _round(self, answers: dict[tuple[str, str], Any], ip: str, sender: str, helo: str,
               rounds: int) -> Deferred[tuple[str, str]] | tuple[str, str]:
        query = FedQuery(answers, i=ip, s=sender, h=helo, receiver="mailplat")
        result, _code, explanation = query.check()
        missing = query.missing - answers.keys()
        if not missing:
            return result, explanation
        if rounds >= MAX_ROUNDS:
            return "temperror", "too many DNS rounds"
        fetches = [self._fetch(answers, key) for key in sorted(missing)]
        d = gatherResults(fetches)
        return d.addCallback(lambda _: self._round(answers, ip, sender, helo, rounds + 1))

    def _fetch(self, answers: dict[tuple[str, str], Any], key: tuple[str, str]) -> Deferred[None]:
        name, qtype = key
        if qtype not in QTYPES:  # type 99 "SPF" is obsolete (RFC 7208 §3.1)
            answers[key] = []
            return succeed(None)
        d = common.lookup(self.resolver, name, QTYPES[qtype], self.timeout)

        def store(values: list[Any]) -> None:
            answers[key] = values

        def failed(failure: Any) -> None:
            answers[key] = pyspf.TempError(f"DNS {failure.getErrorMessage()}")

        return d.addCallbacks(store, failed)


class SPFPolicy(hooks.PolicyPlugin):
    """Checks at MAIL FROM; authenticated and allowlisted clients are not checked."""

    def __init__(self, settings: Settings, resolver: Any) -> None:
        self.settings = settings
        self.checker = SPFChecker(resolver, settings.dns_timeout)

    def mail(self, session: SessionInfo, sender: Any, params: Any) -> Deferred[Verdict]:
        address = common.client_address(session.peer_host)
        if (address is None or session.auth_user or hooks.is_allowlisted(session)
                or common.in_any(address, self.settings.allow_clients)):
            return succeed(CONTINUE)
        mailfrom = str(sender) if sender else ""
        d = self.checker.check(str(address), mailfrom, session.helo)
        return d.addCallback(self._verdict, session, mailfrom)

    def _verdict(self, outcome: tuple[str, str], session: SessionInfo, mailfrom: str) -> Verdict:
        import authres

        result, explanation = outcome
        identity = "mailfrom" if mailfrom else "helo"
        domain = common.domain_of(mailfrom) if mailfrom else session.helo.lower()
        hooks.notes(session).transaction["spf"] = SPFResult(result, domain, identity,
                                                            explanation)
        props = {"smtp_mailfrom": mailfrom} if mailfrom else {"smtp_helo": session.helo}
        hooks.record_result(session, authres.SPFAuthenticationResult(result=result, **props))
        if result == "fail" and self.settings.reject_fail:
            why = explanation or "not authorized"
            return Verdict(Action.REJECT, Reply(550, "5.7.23", f"SPF validation failed: {why}"))
        if result == "temperror" and self.settings.defer_temperror:
            return Verdict(Action.TEMPFAIL, Reply(451, "4.7.24", "SPF temporary error"))
        return CONTINUE


def make(section: dict[str, Any], context: PluginContext) -> SPFPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return SPFPolicy(result, context.resolver)

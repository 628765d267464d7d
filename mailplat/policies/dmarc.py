"""dmarc: apply the From: domain's DMARC policy (RFC 7489) to the SPF and DKIM results.

It runs at the end of data and must come after spf and dkim in ``[plugins] order``: it reads
their results from the transaction notes. The message passes if SPF passed for an aligned
MAIL FROM domain or a DKIM signature of an aligned domain verified (relaxed alignment compares
organizational domains, found with the Public Suffix List of the publicsuffixlist package).
A failing message of a domain whose policy is "reject" is refused with 550 5.7.1 unless
``enforce = false``; "quarantine" and "none" are only recorded in Authentication-Results.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.names import dns

from mailplat import hooks
from mailplat.envelope import SessionInfo, Transaction
from mailplat.interfaces import CONTINUE, Action, PluginContext, Verdict
from mailplat.policies import common
from mailplat.policies.dkim import from_domain
from mailplat.replies import Reply

log = Logger()
KEYS = ("enforce", "dns_timeout")
POLICIES = ("none", "quarantine", "reject")
_psl: Any = None


@dataclass(frozen=True)
class Settings:
    enforce: bool = True
    dns_timeout: float = 10.0


def settings(section: dict[str, Any]) -> tuple[Settings, common.Problems]:
    o = common.Options(section, KEYS)
    result = Settings(
        enforce=o.get("enforce", common.flag, True),
        dns_timeout=o.get("dns_timeout", common.duration, 10.0),
    )
    return result, o.problems


def organizational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 §3.2): one label below the public suffix."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()
    return str(_psl.privatesuffix(domain) or domain)


def aligned(domain: str, from_domain: str, strict: bool) -> bool:
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if strict:
        return domain == from_domain
    return bool(domain) and organizational_domain(domain) == organizational_domain(from_domain)


@dataclass(frozen=True)
class Record:
    """The tags of a DMARC record that decide the outcome."""

    p: str
    sp: str
    adkim_strict: bool
    aspf_strict: bool
    pct: int


def parse_record(text: str) -> Record | None:
    """A DMARC record, or None if it is not a valid one (then there is no policy)."""
    tags = {}
    for part in text.split(";"):
        tag, eq, value = part.partition("=")
        if eq:
            tags[tag.strip().lower()] = value.strip()
    if tags.get("v") != "DMARC1" or tags.get("p", "").lower() not in POLICIES:
        return None
    p = tags["p"].lower()
    sp = tags.get("sp", p).lower()
    pct = tags.get("pct", "100")
    return Record(
        p=p,
        sp=sp if sp in POLICIES else p,
        adkim_strict=tags.get("adkim", "r").lower() == "s",
        aspf_strict=tags.get("aspf", "r").lower() == "s",
        pct=min(100, int(pct)) if pct.isdigit() else 100,
    )


class DMARCPolicy(hooks.PolicyPlugin):
    """Evaluates incoming mail; outgoing (authenticated or trusted) mail is not checked."""

    def __init__(self, settings: Settings, context: PluginContext,
                 chance: Any = random.random) -> None:
        self.settings = settings
        self.resolver = context.resolver
        self.trusted = common.networks(list(context.trusted_networks))
        self.chance = chance

    def data(
        self, session: SessionInfo, transaction: Transaction, headers: bytes
    ) -> Deferred[Verdict]:
        address = common.client_address(session.peer_host)
        if (session.auth_user or hooks.is_allowlisted(session)
                or common.in_any(address, self.trusted)):
            return succeed(CONTINUE)
        domain = from_domain(headers)
        if not domain:
            return succeed(CONTINUE)
        d = self._find_record(domain)
        return d.addCallbacks(self._evaluate, self._temperror,
                              callbackArgs=(session, domain), errbackArgs=(session, domain))

    def _find_record(self, domain: str) -> Deferred[tuple[Record | None, bool]]:
        """(record, found at the organizational domain rather than the From: domain)."""
        org = organizational_domain(domain)

        def at_org(record: Record | None) -> Any:
            if record is not None or org == domain:
                return record, False
            return self._lookup(org).addCallback(lambda r: (r, True))

        return self._lookup(domain).addCallback(at_org)

    def _lookup(self, domain: str) -> Deferred[Record | None]:
        d = common.lookup(self.resolver, f"_dmarc.{domain}", dns.TXT, self.settings.dns_timeout)

        def pick(values: list[list[bytes]]) -> Record | None:
            texts = [t for t in common.txt_strings(values) if t.startswith("v=DMARC1")]
            return parse_record(texts[0]) if len(texts) == 1 else None

        return d.addCallback(pick)

    def _evaluate(self, found: tuple[Record | None, bool], session: SessionInfo,
                  domain: str) -> Verdict:
        record, inherited = found
        if record is None:
            return self._record(session, "none", domain, None)
        passed = self._passes(session, domain, record)
        policy = record.sp if inherited else record.p
        if passed:
            return self._record(session, "pass", domain, policy)
        if self.chance() * 100 >= record.pct:  # pct sampling (RFC 7489 §6.6.4)
            policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)
        verdict = self._record(session, "fail", domain, policy)
        if policy == "reject" and self.settings.enforce:
            return Verdict(Action.REJECT, Reply(
                550, "5.7.1", f"Unauthenticated mail from {domain} refused by its DMARC policy"))
        return verdict

    def _passes(self, session: SessionInfo, domain: str, record: Record) -> bool:
        notes = hooks.notes(session).transaction
        spf = notes.get("spf")
        if spf is not None and spf.result == "pass" and spf.identity == "mailfrom" and aligned(
            spf.domain, domain, record.aspf_strict
        ):
            return True
        return any(r.result == "pass" and aligned(r.domain, domain, record.adkim_strict)
                   for r in notes.get("dkim", []))

    def _temperror(self, failure: Any, session: SessionInfo, domain: str) -> Verdict:
        failure.trap(common.DNSTemporaryError)
        return self._record(session, "temperror", domain, None)

    def _record(self, session: SessionInfo, result: str, domain: str,
                policy: str | None) -> Verdict:
        from authres.dmarc import DMARCAuthenticationResult

        hooks.notes(session).transaction["dmarc"] = (result, policy)
        hooks.record_result(session, DMARCAuthenticationResult(
            result=result, header_from=domain, policy=policy))
        return CONTINUE


def make(section: dict[str, Any], context: PluginContext) -> DMARCPolicy:
    result, problems = settings(section)
    if problems:
        raise ValueError(problems)
    return DMARCPolicy(result, context)

"""The policy: a data hook that reads the Subject, plus two queue-event hooks."""

from __future__ import annotations

import re
from email.parser import BytesHeaderParser
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailplat.hooks import PolicyPlugin
from mailplat.interfaces import CONTINUE, Action, Verdict
from mailplat.replies import Reply

REFUSED = Reply(550, "5.7.1", "Message refused by subject filter")


def check(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems in [plugin.subject-filter]: (key, message) pairs."""
    problems = [(key, "unknown key") for key in config if key != "patterns"]
    patterns = config.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        return problems + [("patterns", "must be a list of regular expressions")]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(("patterns", f"{pattern!r}: {error}"))
    return problems


class SubjectFilter(PolicyPlugin):
    """Only the hooks it needs are overridden; PolicyPlugin answers CONTINUE to the rest."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [re.compile(p) for p in patterns]
        self.counts = {"delivered": 0, "bounced": 0}

    def data(self, session: Any, transaction: Any, headers: bytes) -> Deferred[Verdict]:
        subject = str(BytesHeaderParser().parsebytes(headers + b"\r\n").get("Subject", ""))
        if any(p.search(subject) for p in self.patterns):
            return succeed(Verdict(Action.REJECT, REFUSED))
        return succeed(Verdict(Action.CONTINUE, add_headers=("X-Subject-Filter: passed",)))

    def delivered(self, envelope: Any, recipient: Any, reply: Any) -> None:
        self.counts["delivered"] += 1

    def bounced(self, envelope: Any, recipient: Any, reply: Any) -> None:
        self.counts["bounced"] += 1


__all__ = ["CONTINUE", "SubjectFilter", "check"]

"""The benchmark scenarios of issue 8, full size and ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass, replace

KB = 1024
MB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    """``messages`` of ``size`` payload bytes over ``sessions`` concurrent SMTP sessions.

    ``idle`` scenarios first hold ``sessions`` connections open without sending anything, then
    send one message on each.
    """

    key: str
    title: str
    sessions: int
    messages: int
    size: int
    idle: bool = False

    @property
    def time_limit(self) -> float:
        """Seconds the load (and, separately, the delivery) may take before we give up."""
        return 120.0 + self.messages * (0.05 + self.size / 2e6)


SCENARIOS = [
    Scenario("a", "1 session, 2000 x 1 KB", 1, 2000, 1 * KB),
    Scenario("b", "8 sessions, 4000 x 1 KB", 8, 4000, 1 * KB),
    Scenario("c", "50 sessions, 4000 x 1 KB", 50, 4000, 1 * KB),
    Scenario("d", "4 sessions, 200 x 1 MB", 4, 200, 1 * MB),
    Scenario("e", "1 message of 100 MB", 1, 1, 100 * MB),
    Scenario("f", "1000 idle connections, then 1 KB on each", 1000, 1000, 1 * KB, idle=True),
]

# Small counts for a sanity run in well under a minute per server.
QUICK = {"a": 200, "b": 400, "c": 400, "d": 20, "f": 100}


def quick(scenario: Scenario) -> Scenario:
    if scenario.key == "e":
        return replace(scenario, size=10 * MB, title="1 message of 10 MB")
    count = QUICK[scenario.key]
    if scenario.idle:
        return replace(scenario, sessions=count, messages=count,
                       title=f"{count} idle connections, then 1 KB on each")
    title = scenario.title.replace(str(scenario.messages), str(count), 1)
    return replace(scenario, messages=count, title=title)


def select(keys: str, is_quick: bool) -> list[Scenario]:
    """The scenarios named by ``keys`` (e.g. "abc"), in the order of the issue."""
    unknown = set(keys) - {s.key for s in SCENARIOS}
    if unknown:
        raise ValueError(f"unknown scenario(s): {''.join(sorted(unknown))}; use letters a-f")
    chosen = [s for s in SCENARIOS if s.key in keys]
    return [quick(s) for s in chosen] if is_quick else chosen


def message_size_limit(scenarios: list[Scenario]) -> int:
    """A size limit both servers get: twice the biggest payload, headers leave room."""
    return max(64 * MB, 2 * max(s.size for s in scenarios))

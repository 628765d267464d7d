"""Benchmark mailplat (and, with ``--compare postfix``, a throwaway Postfix) with smtp-source.

    python benchmarks/run.py --quick                 # a fast sanity run, mailplat only
    python benchmarks/run.py --compare postfix       # the full comparison of issue 8

Prints a table, writes results.json and results.png into --output. See docs/performance.rst.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
from typing import Any

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "mailplat" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402
from benchmarks.load import find_smtp_source  # noqa: E402
from benchmarks.mailplat_setup import REPO, MailplatServer, build_compiled_parts  # noqa: E402
from benchmarks.measure import raise_fd_limit  # noqa: E402
from benchmarks.postfix_setup import POSTFIX, PostfixServer  # noqa: E402
from benchmarks.runner import run_scenario  # noqa: E402
from benchmarks.scenarios import MB, Scenario, select  # noqa: E402
from benchmarks.workspace import make_root  # noqa: E402

MESSAGE_SIZE_LIMIT = 200 * MB  # both servers, every scenario: room for (e)'s 100 MB
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=["postfix"], help="also run Postfix, alternately")
    parser.add_argument("--quick", action="store_true", help="small counts: a sanity run")
    parser.add_argument("--scenarios", default="abcdef", help="which scenarios, e.g. abc")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario and server; "
                        "the table shows medians")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="directory for results.json "
                        "and results.png (default: benchmarks/results)")
    parser.add_argument("--workdir", default=None, help="where the servers' throwaway queues "
                        "and Maildirs go (default: the system temp dir); use a real disk")
    parser.add_argument("--source", default=REPO, help="the checkout whose mailplat is "
                        "measured (default: this one), e.g. a git worktree of another commit")
    parser.add_argument("--baseline", metavar="DIR", default=None, help="also run the mailplat "
                        "of another checkout (e.g. a git worktree of the previous release), "
                        "alternately, as server \"baseline\": before/after in one run")
    parser.add_argument("--receivers", default="0",
                        help="mailplat's receiver processes (config key receivers; default 0, as the daemon): a number, or "
                        "auto = one per CPU beyond the first (default)")
    parser.add_argument("--baseline-receivers", type=int, default=0,
                        help="the same for --baseline (an older checkout may not know the key)")
    parser.add_argument("--py-spy", metavar="DIR", default=None,
                        help="record py-spy collapsed stacks of mailplat per scenario into DIR")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be between 1 and 20")
    return args


def preflight(args: argparse.Namespace) -> str:
    """Everything a fresh machine may lack, checked before any server starts."""
    smtp_source = find_smtp_source()
    if args.compare == "postfix":
        if not os.path.exists(POSTFIX):
            raise SystemExit("postfix not found; install it with\n"
                             "    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix")
        if os.geteuid() != 0:
            raise SystemExit("--compare postfix must run as root (postfix start needs it)")
    for checkout in (args.source, args.baseline):
        if checkout:
            build_compiled_parts(os.path.abspath(checkout))
    limit = raise_fd_limit()
    if limit < 2500:
        print(f"warning: only {limit} file descriptors; scenario (f) needs > 2000", file=sys.stderr)
    return smtp_source


def receiver_count(setting: str) -> int:
    """``auto``: the cores beyond the one the main process keeps busy."""
    if setting == "auto":
        return max(0, (os.cpu_count() or 1) - 1)
    return int(setting)


def servers_for(args: argparse.Namespace, round_number: int) -> list[Any]:
    """The servers for one scenario round; their order alternates from round to round."""
    receivers = receiver_count(args.receivers)
    servers: list[Any] = [MailplatServer(MESSAGE_SIZE_LIMIT, os.path.abspath(args.source),
                                         receivers=receivers)]
    if args.baseline:
        baseline = MailplatServer(MESSAGE_SIZE_LIMIT, os.path.abspath(args.baseline),
                                  receivers=args.baseline_receivers)
        baseline.name = "baseline"
        servers.append(baseline)
    if args.compare == "postfix":
        servers.append(PostfixServer(MESSAGE_SIZE_LIMIT))
    return servers if round_number % 2 == 0 else servers[::-1]


def run_all(
    args: argparse.Namespace, scenarios: list[Scenario], smtp_source: str, root: str
) -> list[dict[str, Any]]:
    results = []
    for repeat in range(args.repeat):
        for index, scenario in enumerate(scenarios):
            # Each scenario swaps the order from one repeat to the next (and neighbouring
            # scenarios start differently): with a counter over all rounds, an even number
            # of scenarios gave each one the same order in every repeat, and whichever
            # server runs second in (b) loses up to 25 % on this machine.
            for server in servers_for(args, repeat + index):
                print(f"[{repeat + 1}/{args.repeat}] ({scenario.key}) {scenario.title}: "
                      f"{server.name} ...", file=sys.stderr, flush=True)
                result = run_scenario(server, scenario, smtp_source, root, args.py_spy,
                                      keep_files=True)
                result["repeat"] = repeat
                print("    " + _one_line(result), file=sys.stderr, flush=True)
                results.append(result)
    return results


def _one_line(result: dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"FAILED: {result.get('error')}"
    return (f"accepted {result['accepted_per_s']:.1f}/s, delivered {result['delivered_per_s']:.1f}/s, "
            f"cpu {result['cpu_ms_per_msg']:.2f} ms/msg, peak RSS {result['peak_rss_mb']:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        scenarios = select(args.scenarios, args.quick)
    except ValueError as e:
        raise SystemExit(str(e))
    smtp_source = preflight(args)
    workdir = args.workdir or os.environ.get("TMPDIR", "/tmp")
    machine = report.machine_info(workdir)
    if machine["filesystem"] in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is {machine['filesystem']}: fsync is free there, so the "
              "figures say nothing about a disk; pass --workdir", file=sys.stderr)
    root, machine["runs_spread_over_block_groups"] = make_root(workdir)
    started = datetime.datetime.now(datetime.timezone.utc)
    results: list[dict[str, Any]] = []
    try:
        results = run_all(args, scenarios, smtp_source, root)
    finally:
        if results and all(r["ok"] for r in results):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"the servers' files and logs are kept in {root}", file=sys.stderr)
    rows = report.summarize(results)
    print(report.table(rows))
    os.makedirs(args.output, exist_ok=True)
    command = "python benchmarks/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    document = {
        "date": started.isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": machine,
        "mailplat_receivers": receiver_count(args.receivers),
        "summary": rows,
        "ratios_delivered": report.ratios(rows),
        "ratios_delivered_baseline": report.ratios(rows, "baseline") if args.baseline else None,
        "runs": results,
    }
    report.write_json(os.path.join(args.output, "results.json"), document)
    subtitle = f"{started:%Y-%m-%d}, {machine['nproc']} x {machine['cpu_model']}"
    if not report.plot(os.path.join(args.output, "results.png"), rows, subtitle):
        print("matplotlib missing: no plot (pip install matplotlib, or '.[bench]')", file=sys.stderr)
    print(f"results in {args.output}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``mailplat queue``: the operator's view of the queue and commands for it (mailq, postqueue,
postsuper).

``list`` and ``show`` only read the queue directory, which is always safe: envelopes are
replaced by atomic renames, so a reader sees the old or the new one, never half of either.
Everything that changes the queue is sent to the running daemon over its control socket
(mailplat.control) and carried out there, so it never races a delivery. With ``--offline``
(only when the daemon is stopped) hold, release and delete change the directory directly.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

from mailplat import config as configuration
from mailplat import control
from mailplat.dsn import header_section
from mailplat.envelope import Envelope, Recipient
from mailplat.queue import StoredMessage, domain_of
from mailplat.store import DEFERRED, HOLD, STATES, QueueStore

SHOW_HEADER_LIMIT = 64 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``queue`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help="the server's TOML config (default: the embedded default)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the daemon (default 120)")
    common.add_argument("--offline", action="store_true",
                        help="the daemon is stopped: change the queue directory directly")
    parser = subparsers.add_parser(
        "queue", help="list, inspect and manage the mail queue",
        description="List and inspect queued mail, and tell the running daemon to retry, hold, "
        "release, delete or return messages. See docs/queue.rst.",
    )
    commands = parser.add_subparsers(dest="queue_command", metavar="COMMAND")
    commands.required = True
    listing = commands.add_parser("list", parents=[common], help="every queued message (mailq)")
    listing.add_argument("--domain", help="only messages with a recipient at DOMAIN (e.g. "
                         "what waits for an ODMR site)")
    listing.set_defaults(run=run_list)
    show = commands.add_parser("show", parents=[common], help="one message in detail")
    show.add_argument("queue_id", metavar="ID")
    show.set_defaults(run=run_show)
    flush = commands.add_parser("flush", parents=[common], help="retry now")
    flush.add_argument("queue_id", metavar="ID", nargs="?")
    flush.add_argument("--domain", help="only recipients at DOMAIN")
    flush.set_defaults(run=run_flush)
    for name, text in (("hold", "keep a message until released"),
                       ("release", "put a held message back into the queue"),
                       ("bounce", "give up and return a message to its sender now")):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("queue_id", metavar="ID")
        sub.set_defaults(run=run_command, action=name)
    delete = commands.add_parser("delete", parents=[common], help="remove messages for good")
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", metavar="ID", nargs="?")
    which.add_argument("--all-deferred", action="store_true", help="every deferred message")
    delete.set_defaults(run=run_command, action="delete")


def _load(args: argparse.Namespace) -> configuration.Config | None:
    try:
        return configuration.load_config(args.config)
    except configuration.ConfigError as error:
        for problem in error.problems:
            print(problem, file=args.err)
        return None


def _store(args: argparse.Namespace, config: configuration.Config) -> QueueStore | None:
    if not os.path.isdir(config.queue_dir):
        print(f"mailplat: no queue directory at {config.queue_dir}", file=args.err)
        return None
    return QueueStore(config.queue_dir)


def read_queue(store: QueueStore) -> list[tuple[str, Envelope]]:
    """Every message with its state, oldest first; messages vanishing meanwhile are skipped."""
    found: dict[str, tuple[str, Envelope]] = {}
    for state in STATES:
        for qid in store.list_ids(state):
            if qid in found:
                continue
            try:
                found[qid] = store.read_envelope(qid)
            except (OSError, ValueError, TypeError, KeyError):
                continue
    return [found[qid] for qid in sorted(found)]


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + "Z"


def _summary(state: str, env: Envelope) -> dict[str, Any]:
    """What ``list --json`` says about a message."""
    return {
        "queue_id": env.queue_id, "state": state, "size": env.size,
        "arrival": env.received_at, "sender": env.sender,
        "recipients": [
            {key: getattr(r, key) for key in
             ("address", "state", "attempts", "next_attempt", "last_reply")}
            for r in env.recipients
        ],
    }


def _recipient_line(r: Recipient) -> str:
    line = f"    <{r.address}>  {r.state}"
    if r.attempts:
        line += f", {r.attempts} attempt{'s' if r.attempts != 1 else ''}"
    if r.state == "deferred":
        line += f", next {_when(r.next_attempt)}"
    elif r.state == "held":  # an ODMR site's mail, waiting for the site (docs/odmr.rst)
        line += f", waiting for its site; next check {_when(r.next_attempt)}"
    if r.last_reply and r.state != "delivered":
        line += f"\n        ({r.last_reply})"
    return line


def run_list(args: argparse.Namespace) -> int:
    """Like mailq: one block per message, recipients with their state and last error."""
    config = _load(args)
    store = _store(args, config) if config else None
    if store is None:
        return 1
    messages = read_queue(store)
    if args.domain:
        domain = args.domain.lower()
        messages = [(s, e) for s, e in messages
                    if any(domain_of(r.address) == domain for r in e.recipients)]
    if args.json:
        json.dump({"messages": [_summary(s, e) for s, e in messages]}, args.out, indent=2)
        print(file=args.out)
        return 0
    if not messages:
        print("Mail queue is empty", file=args.out)
        return 0
    for state, env in messages:
        print(f"{env.queue_id}  {state:<8}  {env.size:>9} bytes  {_when(env.received_at)}  "
              f"<{env.sender}>", file=args.out)
        for recipient in env.recipients:
            print(_recipient_line(recipient), file=args.out)
    total = sum(env.size for _, env in messages)
    count = len(messages)
    print(f"-- {count} message{'s' if count != 1 else ''}, {total} bytes", file=args.out)
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Envelope, every recipient's history, and the message's header section."""
    config = _load(args)
    store = _store(args, config) if config else None
    if store is None:
        return 1
    try:
        state, env = store.read_envelope(args.queue_id)
        with StoredMessage(env, store.data_path(env.queue_id)).open() as f:
            headers = header_section(f)[:SHOW_HEADER_LIMIT].decode("utf-8", "replace")
    except FileNotFoundError:
        print(f"mailplat: {args.queue_id}: no such message in the queue", file=args.err)
        return 1
    if args.json:
        json.dump({"state": state, "envelope": asdict(env), "headers": headers}, args.out,
                  indent=2)
        print(file=args.out)
        return 0
    print(_describe(state, env) + "\nHeaders:\n" + headers.replace("\r\n", "\n"), file=args.out)
    return 0


def _describe(state: str, env: Envelope) -> str:
    s = env.session
    lines = [
        f"Queue ID:   {env.queue_id}", f"State:      {state}", f"Size:       {env.size} bytes",
        f"Arrival:    {_when(env.received_at)}", f"Sender:     <{env.sender}>",
        f"From:       {s.helo or '-'} [{s.peer_host or 'local'}] {s.protocol} "
        f"(listener {s.listener or '-'})",
        f"DSN:        ENVID={env.envid or '-'} RET={env.ret or '-'}; "
        f"delay warning {'sent' if env.delay_notified else 'not sent'}",
        f"Body:       {env.body or '7BIT'}{', SMTPUTF8' if env.smtputf8 else ''}",
        "Recipients:",
    ]
    for r in env.recipients:
        extras = f" ORCPT={r.orcpt}" if r.orcpt else ""
        extras += f" NOTIFY={','.join(r.notify)}" if r.notify else ""
        lines.append(_recipient_line(r) + (f"\n       {extras}" if extras else ""))
        lines.extend(f"        {_history(entry)}" for entry in r.history)
    return "\n".join(lines)


def _history(entry: str) -> str:
    """History entries start with the attempt's time in seconds; show it as a date."""
    when, _, rest = entry.partition(" ")
    try:
        return f"{_when(float(when))} {rest}"
    except ValueError:
        return entry


COMMANDS = {"hold": control.Hold, "release": control.Release, "bounce": control.Bounce,
            "delete": control.Delete}
DONE = {"hold": "placed on hold", "release": "released", "bounce": "returned to its sender",
        "delete": "deleted"}


def run_flush(args: argparse.Namespace) -> int:
    args.action = "flush"
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Ask the daemon (or, with --offline, the directory) to change the queue."""
    config = _load(args)
    if config is None:
        return 1
    try:
        count = (_offline(args, config) if args.offline else _ask_daemon(args, config))
    except control.NoDaemon as error:
        print(f"mailplat: {error}; if the server is stopped, use --offline "
              "(hold, release and delete only)", file=args.err)
        return 1
    except control.ControlError as error:
        print(f"mailplat: {error}", file=args.err)
        return 1
    return _report(args, count)


def _ask_daemon(args: argparse.Namespace, config: configuration.Config) -> int:
    path, timeout = config.control_socket, args.timeout
    if args.action == "flush":
        arguments = {k: v for k, v in (("queue_id", args.queue_id), ("domain", args.domain)) if v}
        return int(control.call(path, control.Flush, timeout, **arguments)["count"])
    if args.action == "delete" and args.all_deferred:
        return int(control.call(path, control.DeleteDeferred, timeout)["count"])
    return int(control.call(path, COMMANDS[args.action], timeout, queue_id=args.queue_id)["count"])


def _offline(args: argparse.Namespace, config: configuration.Config) -> int:
    """Direct renames and unlinks; the daemon's recovery at its next start accepts them."""
    if args.action not in ("hold", "release", "delete"):
        raise control.ControlError(f"{args.action} needs the running daemon")
    store = QueueStore(config.queue_dir)
    ids = store.list_ids(DEFERRED) if getattr(args, "all_deferred", False) else [args.queue_id]
    count = 0
    for qid in ids:
        state = store.state_of(qid)
        if state is None or (args.action == "release" and state != HOLD):
            continue
        if args.action == "delete":
            store.remove(qid)
        else:
            store.move(qid, state, HOLD if args.action == "hold" else DEFERRED)
        count += 1
    return count


def _report(args: argparse.Namespace, count: int) -> int:
    """Say what happened; a command about one message that found none fails."""
    qid = getattr(args, "queue_id", None)
    if args.json:
        json.dump({"command": args.action, "queue_id": qid, "count": count}, args.out)
        print(file=args.out)
    elif args.action == "flush" or qid is None:
        verb = "to be tried now" if args.action == "flush" else "deleted"
        print(f"{count} message{'s' if count != 1 else ''} {verb}", file=args.out)
    elif count:
        print(f"{qid}: {DONE[args.action]}", file=args.out)
    if qid is not None and not count:
        print(f"mailplat: {qid}: no such message (or not in a state for {args.action})",
              file=args.err)
        return 1
    return 0

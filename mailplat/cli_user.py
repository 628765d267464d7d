"""``mailplat user add|passwd|del|list``: manage the SMTP AUTH user database.

Passwords are read from the terminal (asked twice) or, when stdin is not a terminal, from its
first line; never from the command line, where other users could see them in ``ps``. The
running server notices the changed file by itself.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

from mailplat import config

ACTIONS = ("add", "passwd", "del", "list")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "user", help="add, change, delete or list SMTP AUTH users",
        description="Manage the users who may authenticate (SMTP AUTH) to submit and relay mail. "
        "The password is asked for on the terminal, or read from the first line of stdin.",
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("name", nargs="?", help="the user name (usually a mail address)")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="config whose [auth] users_file to edit (default: the embedded one)")
    parser.add_argument("--users-file", metavar="FILE", help="edit this users file instead")
    cram = parser.add_mutually_exclusive_group()
    cram.add_argument("--cram-md5", action="store_true",
                      help="also issue a new CRAM-MD5 secret for this user (printed once)")
    cram.add_argument("--no-cram-md5", action="store_true",
                      help="passwd: remove the user's CRAM-MD5 secret")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Do one action; problems are printed to stderr with status 1."""
    from mailplat.userdb import UserDB, UserError

    try:
        db = UserDB(_users_file(args))
        if args.action == "list":
            return _list(db, args.out)
        if not args.name:
            raise UserError(f"'mailplat user {args.action}' needs a user name")
        return _change(db, args)
    except (UserError, config.ConfigError, OSError) as error:
        print(f"mailplat user: {error}", file=args.err)
        return 1


def _users_file(args: argparse.Namespace) -> str:
    if args.users_file:
        return str(args.users_file)
    from mailplat.listener_security import auth_config

    return auth_config(config.load_config(args.config)).users_file


def _list(db: object, out: TextIO) -> int:
    from mailplat.userdb import UserDB

    assert isinstance(db, UserDB)
    for name, user in sorted(db.users().items()):
        print(f"{name}{' (CRAM-MD5)' if user.cram_secret else ''}", file=out)
    return 0


def _change(db: object, args: argparse.Namespace) -> int:
    from mailplat.userdb import UserDB

    assert isinstance(db, UserDB)
    secret: bytes | None = None
    if args.action == "del":
        db.delete(args.name)
        print(f"deleted {args.name.lower()}", file=args.out)
        return 0
    password = read_password(getattr(args, "stdin", None) or sys.stdin, args.err)
    if args.action == "add":
        secret = db.add(args.name, password, cram=args.cram_md5)
        print(f"added {args.name.lower()}", file=args.out)
    else:
        db.set_password(args.name, password)
        if args.cram_md5 or args.no_cram_md5:
            secret = db.set_cram(args.name, args.cram_md5)
        print(f"changed {args.name.lower()}", file=args.out)
    if secret:
        print(f"CRAM-MD5 secret (shown only now; use it as the password for CRAM-MD5): "
              f"{secret.decode('ascii')}", file=args.out)
    return 0


def read_password(stdin: TextIO, err: TextIO) -> bytes:
    """The new password: asked twice on a terminal, else the first line of ``stdin``."""
    from mailplat.userdb import UserError

    if stdin.isatty():
        first = getpass.getpass("Password: ", stream=err)
        if getpass.getpass("Again: ", stream=err) != first:
            raise UserError("the passwords do not match")
    else:
        first = stdin.readline().rstrip("\r\n")
    if not first:
        raise UserError("empty password")
    return first.encode("utf-8")

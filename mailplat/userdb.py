"""The SMTP AUTH user database: a text file of argon2 password hashes, and its cred checker.

One line per user, ``NAME:ARGON2-HASH:CRAM-SECRET``, written atomically with mode 0600 by
``mailplat user``. Names are case-insensitive (they are usually mail addresses) and stored
lowercased. The server re-reads the file when it changes, so users added take effect at once.

CRAM-MD5 needs the secret itself on the server (the client proves it knows it with an HMAC of a
random challenge), and a slow one-way hash cannot serve that. So CRAM-MD5 is opt-in per user,
with its own random secret stored (base64) beside the hash: whoever can read this file can log
in as those users by CRAM-MD5, but never learns their real password, which PLAIN and LOGIN check
against the argon2 hash only. Users without a CRAM secret cannot use CRAM-MD5 at all.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

RunInThread = Callable[..., "Deferred[Any]"]
HEADER = "# mailplat users: NAME:ARGON2-HASH:CRAM-MD5-SECRET (base64, empty = no CRAM-MD5)\n"


class UserError(ValueError):
    """A user name or operation the database refuses, with a message for the operator."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    cram_secret: bytes | None = None


def normal_name(name: str) -> str:
    """The stored form of a user name, or UserError saying why it cannot be one."""
    if not name or len(name) > 255:
        raise UserError("a user name has 1 to 255 characters")
    if ":" in name or any(char.isspace() or not char.isprintable() for char in name):
        raise UserError("a user name cannot contain ':', spaces or control characters")
    return name.lower()


CRAM_ALPHABET = string.ascii_letters + string.digits


def new_cram_secret() -> bytes:
    """A random secret for CRAM-MD5 (about 143 bits): letters and digits only, so it can be
    typed into a mail program or passed to a command line (never starts with "-")."""
    return "".join(secrets.choice(CRAM_ALPHABET) for _ in range(24)).encode("ascii")


def parse_line(line: str) -> User:
    """One ``NAME:ARGON2-HASH:CRAM-SECRET`` line; UserError or binascii.Error if malformed."""
    parts = line.split(":")
    if len(parts) != 3 or not parts[1].startswith("$argon2"):
        raise UserError("expected NAME:ARGON2-HASH:CRAM-SECRET")
    name, password_hash, cram = parts
    return User(normal_name(name), password_hash, base64.b64decode(cram, validate=True) or None)


def format_line(user: User) -> str:
    cram = base64.b64encode(user.cram_secret).decode("ascii") if user.cram_secret else ""
    return f"{user.name}:{user.password_hash}:{cram}\n"


class UserDB:
    """The users file: read (and re-read on change) by the server, edited by ``mailplat user``."""

    def __init__(self, path: str, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self.hasher = hasher or PasswordHasher()
        self._users: dict[str, User] = {}
        self._signature: tuple[int, int, int] | None = None
        self._dummy: str | None = None

    # -- reading ----------------------------------------------------------------------------

    def users(self) -> dict[str, User]:
        """All users, re-reading the file if it changed since the last call."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._users, self._signature = {}, None
            return self._users
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._users = self._read()
            self._signature = signature
        return self._users

    def _read(self) -> dict[str, User]:
        users: dict[str, User] = {}
        with open(self.path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                line = line.rstrip("\n")
                if not line.strip() or line.startswith("#"):
                    continue
                try:
                    user = parse_line(line)
                except (UserError, binascii.Error, ValueError):
                    log.warn("{path}:{line}: malformed user entry ignored", path=self.path,
                             line=number)
                    continue
                users[user.name] = user
        return users

    def get(self, name: str) -> User | None:
        try:
            return self.users().get(normal_name(name))
        except UserError:
            return None

    def has_cram_users(self) -> bool:
        """Whether CRAM-MD5 is worth advertising: some user has a CRAM secret."""
        return any(user.cram_secret for user in self.users().values())

    # -- checking -----------------------------------------------------------------------------

    def verify_password(self, name: str, password: bytes) -> bool:
        """Check ``name``'s password (slow on purpose: see ``verify``)."""
        return self.verify(self.get(name), password)

    def verify(self, user: User | None, password: bytes) -> bool:
        """Check a password against a user's hash; thread-safe, slow on purpose.

        Unknown users (None) cost as much as known ones, so timing does not reveal who exists.
        """
        stored = user.password_hash if user else self._dummy_hash()
        try:
            return self.hasher.verify(stored, password) and user is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self.hasher.hash(secrets.token_bytes(16))
        return self._dummy

    # -- editing (the CLI) -----------------------------------------------------------------

    def add(self, name: str, password: bytes, cram: bool = False) -> bytes | None:
        """Add a user; return the new CRAM-MD5 secret if one was asked for."""
        key = normal_name(name)
        users = dict(self.users())
        if key in users:
            raise UserError(f"user {key!r} already exists")
        secret = new_cram_secret() if cram else None
        users[key] = User(key, self.hasher.hash(password), secret)
        self._write(users)
        return secret

    def set_password(self, name: str, password: bytes) -> None:
        users = dict(self.users())
        user = self._existing(users, name)
        users[user.name] = replace(user, password_hash=self.hasher.hash(password))
        self._write(users)

    def set_cram(self, name: str, enabled: bool) -> bytes | None:
        """Give a user a fresh CRAM-MD5 secret (returned), or take it away."""
        users = dict(self.users())
        user = self._existing(users, name)
        secret = new_cram_secret() if enabled else None
        users[user.name] = replace(user, cram_secret=secret)
        self._write(users)
        return secret

    def delete(self, name: str) -> None:
        users = dict(self.users())
        del users[self._existing(users, name).name]
        self._write(users)

    def _existing(self, users: dict[str, User], name: str) -> User:
        user = users.get(normal_name(name))
        if user is None:
            raise UserError(f"no user {normal_name(name)!r}")
        return user

    def _write(self, users: dict[str, User]) -> None:
        """Replace the file atomically (tmp, fsync, rename), readable by its owner only."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".users.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write(HEADER)
                stream.writelines(format_line(users[name]) for name in sorted(users))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._signature = None


@implementer(ICredentialsChecker)
class UserDBChecker:
    """twisted.cred checker: PLAIN/LOGIN passwords and CRAM-MD5 responses against a UserDB.

    Password hashing is slow by design, so it runs through ``run_in_thread`` (the reactor's
    thread pool in the server, a synchronous stand-in in tests).
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, db: UserDB, run_in_thread: RunInThread | None = None) -> None:
        self.db = db
        self.run_in_thread = run_in_thread or _defer_to_thread

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[Any]:
        try:
            name = credentials.username.decode("utf-8")  # type: ignore[attr-defined]
            key = normal_name(name)
        except (UnicodeDecodeError, UserError):
            return fail(UnauthorizedLogin())
        user = self.db.get(key)  # here, not in the thread: the file is read by one thread only
        if IUsernamePassword.providedBy(credentials):
            password = credentials.password
            d = self.run_in_thread(self.db.verify, user, password)
            return d.addCallback(self._answer, key)
        if user is None or user.cram_secret is None:
            return fail(UnauthorizedLogin())
        ok = credentials.checkPassword(user.cram_secret)  # type: ignore[attr-defined]
        return succeed(key) if ok else fail(UnauthorizedLogin())

    def _answer(self, ok: bool, key: str) -> str:
        if not ok:
            raise UnauthorizedLogin()
        return key


def _defer_to_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    from twisted.internet import reactor, threads

    threaded = cast(Any, reactor)
    return threads.deferToThreadPool(threaded, threaded.getThreadPool(), f, *args)

"""The user database file, its cred checker and the ``mailplat user`` command."""

from __future__ import annotations

import hmac
import io
import os
import stat
from pathlib import Path

from argon2 import PasswordHasher
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailplat import cli
from mailplat.sasl import CramMD5Response
from mailplat.testing import run_synchronously
from mailplat.userdb import UserDB, UserDBChecker, UserError

# Cheap parameters keep the tests fast; the server uses argon2-cffi's defaults (RFC 9106).
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cram_answer(user: bytes, secret: bytes, challenge: bytes = b"<1.2@mx.test>") -> CramMD5Response:
    digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
    return CramMD5Response(user, challenge, digest)


class UserDBTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "users")
        self.db = UserDB(self.path, FAST)

    def test_missing_file(self) -> None:
        """No file means no users, not an error."""
        self.assertEqual(self.db.users(), {})
        self.assertFalse(self.db.verify_password("alice", b"pw"))

    def test_add_and_verify(self) -> None:
        """A user added can be verified with the password and not with another one."""
        self.db.add("Alice@Example.org", b"correct horse")
        self.assertTrue(self.db.verify_password("alice@example.org", b"correct horse"))
        self.assertTrue(self.db.verify_password("ALICE@example.ORG", b"correct horse"))
        self.assertFalse(self.db.verify_password("alice@example.org", b"Correct horse"))

    def test_file_is_private_and_hashed(self) -> None:
        """The file is mode 0600 and holds an argon2id hash, never the password."""
        self.db.add("alice", b"correct horse")
        text = Path(self.path).read_text()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIn("alice:$argon2id$", text)
        self.assertNotIn("correct horse", text)

    def test_duplicate(self) -> None:
        """Adding an existing user (in any case) is refused."""
        self.db.add("alice", b"pw")
        self.assertRaises(UserError, self.db.add, "ALICE", b"pw")

    def test_bad_names(self) -> None:
        """Names with ':' or spaces or controls, or empty names, are refused."""
        for name in ("", "a:b", "a b", "a\nb", "x" * 256):
            self.assertRaises(UserError, self.db.add, name, b"pw")

    def test_passwd_and_delete(self) -> None:
        """A changed password replaces the old one; a deleted user cannot log in."""
        self.db.add("alice", b"old")
        self.db.set_password("alice", b"new")
        self.assertFalse(self.db.verify_password("alice", b"old"))
        self.assertTrue(self.db.verify_password("alice", b"new"))
        self.db.delete("alice")
        self.assertFalse(self.db.verify_password("alice", b"new"))
        self.assertRaises(UserError, self.db.delete, "alice")

    def test_cram_secret(self) -> None:
        """CRAM-MD5 is opt-in: a random secret, stored apart from the password hash."""
        self.db.add("alice", b"pw")
        self.assertFalse(self.db.has_cram_users())
        secret = self.db.set_cram("alice", True)
        assert secret is not None
        self.assertGreaterEqual(len(secret), 20)
        self.assertTrue(self.db.has_cram_users())
        self.assertEqual(UserDB(self.path, FAST).get("alice").cram_secret, secret)  # type: ignore
        self.assertIsNone(self.db.set_cram("alice", False))
        self.assertFalse(self.db.has_cram_users())

    def test_sees_changes_made_elsewhere(self) -> None:
        """A running server's UserDB notices users added by another process."""
        other = UserDB(self.path, FAST)
        self.assertEqual(self.db.users(), {})
        other.add("bob", b"pw")
        self.assertEqual(list(self.db.users()), ["bob"])

    def test_malformed_lines_skipped(self) -> None:
        """A damaged line is skipped (and logged); the other users still work."""
        self.db.add("alice", b"pw")
        with open(self.path, "a") as stream:
            stream.write("garbage line\nbob:notahash:\n")
        self.assertEqual(list(UserDB(self.path, FAST).users()), ["alice"])


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = UserDB(os.path.join(self.mktemp(), "users"), FAST)
        self.db.add("alice", b"secret")
        self.cram = self.db.set_cram("alice", True)
        self.db.add("bob", b"hunter2")
        self.checker = UserDBChecker(self.db, run_synchronously)

    def test_interface(self) -> None:
        """The checker is a twisted.cred credentials checker."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_password(self) -> None:
        """The right password yields the stored user name as avatar id."""
        d = self.checker.requestAvatarId(UsernamePassword(b"ALICE", b"secret"))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_wrong_password_and_unknown_user(self) -> None:
        """A wrong password and an unknown user fail the same way."""
        for creds in (UsernamePassword(b"alice", b"nope"), UsernamePassword(b"eve", b"secret")):
            self.failureResultOf(self.checker.requestAvatarId(creds), UnauthorizedLogin)

    def test_cram(self) -> None:
        """CRAM-MD5 answers are checked against the user's CRAM secret."""
        assert self.cram is not None
        d = self.checker.requestAvatarId(cram_answer(b"alice", self.cram))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_cram_not_with_password(self) -> None:
        """The login password is not a CRAM-MD5 secret; users without a secret cannot use it."""
        for answer in (cram_answer(b"alice", b"secret"), cram_answer(b"bob", b"hunter2")):
            self.failureResultOf(self.checker.requestAvatarId(answer), UnauthorizedLogin)

    def test_bad_utf8_name(self) -> None:
        """A user name that is not UTF-8 fails cleanly."""
        d = self.checker.requestAvatarId(UsernamePassword(b"\xff", b"secret"))
        self.failureResultOf(d, UnauthorizedLogin)


class UserCommandTests(SynchronousTestCase):
    """``mailplat user``: passwords from stdin or the terminal, never from argv."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "users")

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        parser = cli.make_parser()
        args = parser.parse_args(["user", *argv, "--users-file", self.path])
        args.out, args.err, args.stdin = out, err, io.StringIO(stdin)
        return args.run(args), out.getvalue(), err.getvalue()

    def test_add_list_passwd_del(self) -> None:
        """The four actions work on the file the server reads."""
        self.assertEqual(self.run_cli("add", "Alice", stdin="pw one\n")[0], 0)
        status, out, _ = self.run_cli("add", "bob", "--cram-md5", stdin="pw two\n")
        self.assertEqual(status, 0)
        self.assertIn("CRAM-MD5 secret", out)
        self.assertEqual(self.run_cli("list")[1], "alice\nbob (CRAM-MD5)\n")
        self.assertEqual(self.run_cli("passwd", "alice", stdin="pw three\n")[0], 0)
        self.assertTrue(UserDB(self.path).verify_password("alice", b"pw three"))
        self.assertEqual(self.run_cli("del", "bob")[0], 0)
        self.assertEqual(self.run_cli("list")[1], "alice\n")

    def test_no_password_on_command_line(self) -> None:
        """There is no option that takes a password; an empty stdin is refused."""
        self.assertNotIn("password=", cli.make_parser().format_help())
        status, _, err = self.run_cli("add", "alice", stdin="")
        self.assertEqual((status, err), (1, "mailplat user: empty password\n"))

    def test_errors(self) -> None:
        """Unknown users and missing names are reported with status 1."""
        self.assertEqual(self.run_cli("del", "nobody")[0], 1)
        self.assertEqual(self.run_cli("add")[0], 1)

    def test_default_users_file_from_config(self) -> None:
        """Without --users-file the config's [auth] users_file is used."""
        config = Path(self.mktemp())
        config.write_text(f'[auth]\nusers_file = "{self.path}"\n[[listener]]\nname = "s"\n'
                          'endpoint = "tcp:0"\nprofile = "relay"\n[domains.localhost]\n'
                          'catch_all = true\n')
        out, err = io.StringIO(), io.StringIO()
        args = cli.make_parser().parse_args(["user", "add", "carol", "--config", str(config)])
        args.out, args.err, args.stdin = out, err, io.StringIO("pw\n")
        self.assertEqual(args.run(args), 0, err.getvalue())
        self.assertIn("carol", UserDB(self.path).users())


class CramSecretTests(SynchronousTestCase):
    def test_secret_is_safe_to_type(self) -> None:
        """Generated CRAM-MD5 secrets are 24 letters and digits: never a leading "-" that a
        command line (swaks, fetchmail -p) would take for an option."""
        from mailplat.userdb import new_cram_secret

        for _ in range(200):
            secret = new_cram_secret()
            self.assertEqual(len(secret), 24)
            self.assertTrue(secret.isalnum(), secret)

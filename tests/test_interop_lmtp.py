"""LMTP interop with real peers: Postfix's LMTP client (``smtp-source -L``) delivering to our LMTP
listener over TCP and a UNIX socket, and our LMTP agent delivering into a real Dovecot LMTP
server started with a throwaway config. Missing peer binaries fail these tests."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.client import State
from mailplat.envelope import Envelope, Recipient
from mailplat.interfaces import Route
from mailplat.lmtp_agent import LMTPAgent
from mailplat.queue import StoredMessage
from tests.daemon import Daemon, free_port, wait_for_files, wait_for_port, wait_until

SMTP_SOURCE = "/usr/sbin/smtp-source"
DOVECOT = "/usr/sbin/dovecot"
NOBODY = 65534
MESSAGE = (b"From: a@example.com\r\nTo: u@example.org\r\nSubject: lmtp interop\r\n\r\n"
           b".a line with a leading dot\r\nbody\r\n")
STORED_BY_DOVECOT = MESSAGE.replace(b"\r\n", b"\n")  # Dovecot's Maildir files end lines in LF


def require(path: str) -> None:
    """Interop peers are installed by .ci/run; without them the test fails, never skips."""
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is missing: install the Debian peers (see .ci/run)")


def short_tempdir(testcase: Any, prefix: str) -> str:
    """A directory under /tmp (UNIX socket paths must stay short), removed after the test."""
    path = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def smtp_source(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SMTP_SOURCE, "-L", *args], capture_output=True, timeout=60)


class PostfixClientTests(SynchronousTestCase):
    """Postfix's own LMTP client delivers to mailplat's LMTP listener."""

    def start(self, unix_path: str | None = None) -> Daemon:
        require(SMTP_SOURCE)
        extra = ""
        if unix_path:
            extra = f'[[listener]]\nname = "lmtp-unix"\nendpoint = "unix:{unix_path}"\n' \
                    'profile = "lmtp"\n'
        daemon = Daemon.started(self, listeners={"lmtp": "lmtp"}, extra_toml=extra)
        self.addCleanup(daemon.stop)
        return daemon

    def test_smtp_source_over_tcp(self) -> None:
        """Two parallel sessions, six messages of two recipients each: every message is in
        both Maildirs and nothing is left in the queue (LMTP never queues)."""
        daemon = self.start()
        done = smtp_source("-s", "2", "-m", "6", "-r", "2", "-f", "a@localhost",
                           "-t", "bob@localhost", "-S", "interop", f"127.0.0.1:{daemon.port}")
        self.assertEqual(done.returncode, 0, done.stderr)
        for user in ("bob", "2bob"):
            files = wait_for_files(daemon.maildir(user), 6)
            self.assertEqual(len(files), 6)
            with open(files[0], "rb") as f:
                parsed = email.message_from_bytes(f.read(), policy=email.policy.default)
            self.assertEqual(parsed["Subject"], "interop")
            self.assertIn("with LMTP", parsed["Received"])
        self.assertEqual(daemon.queue_files(), [])

    def test_smtp_source_over_unix_socket(self) -> None:
        """The same over a UNIX-domain socket, as Postfix's lmtp:unix: transport uses it."""
        path = os.path.join(short_tempdir(self, "mplmtp"), "lmtp.sock")
        daemon = self.start(unix_path=path)
        wait_until(lambda: os.path.exists(path), 10, f"{path} to exist")
        done = smtp_source("-m", "3", "-f", "a@localhost", "-t", "carol@localhost",
                           f"unix:{path}")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(wait_for_files(daemon.maildir("carol"), 3)), 3)

    def test_unknown_user_refused_at_rcpt(self) -> None:
        """An LMTP recipient we have no mailbox for is refused at RCPT, so Postfix (without
        -A) stops and reports the 550; nothing is delivered."""
        require(SMTP_SOURCE)
        daemon = Daemon.started(self, listeners={"lmtp": "lmtp"},
                                config={"domains": {"localhost": {"catch_all": False,
                                                                  "users": ["bob"]}}})
        self.addCleanup(daemon.stop)
        done = smtp_source("-f", "a@localhost", "-t", "nobody@localhost",
                           f"127.0.0.1:{daemon.port}")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"550", done.stdout + done.stderr)
        self.assertEqual(wait_for_files(daemon.maildir("nobody"), 0), [])


class Dovecot:
    """A Dovecot LMTP server on 127.0.0.1 with a throwaway config (DESIGN.md's recipe)."""

    def __init__(self, testcase: Any) -> None:
        require(DOVECOT)
        self.root = short_tempdir(testcase, "mpdv")
        os.chmod(self.root, 0o755)  # the mail user must reach its home below it
        self.mail = os.path.join(self.root, "mail")
        os.makedirs(self.mail)
        os.chown(self.mail, NOBODY, NOBODY)
        self.port = free_port()
        self.log = os.path.join(self.root, "dovecot.log")
        self.config = os.path.join(self.root, "dovecot.conf")
        with open(self.config, "w", encoding="ascii") as f:
            f.write(self._config())
        self.process: subprocess.Popen[bytes] | None = None
        testcase.addCleanup(self.stop)

    def _config(self) -> str:
        for sub in ("base", "state"):
            os.makedirs(os.path.join(self.root, sub))
        return f"""
protocols = lmtp
base_dir = {self.root}/base
state_dir = {self.root}/state
log_path = {self.log}
ssl = no
listen = 127.0.0.1
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={NOBODY} gid={NOBODY} home={self.mail}/%d/%n
}}
mail_location = maildir:~/Maildir
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
"""

    def start(self) -> None:
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", self.config],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, 15)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except FileNotFoundError:
            return "(no dovecot log)"

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def new(self, user: str, domain: str = "example.org") -> str:
        return os.path.join(self.mail, domain, user, "Maildir", "new")


async def close_agent(testcase: TestCase, agent: LMTPAgent, destination: str) -> None:
    """QUIT the agent's pooled connection and wait until it is really closed, so the test
    leaves the reactor clean."""
    clients = agent.pool.idle(destination)
    testcase.assertEqual(len(clients), 1)
    await agent.pool.close()
    for _ in range(200):  # at most 10 s
        if all(client.state is State.CLOSED for client in clients):
            return
        await deferLater(reactor, 0.05)
    testcase.fail("the pooled LMTP connection did not close")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class DovecotThroughQueueTests(SynchronousTestCase):
    """mailplat in front of Dovecot: SMTP in, queue, lmtp agent, Dovecot's Maildir."""

    def test_domain_delivered_by_dovecot(self) -> None:
        """Mail for a domain with ``lmtp = ...`` ends up in Dovecot's Maildirs, one copy per
        recipient, and leaves mailplat's queue."""
        dovecot = Dovecot(self)
        dovecot.start()
        domains = {"example.org": {"catch_all": True, "lmtp": dovecot.endpoint}}
        daemon = Daemon.started(self, config={"domains": domains})
        self.addCleanup(daemon.stop)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as smtp:
            refused = smtp.sendmail("a@example.com", ["u@example.org", "v@example.org"], MESSAGE)
        self.assertEqual(refused, {})
        for user in ("u", "v"):
            [path] = wait_for_files(dovecot.new(user), 1, timeout=20)
            self.assertTrue(read(path).endswith(STORED_BY_DOVECOT), dovecot.log_text())
        daemon.wait_queue_empty()


class DovecotAgentTests(TestCase):
    """The lmtp agent itself against Dovecot, on the real reactor."""

    async def test_two_messages_one_connection(self) -> None:
        """Two messages in a row reach Dovecot over one LMTP connection, byte-exact."""
        dovecot = Dovecot(self)
        dovecot.start()
        agent = LMTPAgent("mx.test", reactor, endpoint=dovecot.endpoint, idle_timeout=30)
        store = short_tempdir(self, "mpmsg")
        for number, user in enumerate(("u", "w")):
            outcome = await agent.deliver(*self.message(store, number, user))
            self.assertEqual(outcome[f"{user}@example.org"].code, 250, dovecot.log_text())
        self.assertEqual(agent.pool.connections_made, 1)
        await close_agent(self, agent, dovecot.endpoint)
        for user in ("u", "w"):
            [path] = wait_for_files(dovecot.new(user), 1)
            self.assertTrue(read(path).endswith(STORED_BY_DOVECOT))

    def message(self, directory: str, number: int, user: str) -> tuple[StoredMessage, Any]:
        path = os.path.join(directory, f"m{number}")
        with open(path, "wb") as f:
            f.write(MESSAGE)
        address = f"{user}@example.org"
        envelope = Envelope(f"Q{number}", "a@example.com", (Recipient(address),), 0.0,
                            size=len(MESSAGE))
        return StoredMessage(envelope, path), [(Recipient(address), Route("lmtp", "", address))]



class OwnServerTests(TestCase):
    """Our agent to our own LMTP listener over a real UNIX socket (no external peer)."""

    async def test_agent_to_our_listener(self) -> None:
        """The lmtp agent delivers to mailplat's LMTP listener on a UNIX socket; a refused
        recipient comes back 550 while the other is delivered."""
        path = os.path.join(short_tempdir(self, "mpown"), "lmtp.sock")
        daemon = Daemon(self.mktemp(),
                        config={"domains": {"localhost": {"catch_all": False,
                                                          "users": ["bob"]}}},
                        extra_toml=f'[[listener]]\nname = "lmtp"\nendpoint = "unix:{path}"\n'
                                   'profile = "lmtp"\n')
        daemon.in_process(self)
        agent = LMTPAgent("client.test", reactor, idle_timeout=1)
        message_path = os.path.join(short_tempdir(self, "mpmsg"), "m")
        with open(message_path, "wb") as f:
            f.write(MESSAGE)
        recipients = [Recipient("bob@localhost"), Recipient("eve@localhost")]
        envelope = Envelope("Q1", "a@example.com", tuple(recipients), 0.0, size=len(MESSAGE))
        pairs = [(r, Route("lmtp", f"unix:{path}", r.address)) for r in recipients]
        outcome = await agent.deliver(StoredMessage(envelope, message_path), pairs)
        self.assertEqual((outcome["bob@localhost"].code, outcome["eve@localhost"].code),
                         (250, 550))
        [delivered] = wait_for_files(daemon.maildir("bob"), 1)
        self.assertTrue(read(delivered).endswith(MESSAGE))
        await close_agent(self, agent, f"unix:{path}")

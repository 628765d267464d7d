"""``mailplat queue``: reading the queue directory, offline changes, and every command end to
end against a real running daemon (tests/daemon.py)."""

from __future__ import annotations

import email
import email.policy
import io
import json
import os
import shutil
import smtplib
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailplat import cli
from mailplat.envelope import Envelope, Recipient, SessionInfo
from mailplat.store import DEFERRED, HOLD, QueueStore
from mailplat.testing import run_synchronously
from tests.daemon import HOST, Daemon, delivered_body, wait_for_files, wait_until

MESSAGE = b"Subject: queued\r\nMessage-ID: <q1@localhost>\r\n\r\nhello\r\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``mailplat ARGV``, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def short_dir(testcase: Any) -> str:
    """A private directory with a short path, so a UNIX socket fits in it."""
    path = tempfile.mkdtemp(prefix="mpq", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class OfflineTests(SynchronousTestCase):
    """The commands that only read the queue directory, and --offline changes."""

    def setUp(self) -> None:
        self.root = short_dir(self)
        self.config = os.path.join(self.root, "mailplat.toml")
        Path(self.config).write_text(
            f'data_dir = "{self.root}/data"\n[[listener]]\nname = "smtp"\n'
            'endpoint = "tcp:0:interface=127.0.0.1"\nprofile = "relay"\n'
            '[domains.localhost]\ncatch_all = true\n'
        )
        self.store = QueueStore(f"{self.root}/data/queue", runInThread=run_synchronously)
        self.deferred = self.put(DEFERRED, Recipient(
            "bob@example.com", state="deferred", attempts=2, next_attempt=1_700_003_600.0,
            last_reply="451 4.2.0 Mailbox busy",
            history=("1700000000.000 smtp 451 4.2.0 Mailbox busy",)),
            Recipient("carol@example.net", state="delivered", attempts=1,
                      last_reply="250 2.0.0 Ok"))
        self.held = self.put(HOLD, Recipient("dave@example.org"))

    def put(self, state: str, *recipients: Recipient) -> str:
        qid = self.store.new_queue_id()
        with self.store.open_data_for_write(qid) as f:
            f.write(MESSAGE)
        env = Envelope(qid, "alice@localhost", recipients, received_at=1_700_000_000.0,
                       size=len(MESSAGE), envid="E1", ret="HDRS",
                       session=SessionInfo(peer_host="192.0.2.9", helo="c.test"))
        self.successResultOf(self.store.write_envelope(env, state))
        return qid

    def test_list(self) -> None:
        """list shows each message with state, size, arrival and sender, then each recipient
        with its state, attempts, next retry and last error, and a total."""
        status, out, err = run_cli("queue", "list", "-c", self.config)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"{self.deferred}  deferred         {len(MESSAGE)} bytes  "
                                   "2023-11-14 22:13:20Z  <alice@localhost>")
        self.assertEqual(lines[1], "    <bob@example.com>  deferred, 2 attempts, "
                                   "next 2023-11-14 23:13:20Z")
        self.assertEqual(lines[2], "        (451 4.2.0 Mailbox busy)")
        self.assertEqual(lines[3], "    <carol@example.net>  delivered, 1 attempt")
        self.assertTrue(lines[4].startswith(f"{self.held}  hold "))
        self.assertEqual(lines[-1], f"-- 2 messages, {2 * len(MESSAGE)} bytes")

    def test_list_json_and_domain(self) -> None:
        """--json gives every field for scripts; --domain keeps messages with a recipient
        there."""
        status, out, _ = run_cli("queue", "list", "--json", "--domain", "EXAMPLE.net",
                                 "-c", self.config)
        [message] = json.loads(out)["messages"]
        self.assertEqual((status, message["queue_id"], message["state"]),
                         (0, self.deferred, "deferred"))
        self.assertEqual(message["recipients"][0], {
            "address": "bob@example.com", "state": "deferred", "attempts": 2,
            "next_attempt": 1_700_003_600.0, "last_reply": "451 4.2.0 Mailbox busy"})

    def test_empty(self) -> None:
        """An empty queue says so, like mailq."""
        for qid in (self.deferred, self.held):
            self.store.remove(qid)
        self.assertEqual(run_cli("queue", "list", "-c", self.config),
                         (0, "Mail queue is empty\n", ""))

    def test_show(self) -> None:
        """show prints the envelope, DSN parameters, each recipient's history and the
        message's headers."""
        status, out, _ = run_cli("queue", "show", self.deferred, "-c", self.config)
        self.assertEqual(status, 0)
        self.assertIn("State:      deferred", out)
        self.assertIn("From:       c.test [192.0.2.9] ESMTP", out)
        self.assertIn("DSN:        ENVID=E1 RET=HDRS; delay warning not sent", out)
        self.assertIn("        2023-11-14 22:13:20Z smtp 451 4.2.0 Mailbox busy", out)
        self.assertTrue(out.endswith("Headers:\nSubject: queued\nMessage-ID: <q1@localhost>\n\n"))
        status, out, _ = run_cli("queue", "show", "--json", self.held, "-c", self.config)
        shown = json.loads(out)
        self.assertEqual((shown["state"], shown["envelope"]["queue_id"]), ("hold", self.held))
        self.assertEqual(shown["headers"], "Subject: queued\r\nMessage-ID: <q1@localhost>\r\n")

    def test_show_unknown(self) -> None:
        """show of an unknown id fails with a message."""
        status, out, err = run_cli("queue", "show", "0000", "-c", self.config)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("0000: no such message", err)

    def test_commands_need_the_daemon(self) -> None:
        """Without a daemon, changing commands fail and point at --offline."""
        status, _, err = run_cli("queue", "hold", self.deferred, "-c", self.config)
        self.assertEqual(status, 1)
        self.assertIn("no daemon is listening", err)
        self.assertIn("--offline", err)
        self.assertEqual(self.store.state_of(self.deferred), DEFERRED)

    def test_offline(self) -> None:
        """--offline holds, releases and deletes in the directory; flush and bounce refuse."""
        self.assertEqual(run_cli("queue", "hold", "--offline", self.deferred, "-c", self.config),
                         (0, f"{self.deferred}: placed on hold\n", ""))
        self.assertEqual(self.store.state_of(self.deferred), HOLD)
        self.assertEqual(run_cli("queue", "release", "--offline", self.held, "-c", self.config)[0],
                         0)
        self.assertEqual(self.store.state_of(self.held), DEFERRED)
        status, out, _ = run_cli("queue", "delete", "--offline", "--all-deferred", "--json",
                                 "-c", self.config)
        self.assertEqual(json.loads(out)["count"], 1)
        self.assertEqual(self.store.state_of(self.held), None)
        status, _, err = run_cli("queue", "flush", "--offline", "-c", self.config)
        self.assertEqual(status, 1)
        self.assertIn("flush needs the running daemon", err)


class DaemonTests(SynchronousTestCase):
    """Every command against a real ``twistd mailplat`` that is delivering at the time."""

    def setUp(self) -> None:
        self.daemon = Daemon.started(self, workdir=short_dir(self),
                                     config={"queue": {"retry_delay": "1h"}})
        self.config = self.daemon.config_path
        os.makedirs(os.path.join(self.daemon.maildir_root, "localhost"))

    def block(self, user: str) -> str:
        """Make ``user``'s Maildir impossible to create: deliveries to it get 451."""
        path = os.path.join(self.daemon.maildir_root, "localhost", user)
        Path(path).write_text("in the way\n")
        return path

    def send(self, *recipients: str) -> str:
        with smtplib.SMTP(HOST, self.daemon.port, local_hostname="client.test", timeout=10) as s:
            s.ehlo()
            s.mail("alice@localhost")
            for recipient in recipients:
                s.rcpt(recipient)
            code, text = s.data(MESSAGE)
        self.assertEqual(code, 250)
        return text.decode().rsplit(" ", 1)[-1]

    def queue(self, *argv: str) -> tuple[int, str, str]:
        return run_cli("queue", *argv, "-c", self.config)

    def listed(self) -> dict[str, Any]:
        status, out, _ = self.queue("list", "--json")
        self.assertEqual(status, 0)
        return {m["queue_id"]: m for m in json.loads(out)["messages"]}

    def wait_deferred(self, qid: str) -> dict[str, Any]:
        return wait_until(lambda: self.listed().get(qid, {}).get("state") == "deferred"
                          and self.listed()[qid], 15, f"{qid} to be deferred")

    def test_commands_end_to_end(self) -> None:
        """list/show see the daemon's queue; hold, release, flush, bounce and delete are
        carried out by the daemon; the deferred recipient is delivered once after flush."""
        blocker = self.block("bob")
        qid = self.send("bob@localhost", "carol@localhost")
        message = self.wait_deferred(qid)
        self.assertEqual([(r["address"], r["state"]) for r in message["recipients"]],
                         [("bob@localhost", "deferred"), ("carol@localhost", "delivered")])
        status, out, _ = self.queue("show", qid)
        self.assertIn("Subject: queued", out)
        self.assertEqual(self.queue("hold", qid), (0, f"{qid}: placed on hold\n", ""))
        self.assertEqual(self.listed()[qid]["state"], "hold")
        self.assertEqual(self.queue("flush", qid)[0], 1)  # held mail is not flushed
        self.assertEqual(self.queue("release", qid), (0, f"{qid}: released\n", ""))
        self.assertEqual(self.listed()[qid]["state"], "deferred")
        os.unlink(blocker)
        self.assertEqual(self.queue("flush"), (0, "1 message to be tried now\n", ""))
        [path] = wait_for_files(self.daemon.maildir("bob"), 1)
        self.assertTrue(delivered_body(path).endswith(MESSAGE))
        wait_until(lambda: qid not in self.listed(), 10, "the message to leave the queue")
        self.assertEqual(len(wait_for_files(self.daemon.maildir("carol"), 1)), 1)

        self.block("dave")
        bounced = self.send("dave@localhost")
        self.wait_deferred(bounced)
        self.assertEqual(self.queue("bounce", bounced),
                         (0, f"{bounced}: returned to its sender\n", ""))
        [dsn_path] = wait_for_files(self.daemon.maildir("alice"), 1)
        with open(dsn_path, "rb") as f:
            report = email.message_from_bytes(f.read(), policy=email.policy.default)
        fields = report.get_payload()[1].get_payload()[1]
        self.assertEqual((fields["Final-Recipient"], fields["Action"], fields["Status"]),
                         ("rfc822; dave@localhost", "failed", "5.0.0"))
        notice = f"{bounced}: sender non-delivery notification: "
        wait_until(lambda: notice in self.daemon.log(), 10, "the notification logged")

        self.block("erin")
        doomed = self.send("erin@localhost")
        self.wait_deferred(doomed)
        self.assertEqual(self.queue("delete", "--all-deferred"), (0, "1 message deleted\n", ""))
        self.assertEqual(self.listed(), {})
        self.assertEqual(self.queue("delete", doomed)[0], 1)

    def test_restart_keeps_schedule(self) -> None:
        """A restarted daemon keeps a deferred message's attempts and retry time (it is not
        tried at start) and still obeys flush."""
        blocker = self.block("bob")
        qid = self.send("bob@localhost")
        before = self.wait_deferred(qid)["recipients"][0]
        self.daemon.restart()
        os.unlink(blocker)
        after = self.listed()[qid]["recipients"][0]
        self.assertEqual((after["attempts"], after["next_attempt"]),
                         (before["attempts"], before["next_attempt"]))
        self.assertEqual(self.daemon.log().count(f"{qid}: to=<bob@localhost>"), 1)
        self.assertEqual(self.queue("flush", qid)[0], 0)
        wait_for_files(self.daemon.maildir("bob"), 1)
        wait_until(lambda: not self.listed(), 10, "the queue to empty")

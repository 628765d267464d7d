"""Receiver processes (``receivers = N``): the real daemon with its receivers, end to end."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailplat.config import ConfigError, parse_config
from mailplat.envelope import Envelope, Recipient
from mailplat.store import INCOMING, QueueStore, envelope_trailer
from tests.daemon import HOST, Daemon, delivered_body, wait_for_files, wait_until

MESSAGE = b"Subject: through a receiver\r\n\r\nbody\r\n"


class ReceiverDaemonTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.daemon = Daemon.started(
            self, listeners={"smtp": "relay", "lmtp": "lmtp"},
            config={"receivers": 1, "relay": {"trusted_networks": ["127.0.0.1/32"]}})
        self.up = 0
        self.wait_up(1)

    def receivers_up(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"receiver (\d+) is up", self.daemon.log())]

    def wait_up(self, count: int) -> int:
        wait_until(lambda: len(self.receivers_up()) >= count, 20, f"{count} receivers up")
        return self.receivers_up()[count - 1]

    def send(self, count: int, first: int = 0) -> None:
        with smtplib.SMTP(HOST, self.daemon.ports["smtp"], timeout=10) as smtp:
            for n in range(first, first + count):
                body = MESSAGE + f"n={n}\r\n".encode()
                self.assertEqual(smtp.sendmail("a@example.org", ["rose@localhost"], body), {})

    def test_mail_taken_by_a_receiver_is_delivered_by_the_queue(self) -> None:
        """Several connections' worth of mail, every message once, byte for byte; the queue
        empties and nothing went wrong in either process."""
        for batch in range(4):
            self.send(10, first=batch * 10)
        paths = wait_for_files(self.daemon.maildir("rose"), 40)
        bodies = sorted(delivered_body(p) for p in paths)
        self.assertEqual(bodies, sorted(MESSAGE + f"n={n}\r\n".encode() for n in range(40)))
        self.daemon.wait_queue_empty()
        self.assertNotIn("Traceback", self.daemon.log())

    def test_only_the_receiver_accepts_while_it_is_up(self) -> None:
        """The main process leaves the handed-over socket to the receiver: with the receiver
        stopped, nobody greets; once it runs again, the waiting client is served. LMTP stays
        with the main process throughout."""
        pid = self.wait_up(1)
        os.kill(pid, signal.SIGSTOP)
        try:
            with socket.create_connection((HOST, self.daemon.ports["smtp"]), timeout=10) as sock:
                sock.settimeout(1.5)
                self.assertRaises(socket.timeout, sock.recv, 100)
                with socket.create_connection((HOST, self.daemon.ports["lmtp"]), timeout=5) as lm:
                    self.assertTrue(lm.recv(100).startswith(b"220 "))
                os.kill(pid, signal.SIGCONT)
                sock.settimeout(10)
                self.assertTrue(sock.recv(100).startswith(b"220 "))
        finally:
            os.kill(pid, signal.SIGCONT)

    def test_a_dead_receiver_is_replaced_and_mail_keeps_flowing(self) -> None:
        pid = self.wait_up(1)
        os.kill(pid, signal.SIGKILL)
        self.send(3)  # the main process accepts meanwhile, or the new receiver does
        second = self.wait_up(2)
        self.assertNotEqual(second, pid)
        self.send(3, first=3)
        wait_for_files(self.daemon.maildir("rose"), 6)
        self.daemon.wait_queue_empty()

    def test_committed_but_unannounced_mail_is_swept_into_the_queue(self) -> None:
        """A receiver that dies between its commit and its line up the pipe leaves the
        message in incoming/: the main process finds it and delivers it."""
        store = QueueStore(self.daemon.queue_dir)
        qid = store.new_queue_id()
        envelope = Envelope(qid, "a@example.org", (Recipient("rose@localhost"),), time.time(),
                            size=len(MESSAGE), data_length=len(MESSAGE))
        with store.open_data_for_write(qid) as f:
            f.write(MESSAGE + envelope_trailer(envelope))
        old = time.time() - 60
        os.utime(store.data_path(qid), (old, old))
        self.assertEqual(store.list_ids(INCOMING), [qid])
        os.kill(self.wait_up(1), signal.SIGKILL)
        [path] = wait_for_files(self.daemon.maildir("rose"), 1)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)  # written here, so without a Received: field
        swept = f"{qid}: committed by a receiver that ended; queued now"
        wait_until(lambda: swept in self.daemon.log(), 10, "the sweep logged")

    def test_etrn_is_answered_by_the_main_process(self) -> None:
        """ETRN reaches the receiver, which asks the queue's process (RFC 1985 replies)."""
        with smtplib.SMTP(HOST, self.daemon.ports["smtp"], timeout=10) as smtp:
            smtp.ehlo("client.test")
            self.assertEqual(smtp.docmd("ETRN", "example.org"),
                             (251, b"2.0.0 OK, no messages waiting for node example.org"))
            self.assertEqual(smtp.docmd("ETRN", "#nosuchqueue"),
                             (459, b"4.7.1 Node #nosuchqueue not allowed: no such queue"))


class ReceiversConfigTests(SynchronousTestCase):
    BASE = ('[[listener]]\nname = "smtp"\nendpoint = "tcp:2525"\nprofile = "relay"\n'
            '[domains.localhost]\ncatch_all = true\n')

    def test_default_is_one_process(self) -> None:
        self.assertEqual(parse_config(self.BASE).receivers, 0)

    def test_range(self) -> None:
        self.assertEqual(parse_config("receivers = 3\n" + self.BASE).receivers, 3)
        for bad in ("-1", "65", "true", '"2"'):
            with self.assertRaises(ConfigError) as caught:
                parse_config(f"receivers = {bad}\n" + self.BASE)
            self.assertEqual(caught.exception.problems[0].key, "receivers")



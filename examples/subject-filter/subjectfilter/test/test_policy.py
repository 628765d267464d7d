"""Tests of the example plugin, written with mailplat.testing as any plugin author can."""

from __future__ import annotations

from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import mailplat.plugins
from mailplat.envelope import Recipient, Transaction
from mailplat.interfaces import Action, IPolicy, IPolicyPluginFactory, IQueueObserver
from mailplat.replies import Reply
from mailplat.testing import session_info
from subjectfilter.policy import SubjectFilter, check


class SubjectFilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = SubjectFilter(["(?i)viagra", r"^\[SPAM\]"])
        self.session = session_info(peer_host="192.0.2.1")

    def data(self, subject: bytes) -> object:
        headers = b"From: a@example.net\r\nSubject: " + subject + b"\r\n"
        return self.successResultOf(self.policy.data(self.session, Transaction(""), headers))

    def test_discovered_by_mailplat(self) -> None:
        """mailplat's plugin scan finds the factory, which builds a full policy."""
        [factory] = [f for f in getPlugins(IPolicyPluginFactory, mailplat.plugins)
                     if f.name == "subject-filter"]
        verifyObject(IPolicyPluginFactory, factory)
        policy = factory.makePolicy({"patterns": ["x"]}, None)
        verifyObject(IPolicy, policy)
        verifyObject(IQueueObserver, policy)

    def test_matching_subject_refused(self) -> None:
        """A Subject matching a pattern is refused with 550 5.7.1."""
        for subject in (b"Cheap VIAGRA", b"[SPAM] hello"):
            verdict = self.data(subject)
            self.assertEqual((verdict.action, verdict.reply.code), (Action.REJECT, 550))

    def test_other_subject_passes_with_header(self) -> None:
        """Other messages go on and get the X-Subject-Filter header."""
        verdict = self.data(b"Lunch?")
        self.assertEqual(verdict.action, Action.CONTINUE)
        self.assertEqual(verdict.add_headers, ("X-Subject-Filter: passed",))

    def test_queue_events_counted(self) -> None:
        """Delivered and bounced recipients are counted from the queue events."""
        recipient, ok = Recipient("b@example.org"), Reply(250, "2.0.0", "ok")
        self.policy.delivered(None, recipient, ok)
        self.policy.bounced(None, recipient, Reply(550, "5.1.1", "no"))
        self.assertEqual(self.policy.counts, {"delivered": 1, "bounced": 1})

    def test_config_check(self) -> None:
        """Bad regular expressions and unknown keys are reported by key."""
        self.assertEqual(check({"patterns": ["ok"]}), [])
        self.assertEqual([k for k, _ in check({"patterns": ["("], "colour": 1})],
                         ["colour", "patterns"])

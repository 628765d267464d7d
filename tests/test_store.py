"""The queue directories (mailplat.store) and group commit (mailplat.groupsync)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

from twisted.trial.unittest import SynchronousTestCase

from mailplat.envelope import Envelope, Recipient, SessionInfo
from mailplat.groupsync import GroupSyncer
from mailplat.store import (
    ACTIVE, DEFERRED, HOLD, INCOMING, STATES, QueueStore, envelope_trailer, open_data, read_trailer,
)
from mailplat.testing import ManualThreads, run_synchronously


def envelope(qid: str, *addresses: str) -> Envelope:
    return Envelope(
        queue_id=qid,
        sender="alice@example.org",
        recipients=tuple(Recipient(a) for a in addresses or ("bob@example.com",)),
        received_at=1000.0,
    )


class FakeSyncer:
    """Records sync requests and lets the test fire them."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[str], object]] = []

    def sync_dirs(self, paths: list[str]) -> object:
        from twisted.internet.defer import Deferred

        d: Deferred[None] = Deferred()
        self.requests.append((list(paths), d))
        return d


class GroupSyncerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.syncer = GroupSyncer(runInThread=self.threads)
        self.dirs = [self.mktemp() for _ in range(3)]
        for path in self.dirs:
            os.makedirs(path)

    def test_many_concurrent_callers_need_two_rounds(self) -> None:
        """Ten sessions committing at once cost two fsync rounds, not ten."""
        waiting = [self.syncer.sync_dirs([self.dirs[i % 3]]) for i in range(10)]
        self.threads.run_all()
        for d in waiting:
            self.successResultOf(d)
        self.assertEqual(self.syncer.rounds, 2)

    def test_request_during_round_waits_for_next_round(self) -> None:
        """A request made while a round runs fires only after a round that began after it."""
        early = self.syncer.sync_dirs([self.dirs[0]])
        late = self.syncer.sync_dirs([self.dirs[1]])
        late2 = self.syncer.sync_dirs([self.dirs[2]])
        self.threads.run_next()
        self.successResultOf(early)
        self.assertNoResult(late)
        self.assertEqual(self.threads.pending, 1)
        self.threads.run_next()
        self.successResultOf(late)
        self.successResultOf(late2)
        self.assertEqual(self.syncer.rounds, 2)

    def test_round_syncs_every_requested_directory_once(self) -> None:
        """One round covers the union of the directories its callers asked for."""
        self.syncer.sync_dirs([self.dirs[0]])
        self.syncer.sync_dirs([self.dirs[1], self.dirs[2]])
        self.syncer.sync_dirs([self.dirs[2]])
        self.threads.run_next()
        _, args, _ = self.threads.calls[0]
        self.assertEqual(args[0], sorted(self.dirs[1:]))

    def test_failure_reaches_every_caller_of_the_round(self) -> None:
        """If fsync fails, every caller of that round sees the error (none may say 250)."""
        self.syncer.sync_dirs([self.dirs[0]])
        a = self.syncer.sync_dirs([self.mktemp()])
        b = self.syncer.sync_dirs([self.dirs[1]])
        self.threads.run_all()
        self.failureResultOf(a, FileNotFoundError)
        self.failureResultOf(b, FileNotFoundError)


class QueueStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = QueueStore(self.root, runInThread=run_synchronously)

    def test_creates_layout(self) -> None:
        """The store creates data/, tmp/ and one directory per state."""
        for name in ("data", "tmp", *STATES):
            self.assertTrue(os.path.isdir(os.path.join(self.root, name)), name)

    def test_queue_ids_are_unique_sortable_and_safe(self) -> None:
        """Queue ids are uppercase, distinct, ordered by creation and usable as file names."""
        ids = [self.store.new_queue_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(ids, sorted(ids))
        for qid in ids[:10]:
            self.assertEqual(qid, qid.upper())
            self.assertTrue(qid.isalnum())

    def test_data_file_is_created_exclusively(self) -> None:
        """A data file is never opened twice for writing: a reused id is an error."""
        qid = self.store.new_queue_id()
        with self.store.open_data_for_write(qid) as f:
            f.write(b"x")
        self.assertRaises(FileExistsError, self.store.open_data_for_write, qid)

    def test_write_and_read_envelope(self) -> None:
        """An envelope written into a state reads back equal, with its state."""
        env = envelope("ABC", "b@example.com", "c@example.com")
        self.successResultOf(self.store.write_envelope(env, INCOMING))
        self.assertEqual(self.store.read_envelope("ABC"), (INCOMING, env))
        self.assertEqual(os.listdir(self.store.tmp_dir), [])

    def test_envelope_appears_only_after_fsync_then_dir_sync(self) -> None:
        """The rename into the state dir happens after the file is written and fsync'd in a
        thread, and the Deferred fires only once the state directory has been synced."""
        threads, syncer = ManualThreads(), FakeSyncer()
        store = QueueStore(
            self.mktemp(), syncer=syncer, runInThread=threads,  # type: ignore[arg-type]
            sync_directories=True,
        )
        d = store.write_envelope(envelope("ABC"), INCOMING, also_sync=[store.data_dir])
        self.assertEqual(store.list_ids(INCOMING), [])
        threads.run_next()
        self.assertEqual(store.list_ids(INCOMING), ["ABC"])
        self.assertNoResult(d)
        [(paths, sync)] = syncer.requests
        self.assertEqual(set(paths), {store.state_dir(INCOMING), store.data_dir})
        sync.callback(None)  # type: ignore[attr-defined]
        self.successResultOf(d)

    def test_rewrite_replaces_in_place(self) -> None:
        """Writing an envelope again into the same state replaces it atomically."""
        env = envelope("ABC")
        self.successResultOf(self.store.write_envelope(env, ACTIVE))
        changed = env.with_recipient(0, attempts=3)
        self.successResultOf(self.store.write_envelope(changed, ACTIVE))
        self.assertEqual(self.store.read_envelope("ABC"), (ACTIVE, changed))
        self.assertEqual(self.store.list_ids(ACTIVE), ["ABC"])

    def test_move_changes_state_by_rename(self) -> None:
        """move() takes the envelope from one state directory to another."""
        self.successResultOf(self.store.write_envelope(envelope("ABC"), INCOMING))
        self.store.move("ABC", INCOMING, ACTIVE)
        self.store.move("ABC", ACTIVE, DEFERRED)
        self.assertEqual(self.store.read_envelope("ABC")[0], DEFERRED)
        self.assertEqual(self.store.list_ids(INCOMING) + self.store.list_ids(ACTIVE), [])

    def test_read_missing_raises(self) -> None:
        """Reading an unknown queue id raises FileNotFoundError."""
        self.assertRaises(FileNotFoundError, self.store.read_envelope, "NOPE")

    def test_remove_deletes_envelope_and_data(self) -> None:
        """remove() forgets both the envelope and the message bytes."""
        with self.store.open_data_for_write("ABC") as f:
            f.write(b"hello\r\n")
        self.successResultOf(self.store.write_envelope(envelope("ABC"), ACTIVE))
        self.store.remove("ABC")
        self.assertEqual(self.store.list_ids(ACTIVE), [])
        self.assertFalse(os.path.exists(self.store.data_path("ABC")))

    def test_remove_with_a_state_directory_replaced_by_a_file(self) -> None:
        """remove() still deletes the data when a state directory is not a directory (ENOTDIR
        means no envelope can be there)."""
        with self.store.open_data_for_write("ABC") as f:
            f.write(b"hello\r\n")
        incoming = self.store.state_dir(INCOMING)
        os.rmdir(incoming)
        open(incoming, "w").close()
        self.store.remove("ABC")
        self.assertFalse(os.path.exists(self.store.data_path("ABC")))

    def test_list_ids_oldest_first(self) -> None:
        """list_ids returns queue ids in creation order and ignores stray files."""
        ids = [self.store.new_queue_id() for _ in range(3)]
        for qid in reversed(ids):
            self.successResultOf(self.store.write_envelope(envelope(qid), DEFERRED))
        open(os.path.join(self.store.state_dir(DEFERRED), "junk.tmp"), "w").close()
        self.assertEqual(self.store.list_ids(DEFERRED), ids)

    def test_recover(self) -> None:
        """Recovery empties tmp/, deletes data never committed and reports every state."""
        for qid, state in (("A1", INCOMING), ("A2", ACTIVE), ("A3", DEFERRED), ("A4", HOLD)):
            with self.store.open_data_for_write(qid) as f:
                f.write(b"data")
            self.successResultOf(self.store.write_envelope(envelope(qid), state))
        with self.store.open_data_for_write("HALF") as f:
            f.write(b"half-written")
        open(os.path.join(self.store.tmp_dir, "A9.123"), "w").close()
        found = self.store.recover()
        self.assertEqual(found, {INCOMING: ["A1"], ACTIVE: ["A2"], DEFERRED: ["A3"], HOLD: ["A4"]})
        self.assertEqual(os.listdir(self.store.tmp_dir), [])
        self.assertEqual(sorted(os.listdir(self.store.data_dir)), ["A1", "A2", "A3", "A4"])

    def test_envelope_json_is_asdict_json(self) -> None:
        """The fast envelope encoding is byte for byte what dataclasses.asdict would give,
        and reads back equal."""
        env = Envelope(
            "Q1", "a@example.org",
            (Recipient("b@example.com", notify=("NEVER",), history=("t1", "t2")),
             Recipient("c@example.com", orcpt="rfc822;c@example.com")),
            12.5, size=99, session=SessionInfo(peer_host="192.0.2.1", helo="x.test"),
            add_headers=("X-Test: 1",),
        )
        self.assertEqual(env.to_json(), json.dumps(asdict(env), separators=(",", ":")).encode())
        self.assertEqual(Envelope.from_json(env.to_json()), env)

    def test_recover_drops_torn_incoming_envelope(self) -> None:
        """An incoming envelope cut short by a crash (never acknowledged) is deleted with its
        data at recovery; an intact one stays."""
        for qid in ("T1", "OK"):
            with self.store.open_data_for_write(qid) as f:
                f.write(b"data")
        self.successResultOf(self.store.write_envelope(envelope("OK"), INCOMING))
        with open(self.store.envelope_path("T1", INCOMING), "wb") as f:
            f.write(envelope("T1").to_json()[:40])
        found = self.store.recover()
        self.assertEqual(found[INCOMING], ["OK"])
        self.assertEqual(self.store.list_ids(INCOMING), ["OK"])
        self.assertEqual(os.listdir(self.store.data_dir), ["OK"])

    def committed(self, qid: str, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> Envelope:
        """A data file as the spool commits it: the message, then its envelope."""
        env = replace(envelope(qid), size=len(body), data_length=len(body))
        with self.store.open_data_for_write(qid) as f:
            f.write(body + envelope_trailer(env))
        return env

    def test_trailer_reads_back_and_bounds_the_message(self) -> None:
        env = self.committed("T1")
        path = self.store.data_path("T1")
        self.assertEqual(read_trailer(path), env)
        with open_data(path, env.data_length) as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nbody\r\n")

    def test_torn_or_missing_trailer_is_none(self) -> None:
        """Every cut of a committed file reads as "never committed", as does a message
        whose bytes merely look like a tail."""
        self.committed("T1")
        path = self.store.data_path("T1")
        with open(path, "rb") as f:
            whole = f.read()
        for cut in range(len(whole)):
            with open(path, "wb") as f:
                f.write(whole[:cut])
            self.assertIsNone(read_trailer(path), cut)
        with open(path, "wb") as f:
            f.write(b"x\r\nMAILPLAT-ENVELOPE 0000000002\r\n")
        self.assertIsNone(read_trailer(path))

    def test_recover_rebuilds_lost_incoming_envelope_from_the_trailer(self) -> None:
        """The unsynced incoming/ copy lost or torn in a crash: the data file's trailer was
        fsync'd before 250, so the message is rebuilt into incoming/, not dropped."""
        lost, torn = self.committed("L1"), self.committed("T1")
        with open(self.store.envelope_path("T1", INCOMING), "wb") as f:
            f.write(torn.to_json()[:30])
        found = self.store.recover()
        self.assertEqual(found[INCOMING], ["T1", "L1"])
        self.assertEqual(self.store.read_envelope("L1"), (INCOMING, lost))
        self.assertEqual(self.store.read_envelope("T1"), (INCOMING, torn))
        self.assertEqual(sorted(os.listdir(self.store.data_dir)), ["L1", "T1"])

    def test_recover_drops_data_with_a_torn_trailer(self) -> None:
        self.committed("T1")
        path = self.store.data_path("T1")
        os.truncate(path, os.path.getsize(path) - 5)
        self.assertEqual(self.store.recover()[INCOMING], [])
        self.assertEqual(os.listdir(self.store.data_dir), [])

    def test_unfiled_message_is_incoming_through_its_trailer(self) -> None:
        """A committed message without an envelope file: read, listed and found in state
        incoming; a data file still being received (no trailer) is none of these."""
        env = self.committed("U1")
        with self.store.open_data_for_write("RX") as f:
            f.write(b"Subject: still arriving\r\n")
        self.assertEqual(self.store.read_envelope("U1"), (INCOMING, env))
        self.assertEqual(self.store.state_of("U1"), INCOMING)
        self.assertEqual(self.store.list_ids(INCOMING), ["U1"])
        self.assertIsNone(self.store.state_of("RX"))
        self.assertRaises(FileNotFoundError, self.store.read_envelope, "RX")

    def test_moving_an_unfiled_message_files_its_envelope(self) -> None:
        env = self.committed("U1")
        self.store.move("U1", INCOMING, HOLD)
        self.assertEqual(self.store.read_envelope("U1"), (HOLD, env))
        self.assertEqual(self.store.list_ids(INCOMING), [])
        self.assertRaises(FileNotFoundError, self.store.move, "NONE", INCOMING, HOLD)

    def test_remove_unfiled_takes_only_the_data(self) -> None:
        self.committed("U1")
        self.store.remove("U1", INCOMING, filed=False)
        self.assertEqual(os.listdir(self.store.data_dir), [])
        self.assertIsNone(self.store.state_of("U1"))

    def test_recover_keeps_later_state_of_duplicate(self) -> None:
        """A message found in two state directories is kept only in the later state."""
        self.successResultOf(self.store.write_envelope(envelope("A1"), ACTIVE))
        self.successResultOf(self.store.write_envelope(envelope("A1"), DEFERRED))
        found = self.store.recover()
        self.assertEqual(found[ACTIVE], [])
        self.assertEqual(found[DEFERRED], ["A1"])
        self.assertEqual(self.store.list_ids(ACTIVE), [])

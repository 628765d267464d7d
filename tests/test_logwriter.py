"""Log file writes in a thread (mailplat.logwriter)."""

from __future__ import annotations

import io
import threading
from typing import Any

from twisted.logger import FileLogObserver, LogLevel, LogPublisher, Logger, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailplat.logwriter import BackgroundWriter, SecondCache, offload_log_files, restore


class SlowFile(io.StringIO):
    """Records which thread wrote, like a log file on a busy disk."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def write(self, text: str) -> int:
        self.threads.add(threading.current_thread().name)
        return super().write(text)


class BackgroundWriterTests(SynchronousTestCase):
    def test_lines_keep_their_order_and_are_all_written_at_close(self) -> None:
        target = SlowFile()
        writer = BackgroundWriter(target)
        for n in range(2000):
            writer.write(f"line {n}\n")
        writer.close()
        self.assertEqual(target.getvalue(), "".join(f"line {n}\n" for n in range(2000)))
        self.assertEqual(target.threads, {"mailplat-log"})

    def test_bytes_too(self) -> None:
        target = io.BytesIO()
        writer = BackgroundWriter(target)
        writer.write(b"a\n")
        writer.write(b"b\n")
        writer.close()
        self.assertEqual(target.getvalue(), b"a\nb\n")

    def test_after_close_writes_in_place(self) -> None:
        target = SlowFile()
        writer = BackgroundWriter(target)
        writer.close()
        writer.write("late\n")
        self.assertEqual(target.getvalue(), "late\n")


    def test_lines_written_when_the_process_exits_without_close(self) -> None:
        """A daemon dying at start-up (an uncaught traceback) still leaves its last lines."""
        import subprocess
        import sys

        path = self.mktemp()
        code = (
            "import sys, time\n"
            "from mailplat.logwriter import BackgroundWriter\n"
            f"writer = BackgroundWriter(open({path!r}, 'w'))\n"
            "writer.write('first\\n')\n"
            "time.sleep(0.05)\n"
            "writer._idle = False\n"  # the thread is busy: nobody wakes it for this line
            "writer.write('last words\\n')\n"
            "raise SystemExit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], timeout=30)
        self.assertEqual(result.returncode, 3)
        with open(path) as f:
            self.assertEqual(f.read(), "first\nlast words\n")


class OffloadTests(SynchronousTestCase):
    def test_observer_file_swapped_and_restored(self) -> None:
        """twistd's file observer keeps formatting; only its file changes, and returns."""
        target = SlowFile()
        observer = FileLogObserver(target, lambda event: event["log_format"] + "\n")
        publisher = LogPublisher(observer, lambda event: None)
        writers = offload_log_files(publisher)
        self.assertEqual(len(writers), 1)
        self.assertEqual(offload_log_files(publisher), [])  # never wrapped twice
        log = Logger(observer=publisher)
        for n in range(100):
            log.info(f"event {n}")
        restore(publisher, writers)
        self.assertIs(observer._outFile, target)
        self.assertEqual(target.getvalue(), "".join(f"event {n}\n" for n in range(100)))
        self.assertEqual(target.threads, {"mailplat-log"})

    def test_twistd_format_same_text_with_cached_seconds(self) -> None:
        """twistd's own observer: its lines come out byte for byte as Twisted writes them."""
        ours, theirs = SlowFile(), io.StringIO()
        observer = textFileLogObserver(ours)
        reference = textFileLogObserver(theirs)
        publisher = LogPublisher(observer)
        writers = offload_log_files(publisher)
        self.assertIsInstance(observer.formatEvent.__self__, SecondCache)
        events: list[dict[str, Any]] = [
            dict(log_format="n={n}", n=n, log_time=1_700_000_000 + n / 3,
                 log_namespace="mailplat.queue", log_level=None, log_system="-")
            for n in range(12)]
        events += [
            dict(log_format="{qid}: to=<{a}>, delay={d:.2f}, {r!r}", qid="Q1", a="x@y", d=0.123,
                 r=("250", "ok"), log_time=1_700_000_100.5, log_namespace="mailplat.queue",
                 log_level=LogLevel.info),
            dict(log_format="two\nlines {x}", x=1, log_time=1_700_000_101.0, log_system=5),
            dict(log_format="{missing}", log_time=1_700_000_102.0),
            dict(log_format="", log_time=1_700_000_103.0),
            dict(log_format="{f()}", f=lambda: "called", log_time=1_700_000_104.0),
            dict(log_format="{a[k]} {b.real}", a={"k": "v"}, b=3, log_time=None,
                 log_namespace="ns", log_level=LogLevel.warn),
            dict(log_format="oops", log_failure=Failure(ValueError("boom")),
                 log_time=1_700_000_105.0),
        ]
        for event in events:
            publisher(event)
            reference(event)
        restore(publisher, writers)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertNotIsInstance(getattr(observer.formatEvent, "__self__", None), SecondCache)

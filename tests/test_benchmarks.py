"""The benchmark harness's pure parts: rendered configs, /proc parsing, scenario selection and
the report. Nothing here starts a server or times anything."""

from __future__ import annotations

import tomllib

from twisted.trial.unittest import SynchronousTestCase

from benchmarks import report
from benchmarks.load import message_bytes, smtp_source_command
from benchmarks.mailplat_setup import DOMAIN, render_config
from benchmarks.measure import parse_smaps_rollup, parse_stat
from benchmarks.postfix_setup import render_main_cf, render_master_cf
from benchmarks.runner import verdict
from benchmarks.scenarios import SCENARIOS, select
from mailplat.config import parse_config

STAT = (
    "4242 (tw (ist) d) S 1 4242 4242 0 -1 4194560 1234 0 0 0 "
    "150 37 12 5 20 0 3 0 100 4096000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0"
)
SMAPS = "55d0-7fff ---p 00000000 00:00 0 [rollup]\nRss:               81236 kB\nPss:               79010 kB\n"


class MailplatConfigTests(SynchronousTestCase):
    def test_config_is_valid(self) -> None:
        """The throwaway TOML passes mailplat's own config loader with the port and size asked."""
        config = parse_config(render_config("/tmp/x", 40123, 200 * 1024 * 1024), "bench.toml")
        self.assertEqual(config.max_message_size, 200 * 1024 * 1024)
        self.assertEqual(config.listeners[0].endpoint.split(":")[1], "40123")
        self.assertIn("interface=127.0.0.1", config.listeners[0].endpoint)
        self.assertIn(DOMAIN, config.domains)


class PostfixConfigTests(SynchronousTestCase):
    def test_main_cf_is_loopback_virtual_maildir(self) -> None:
        """main.cf listens on loopback only and delivers the bench domain to Maildirs in the base."""
        text = render_main_cf("/tmp/pf", 1 << 27)
        settings = dict(line.split(" = ", 1) for line in text.splitlines())
        self.assertEqual(settings["inet_interfaces"], "127.0.0.1")
        self.assertEqual(settings["virtual_mailbox_domains"], DOMAIN)
        self.assertEqual(settings["virtual_mailbox_base"], "/tmp/pf/mail")
        self.assertEqual(settings["message_size_limit"], str(1 << 27))
        self.assertEqual(settings["smtpd_peername_lookup"], "no")

    def test_master_cf_listens_on_the_chosen_port(self) -> None:
        """master.cf's smtpd listens on 127.0.0.1 at the chosen port and nothing runs chrooted."""
        rows = [line.split() for line in render_master_cf(40555).splitlines()]
        self.assertEqual(rows[0][:2], ["127.0.0.1:40555", "inet"])
        self.assertEqual({row[4] for row in rows}, {"n"})


class ProcParsingTests(SynchronousTestCase):
    def test_stat_with_parentheses_in_the_name(self) -> None:
        """CPU fields are found after the last ')' even when the command name contains one."""
        stat = parse_stat(STAT)
        self.assertEqual((stat.pid, stat.ppid), (4242, 1))
        self.assertEqual((stat.utime, stat.stime, stat.cutime, stat.cstime), (150, 37, 12, 5))

    def test_smaps_rollup(self) -> None:
        """Rss and Pss are read in kB from smaps_rollup."""
        self.assertEqual(parse_smaps_rollup(SMAPS), {"Rss": 81236, "Pss": 79010})


class ScenarioTests(SynchronousTestCase):
    def test_select_keeps_issue_order(self) -> None:
        """Scenarios come back in a-f order whatever order they were asked in."""
        self.assertEqual([s.key for s in select("fa", False)], ["a", "f"])

    def test_quick_is_smaller(self) -> None:
        """--quick shrinks every scenario's volume."""
        for full, small in zip(SCENARIOS, select("abcdef", True)):
            self.assertLess(small.messages * small.size, full.messages * full.size + 1)
            self.assertLess(small.sessions * small.messages * small.size,
                            full.sessions * full.messages * full.size)

    def test_unknown_scenario(self) -> None:
        """An unknown scenario letter is refused."""
        self.assertRaises(ValueError, select, "az", False)

    def test_smtp_source_command(self) -> None:
        """smtp-source keeps sessions open (-d) and targets only 127.0.0.1."""
        command = smtp_source_command("/usr/sbin/smtp-source", 4000, 8, 4000, 1024, "b@x")
        self.assertIn("-d", command)
        self.assertEqual(command[-1], "127.0.0.1:4000")
        self.assertEqual(command[command.index("-s") + 1], "8")

    def test_idle_message(self) -> None:
        """The (f) message ends with CRLF.CRLF, has short lines and about the asked body size."""
        message = message_bytes(1024, 7)
        self.assertTrue(message.endswith(b"\r\n.\r\n"))
        self.assertLess(max(map(len, message.split(b"\r\n"))), 1000)
        body = message.split(b"\r\n\r\n", 1)[1][: -len(b".\r\n")]
        self.assertLessEqual(abs(len(body) - 1024), 1)
        self.assertNotIn(b"\r\r", body)


class VerdictTests(SynchronousTestCase):
    def test_all_delivered_once(self) -> None:
        """Exactly the expected number of messages in new/ and no load error is a pass."""
        self.assertEqual(verdict(None, 2000, 2000), {"ok": True, "error": None})

    def test_lost_or_doubled(self) -> None:
        """One message too few or too many fails the run, saying how many were found."""
        self.assertEqual(verdict(None, 1999, 2000)["error"], "1999 messages in new/, expected 2000")
        self.assertFalse(verdict(None, 2001, 2000)["ok"])

    def test_load_error_kept(self) -> None:
        """smtp-source's own failure is reported along with the count."""
        result = verdict("smtp-source exit 1: 451", 0, 10)
        self.assertEqual(result["error"], "smtp-source exit 1: 451; 0 messages in new/, expected 10")


class ReportTests(SynchronousTestCase):
    def runs(self) -> list[dict[str, object]]:
        base = {"title": "t", "messages": 10, "size": 1024, "ok": True, "error": None,
                "cpu_ms_per_msg": 1.0, "peak_rss_mb": 50.0, "peak_pss_mb": 40.0}
        return [
            dict(base, scenario="a", server="mailplat", delivered_per_s=v, accepted_per_s=v)
            for v in (100.0, 300.0, 200.0)
        ] + [dict(base, scenario="a", server="postfix", delivered_per_s=100.0, accepted_per_s=100.0)]

    def test_summary_takes_medians(self) -> None:
        """Repeated runs are summarised by their median."""
        rows = report.summarize(self.runs())
        mailplat = next(r for r in rows if r["server"] == "mailplat")
        self.assertEqual((mailplat["delivered_per_s"], mailplat["runs"]), (200.0, 3))

    def test_ratio_and_table(self) -> None:
        """The ratio is mailplat over Postfix delivered msgs/s and appears in the table."""
        rows = report.summarize(self.runs())
        self.assertEqual(report.ratios(rows), {"a": 2.0})
        self.assertIn("2.00x", report.table(rows))

    def test_baseline_gets_its_own_ratio(self) -> None:
        """A baseline mailplat (--baseline) is compared with Postfix too, in its own row."""
        runs = self.runs() + [dict(self.runs()[0], server="baseline", delivered_per_s=50.0)]
        rows = report.summarize(runs)
        self.assertEqual(report.ratios(rows, "baseline"), {"a": 0.5})
        self.assertIn("0.50x", report.table(rows))

    def test_failed_run_is_flagged(self) -> None:
        """A failed run marks its row not ok and its error shows in the table."""
        runs = self.runs()
        runs[0].update(ok=False, error="3 messages in new/, expected 10")
        text = report.table(report.summarize(runs))
        self.assertIn("FAILED: 3 messages in new/", text)

    def test_toml_is_toml(self) -> None:
        """The mailplat config also parses as plain TOML (no harness-only syntax)."""
        self.assertIn("listener", tomllib.loads(render_config("/b", 1, 2)))


class AlternationTests(SynchronousTestCase):
    def test_each_scenario_swaps_the_order_between_repeats(self) -> None:
        """With six scenarios (an even number) every scenario still gets each server first
        in half of the repeats."""
        from benchmarks import run

        args = run.parse_args(["--compare", "postfix", "--repeat", "4"])
        scenarios = select("abcdef", False)
        firsts: dict[str, list[str]] = {}

        def fake_run(server: object, scenario: object, *rest: object, **kw: object) -> dict[str, object]:
            runs = firsts.setdefault(scenario.key, [])  # type: ignore[attr-defined]
            runs.append(server.name)  # type: ignore[attr-defined]
            return {"ok": False, "error": "not run (test)"}

        self.patch(run, "run_scenario", fake_run)
        run.run_all(args, scenarios, "/usr/sbin/smtp-source", "/tmp/unused")
        for key, names in firsts.items():
            first_of_each_repeat = names[0::2]
            self.assertEqual(sorted(first_of_each_repeat),
                             ["mailplat", "mailplat", "postfix", "postfix"], key)


class BarLabelTests(SynchronousTestCase):
    def test_large_values_are_grouped_small_ones_keep_three_digits(self) -> None:
        from benchmarks.report import _bar_text

        self.assertEqual([_bar_text(v) for v in (1512.4, 224.1, 93.24, 1.47)],
                         ["1,512", "224", "93.2", "1.47"])

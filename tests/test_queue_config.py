"""The [queue] settings: retry schedule, delay warning, concurrency, DSN size, control socket."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailplat.config import ConfigError, parse_config
from mailplat.schedule import RetrySchedule

BASE = ('[[listener]]\nname = "smtp"\nendpoint = "tcp:2525"\nprofile = "relay"\n'
        '[domains.localhost]\ncatch_all = true\n')


def problems(queue: str) -> list[str]:
    try:
        parse_config(BASE + "[queue]\n" + queue)
    except ConfigError as error:
        return [f"{p.line}: {p.key}: {p.message}" for p in error.problems]
    return []


class QueueConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without [queue] keys: 5 min backoff doubling to 1 h, 5 days, warning after 4 h,
        20 calls per agent, 5 per destination (20 into one Maildir), 1 MiB returned in
        bounces."""
        config = parse_config(BASE)
        self.assertEqual(config.retry_schedule, RetrySchedule())
        self.assertEqual((config.concurrency.agent, config.concurrency.destination), (20, 5))
        limits = config.concurrency
        self.assertEqual((limits.for_destination("smtp"), limits.for_destination("maildir")),
                         (5, 20))
        self.assertEqual(config.bounce_size_limit, 1 << 20)
        self.assertTrue(config.control_socket.endswith("/control.sock"))

    def test_all_keys(self) -> None:
        """Every key is read with its units, including per-agent concurrency tables."""
        config = parse_config(
            'data_dir = "/srv/mail"\n' + BASE + '[queue]\nretry_delay = "10m"\n'
            'max_retry_delay = "2h"\nretry_backoff = 1.5\nretry_jitter = 0\n'
            'max_lifetime = "3d"\ndelay_warning = false\nactive_limit = 50\n'
            'agent_concurrency = { default = 4, smtp = 40 }\ndestination_concurrency = 2\n'
            'bounce_size_limit = "100K"\ncontrol_socket = "/run/mailplat.sock"\n')
        self.assertEqual(config.retry_schedule, RetrySchedule(
            first=600, factor=1.5, cap=7200, jitter=0.0, max_lifetime=3 * 86400,
            delay_warning=None))
        limits = config.concurrency
        self.assertEqual((limits.for_agent("smtp"), limits.for_agent("maildir")), (40, 4))
        self.assertEqual((limits.for_destination("smtp"), limits.active), (2, 50))
        self.assertEqual(limits.for_destination("maildir"), 2)  # one number: every agent
        self.assertEqual(config.bounce_size_limit, 100 << 10)
        self.assertEqual(config.control_socket, "/run/mailplat.sock")

    def test_maildir_destination_from_table(self) -> None:
        """A table without ``default`` keeps the Maildir's own default; one with it, not."""
        config = parse_config(BASE + "[queue]\ndestination_concurrency = { smtp = 9 }\n")
        limits = config.concurrency
        self.assertEqual([limits.for_destination(a) for a in ("smtp", "lmtp", "maildir")],
                         [9, 5, 20])
        config = parse_config(BASE + "[queue]\ndestination_concurrency = { default = 3 }\n")
        self.assertEqual(config.concurrency.for_destination("maildir"), 3)

    def test_mistakes_located(self) -> None:
        """Bad values are reported with their line and key."""
        found = problems('retry_backoff = 0.5\nretry_jitter = 2\ndelay_warning = "soon"\n'
                         'agent_concurrency = { smtp = 0 }\n'
                         f'control_socket = "/{"x" * 120}"\n')
        self.assertEqual([p.split(":")[0:2] for p in found], [
            ["8", " queue.retry_backoff"], ["9", " queue.retry_jitter"],
            ["10", " queue.delay_warning"], ["11", " queue.agent_concurrency"],
            ["12", " queue.control_socket"]])
        self.assertIn("too long for a UNIX socket", found[-1])

    def test_sync_directories(self) -> None:
        """"auto" by default (decided by the filesystem), true or false when set; anything
        else is reported with its line."""
        self.assertEqual(parse_config(BASE).sync_directories, "auto")
        for text, value in (("true", True), ("false", False), ('"auto"', "auto")):
            self.assertEqual(
                parse_config(BASE + f"[queue]\nsync_directories = {text}\n").sync_directories,
                value)
        [found] = problems('sync_directories = "yes"\n')
        self.assertTrue(found.startswith("8: queue.sync_directories"), found)

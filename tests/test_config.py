"""Tests for mailplat.config: defaults, units, and every problem located by key and line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailplat import config
from mailplat.config import (
    EMBEDDED,
    Config,
    ConfigError,
    Problem,
    check_config,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
[[listener]]
name = "smtp"
endpoint = "tcp:2525:interface=127.0.0.1"
profile = "relay"

[domains."localhost"]
catch_all = true
"""


def problems(text: str) -> list[Problem]:
    """The problems parse_config finds in ``text`` (failing if it finds none)."""
    try:
        parse_config(textwrap.dedent(text), "test.toml")
    except ConfigError as error:
        return error.problems
    raise AssertionError("expected a ConfigError")


class DefaultsTests(SynchronousTestCase):
    """What a minimal file and the embedded default mean."""

    def test_minimal_defaults(self) -> None:
        """Everything but listeners and domains has a documented default."""
        parsed = parse_config(MINIMAL)
        data_dir = os.path.abspath("./var/mailplat")
        self.assertEqual(parsed.data_dir, data_dir)
        self.assertEqual(parsed.queue_dir, os.path.join(data_dir, "queue"))
        self.assertEqual(parsed.maildir_root, os.path.join(data_dir, "mail"))
        self.assertEqual(parsed.max_message_size, 64 * 1024 * 1024)
        self.assertEqual(parsed.max_recipients, 100)
        self.assertEqual(parsed.command_timeout, 300)
        self.assertEqual(parsed.data_timeout, 180)
        self.assertEqual(parsed.max_received_headers, 50)
        self.assertEqual(parsed.retry_delay, 300)
        self.assertEqual(parsed.max_lifetime, 5 * 86400)

    def test_no_trusted_networks_by_default(self) -> None:
        """Nobody may relay by default, not even the loopback interface."""
        self.assertEqual(parse_config(MINIMAL).trusted_networks, ())

    def test_hostname_defaults_to_fqdn(self) -> None:
        """Without a hostname the machine's fully qualified name is used."""
        import socket

        self.assertEqual(parse_config(MINIMAL).hostname, socket.getfqdn())

    def test_embedded_default(self) -> None:
        """The embedded default listens on loopback 2525, 2587, 2465; takes any localhost mailbox."""
        default = load_config(None)
        self.assertEqual(default.source, EMBEDDED)
        listeners = [(one.name, one.endpoint, one.profile) for one in default.listeners]
        self.assertEqual(listeners[:3], [
            ("smtp", "tcp:2525:interface=127.0.0.1", "relay"),
            ("submission", "tcp:2587:interface=127.0.0.1", "submission"),
            ("submissions", "tcp:2465:interface=127.0.0.1", "submissions"),
        ])
        localhost = default.domains["localhost"]
        self.assertIsNone(localhost.users)
        expected = os.path.abspath(os.path.join("var", "mailplat", "mail", "localhost"))
        self.assertEqual(localhost.maildir_root, expected)

    def test_example_file_is_clean(self) -> None:
        """The commented example etc/mailplat.toml has no problems."""
        self.assertEqual(check_config(str(REPO / "etc" / "mailplat.toml")), [])

    def test_raw_keeps_everything(self) -> None:
        """``raw`` holds the whole parsed file so plugins can read their own sections."""
        parsed = parse_config(MINIMAL + '[agent.smtp]\nport = 25\n')
        self.assertEqual(parsed.raw["agent"], {"smtp": {"port": 25}})

    def test_full_file(self) -> None:
        """Every setting given explicitly is read, with paths made absolute and units applied."""
        parsed = parse_config(
            'hostname = "MX.Example.org"\ndata_dir = "/srv/mail"\n'
            '[queue]\ndir = "/spool/q"\nretry_delay = "10m"\nmax_lifetime = "4h"\n'
            '[limits]\nmessage_size = "10M"\nrecipients = 7\ncommand_timeout = 60\n'
            'data_timeout = "2m"\nreceived_headers = 30\n'
            '[maildir]\nroot = "/srv/maildirs"\n'
            '[relay]\ntrusted_networks = ["192.0.2.0/24", "2001:db8::/32"]\n' + MINIMAL
        )
        self.assertEqual(
            (parsed.hostname, parsed.data_dir, parsed.queue_dir, parsed.maildir_root),
            ("mx.example.org", "/srv/mail", "/spool/q", "/srv/maildirs"),
        )
        self.assertEqual((parsed.retry_delay, parsed.max_lifetime), (600, 4 * 3600))
        self.assertEqual((parsed.max_message_size, parsed.max_recipients), (10 << 20, 7))
        self.assertEqual((parsed.command_timeout, parsed.data_timeout), (60, 120))
        self.assertEqual(parsed.max_received_headers, 30)
        self.assertEqual(parsed.trusted_networks, ("192.0.2.0/24", "2001:db8::/32"))
        self.assertEqual(parsed.domains["localhost"].maildir_root, "/srv/maildirs/localhost")


class DomainTests(SynchronousTestCase):
    """Local domains, their users and postmaster."""

    def test_users_lowercased(self) -> None:
        """Domain and user names are stored lowercased, so lookups are case-insensitive."""
        parsed = parse_config(MINIMAL + '[domains."Example.ORG"]\nusers = ["Alice", "bob"]\n')
        domain = parsed.domains["example.org"]
        self.assertEqual(domain.users, frozenset({"alice", "bob"}))

    def test_postmaster_defaults_to_first_user(self) -> None:
        """A user list without postmaster gives postmaster's mail to the first user listed."""
        parsed = parse_config(MINIMAL + '[domains."example.org"]\nusers = ["Zed", "alice"]\n')
        self.assertEqual(parsed.domains["example.org"].postmaster, "zed")

    def test_postmaster_listed(self) -> None:
        """A listed postmaster, or a catch-all domain, keeps postmaster's own Maildir."""
        parsed = parse_config(MINIMAL + '[domains."a.example"]\nusers = ["x", "postmaster"]\n')
        self.assertEqual(parsed.domains["a.example"].postmaster, "postmaster")
        self.assertEqual(parsed.domains["localhost"].postmaster, "postmaster")

    def test_postmaster_chosen(self) -> None:
        """``postmaster = "name"`` picks the user who reads postmaster's mail."""
        text = MINIMAL + '[domains."a.example"]\nusers = ["x", "y"]\npostmaster = "Y"\n'
        self.assertEqual(parse_config(text).domains["a.example"].postmaster, "y")

    def test_domain_maildir_root(self) -> None:
        """A domain may keep its Maildirs somewhere else."""
        text = MINIMAL + '[domains."a.example"]\ncatch_all = true\nmaildir_root = "/m/a"\n'
        self.assertEqual(parse_config(text).domains["a.example"].maildir_root, "/m/a")

    def test_domain_order_kept(self) -> None:
        """Domains keep the file's order: the first one answers for <postmaster>."""
        text = '[domains."b.example"]\ncatch_all = true\n' + MINIMAL
        self.assertEqual(list(parse_config(text).domains), ["b.example", "localhost"])


class UnitTests(SynchronousTestCase):
    """Sizes and durations as operators write them."""

    def test_sizes(self) -> None:
        """Sizes are bytes, or a number with K, M, G (powers of 1024)."""
        for text, size in [(1000, 1000), ("512", 512), ("10K", 10240), ("64M", 64 << 20),
                           ("1G", 1 << 30), ("10m", 10 << 20), ("2MB", 2 << 20)]:
            self.assertEqual(parse_size(text), size, text)

    def test_bad_sizes(self) -> None:
        """Zero, negatives, fractions, booleans and unknown units are refused."""
        for text in [0, -1, 1.5, True, "", "10X", "M", "1.5M", "0M", [1]]:
            self.assertRaises(ValueError, parse_size, text)

    def test_durations(self) -> None:
        """Durations are seconds, or a number with s, m, h, d or w."""
        for text, seconds in [(300, 300), (0.5, 0.5), ("90s", 90), ("30m", 1800),
                              ("4h", 14400), ("5d", 432000), ("1w", 604800), ("45", 45)]:
            self.assertEqual(parse_duration(text), seconds, text)

    def test_bad_durations(self) -> None:
        """Zero, negatives, booleans and unknown units are refused."""
        for text in [0, -5, False, "", "5y", "h", "0s", {}]:
            self.assertRaises(ValueError, parse_duration, text)

    @given(st.integers(min_value=1, max_value=10**6), st.sampled_from("KMG"))
    def test_size_units_scale(self, number: int, unit: str) -> None:
        """Each size unit multiplies by its power of 1024."""
        power = "KMG".index(unit) + 1
        self.assertEqual(parse_size(f"{number}{unit}"), number * 1024**power)


class ProblemTests(SynchronousTestCase):
    """Each mistake is reported with its dotted key and its line."""

    def assertProblem(self, found: list[Problem], key: str, line: int | None, text: str) -> None:
        """One of ``found`` has this key and line and mentions ``text``."""
        for problem in found:
            if problem.key == key and problem.line == line and text in problem.message:
                return
        self.fail(f"no problem {key!r} at line {line} mentioning {text!r} in {found}")

    def test_problem_format(self) -> None:
        """A problem prints as FILE:LINE: key: message."""
        self.assertEqual(str(Problem("limits.recipients", 4, "bad", "a.toml")),
                         "a.toml:4: limits.recipients: bad")
        self.assertEqual(str(Problem("domains", None, "none", "a.toml")), "a.toml: domains: none")

    def test_all_problems_at_once(self) -> None:
        """Every problem in the file is reported, not only the first."""
        found = problems('hostnam = "x"\n[limits]\nrecipients = 0\n')
        self.assertEqual({p.key for p in found}, {"hostnam", "limits.recipients", "listener",
                                                  "domains"})

    def test_unknown_top_level_key(self) -> None:
        """A misspelt key is reported with a suggestion."""
        self.assertProblem(problems('# x\nhostnme = "a"\n' + MINIMAL), "hostnme", 2,
                           "did you mean 'hostname'")

    def test_unknown_key_in_section(self) -> None:
        """Unknown keys inside sections are reported with their dotted key."""
        found = problems(MINIMAL + '[queue]\nretry = 5\n')
        self.assertProblem(found, "queue.retry", 9, "unknown key")

    def test_unknown_section(self) -> None:
        """An unknown table is reported at its header."""
        self.assertProblem(problems(MINIMAL + '\n[limit]\nx = 1\n'), "limit", 9, "unknown key")

    def test_wrong_types(self) -> None:
        """Values of the wrong type are reported at their line."""
        found = problems(MINIMAL + '[limits]\nrecipients = "many"\n[relay]\ntrusted_networks = '
                         '"10.0.0.0/8"\n')
        self.assertProblem(found, "limits.recipients", 9, "not a positive integer")
        self.assertProblem(found, "relay.trusted_networks", 11, "must be a list")

    def test_section_not_a_table(self) -> None:
        """A section given as a plain value is reported."""
        self.assertProblem(problems('queue = 5\n' + MINIMAL), "queue", 1, "must be a table")

    def test_bad_size_and_duration(self) -> None:
        """Sizes and durations that do not parse are reported at their lines."""
        found = problems(MINIMAL + '[limits]\nmessage_size = "10Q"\ndata_timeout = "3 years"\n')
        self.assertProblem(found, "limits.message_size", 9, "not a size")
        self.assertProblem(found, "limits.data_timeout", 10, "not a duration")

    def test_bad_hostname(self) -> None:
        """A host name with spaces or bad characters is refused."""
        self.assertProblem(problems('hostname = "mail server"\n' + MINIMAL), "hostname", 1,
                           "not a valid host name")

    def test_bad_network(self) -> None:
        """Networks are validated, including host bits set by mistake."""
        found = problems(MINIMAL + '[relay]\ntrusted_networks = [\n "10.0.0.1/8",\n]\n')
        self.assertProblem(found, "relay.trusted_networks", 9, "'10.0.0.1/8' is not a network")
        found = problems(MINIMAL + '[relay]\ntrusted_networks = ["nonsense"]\n')
        self.assertProblem(found, "relay.trusted_networks", 9, "'nonsense' is not a network")

    def test_unknown_profile(self) -> None:
        """A listener profile must be one of the known profiles."""
        found = problems(MINIMAL.replace('"relay"', '"smtp"'))
        self.assertProblem(found, "listener[0].profile", 4, "not a profile")

    def test_listener_missing_keys(self) -> None:
        """A listener lacking keys is reported at its [[listener]] header."""
        found = problems(MINIMAL + '\n[[listener]]\nname = "b"\n')
        self.assertProblem(found, "listener[1]", 9, "missing 'endpoint'")
        self.assertProblem(found, "listener[1]", 9, "missing 'profile'")

    def test_unknown_listener_key(self) -> None:
        """Unknown keys in the second listener point at that listener's line."""
        text = MINIMAL + '\n[[listener]]\nname = "b"\nendpoint = "unix:/tmp/s"\nprofile = "lmtp"\n'
        found = problems(text + 'tls = true\n')
        self.assertProblem(found, "listener[1].tls", 13, "unknown key")

    def test_duplicate_listener_names(self) -> None:
        """Two listeners may not share a name."""
        text = MINIMAL + '\n[[listener]]\nname = "smtp"\nendpoint = "tcp:25"\nprofile = "relay"\n'
        self.assertProblem(problems(text), "listener[1].name", 10, "duplicate listener name")

    def test_bad_endpoints(self) -> None:
        """Endpoint strings are checked for syntax without binding anything."""
        for endpoint, message in [
            ("tcp:abc", "port 'abc'"),
            ("tcp:70000", "port '70000'"),
            ("tcp:25:bogus=1", "unexpected keyword argument 'bogus'"),
            ("foo:25", "Unknown endpoint type"),
            ("tcp", "missing a required argument: 'port'"),
            ("unix:", "unix socket path is empty"),
            ("unix:/s:mode=999", "octal"),
            ("tcp:25:backlog=lots", "backlog 'lots'"),
        ]:
            found = problems(MINIMAL.replace("tcp:2525:interface=127.0.0.1", endpoint))
            self.assertProblem(found, "listener[0].endpoint", 3, message)

    def test_good_endpoints(self) -> None:
        """Common endpoint forms pass, including ssl without reading its key files."""
        for endpoint in ["tcp:25", "tcp:port=25:interface=0.0.0.0", "unix:/run/m.sock:mode=660",
                         "ssl:465:privateKey=/nonexistent.pem", r"tcp6:25:interface=\\:\\:1",
                         "systemd:domain=INET:index=0"]:
            text = MINIMAL.replace("tcp:2525:interface=127.0.0.1", endpoint)
            parsed = parse_config(text)
            self.assertEqual(parsed.listeners[0].endpoint, endpoint.replace("\\\\", "\\"))

    def test_listener_not_array(self) -> None:
        """``[listener]`` instead of ``[[listener]]`` is reported."""
        found = problems('[listener]\nname = "x"\n[domains.localhost]\ncatch_all = true\n')
        self.assertProblem(found, "listener", 1, "array of tables")

    def test_no_listeners(self) -> None:
        """A file without listeners is reported."""
        found = problems('[domains.localhost]\ncatch_all = true\n')
        self.assertProblem(found, "listener", None, "no listeners")

    def test_no_domains(self) -> None:
        """A file without domains is reported."""
        self.assertProblem(problems(MINIMAL.split("[domains")[0]), "domains", None, "no domains")

    def test_domain_needs_users_or_catch_all(self) -> None:
        """A domain must say who exists: a user list or catch_all, not neither nor both."""
        found = problems(MINIMAL + '[domains."a.example"]\nmaildir_root = "/m"\n')
        self.assertProblem(found, 'domains."a.example"', 8, "users = [...] or catch_all")
        found = problems(MINIMAL + '[domains."a.example"]\nusers = ["x"]\ncatch_all = true\n')
        self.assertProblem(found, 'domains."a.example"', 8, "not both")

    def test_bad_domain_name(self) -> None:
        """Domain names must be valid host names."""
        found = problems(MINIMAL + '[domains."bad..example"]\ncatch_all = true\n')
        self.assertProblem(found, 'domains."bad..example"', 8, "not a valid domain name")

    def test_duplicate_domain(self) -> None:
        """Domain names differing only in case are the same domain."""
        found = problems(MINIMAL + '[domains."LocalHost"]\ncatch_all = true\n')
        self.assertProblem(found, 'domains.LocalHost', 8, "duplicate domain")

    def test_unsafe_user_names(self) -> None:
        """User names that could escape the Maildir root are refused."""
        for user in ["../x", ".hidden", "a/b", ""]:
            found = problems(MINIMAL + f'[domains."a.example"]\nusers = ["ok", "{user}"]\n')
            self.assertProblem(found, 'domains."a.example".users', 9, "user name")

    def test_postmaster_must_be_a_user(self) -> None:
        """A chosen postmaster must be one of the listed users."""
        found = problems(MINIMAL + '[domains."a.example"]\nusers = ["x"]\npostmaster = "y"\n')
        self.assertProblem(found, 'domains."a.example".postmaster', 10, "not one of")

    def test_unknown_domain_key(self) -> None:
        """Unknown keys in a domain table are reported with a suggestion."""
        found = problems(MINIMAL + '[domains."a.example"]\ncatchall = true\n')
        self.assertProblem(found, 'domains."a.example".catchall', 9, "did you mean 'catch_all'")

    def test_syntax_error(self) -> None:
        """A TOML syntax error is one problem carrying tomllib's line number."""
        [found] = problems('hostname = "a"\nlimits = [\n\n')
        self.assertEqual(found.line, 4)
        self.assertIn("end of file", found.message)
        [found] = problems('hostname = "a"\n\ndata_dir = \n' + MINIMAL)
        self.assertEqual((found.line, found.key), (3, ""))
        self.assertIn("TOML syntax error", found.message)

    def test_repeated_key(self) -> None:
        """A key set twice is located at its second assignment."""
        [found] = problems(MINIMAL + '[limits]\nrecipients = 1\nrecipients = 2\n')
        self.assertEqual(found.line, 10)

    def test_unreadable_file(self) -> None:
        """A missing file is one problem naming the file."""
        [found] = check_config("/nonexistent/mailplat.toml")
        self.assertEqual(found.file, "/nonexistent/mailplat.toml")
        self.assertIn("cannot read", found.message)

    def test_check_config_reports_file(self) -> None:
        """Problems from a file carry its path."""
        path = self.mktemp()
        Path(path).write_text('hostnme = "x"\n' + MINIMAL)
        [found] = check_config(path)
        self.assertEqual(str(found).split(":")[:3], [path, "1", " hostnme"])


class ExtensionTests(SynchronousTestCase):
    """Plugins declare the keys they own instead of being reported as typos."""

    def setUp(self) -> None:
        saved = {table: set(keys) for table, keys in config._KNOWN.items()}
        checks = list(config._CHECKS)

        def restore() -> None:
            config._KNOWN.clear()
            config._KNOWN.update(saved)
            config._CHECKS[:] = checks

        self.addCleanup(restore)

    def test_registered_listener_key(self) -> None:
        """A registered listener key is accepted and handed over in ``options``."""
        config.register_keys("listener", "certificate")
        text = MINIMAL.replace('profile = "relay"', 'profile = "relay"\ncertificate = "/c.pem"')
        self.assertEqual(parse_config(text).listeners[0].options, {"certificate": "/c.pem"})

    def test_registered_section(self) -> None:
        """A registered top-level section is accepted and left to its plugin."""
        config.register_keys("", "example")
        self.assertEqual(parse_config(MINIMAL + "[example]\nanything = 1\n").raw["example"],
                         {"anything": 1})

    def test_registered_check(self) -> None:
        """A registered check's problems are located like the core's."""
        config.register_keys("", "example")
        config.register_check(lambda raw: [(("example", "key"), "missing key file")]
                               if "example" in raw else [])
        found = problems(MINIMAL + "[example]\nkey = 1\n")
        self.assertEqual([(p.key, p.line, p.message) for p in found],
                         [("example.key", 9, "missing key file")])

    def test_failing_check(self) -> None:
        """A check that raises becomes a problem instead of a crash."""
        config.register_check(lambda raw: 1 / 0)  # type: ignore[arg-type, return-value]
        [found] = problems(MINIMAL)
        self.assertIn("ZeroDivisionError", found.message)


class LocatorTests(SynchronousTestCase):
    """Finding keys in the text, which tomllib does not do for us."""

    def test_quoted_and_dotted_keys(self) -> None:
        """Quoted table names, dotted keys and arrays of tables are found."""
        locator = config.Locator(
            '[domains."ex.org"]\nusers = [\n "a = b",\n]\n[[listener]]\nx.y = 1\n'
            '[[listener]]\n"q" = 2\n'
        )
        self.assertEqual(locator.line(("domains", "ex.org", "users")), 2)
        self.assertEqual(locator.line(("listener", 0, "x", "y")), 6)
        self.assertEqual(locator.line(("listener", 1, "q")), 8)
        self.assertEqual(locator.line(("listener", 1, "missing")), 7)
        self.assertIsNone(locator.line(("nowhere",)))

    @given(st.lists(st.tuples(st.sampled_from(["", "# note", "[queue]", "[limits]"]),
                              st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)),
                    min_size=1, max_size=8, unique_by=lambda item: item[1]))
    def test_unknown_keys_located(self, lines: list[tuple[str, str]]) -> None:
        """Whatever the layout, each unknown key is reported at the line that sets it."""
        text, expected, table, seen = "", {}, "", set()
        for number, (prefix, key) in enumerate(lines):
            key = f"zz{key}"  # never a known key
            if prefix in seen:  # a table may be opened only once
                prefix = ""
            seen.add(prefix)
            table = prefix[1:-1] if prefix.startswith("[") else table
            text += f"{prefix}\n{key} = 1\n"
            expected[f"{table}.{key}" if table else key] = 2 * number + 2
        found = problems(text + MINIMAL.replace("[[listener]]", "\n[[listener]]"))
        located = {p.key: p.line for p in found if p.message.startswith("unknown key")}
        self.assertEqual(located, expected)

    def test_multiline_strings_skipped(self) -> None:
        """Text inside multi-line strings is not mistaken for keys."""
        locator = config.Locator('a = """\nb = 1\n"""\nb = 2\n')
        self.assertEqual(locator.line(("b",)), 4)

    def test_dotted_names(self) -> None:
        """Paths print as operators write them."""
        self.assertEqual(config.dotted(("listener", 2, "endpoint")), "listener[2].endpoint")
        self.assertEqual(config.dotted(("domains", "a.b", "users")), 'domains."a.b".users')

    def test_config_is_frozen(self) -> None:
        """A loaded Config cannot be changed behind the server's back."""
        parsed = parse_config(MINIMAL)
        self.assertIsInstance(parsed, Config)
        with self.assertRaises(AttributeError):
            parsed.hostname = "x"  # type: ignore[misc]

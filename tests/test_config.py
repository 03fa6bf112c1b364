"""Config validation: every mistake reported as `file:line: message`, nothing half-loaded."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest

from gateway.config.loader import ConfigError, load_config, parse_config, parse_size, usd_to_nanousd

HASH_A = hashlib.sha256(b"a").hexdigest()
HASH_B = hashlib.sha256(b"b").hexdigest()
ROOT = Path(__file__).resolve().parent.parent


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), Path("gw.yaml"))
    return caught.value.problems


def test_sample_config_loads_with_its_teams_and_keys():
    config = load_config(ROOT / "config" / "gateway.yaml")
    assert sorted(config.teams) == ["product", "research"]
    research = config.teams["research"]
    assert research.limits.requests_per_minute == 60
    assert research.limits.bytes_per_day == 500_000_000
    assert research.limits.spend_per_day_nanousd == 20_000_000_000
    assert research.on_limit == "queue" and research.queue.max_depth == 100
    ci_key = [k for k in research.keys if k.id == "research-ci"][0]
    assert ci_key.expires == date(2026, 12, 31)
    assert ci_key.limits.requests_per_minute == 10
    assert ci_key.sha256 == hashlib.sha256(b"mgw-demo-research-ci").digest()
    product = config.teams["product"]
    assert product.billing.plan == "capped_per_request"
    assert product.billing.rate_nanousd == 10_000_000
    assert product.billing.max_requests_per_day == 200
    assert config.listen.max_request_body == 64_000_000


def test_minimal_config_gets_spec_defaults():
    config = parse_config("teams: {}\n", Path("gw.yaml"))
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8787)
    assert config.upstream.base_url == "https://api.openai.com/v1"
    assert config.upstream.api_key_env == "OPENAI_API_KEY"
    assert config.storage.flush_interval_ms == 100
    assert config.renew_warning_days == 7
    assert str(config.limits_timezone) == "UTC"


def test_every_problem_is_reported_with_its_line():
    problems = problems_of(
        f"""\
        listen: {{port: 80000, max_request_body: lots}}
        upstream:
          base_url: ftp://example
          timeout: 5
        limits_timezone: Mars/Olympus
        limits: {{backend: redis, redis_url: "http://:pw@cache:6379"}}
        teams:
          research:
            on_limit: drop
            limits:
              requests_per_minute: -1
              spend_per_day_usd: ten
            keys:
              - id: a
                sha256: {HASH_A}
              - id: a
                sha256: {HASH_B}
              - id: c
                sha256: nothex
          other:
            keys:
              - id: d
                sha256: {HASH_A}
                expires: someday
        """
    )
    assert problems == [
        "gw.yaml:1: listen.max_request_body: 'lots' is not a size (use e.g. 500MB, 2GiB or bytes)",
        "gw.yaml:1: listen.port: must be <= 65535",
        "gw.yaml:3: upstream.base_url: 'ftp://example' is not an http(s) URL",
        "gw.yaml:4: upstream: unknown key 'timeout'",
        "gw.yaml:5: config.limits_timezone: 'Mars/Olympus' is not a known time zone",
        "gw.yaml:6: limits.redis_url: must be a redis://[[user]:password@]host[:port][/db] "
        "or rediss:// URL",
        "gw.yaml:9: teams.research.on_limit: must be one of: reject, queue",
        "gw.yaml:11: teams.research.limits.requests_per_minute: must be >= 0",
        "gw.yaml:12: teams.research.limits.spend_per_day_usd: 'ten' is not a number of USD",
        "gw.yaml:16: duplicate key id 'a' (also in team research)",
        "gw.yaml:19: teams.research.keys[2].sha256: must be the 64-character hex sha256 of the key",
        "gw.yaml:22: key 'd' has the same sha256 as key 'a'",
        "gw.yaml:24: teams.other.keys[0].expires: 'someday' is not a date (YYYY-MM-DD)",
    ]


def test_duplicate_yaml_keys_and_unknown_team_fields_are_refused():
    problems = problems_of(
        """\
        teams:
          research:
            modelz: [gpt-4o]
          research:
            models: [gpt-4o]
        """
    )
    assert problems == [
        "gw.yaml:3: teams.research: unknown key 'modelz'",
        "gw.yaml:4: teams: duplicate key 'research'",
    ]


def test_broken_yaml_points_at_the_line():
    assert problems_of("teams:\n  a: [1, 2\n  b: 3\n")[0].startswith("gw.yaml:3: invalid YAML")


def test_plans_need_their_parameters():
    problems = problems_of(
        """\
        teams:
          t:
            billing: {plan: capped_per_request}
        """
    )
    assert problems == [
        "gw.yaml:3: teams.t.billing: plan 'capped_per_request' needs rate_usd",
        "gw.yaml:3: teams.t.billing: plan 'capped_per_request' needs max_requests_per_day",
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500MB", 500_000_000),
        ("2GiB", 2 * 2**30),
        (1234, 1234),
        ("64KB", 64_000),
        ("1.5MB", 1_500_000),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-5", "12 apples", "0.5B", True])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_usd_is_converted_exactly_to_nano_usd():
    assert usd_to_nanousd(0.1) == 100_000_000
    assert usd_to_nanousd("300") == 300_000_000_000
    assert usd_to_nanousd(0.000000001) == 1
    with pytest.raises(ValueError):
        usd_to_nanousd(0.0000000001)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_check_config_exit_codes(tmp_path: Path):
    good = run_cli("check-config", "config/gateway.yaml")
    assert good.returncode == 0, good.stderr
    assert "ok (2 teams, 3 keys)" in good.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("teams:\n  t:\n    on_limit: never\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"{bad}:3: teams.t.on_limit: must be one of: reject, queue"
    )


def test_keys_new_prints_a_key_whose_hash_is_in_the_entry():
    result = run_cli(
        "keys", "new", "--team", "research", "--id", "research-new", "--expires", "30d"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    secret = lines[0].rsplit(" ", 1)[1]
    assert secret.startswith("mgw-") and len(secret) > 40
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert f"  sha256: {digest}" in lines
    assert "- id: research-new" in lines
    assert any(line.startswith("  expires: ") for line in lines)
    assert secret not in result.stdout.split("\n", 1)[1]


def test_keys_new_refuses_unknown_team():
    result = run_cli("keys", "new", "--team", "nobody")
    assert result.returncode == 2
    assert "unknown team 'nobody'" in result.stderr


def test_report_lists_key_expiry_and_renewal(tmp_path: Path):
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"""\
renew_warning_days: 7
storage: {{sqlite_path: {tmp_path / "none.sqlite3"}}}
teams:
  t:
    keys:
      - {{id: forever, sha256: {HASH_A}}}
      - {{id: old, sha256: {HASH_B}, expires: 2020-01-01}}
      - {{id: later, sha256: {"c" * 64}, expires: 2999-01-01}}
"""
    )
    result = run_cli("report", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "no calls in the ledger for this period"
    assert "  t/forever: no expiry" in lines
    assert "  t/old: EXPIRED on 2020-01-01" in lines
    assert any(line.startswith("  t/later: expires 2999-01-01 (") for line in lines)

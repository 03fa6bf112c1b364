"""`metering-gateway check-config` warns about keys whose `expires` day is past: the config
still loads (exit 0), and each such key gets one `FILE:LINE: warning:` line on stderr."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from gateway.commands.config_file import expired_key_warnings
from gateway.config.loader import load_config
from tests.conftest import sha
from tests.test_config import run_cli

CONFIG = f"""\
teams:
  research:
    keys:
      - id: research-dev
        sha256: {sha("a")}
      - id: ci-old
        sha256: {sha("b")}
        expires: 2025-01-01
      - id: research-future
        sha256: {sha("c")}
        expires: 2999-12-31
  product:
    keys:
      - id: product-last-day
        sha256: {sha("d")}
        expires: 2998-06-30
      - expires: 2020-02-29
        id: product-older
        sha256: {sha("e")}
"""


def test_check_config_prints_a_warning_line_per_expired_key_and_still_exits_0(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok (2 teams, 5 keys)\n"
    assert result.stderr.splitlines() == [
        f"{path}:8: warning: key 'ci-old' of team 'research' expired on 2025-01-01",
        f"{path}:17: warning: key 'product-older' of team 'product' expired on 2020-02-29",
    ]


def test_check_config_is_silent_when_no_key_has_expired(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.replace("2025-01-01", "2999-01-01").replace("2020-02-29", "2999-02-28"))
    result = run_cli("check-config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: ok (2 teams, 5 keys)\n"


def test_a_key_is_expired_from_the_day_after_its_expires_date(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    on_last_day = expired_key_warnings(config, "g.yaml", date(2998, 6, 30))
    day_after = expired_key_warnings(config, "g.yaml", date(2998, 7, 1))
    assert on_last_day == [
        "g.yaml:8: warning: key 'ci-old' of team 'research' expired on 2025-01-01",
        "g.yaml:17: warning: key 'product-older' of team 'product' expired on 2020-02-29",
    ]
    assert day_after == [
        "g.yaml:8: warning: key 'ci-old' of team 'research' expired on 2025-01-01",
        "g.yaml:16: warning: key 'product-last-day' of team 'product' expired on 2998-06-30",
        "g.yaml:17: warning: key 'product-older' of team 'product' expired on 2020-02-29",
    ]

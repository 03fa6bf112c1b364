"""The config schema (`gateway/config/schema.py`): each key declared once, with a default (or
marked required), a check and a one-line doc; validation, defaults and the README reference
all come from those declarations."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from gateway.config.checks import Check
from gateway.config.fields import CUSTOM, LIST, MAP, SECTION, VALUE, accepted, declared
from gateway.config.loader import ConfigError, GatewayConfig, KeyConfig, Limits, parse_config
from gateway.config.reference import sections

SHA = "a" * 64
ALL_KEYS = [(path, key) for path, _, keys in sections() for key in keys]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), Path("gw.yaml"))
    return caught.value.problems


def key_id(case: tuple) -> str:
    path, key = case
    return f"{path}.{key.name}" if path else key.name


@pytest.mark.parametrize("case", ALL_KEYS, ids=key_id)
def test_every_key_has_a_default_or_is_required_and_never_both(case):
    _, key = case
    if key.shape == CUSTOM and not key.has_default:
        assert key.read is not None, "without a default, its reader makes one of nothing"
    else:
        assert key.has_default != key.required


@pytest.mark.parametrize("case", ALL_KEYS, ids=key_id)
def test_every_key_has_a_check_and_a_one_line_doc(case):
    _, key = case
    if key.shape == VALUE:
        assert isinstance(key.check, Check) and key.check.kind
    elif key.shape == CUSTOM:
        assert key.read is not None and key.kind
    else:  # a section: its own keys are checked, one by one
        assert key.shape in (SECTION, LIST, MAP) and dataclasses.is_dataclass(key.section)
        assert declared(key.section)
    if key.shape in (VALUE, CUSTOM, LIST, MAP):
        assert key.doc and "\n" not in key.doc and not key.doc.endswith(".")
    else:  # a mapping documented by its keys' rows, or (keys[].limits) by a row of its own
        assert key.doc is None or "\n" not in key.doc


@pytest.mark.parametrize("case", ALL_KEYS, ids=key_id)
def test_a_dataclass_default_is_the_declared_one(case):
    _, key = case
    cls = next(cls for _, cls, keys in sections() if key in keys)
    field = next(f for f in dataclasses.fields(cls) if f.name == key.field)
    if field.default is not dataclasses.MISSING:
        assert field.default == key.default_value()
    elif field.default_factory is not dataclasses.MISSING:
        assert field.default_factory() == key.default_value()
    else:  # the loader always gives it: the root's own keys, and required ones
        assert cls is GatewayConfig or key.required


def test_a_config_of_only_teams_gets_every_declared_default():
    config = parse_config("teams: {}\n", Path("gw.yaml"))
    for key in declared(GatewayConfig):
        if key.shape == VALUE:
            assert getattr(config, key.field) == key.default, key.name
        elif key.shape == SECTION:
            assert getattr(config, key.field) == key.section(), key.name
    assert config.listen.port == 8787 and str(config.limits_timezone) == "UTC"
    assert config.pricing.source.startswith(config.pricing.catalog.source)


def test_a_team_of_nothing_gets_every_declared_default():
    team = parse_config("teams: {t: {}}\n", Path("gw.yaml")).teams["t"]
    for key in declared(type(team)):
        assert getattr(team, key.field) == key.default_value(), key.name
    assert (team.name, team.pricing_overrides) == ("t", None)


def test_a_key_with_another_yaml_name_is_read_under_that_name():
    renamed = {key.name: key.field for key in declared(Limits) if key.name != key.field}
    assert renamed == {
        "spend_per_day_usd": "spend_per_day_nanousd",
        "spend_per_month_usd": "spend_per_month_nanousd",
    }
    config = parse_config(
        "limits: {backend: redis}\nteams: {t: {limits: {spend_per_day_usd: 0.5}, "
        "billing: {plan: per_request, rate_usd: 0.01}}}\n",
        Path("gw.yaml"),
    )
    assert config.limits_backend.backend == "redis"
    assert config.teams["t"].limits.spend_per_day_nanousd == 500_000_000
    assert config.teams["t"].billing.rate_nanousd == 10_000_000


def test_the_accepted_keys_are_the_declared_names():
    assert accepted(KeyConfig) == {"id", "sha256", "expires", "limits"}
    assert "limits" in accepted(GatewayConfig) and "limits_backend" not in accepted(GatewayConfig)
    assert problems_of("limits_backend: {}\nteams: {}\n") == [
        "gw.yaml:1: config: unknown key 'limits_backend'"
    ]


@pytest.mark.parametrize(
    ("text", "place", "message"),
    [
        # integers, with a minimum
        ("renew_warning_days: -1", "config.renew_warning_days", "must be >= 0"),
        ("renew_warning_days: true", "config.renew_warning_days", "must be an integer"),
        ("storage: {flush_interval_ms: 0}", "storage.flush_interval_ms", "must be >= 1"),
        # numbers, positive or not negative
        ("listen: {body_timeout_s: 0}", "listen.body_timeout_s", "must be > 0"),
        ("shutdown_grace_s: -1", "config.shutdown_grace_s", "must not be negative"),
        ("upstream: {timeout_s: soon}", "upstream.timeout_s", "must be a number"),
        # sizes
        ("listen: {max_request_body: 0.5B}", "listen.max_request_body",
         "'0.5B' is not a whole number of bytes"),
        ("listen: {max_request_body: -5}", "listen.max_request_body", "must not be negative"),
        # choices
        ("log_level: loud", "config.log_level", "must be one of: debug, info, warning, error"),
        ("pricing: {unknown_model: guess}", "pricing.unknown_model",
         "must be one of: estimate, zero, reject"),
        # strings, paths, booleans
        ('admin: {key_env: ""}', "admin.key_env", "must be a non-empty string"),
        ("storage: {sqlite_path: 5}", "storage.sqlite_path", "must be a non-empty string"),
        ("log_calls: 1", "config.log_calls", "must be true or false"),
        # URLs, time zones, header names
        ("upstream: {base_url: ftp://x}", "upstream.base_url", "'ftp://x' is not an http(s) URL"),
        ("limits: {redis_url: redis://h/x}", "limits.redis_url",
         "must be a redis://[[user]:password@]host[:port][/db] or rediss:// URL"),
        ("limits_timezone: Mars/Olympus", "config.limits_timezone",
         "'Mars/Olympus' is not a known time zone"),
        ("upstream: {forward_headers: [X-Api-Key]}", "upstream.forward_headers",
         "'X-Api-Key' may hold a credential and is never forwarded"),
        ("upstream: {forward_headers: [a b]}", "upstream.forward_headers",
         "'a b' is not a header name (letters, digits, '-'; '*' last)"),
    ],
)  # fmt: skip
def test_each_kind_of_check_refuses_a_bad_value_with_its_message(text, place, message):
    assert problems_of(f"{text}\nteams: {{}}\n") == [f"gw.yaml:1: {place}: {message}"]


@pytest.mark.parametrize(
    ("team", "problem"),
    [
        ("models: [1]", "teams.t.models: must be a list of strings"),
        ("endpoints: [FOO /v1/x]",
         "teams.t.endpoints: 'FOO /v1/x': 'FOO' is not an HTTP method (GET, POST, ...)"),
        ("endpoints: [/v2/x]", "teams.t.endpoints: '/v2/x': the path must start with /v1/"),
        ("limits: {spend_per_day_usd: [1]}",
         "teams.t.limits.spend_per_day_usd: must be a number of USD"),
        ("limits: {spend_per_day_usd: 0.0000000001}",
         "teams.t.limits.spend_per_day_usd: '1e-10' has more than 9 decimals"),
        ("limits: {max_concurrent: 0}", "teams.t.limits.max_concurrent: must be >= 1"),
        ("keys: [{id: a, sha256: nothex}]",
         "teams.t.keys[0].sha256: must be the 64-character hex sha256 of the key"),
        (f"keys: [{{id: a, sha256: {SHA}, expires: soon}}]",
         "teams.t.keys[0].expires: 'soon' is not a date (YYYY-MM-DD)"),
        ("queue: 5", "teams.t.queue must be a mapping"),
        ("keys: {id: a}", "teams.t.keys must be a list"),
    ],
)  # fmt: skip
def test_each_kind_of_team_check_refuses_a_bad_value_with_its_message(team, problem):
    assert problems_of(f"teams:\n  t: {{{team}}}\n") == [f"gw.yaml:2: {problem}"]


def test_a_rule_of_a_whole_section_is_reported_at_the_section():
    assert problems_of("listen:\n  host: h\n  port: 70000\nteams: {}\n") == [
        "gw.yaml:2: listen.port: must be <= 65535"
    ]
    assert problems_of("teams:\n  t:\n    billing:\n      plan: per_request\n") == [
        "gw.yaml:4: teams.t.billing: plan 'per_request' needs rate_usd"
    ]


def test_a_required_key_missing_is_reported_at_its_mapping():
    assert problems_of("log_calls: true\n") == ["gw.yaml:1: config: missing 'teams'"]
    assert problems_of("teams:\n  t:\n    keys:\n      - sha256: " + SHA + "\n") == [
        "gw.yaml:4: teams.t.keys[0]: missing 'id'"
    ]


def test_a_list_entry_without_its_identity_is_dropped_unread():
    assert problems_of(
        """\
        teams:
          t:
            keys:
              - {id: a, sha256: nothex, expires: soon, limits: 5}
              - {expires: soon}
        """
    ) == [
        "gw.yaml:4: teams.t.keys[0].sha256: must be the 64-character hex sha256 of the key",
        "gw.yaml:5: teams.t.keys[1]: missing 'id'",
        "gw.yaml:5: teams.t.keys[1]: missing 'sha256'",
    ]


def test_a_key_gets_its_team_from_the_mapping_that_holds_it():
    config = parse_config(f"teams: {{t: {{keys: [{{id: a, sha256: {SHA}}}]}}}}\n", Path("g.yaml"))
    (key,) = config.teams["t"].keys
    assert (key.id, key.team, key.sha256, key.expires) == ("a", "t", bytes.fromhex(SHA), None)

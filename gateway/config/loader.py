"""YAML config → frozen dataclasses, validated with `file:line: message` errors.

The YAML is composed into nodes (not loaded) so every value keeps the line it came from.
Validation collects every problem before failing, so `check-config` can list them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.pricing.book import BUILTIN, PriceBook
from gateway.pricing.table import UNKNOWN_MODEL_POLICIES, PricingError, load_price_table

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
CONFIG_ENV = "GATEWAY_CONFIG"
DEFAULT_MAX_REQUEST_BODY = 64 * 10**6
NANOUSD_PER_USD = 10**9


class ConfigError(Exception):
    """Every problem found in a config file, each as `file:line: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------- the parsed config


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_day: int | None = None
    bytes_per_day: int | None = None
    spend_per_day_nanousd: int | None = None
    spend_per_month_nanousd: int | None = None
    max_concurrent: int | None = None

    def configured(self) -> dict[str, int]:
        return {
            name: value
            for name in self.__slots__  # type: ignore[attr-defined]
            if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_wait_s: float = 30.0
    max_depth: int = 100


@dataclass(frozen=True, slots=True)
class Billing:
    plan: str = "usage"
    rate_nanousd: int = 0
    max_requests_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class KeyConfig:
    id: str
    team: str
    sha256: bytes
    expires: date | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class EndpointRule:
    """One entry of a team's `endpoints` allow-list: a path prefix, optionally one method."""

    path: str
    method: str | None = None  # None: every method

    def allows(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class TeamUpstream:
    """A team's own upstream credentials (`teams.<team>.upstream`)."""

    api_key_env: str | None = None
    organization: str | None = None
    project: str | None = None


@dataclass(frozen=True, slots=True)
class TeamConfig:
    name: str
    models: frozenset[str] | None = None
    endpoints: tuple[EndpointRule, ...] | None = None
    upstream: TeamUpstream = field(default_factory=TeamUpstream)
    on_limit: str = "reject"
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: Limits = field(default_factory=Limits)
    billing: Billing = field(default_factory=Billing)
    keys: tuple[KeyConfig, ...] = ()
    pricing: PriceBook | None = None
    pricing_overrides: Mapping[str, Any] | None = None  # as written, to apply over a new table
    enforce: bool = True
    on_budget_exhausted_mid_stream: str = "finish"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY
    body_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    connect_timeout_s: float = 10.0
    timeout_s: float = 600.0
    forward_headers: tuple[str, ...] = ()  # extra client headers for the upstream; `x-foo-*`


@dataclass(frozen=True, slots=True)
class StorageConfig:
    sqlite_path: Path = Path("data/ledger.sqlite3")
    flush_interval_ms: int = 100
    backend: str = "sqlite"
    dsn_env: str = "GATEWAY_PG_DSN"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_env: str = "GATEWAY_ADMIN_KEY"


@dataclass(frozen=True, slots=True)
class LimitsBackendConfig:
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_backend_error: str = "fail_closed"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    path: Path
    listen: ListenConfig
    upstream: UpstreamConfig
    storage: StorageConfig
    admin: AdminConfig
    pricing: PriceBook
    limits_timezone: ZoneInfo
    renew_warning_days: int
    limits_backend: LimitsBackendConfig
    teams: Mapping[str, TeamConfig]
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    log_calls: bool = True

    def keys_by_hash(self) -> dict[bytes, KeyConfig]:
        return {key.sha256: key for team in self.teams.values() for key in team.keys}

    def team_prices(self, team: str | None) -> PriceBook:
        """What a team's calls are priced with: the global book under the team's `pricing:`."""
        team_config = self.teams.get(team) if team else None
        return team_config.pricing if team_config and team_config.pricing else self.pricing


# ---------------------------------------------------------------- YAML with line numbers


class _Problems:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, str]] = []

    def add(self, node: yaml.Node | None, message: str) -> None:
        self.add_at(node.start_mark.line + 1 if node is not None else 1, message)

    def add_at(self, line: int, message: str) -> None:
        self._found.append((line, f"{self.filename}:{line}: {message}"))

    def __bool__(self) -> bool:
        return bool(self._found)

    def __len__(self) -> int:
        return len(self._found)

    def sorted(self) -> list[str]:
        """In file order (stable, so problems on one line keep the order they were found)."""
        return [text for _, text in sorted(self._found, key=lambda found: found[0])]


def _compose(text: str, problems: _Problems) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.add_at(mark.line + 1 if mark else 1, f"invalid YAML: {exc.problem}")
    except yaml.YAMLError as exc:
        problems.add_at(1, f"invalid YAML: {exc}")
    return None


def _plain(node: yaml.Node) -> Any:
    """The Python value of a node, as PyYAML's safe loader would construct it."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _mapping(
    node: yaml.Node, where: str, problems: _Problems, allowed: set[str] | None = None
) -> dict[str, yaml.Node]:
    """A mapping node's entries by key; reports wrong type, duplicates and unknown keys."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, f"{where} must be a mapping")
        return {}
    entries: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            problems.add(key_node, f"{where}: keys must be strings")
            continue
        if key in entries:
            problems.add(key_node, f"{where}: duplicate key '{key}'")
            continue
        if allowed is not None and key not in allowed:
            problems.add(key_node, f"{where}: unknown key '{key}'")
            continue
        entries[key] = value_node
    return entries


# ---------------------------------------------------------------- scalar validators

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """`500MB` (10^6), `2GiB` (2^30) or plain bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 500MB, 2GiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size (use e.g. 500MB, 2GiB or bytes)")
    number, unit = Decimal(match.group(1)), (match.group(2) or "b").lower()
    size = number * _SIZE_UNITS[unit]
    if size != size.to_integral_value():
        raise ValueError(f"'{value}' is not a whole number of bytes")
    return int(size)


def usd_to_nanousd(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number of USD")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"'{value}' is not a number of USD") from exc
    if amount < 0:
        raise ValueError("must not be negative")
    nano = amount * NANOUSD_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"'{value}' has more than 9 decimals")
    return int(nano)


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return check


def _number(*, positive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if value < 0 or (positive and value == 0):
            raise ValueError("must be > 0" if positive else "must not be negative")
        return float(value)

    return check


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of: {', '.join(options)}")
        return str(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of strings")
    return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+\*?$")
_NEVER_FORWARDED = ("authorization", "proxy-authorization", "api-key", "x-api-key", "cookie")


def _header_names(value: Any) -> tuple[str, ...]:
    names = []
    for name in _string_list(value):
        lowered = name.lower()
        if not _HEADER_NAME.match(name):
            raise ValueError(f"'{name}' is not a header name (letters, digits, '-'; '*' last)")
        if lowered.rstrip("*") in _NEVER_FORWARDED or lowered == "*":
            raise ValueError(f"'{name}' may hold a credential and is never forwarded")
        names.append(lowered)
    return tuple(names)


def _url(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text.rstrip("/")


def _redis_url(value: Any) -> str:
    text = _string(value)
    # Not echoed: the URL may hold a password.
    if not re.match(r"^rediss?://[^/\s]+(/\d+)?/?$", text):
        raise ValueError("must be a redis://[[user]:password@]host[:port][/db] or rediss:// URL")
    return text


def _date(value: Any) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"'{value}' is not a date (YYYY-MM-DD)") from exc


def _timezone(value: Any) -> ZoneInfo:
    try:
        return ZoneInfo(_string(value))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"'{value}' is not a known time zone") from exc


def _field(
    entries: dict[str, yaml.Node],
    name: str,
    check: Callable[[Any], Any],
    where: str,
    problems: _Problems,
) -> Any:
    """The validated value of one optional field, or None (absent or invalid)."""
    node = entries.get(name)
    if node is None:
        return None
    try:
        return check(_plain(node))
    except ValueError as exc:
        problems.add(node, f"{where}.{name}: {exc}")
        return None


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


# ---------------------------------------------------------------- sections

_LIMIT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "requests_per_minute": _int(0),
    "tokens_per_minute": _int(0),
    "requests_per_hour": _int(0),
    "requests_per_day": _int(0),
    "tokens_per_day": _int(0),
    "bytes_per_day": parse_size,
    "spend_per_day_usd": usd_to_nanousd,
    "spend_per_month_usd": usd_to_nanousd,
    "max_concurrent": _int(1),
}
_LIMIT_FIELD_NAMES = {
    "spend_per_day_usd": "spend_per_day_nanousd",
    "spend_per_month_usd": "spend_per_month_nanousd",
}


def _limits(node: yaml.Node | None, where: str, problems: _Problems) -> Limits:
    if node is None:
        return Limits()
    entries = _mapping(node, where, problems, set(_LIMIT_CHECKS))
    values = {
        _LIMIT_FIELD_NAMES.get(name, name): _field(entries, name, check, where, problems)
        for name, check in _LIMIT_CHECKS.items()
    }
    return Limits(**_given(**values))


def _section(
    root: dict[str, yaml.Node],
    name: str,
    checks: dict[str, Callable[[Any], Any]],
    problems: _Problems,
) -> dict[str, Any]:
    node = root.get(name)
    if node is None:
        return {}
    entries = _mapping(node, name, problems, set(checks))
    return _given(
        **{key: _field(entries, key, check, name, problems) for key, check in checks.items()}
    )


def _billing(node: yaml.Node | None, where: str, problems: _Problems) -> Billing:
    if node is None:
        return Billing()
    entries = _mapping(node, where, problems, BILLING_KEYS)
    plan = _field(
        entries, "plan", _choice("usage", "per_request", "capped_per_request"), where, problems
    )
    rate = _field(entries, "rate_usd", usd_to_nanousd, where, problems)
    cap = _field(entries, "max_requests_per_day", _int(1), where, problems)
    plan = plan or "usage"
    if plan in ("per_request", "capped_per_request") and "rate_usd" not in entries:
        problems.add(node, f"{where}: plan '{plan}' needs rate_usd")
    if plan == "capped_per_request" and "max_requests_per_day" not in entries:
        problems.add(node, f"{where}: plan 'capped_per_request' needs max_requests_per_day")
    return Billing(plan=plan, rate_nanousd=rate or 0, max_requests_per_day=cap)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _sha256(value: Any) -> bytes:
    text = _string(value).lower()
    if not _SHA256_RE.match(text):
        raise ValueError("must be the 64-character hex sha256 of the key")
    return bytes.fromhex(text)


def _keys(node: yaml.Node | None, team: str, problems: _Problems) -> tuple[KeyConfig, ...]:
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        problems.add(node, f"teams.{team}.keys must be a list")
        return ()
    keys = []
    for index, item in enumerate(node.value):
        where = f"teams.{team}.keys[{index}]"
        entries = _mapping(item, where, problems, KEY_KEYS)
        key_id = _field(entries, "id", _string, where, problems)
        digest = _field(entries, "sha256", _sha256, where, problems)
        for required in ("id", "sha256"):
            if required not in entries:
                problems.add(item, f"{where}: missing '{required}'")
        if key_id is None or digest is None:
            continue
        keys.append(
            KeyConfig(
                id=key_id,
                team=team,
                sha256=digest,
                expires=_field(entries, "expires", _date, where, problems),
                limits=_limits(entries.get("limits"), f"{where}.limits", problems),
            )
        )
    return tuple(keys)


HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _endpoints(value: Any) -> tuple[EndpointRule, ...]:
    rules = []
    for entry in _string_list(value):
        method, _, path = entry.strip().rpartition(" ")
        method = method.strip()
        if method and method not in HTTP_METHODS:
            raise ValueError(f"'{entry}': '{method}' is not an HTTP method (GET, POST, ...)")
        if not path.startswith("/v1/"):
            raise ValueError(f"'{entry}': the path must start with /v1/")
        rules.append(EndpointRule(path=path, method=method or None))
    return tuple(rules)


def _team_upstream(node: yaml.Node | None, where: str, problems: _Problems) -> TeamUpstream:
    if node is None:
        return TeamUpstream()
    entries = _mapping(node, where, problems, TEAM_UPSTREAM_KEYS)
    return TeamUpstream(
        **_given(
            **{name: _field(entries, name, _string, where, problems) for name in TEAM_UPSTREAM_KEYS}
        )
    )


def _queue(node: yaml.Node | None, where: str, problems: _Problems) -> QueueConfig:
    if node is None:
        return QueueConfig()
    entries = _mapping(node, where, problems, QUEUE_KEYS)
    return QueueConfig(
        **_given(
            max_wait_s=_field(entries, "max_wait_s", _number(positive=False), where, problems),
            max_depth=_field(entries, "max_depth", _int(0), where, problems),
        )
    )


_TEAM_KEYS = {
    "models", "endpoints", "upstream", "on_limit", "queue", "limits", "billing", "keys", "pricing",
    "enforce", "on_budget_exhausted_mid_stream",
}  # fmt: skip


def _team(
    name: str, node: yaml.Node, global_prices: PriceBook | None, problems: _Problems
) -> TeamConfig:
    where = f"teams.{name}"
    entries = _mapping(node, where, problems, _TEAM_KEYS)
    models = _field(entries, "models", _string_list, where, problems)
    prices = overrides = None
    if "pricing" in entries and global_prices is not None:
        try:
            overrides = _plain(entries["pricing"])
            prices = global_prices.with_overrides(overrides)
        except (PricingError, ValueError, TypeError, AttributeError) as exc:
            problems.add(entries["pricing"], f"{where}.pricing: {exc}")
    return TeamConfig(
        name=name,
        models=frozenset(models) if models is not None else None,
        endpoints=_field(entries, "endpoints", _endpoints, where, problems),
        upstream=_team_upstream(entries.get("upstream"), f"{where}.upstream", problems),
        on_limit=_field(entries, "on_limit", _choice("reject", "queue"), where, problems)
        or "reject",
        queue=_queue(entries.get("queue"), f"{where}.queue", problems),
        limits=_limits(entries.get("limits"), f"{where}.limits", problems),
        billing=_billing(entries.get("billing"), f"{where}.billing", problems),
        keys=_keys(entries.get("keys"), name, problems),
        pricing=prices,
        pricing_overrides=overrides,
        enforce=_field(entries, "enforce", _boolean, where, problems) is not False,
        on_budget_exhausted_mid_stream=_field(
            entries, "on_budget_exhausted_mid_stream", _choice("finish", "cut"), where, problems
        )
        or "finish",
    )


def _check_unique_keys(teams: dict[str, TeamConfig], key_nodes: dict, problems: _Problems) -> None:
    seen_ids: dict[str, str] = {}
    seen_hashes: dict[bytes, str] = {}
    for team in teams.values():
        for key in team.keys:
            node = key_nodes.get((team.name, key.id))
            if key.id in seen_ids:
                problems.add(node, f"duplicate key id '{key.id}' (also in team {seen_ids[key.id]})")
            if key.sha256 in seen_hashes:
                problems.add(
                    node, f"key '{key.id}' has the same sha256 as key '{seen_hashes[key.sha256]}'"
                )
            seen_ids.setdefault(key.id, team.name)
            seen_hashes.setdefault(key.sha256, key.id)


def _key_nodes(teams_node: dict[str, yaml.Node]) -> dict[tuple[str, str], yaml.Node]:
    """(team, key id) → the YAML node of that key, for pointing at duplicates."""
    located = {}
    for team, node in teams_node.items():
        if not isinstance(node, yaml.MappingNode):
            continue
        for key_node, value_node in node.value:
            if key_node.value == "keys" and isinstance(value_node, yaml.SequenceNode):
                for item in value_node.value:
                    if isinstance(item, yaml.MappingNode):
                        for k, v in item.value:
                            if k.value == "id" and isinstance(v, yaml.ScalarNode):
                                located[(team, v.value)] = item
    return located


def _resolve_path(value: str, config_dir: Path) -> Path:
    """Relative paths resolve against the working directory, else the config's own folder."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    beside_config = config_dir / path
    return beside_config if beside_config.exists() else path


PRICING_KEYS = {"table", "overrides", "unknown_model"}


def _prices(node: yaml.Node | None, config_dir: Path, problems: _Problems) -> PriceBook | None:
    """`pricing`: absent → the database; a path or an inline table → that table alone (unknown
    models estimated); `{table, overrides, unknown_model}` → a table (default: the database)
    under an override table."""
    if node is None:
        return PriceBook.builtin()
    if isinstance(node, yaml.MappingNode) and any(
        isinstance(key, yaml.ScalarNode) and key.value in PRICING_KEYS for key, _ in node.value
    ):
        return _layered_prices(node, config_dir, problems)
    try:
        value = _plain(node)
        if isinstance(value, str):
            return PriceBook(load_price_table(_resolve_path(value, config_dir)))
        return PriceBook(load_price_table(value))
    except (PricingError, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        problems.add(node, f"pricing: {exc}")
        return None


def _layered_prices(node: yaml.Node, config_dir: Path, problems: _Problems) -> PriceBook | None:
    entries = _mapping(node, "pricing", problems, PRICING_KEYS)
    before = len(problems)
    policy = _field(entries, "unknown_model", _choice(*UNKNOWN_MODEL_POLICIES), "pricing", problems)
    table_value = _field(entries, "table", _string, "pricing", problems) or BUILTIN
    overrides: Any = None
    try:
        if "overrides" in entries:
            overrides = _plain(entries["overrides"])
            if isinstance(overrides, str):
                overrides = _table_mapping(_resolve_path(overrides, config_dir))
    except (PricingError, OSError, yaml.YAMLError) as exc:
        problems.add(entries["overrides"], f"pricing.overrides: {exc}")
        return None
    if len(problems) > before:
        return None
    where = entries.get("table", node)
    try:
        if table_value == BUILTIN:
            base = PriceBook.builtin(unknown_model=policy or "estimate")
        else:
            table = load_price_table(_resolve_path(table_value, config_dir))
            base = PriceBook(table, unknown_model=policy or "estimate")
    except (PricingError, OSError, ValueError, yaml.YAMLError) as exc:
        problems.add(where, f"pricing.table: {exc}")
        return None
    if overrides is None:
        return base
    try:
        return base.with_overrides(overrides, "pricing.overrides")
    except (PricingError, ValueError, TypeError) as exc:
        problems.add(entries["overrides"], str(exc))
        return None


def _table_mapping(path: Path) -> Any:
    """A table file's mapping as written (overrides apply only the fields they give)."""
    text = path.read_text(encoding="utf-8")
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PricingError(f"{path}: not valid YAML: {exc}") from exc
    return {} if mapping is None else mapping


SECTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "listen": {
        "host": _string,
        "port": _int(0),
        "max_request_body": parse_size,
        "body_timeout_s": _number(positive=True),
    },
    "upstream": {
        "base_url": _url,
        "api_key_env": _string,
        "connect_timeout_s": _number(positive=True),
        "timeout_s": _number(positive=True),
        "forward_headers": _header_names,
    },
    "storage": {
        "sqlite_path": _string,
        "flush_interval_ms": _int(1),
        "backend": _choice("sqlite", "postgres"),
        "dsn_env": _string,
    },
    "admin": {"key_env": _string},
    "limits": {
        "backend": _choice("memory", "redis"),
        "redis_url": _redis_url,
        "on_backend_error": _choice("fail_closed", "fail_open"),
    },
}
QUEUE_KEYS = {"max_wait_s", "max_depth"}
BILLING_KEYS = {"plan", "rate_usd", "max_requests_per_day"}
KEY_KEYS = {"id", "sha256", "expires", "limits"}
TEAM_UPSTREAM_KEYS = ("api_key_env", "organization", "project")


def documented_keys() -> dict[str, set[str]]:
    """Every key the validator accepts, by section (the README's reference is checked on it)."""
    return {
        "top": set(_TOP_KEYS),
        **{name: set(checks) for name, checks in SECTIONS.items()},
        "pricing": set(PRICING_KEYS),
        "teams.<team>": set(_TEAM_KEYS),
        "teams.<team>.queue": set(QUEUE_KEYS),
        "teams.<team>.upstream": set(TEAM_UPSTREAM_KEYS),
        "teams.<team>.billing": set(BILLING_KEYS),
        "teams.<team>.keys[]": set(KEY_KEYS),
        "limits (team or key)": set(_LIMIT_CHECKS),
    }


_TOP_KEYS = {
    "listen", "upstream", "storage", "admin", "pricing", "limits_timezone",
    "renew_warning_days", "limits", "teams", "shutdown_grace_s", "log_level", "log_calls",
}  # fmt: skip


def parse_config(text: str, path: Path) -> GatewayConfig:
    """Parse and validate config text; raises ConfigError listing every problem."""
    problems = _Problems(str(path))
    document = _compose(text, problems)
    if document is None:
        if not problems:
            problems.add(None, "the config is empty")
        raise ConfigError(problems.sorted())
    root = _mapping(document, "config", problems, _TOP_KEYS)
    listen, upstream, storage, admin, limits_backend = (
        _section(root, name, SECTIONS[name], problems)
        for name in ("listen", "upstream", "storage", "admin", "limits")
    )
    if "sqlite_path" in storage:
        storage["sqlite_path"] = Path(storage["sqlite_path"])
    top = _given(
        limits_timezone=_field(root, "limits_timezone", _timezone, "config", problems),
        renew_warning_days=_field(root, "renew_warning_days", _int(0), "config", problems),
        shutdown_grace_s=_field(
            root, "shutdown_grace_s", _number(positive=False), "config", problems
        ),
        log_level=_field(
            root, "log_level", _choice("debug", "info", "warning", "error"), "config", problems
        ),
        log_calls=_field(root, "log_calls", _boolean, "config", problems),
    )
    if listen.get("port", 8787) > 65535:
        problems.add(root.get("listen"), "listen.port: must be <= 65535")
    prices = _prices(root.get("pricing"), path.parent, problems)
    teams_node = _mapping(root["teams"], "teams", problems) if "teams" in root else {}
    if "teams" not in root:
        problems.add(document, "config: missing 'teams'")
    teams = {name: _team(name, node, prices, problems) for name, node in teams_node.items()}
    _check_unique_keys(teams, _key_nodes(teams_node), problems)
    if problems or prices is None:
        raise ConfigError(problems.sorted())
    return GatewayConfig(
        path=path,
        listen=ListenConfig(**listen),
        upstream=UpstreamConfig(**upstream),
        storage=StorageConfig(**storage),
        admin=AdminConfig(**admin),
        pricing=prices,
        limits_timezone=top.get("limits_timezone", ZoneInfo("UTC")),
        renew_warning_days=top.get("renew_warning_days", 7),
        limits_backend=LimitsBackendConfig(**limits_backend),
        teams=teams,
        **{k: top[k] for k in ("shutdown_grace_s", "log_level", "log_calls") if k in top},
    )


def load_config(path: str | Path) -> GatewayConfig:
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{config_path}:1: cannot read the config: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{config_path}:1: the config is not UTF-8 text"]) from exc
    return parse_config(text, config_path)


def config_path_from(cli_value: str | None) -> Path:
    """`--config`, else `$GATEWAY_CONFIG`, else config/gateway.yaml."""
    return Path(cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)

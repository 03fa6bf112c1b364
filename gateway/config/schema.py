"""The config schema, declared once: each section a frozen dataclass, each key a field with
its default, its check and its one-line doc (`fields.setting` and friends). The reader checks
a file against it, the defaults are the fields' own, and the README's config reference is
tested against what `reference.py` derives from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from gateway.config import checks as check
from gateway.config.checks import Check, EndpointRule
from gateway.config.fields import custom, required, section, section_list, section_map, setting
from gateway.config.prices import read_prices, read_team_prices
from gateway.config.rules import (
    export_is_complete,
    exports_are_distinct,
    keys_are_unique,
    plan_has_its_parameters,
    port_fits,
)
from gateway.pricing.book import BUILTIN, UNKNOWN_MODEL_POLICIES, PriceBook

DEFAULT_MAX_REQUEST_BODY = 64 * 10**6

_COUNT, _AT_LEAST_ONE = check.integer(0), check.integer(1)


@dataclass(frozen=True, slots=True)
class Limits:
    """`teams.<team>.limits` and `teams.<team>.keys[].limits`: unset, no limit."""

    requests_per_minute: int | None = setting(None, _COUNT, "token bucket, burst = the limit")
    tokens_per_minute: int | None = setting(
        None, _COUNT,
        "token bucket; a call reserves its JSON body bytes / 4 + `max_tokens`, settled to the "
        "real count after",
    )  # fmt: skip
    requests_per_hour: int | None = setting(None, _COUNT, "calendar-hour quota")
    requests_per_day: int | None = setting(None, _COUNT, "calendar-day quota")
    tokens_per_day: int | None = setting(None, _COUNT, "input + output tokens a day")
    bytes_per_day: int | None = setting(None, check.size, "request + response body bytes a day")
    spend_per_day_nanousd: int | None = setting(
        None, check.usd, "spend cap a day", name="spend_per_day_usd"
    )
    spend_per_month_nanousd: int | None = setting(
        None, check.usd, "spend cap a month", name="spend_per_month_usd"
    )
    max_concurrent: int | None = setting(None, _AT_LEAST_ONE, "calls at once")

    def configured(self) -> dict[str, int]:
        return {
            name: value
            for name in self.__slots__  # type: ignore[attr-defined]
            if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """`teams.<team>.queue`: where calls over a limit wait, with `on_limit: queue`."""

    max_wait_s: float = setting(30.0, check.number(positive=False), "longest wait in the queue")
    max_depth: int = setting(100, _COUNT, "most calls waiting")


@dataclass(frozen=True, slots=True)
class Billing:
    """`teams.<team>.billing`: how the team's invoice bills."""

    plan: str = setting(
        "usage", check.choice("usage", "per_request", "capped_per_request"),
        "how the invoice bills",
    )  # fmt: skip
    # No default in the reference: the per-request plans need it (`plan_has_its_parameters`).
    rate_nanousd: int = setting(
        0, check.usd, "R, per call (per_request plans)", name="rate_usd", shown=None
    )
    max_requests_per_day: int | None = setting(
        None, _AT_LEAST_ONE, "C: at most C·days calls billed a month"
    )


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """`teams.<team>.keys[]`: one key of a team."""

    id: str = required(check.string, "key id, in the ledger and reports")
    team: str = field()  # the team whose `keys` list holds it
    sha256: bytes = required(check.sha256_hex, "sha256 of the secret")
    expires: date | None = setting(None, check.calendar_date, "last valid day")
    limits: Limits = section(Limits, "the key's own limits (same names as the team's)")


@dataclass(frozen=True, slots=True)
class TeamUpstream:
    """A team's own upstream credentials (`teams.<team>.upstream`)."""

    api_key_env: str | None = setting(
        None, check.string,
        "env var holding this team's own upstream key",
        shown="the global key",
    )  # fmt: skip
    organization: str | None = setting(
        None, check.string, "sent upstream as `OpenAI-Organization` for this team's calls"
    )
    project: str | None = setting(
        None, check.string,
        "sent upstream as `OpenAI-Project` for this team's calls, so OpenAI's own project walls "
        "hold",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TeamConfig:
    """`teams.<team>`: one team, its allow-lists, limits, billing and keys."""

    name: str  # its key under `teams`
    models: frozenset[str] | None = setting(
        None, check.string_set, "model allow-list; omitted = all"
    )
    endpoints: tuple[EndpointRule, ...] | None = setting(
        None, check.endpoints,
        "path-prefix allow-list: `/v1/...` allows every method, `\"GET /v1/models\"` only that "
        "one; omitted = all (the upstream's `/v1/organization/*` is closed to team keys either "
        "way)",
    )  # fmt: skip
    upstream: TeamUpstream = section(TeamUpstream)
    on_limit: str = setting("reject", check.choice("reject", "queue"), "what happens over a limit")
    queue: QueueConfig = section(QueueConfig)
    limits: Limits = section(Limits)
    billing: Billing = section(Billing, rules=(plan_has_its_parameters,))
    keys: tuple[KeyConfig, ...] = section_list(KeyConfig, "the team's keys", owner="team")
    pricing: PriceBook | None = custom(
        read_team_prices, "the team's own prices (table shape) over the global ones",
        kind="mapping",
    )  # fmt: skip
    pricing_overrides: Mapping[str, Any] | None = None  # as written, to apply over a new table
    enforce: bool = setting(
        True, check.boolean,
        "`false` = shadow mode: nothing is refused; the ledger's `shadow_rejected_by` names the "
        "limit that would have refused (`report --by team,shadow`)",
    )  # fmt: skip
    on_budget_exhausted_mid_stream: str = setting(
        "finish", check.choice("finish", "cut"),
        "`cut`: a stream that would cross the team's daily tokens or day/month spend is ended "
        "there with an `insufficient_quota` SSE event and `[DONE]`, billed for what was "
        "delivered; `finish`: it completes and later calls are refused",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """`listen`: where the gateway serves, and what it reads of a request."""

    host: str = setting("127.0.0.1", check.string, "listen address")
    port: int = setting(8787, _COUNT, "listen port")  # at most 65535: `port_fits`
    max_request_body: int = setting(
        DEFAULT_MAX_REQUEST_BODY, check.size,
        "larger bodies get 413 unread; `500MB` = 10^6 units, `2GiB` = 2^30",
    )  # fmt: skip
    body_timeout_s: float = setting(
        60.0, check.number(positive=True),
        "a request body that stops arriving for this long gets 408 `request_timeout` (its slot "
        "freed, its row recorded)",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """`upstream`: where calls go, and with which credentials."""

    base_url: str = setting("https://api.openai.com/v1", check.url, "where calls go")
    api_key_env: str = setting(
        "OPENAI_API_KEY", check.string, "env var holding the real upstream key"
    )
    connect_timeout_s: float = setting(10.0, check.number(positive=True), "connect timeout")
    timeout_s: float = setting(
        600.0, check.number(positive=True), "longest wait for upstream bytes"
    )
    forward_headers: tuple[str, ...] = setting(
        (), check.header_names,
        "client headers forwarded beyond OpenAI's own (`Content-*`, `Accept*`, `User-Agent`, "
        "`Idempotency-Key`, `OpenAI-Beta`, `X-Stainless-*`, `X-Client-Request-Id`); a name, or "
        "a prefix ending in `*` (`x-fake-*`); credential headers are refused",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """`storage`: the ledger."""

    sqlite_path: Path = setting(Path("data/ledger.sqlite3"), check.file_path, "the ledger")
    flush_interval_ms: int = setting(100, _AT_LEAST_ONE, "ledger batch interval")
    backend: str = setting(
        "sqlite", check.choice("sqlite", "postgres"),
        "where the ledger lives; `postgres` is shared by every replica",
    )  # fmt: skip
    dsn_env: str = setting(
        "GATEWAY_PG_DSN", check.string,
        "env var holding the Postgres DSN (`postgresql://user:pass@host:5432/db`)",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """`admin`: the admin endpoints' bearer key."""

    key_env: str = setting("GATEWAY_ADMIN_KEY", check.string, "env var holding the admin key")


NOTIFICATION_EVENTS = ("key_expiring", "key_expired", "budget_threshold")


def _events(value: object) -> tuple[str, ...]:
    names = check.string_list(value)
    unknown = [name for name in names if name not in NOTIFICATION_EVENTS]
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not one of {', '.join(NOTIFICATION_EVENTS)}")
    return tuple(dict.fromkeys(names))


def _thresholds(value: object) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a list of shares, like [0.5, 0.8, 1.0]")
    shares = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 < item <= 1:
            raise ValueError(f"'{item}' is not a share above 0 and at most 1")
        shares.append(float(item))
    return tuple(sorted(set(shares)))


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """`notifications.webhooks[]`: one receiver."""

    url: str = required(check.url, "where events are POSTed")
    format: str = setting(
        "json", check.choice("json", "slack"), "`slack`: a Slack incoming-webhook body"
    )
    events: tuple[str, ...] = setting(
        NOTIFICATION_EVENTS, Check("list", _events), "the event types sent here"
    )
    secret_env: str | None = setting(
        None, check.string,
        "env var holding a secret: header `x-gateway-signature` = hex HMAC-SHA256 of the body",
        shown="unsigned",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class NotificationsConfig:
    """`notifications`: key expiry reminders and budget alerts to webhooks."""

    check_interval_s: float = setting(
        3600.0, check.number(positive=True), "how often key expiry and budgets are looked at"
    )
    budget_thresholds: tuple[float, ...] = setting(
        (0.5, 0.8, 1.0), Check("list", _thresholds),
        "shares of each quota and spend cap that send a `budget_threshold` event once per window",
    )  # fmt: skip
    webhooks: tuple[WebhookConfig, ...] = section_list(
        WebhookConfig, "receivers of the events (none: nothing is sent)", owner=""
    )


@dataclass(frozen=True, slots=True)
class BatchesConfig:
    """`batches`: how the Batch API's jobs created through the gateway are watched."""

    poll_interval_s: float = setting(
        300.0, check.number(positive=True),
        "how often pending batches are looked at upstream (and whenever a client fetches one)",
    )  # fmt: skip


EXPORT_KINDS = ("stripe", "openmeter", "lago", "webhook")
EXPORT_VALUES = ("cost_nanousd", "input_tokens", "output_tokens", "total_tokens", "requests")
EXPORT_URLS = {
    "stripe": "https://api.stripe.com",
    "openmeter": "https://openmeter.cloud",
    "lago": "https://api.getlago.com",
}


def _customers(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(team, str) and team and isinstance(customer, str) and customer
        for team, customer in value.items()
    ):
        raise ValueError("must map team names to customer ids, like {research: cus_123}")
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """`export[]`: one billing system the ledger's billable rows are sent to."""

    kind: str = required(check.choice(*EXPORT_KINDS), "the billing system's API")
    name: str | None = setting(
        None, check.string,
        "the metric label and the idempotency-id prefix (`<name>:<request_id>`); needed when two "
        "exports share a kind", shown="the kind",
    )  # fmt: skip
    url: str | None = setting(
        None, check.url, "the service's base URL (a webhook's full URL)",
        shown="the service's own",
    )  # fmt: skip
    api_key_env: str | None = setting(
        None, check.string, "env var holding the service's API key (stripe and lago need one)",
        shown="none",
    )  # fmt: skip
    secret_env: str | None = setting(
        None, check.string,
        "webhook: env var holding the secret that signs the body (`x-gateway-signature`)",
        shown="unsigned",
    )  # fmt: skip
    event_name: str | None = setting(
        None, check.string,
        "Stripe meter event name / OpenMeter event type / Lago billable-metric code",
        shown="none",
    )  # fmt: skip
    value: str = setting("cost_nanousd", check.choice(*EXPORT_VALUES), "what each event counts")
    customers: Mapping[str, str] | None = setting(
        None, Check("mapping", _customers),
        "team → the service's customer id (Stripe), subject (OpenMeter) or subscription id "
        "(Lago); other teams' rows are skipped (a webhook without any sends every team)",
        shown="none",
    )  # fmt: skip
    interval_s: float = setting(
        5.0, check.number(positive=True), "how often new ledger rows are looked for"
    )

    @property
    def label(self) -> str:
        return self.name or self.kind

    def customer_of(self, team: str | None) -> str | None:
        """The service's id for a team; None: its rows are not sent. A webhook without
        `customers` sends every team's (the team is in the event)."""
        if self.customers is None:
            return team if self.kind == "webhook" else None
        return self.customers.get(team) if team else None

    @property
    def base_url(self) -> str:
        return self.url or EXPORT_URLS.get(self.kind, "")


@dataclass(frozen=True, slots=True)
class LimitsBackendConfig:
    """`limits`: where limit counters live."""

    backend: str = setting(
        "memory", check.choice("memory", "redis"),
        "where limit counters live; `redis` shares them between replicas",
    )  # fmt: skip
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", check.redis_url,
        "the Redis that holds them (`rediss://` for TLS, `redis://:password@host`)",
    )  # fmt: skip
    on_backend_error: str = setting(
        "fail_closed", check.choice("fail_closed", "fail_open"),
        "while Redis is unreachable: refuse calls with 503 `limits_unavailable`, or let them "
        "through unlimited",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """`pricing` written as a mapping: a table (default: the database) under overrides. Read
    by `prices.read_prices`, which makes a `PriceBook` of it."""

    unknown_model: str = setting(
        "estimate", check.choice(*UNKNOWN_MODEL_POLICIES),
        "a model without a price: priced as the nearest known model of its family, 0, or "
        "refused (400 `model_not_priced`); the row is flagged `price_unknown`",
    )  # fmt: skip
    table: str = setting(
        BUILTIN, check.string,
        "the maintained price database, or a table file",
        kind="`builtin` \\| path",
    )  # fmt: skip
    overrides: yaml.Node | None = setting(
        None, check.as_written,
        "a table (shape of `config/pricing.yaml`) over it: its model entries replace the "
        "table's whole; its `transfer_per_mb` / `per_request` apply",
        kind="path or mapping",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole config file."""

    path: Path  # the file it was read from
    listen: ListenConfig = section(ListenConfig, rules=(port_fits,), bare=True)
    upstream: UpstreamConfig = section(UpstreamConfig, bare=True)
    storage: StorageConfig = section(StorageConfig, bare=True)
    admin: AdminConfig = section(AdminConfig, bare=True)
    notifications: NotificationsConfig = section(NotificationsConfig, bare=True)
    batches: BatchesConfig = section(BatchesConfig, bare=True)
    pricing: PriceBook = custom(
        read_prices,
        "how calls are priced (see [Prices](#prices)); a path or an inline table mapping: that "
        "table alone",
        kind="mapping, path or table", section=PricingConfig, shown="the price database",
        bare=True,
    )  # fmt: skip
    limits_timezone: ZoneInfo = setting(
        ZoneInfo("UTC"), check.timezone, "calendar windows and key expiry use this zone",
        bare=True,
    )  # fmt: skip
    renew_warning_days: int = setting(
        7, _COUNT, "warn this many days before a key expires", bare=True
    )
    limits_backend: LimitsBackendConfig = section(LimitsBackendConfig, name="limits", bare=True)
    teams: Mapping[str, TeamConfig] = section_map(
        TeamConfig, "one entry per team", key_field="name", placeholder="<team>",
        rules=(keys_are_unique,),
    )  # fmt: skip
    shutdown_grace_s: float = setting(
        30.0, check.number(positive=False), "how long SIGTERM waits for open calls and streams"
    )
    log_level: str = setting(
        "info", check.choice("debug", "info", "warning", "error"), "JSON log level (stderr)"
    )
    log_calls: bool = setting(
        True, check.boolean, "one JSON log line per call (never keys or text)"
    )
    export: tuple[ExportConfig, ...] = section_list(
        ExportConfig, "billing systems the billable rows are sent to (SPEC \"Billing export\")",
        owner="", rules=(export_is_complete,), list_rules=(exports_are_distinct,),
    )  # fmt: skip

    def keys_by_hash(self) -> dict[bytes, KeyConfig]:
        return {key.sha256: key for team in self.teams.values() for key in team.keys}

    def team_prices(self, team: str | None) -> PriceBook:
        """What a team's calls are priced with: the global book under the team's `pricing:`."""
        team_config = self.teams.get(team) if team else None
        return team_config.pricing if team_config and team_config.pricing else self.pricing

"""The windows a call draws from, held in this process: token buckets, calendar quotas and
concurrency counts, one `Meter` of them per key and per team, in a `MeterRegistry` rebuilt
from config on every reload.

These objects are the in-memory store's state and, with a shared store, the local mirror of
what it last said (for headers, reports and mid-stream budgets). They know nothing of
queues, refusals or where the windows really live.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.config.loader import GatewayConfig, KeyConfig, Limits, TeamConfig

# What a call draws from each kind of window.
REQUESTS, TOKENS, BYTES, SPEND = "requests", "tokens", "bytes", "spend"
_QUOTAS = {
    "requests_per_hour": (REQUESTS, "hour"),
    "requests_per_day": (REQUESTS, "day"),
    "tokens_per_day": (TOKENS, "day"),
    "bytes_per_day": (BYTES, "day"),
    "spend_per_day_nanousd": (SPEND, "day"),
    "spend_per_month_nanousd": (SPEND, "month"),
}
_RATES = {"requests_per_minute": REQUESTS, "tokens_per_minute": TOKENS}
# The config's names, for messages and headers (spend limits are stored in nano-USD).
CONFIG_NAMES = {
    "spend_per_day_nanousd": "spend_per_day_usd",
    "spend_per_month_nanousd": "spend_per_month_usd",
}


@dataclass(slots=True)
class Draw:
    """What one call takes (reserved before, actual after). `slots` is the concurrency slot
    it holds until it settles: 0 for a response inside a WebSocket session, whose session
    holds the slot."""

    requests: int = 1
    tokens: int = 0
    bytes: int = 0
    spend: int = 0
    slots: int = 1

    def of(self, kind: str) -> int:
        return getattr(self, kind)


NOTHING = Draw(requests=0, slots=0)  # the reservation of a usage charged after the fact


class TokenBucket:
    """Refilled continuously at limit/60 per second; holds at most `limit`; may go into debt
    when a call used more than it reserved."""

    def __init__(self, name: str, kind: str, limit: int, now: float) -> None:
        self.name, self.kind, self.limit = name, kind, limit
        self.rate = limit / 60.0
        self.level = float(limit)
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until `amount` fits (0 if it fits now; inf if it never can)."""
        self._refill(now)
        if amount <= self.level:
            return 0.0
        if amount > self.limit or self.rate == 0:
            return math.inf
        return (amount - self.level) / self.rate

    def take(self, amount: int) -> None:
        self.level -= amount

    def give_back(self, amount: int) -> None:
        self.level = min(self.limit, self.level + amount)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.level))

    def reset_in(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return (self.limit - self.level) / self.rate if self.rate else 0.0


class Calendar:
    """Start of the current hour/day/month in a time zone, as unix seconds."""

    def __init__(self, zone: ZoneInfo, wall_clock: Callable[[], float] = time.time) -> None:
        self.zone = zone
        self.wall_clock = wall_clock

    def window(self, period: str, at: float | None = None) -> tuple[float, float]:
        moment = datetime.fromtimestamp(self.wall_clock() if at is None else at, self.zone)
        if period == "hour":
            start = moment.replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=1)
        elif period == "day":
            start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=1, hours=2)).replace(hour=0)  # DST-safe
        else:
            start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=32)).replace(day=1)
        return start.timestamp(), end.timestamp()


class Quota:
    """A count over a calendar window; rolls over to zero when the window ends."""

    def __init__(self, name: str, kind: str, period: str, limit: int) -> None:
        self.name, self.kind, self.period, self.limit = name, kind, period, limit
        self.used = 0
        self.window_end = 0.0

    def roll(self, calendar: Calendar, now: float) -> None:
        if now >= self.window_end:
            _, self.window_end = calendar.window(self.period, now)
            self.used = 0

    def fits(self, amount: int) -> bool:
        # Spend and bytes are not known in full before the call: admit while any is left.
        return self.used + amount <= self.limit and self.used < self.limit

    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass
class Meter:
    """The windows of one key or one team."""

    name: str
    scope: str = "key"  # "key" or "team": names are unique only within a scope
    rates: list[TokenBucket] = field(default_factory=list)
    quotas: list[Quota] = field(default_factory=list)
    max_concurrent: int | None = None
    active: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.rates or self.quotas or self.max_concurrent)


def build_meter(name: str, scope: str, limits: Limits, now: float) -> Meter:
    meter = Meter(name=name, scope=scope, max_concurrent=limits.max_concurrent)
    for config_name, kind in _RATES.items():
        value = getattr(limits, config_name)
        if value is not None:
            meter.rates.append(TokenBucket(config_name, kind, value, now))
    for config_name, (kind, period) in _QUOTAS.items():
        value = getattr(limits, config_name)
        if value is not None:
            meter.quotas.append(Quota(config_name, kind, period, value))
    return meter


def carry_over(old: Meter, new: Meter) -> None:
    """A reload keeps what a key or team has already used of the windows it still has."""
    new.active = old.active
    old_rates = {b.name: b for b in old.rates}
    for bucket in new.rates:
        if bucket.name in old_rates:
            previous = old_rates[bucket.name]
            bucket.level = min(bucket.limit, previous.level)
            bucket.updated = previous.updated
    old_quotas = {q.name: q for q in old.quotas}
    for quota in new.quotas:
        if quota.name in old_quotas:
            quota.used = old_quotas[quota.name].used
            quota.window_end = old_quotas[quota.name].window_end


class MeterRegistry:
    """Every key's and team's meter, and the clocks and calendar they run on: `clock` for
    per-minute rates (monotonic), `wall_clock` and `calendar` for calendar quotas."""

    def __init__(
        self,
        config: GatewayConfig,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.calendar = Calendar(config.limits_timezone, wall_clock)
        self.teams: dict[str, Meter] = {}
        self.keys: dict[str, Meter] = {}
        self.apply(config)

    def apply(self, config: GatewayConfig) -> None:
        """(Re)build meters from config, keeping what is already used."""
        now = self.clock()
        teams = {
            name: build_meter(name, "team", team.limits, now) for name, team in config.teams.items()
        }
        keys = {
            key.id: build_meter(key.id, "key", key.limits, now)
            for team in config.teams.values()
            for key in team.keys
        }
        for new, old in ((teams, self.teams), (keys, self.keys)):
            for name, meter in new.items():
                if name in old:
                    carry_over(old[name], meter)
        self.teams, self.keys = teams, keys
        self.calendar.zone = config.limits_timezone

    def find(self, scope: str, name: str) -> Meter | None:
        """The meter of team or key `name` (scope "team" or "key"), if configured."""
        return (self.teams if scope == "team" else self.keys).get(name)

    def meters_for(self, key: KeyConfig, team: TeamConfig) -> tuple[Meter, ...]:
        """The meters a call of `key` draws from: its own and its team's, those with limits."""
        return tuple(
            m for m in (self.keys.get(key.id), self.teams.get(team.name)) if m and not m.unlimited
        )

"""Limits: per-minute rates, calendar quotas, concurrency, reservations, and the team queue.

One `Meter` per key and per team holds its windows. A call is admitted only when every
window of its key and its team has room; it then takes its reservation from all of them at
once (nothing awaits between the check and the take, so asyncio makes it atomic) and
settles to the real usage when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.config.loader import GatewayConfig, KeyConfig, Limits, TeamConfig
from gateway.errors import (
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    QUOTA_EXHAUSTED,
    RATE_LIMITED_REQUESTS,
    RATE_LIMITED_TOKENS,
    ErrorKind,
    GatewayError,
)
from gateway.ledger.readers import LedgerReader

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
    """What one call takes (reserved before, actual after)."""

    requests: int = 1
    tokens: int = 0
    bytes: int = 0
    spend: int = 0

    def of(self, kind: str) -> int:
        return getattr(self, kind)


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


# What each (scope, name) used in each current period ("hour", "day", "month").
Usage = dict[tuple[str, str], dict[str, Draw]]
UsageSource = Callable[[], Awaitable[Usage]]


@dataclass(frozen=True, slots=True)
class Refusal:
    window: str
    kind: ErrorKind
    retry_after_s: float
    message: str

    @property
    def queue_wait_s(self) -> float:
        """How long a queued call should expect to wait; a concurrency slot frees whenever a
        call ends, so the queue waits for that wake-up rather than a fixed time."""
        return 0.0 if self.window == "max_concurrent" else self.retry_after_s


@dataclass(slots=True)
class Admission:
    """A call let through: what it reserved, to settle when it ends."""

    team: str
    meters: tuple[Meter, ...]
    reserved: Draw
    queued_ms: float = 0.0
    settled: bool = False
    rates_returned: bool = False  # the upstream never answered: per-minute rates given back
    shadow_rejected_by: str | None = None  # shadow mode: the limit that would have refused
    ticket: object = None  # what a shared backend needs to settle the call


class Limiter:
    """All keys' and teams' meters, and the per-team queues."""

    # How often the head of a queue looks again for a freed concurrency slot when no local
    # call's end can tell it (never, in process: every end here wakes the queue).
    poll_interval_s = math.inf

    def __init__(
        self,
        config: GatewayConfig,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.calendar = Calendar(config.limits_timezone, wall_clock)
        self.wall_clock = wall_clock
        self.teams: dict[str, Meter] = {}
        self.keys: dict[str, Meter] = {}
        self.queues: dict[str, deque[object]] = {}
        self._changes: dict[str, asyncio.Event] = {}
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
                    _carry_over(old[name], meter)
        self.teams, self.keys = teams, keys
        self.calendar.zone = config.limits_timezone

    def seed_usage(self, scope: str, name: str, used: dict[str, Draw]) -> None:
        """Start a meter's quotas from the ledger: used[period] is that window's total."""
        meter = (self.teams if scope == "team" else self.keys).get(name)
        if meter is None:
            return
        now = self.wall_clock()
        for quota in meter.quotas:
            quota.roll(self.calendar, now)
            if quota.period in used:
                quota.used = used[quota.period].of(quota.kind)

    def remaining(self, key: KeyConfig, team: TeamConfig) -> dict[str, dict[str, object]]:
        """Every configured limit of a key and its team; where both set one, the tighter."""
        merged: dict[str, dict[str, object]] = {}
        for meter in (self.keys.get(key.id), self.teams.get(team.name)):
            if meter is None:
                continue
            for name, entry in _limit_entries(meter, self).items():
                held = merged.get(name)
                if held is None or entry["remaining"] < held["remaining"]:  # type: ignore[operator]
                    merged[name] = entry
        return merged

    def meters_for(self, key: KeyConfig, team: TeamConfig) -> tuple[Meter, ...]:
        return tuple(
            m for m in (self.keys.get(key.id), self.teams.get(team.name)) if m and not m.unlimited
        )

    # ------------------------------------------------------------ admission

    def try_admit(self, meters: tuple[Meter, ...], draw: Draw) -> Refusal | None:
        """Take `draw` from every meter, or say which window refused and for how long."""
        now, wall = self.clock(), self.wall_clock()
        refusal = None
        for meter in meters:
            refusal = self._check(meter, draw, now, wall)
            if refusal is not None:
                return refusal
        for meter in meters:
            for bucket in meter.rates:
                bucket.take(draw.of(bucket.kind))
            for quota in meter.quotas:
                quota.used += draw.of(quota.kind)
            meter.active += 1
        return None

    def _check(self, meter: Meter, draw: Draw, now: float, wall: float) -> Refusal | None:
        if meter.max_concurrent is not None and meter.active >= meter.max_concurrent:
            return concurrency_refusal(meter)
        for bucket in meter.rates:
            wait = bucket.wait_for(draw.of(bucket.kind), now)
            if wait > 0:
                return rate_refusal(meter, bucket, draw.of(bucket.kind), wait)
        for quota in meter.quotas:
            quota.roll(self.calendar, wall)
            if not quota.fits(draw.of(quota.kind)):
                return quota_refusal(meter, quota, quota.window_end - wall, self.calendar.zone)
        return None

    async def _take(self, meters: tuple[Meter, ...], draw: Draw) -> tuple[Refusal | None, object]:
        """Where the windows live: here, in this process. A shared backend overrides this;
        the second value is its ticket for settling the call."""
        return self.try_admit(meters, draw), None

    async def start(self, usage: UsageSource) -> None:
        """Start the quotas from what the ledger says their windows have used, so a restart
        never hands out a fresh quota."""
        for (scope, name), used in (await usage()).items():
            self.seed_usage(scope, name, used)

    async def close(self) -> None:
        """Nothing to release for in-process limits."""

    async def refresh(self, meters: tuple[Meter, ...]) -> None:
        """Bring `meters` up to date before reporting them (already are, in process)."""

    def backend_status(self) -> dict[str, object] | None:
        """A shared backend's health for metrics; None for in-process limits."""
        return None

    def settle(self, admission: Admission, actual: Draw) -> None:
        """Replace the reservation with what the call really used; free its slot."""
        if admission.settled:
            return
        admission.settled = True
        wall = self.wall_clock()
        for meter in admission.meters:
            meter.active -= 1
            for bucket in () if admission.rates_returned else meter.rates:
                difference = admission.reserved.of(bucket.kind) - actual.of(bucket.kind)
                if difference > 0:
                    bucket.give_back(difference)
                else:
                    bucket.take(-difference)
            for quota in meter.quotas:
                if wall < quota.window_end:
                    quota.used += actual.of(quota.kind) - admission.reserved.of(quota.kind)
        self._notify(admission.team)

    def return_rates(self, admission: Admission) -> None:
        """A call the upstream never answered gives back all it reserved from the per-minute
        rates (calendar quotas still count it when it settles, as the ledger's rebuild does)."""
        if admission.settled or admission.rates_returned:
            return
        admission.rates_returned = True
        for meter in admission.meters:
            for bucket in meter.rates:
                bucket.give_back(admission.reserved.of(bucket.kind))
        self._notify(admission.team)

    # ------------------------------------------------------------ the queue

    async def admit(self, team: TeamConfig, meters: tuple[Meter, ...], draw: Draw) -> Admission:
        """Admit now, wait in the team's FIFO queue, or raise the SPEC's 429."""
        if not team.enforce:
            return await self._admit_in_shadow(team, meters, draw)
        started = self.clock()
        queue = self.queues.setdefault(team.name, deque())
        if not queue:
            refusal, ticket = await self._take(meters, draw)
            if refusal is None:
                return Admission(team.name, meters, draw, ticket=ticket)
            if team.on_limit != "queue" or refusal.queue_wait_s > team.queue.max_wait_s:
                raise _limit_error(refusal)
        if len(queue) >= team.queue.max_depth:
            raise GatewayError(
                QUEUE_FULL,
                f"The queue of team '{team.name}' is full ({team.queue.max_depth} waiting).",
                retry_after_s=1,
            )
        place = object()
        queue.append(place)
        try:
            ticket = await self._wait_turn(
                team, meters, draw, place, started + team.queue.max_wait_s
            )
        finally:
            queue.remove(place)
            self._notify(team.name)
        queued_ms = (self.clock() - started) * 1000
        return Admission(team.name, meters, draw, queued_ms=queued_ms, ticket=ticket)

    async def _admit_in_shadow(
        self, team: TeamConfig, meters: tuple[Meter, ...], draw: Draw
    ) -> Admission:
        """`enforce: false`: let every call through, but account exactly as a rejecting team
        would: a call that would have been refused takes nothing and is marked instead."""
        try:
            refusal, ticket = await self._take(meters, draw)
        except GatewayError:
            # A shared backend that cannot be reached refuses nothing in shadow mode either.
            return Admission(team.name, (), draw)
        if refusal is None:
            return Admission(team.name, meters, draw, ticket=ticket)
        return Admission(team.name, (), draw, shadow_rejected_by=refusal.window)

    async def _wait_turn(
        self,
        team: TeamConfig,
        meters: tuple[Meter, ...],
        draw: Draw,
        place: object,
        deadline: float,
    ) -> object:
        """Wait for the head of the queue and room in every window; the take's ticket."""
        queue = self.queues[team.name]
        while True:
            retry_after = math.inf
            if queue[0] is place:
                refusal, ticket = await self._take(meters, draw)
                if refusal is None:
                    return ticket
                retry_after = refusal.queue_wait_s or self.poll_interval_s
            left = deadline - self.clock()
            if left <= 0 or retry_after > left and math.isfinite(retry_after):
                raise GatewayError(
                    QUEUE_TIMEOUT,
                    f"Waited in the queue of team '{team.name}' past its limit of "
                    f"{team.queue.max_wait_s:g}s.",
                    retry_after_s=max(1, math.ceil(retry_after))
                    if math.isfinite(retry_after)
                    else 1,
                )
            changed = self._changes.setdefault(team.name, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, retry_after))

    def _notify(self, team: str) -> None:
        """Wake the team's waiters: a slot was freed or the head of the queue moved."""
        changed = self._changes.pop(team, None)
        if changed is not None:
            changed.set()


def _carry_over(old: Meter, new: Meter) -> None:
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


def concurrency_refusal(meter: Meter) -> Refusal:
    return Refusal(
        "max_concurrent",
        RATE_LIMITED_REQUESTS,
        1.0,
        f"Too many concurrent requests for {meter.name}: limit {meter.max_concurrent}.",
    )


def rate_refusal(meter: Meter, bucket: TokenBucket, amount: int, wait: float) -> Refusal:
    return Refusal(
        bucket.name,
        RATE_LIMITED_TOKENS if bucket.kind == TOKENS else RATE_LIMITED_REQUESTS,
        wait,
        f"Rate limit reached for {meter.name} on {bucket.name}: limit {bucket.limit}, "
        f"requested {amount}. "
        + (
            f"Please try again in {format_duration(wait)}."
            if math.isfinite(wait)
            else "This request can never fit that limit."
        ),
    )


def quota_refusal(meter: Meter, quota: Quota, wait: float, zone: ZoneInfo) -> Refusal:
    name = CONFIG_NAMES.get(quota.name, quota.name)
    return Refusal(
        name,
        QUOTA_EXHAUSTED,
        wait,
        f"Quota exhausted for {meter.name}: {name} is used up; it resets at "
        f"{datetime.fromtimestamp(quota.window_end, zone).isoformat()}.",
    )


def _limit_error(refusal: Refusal) -> GatewayError:
    return GatewayError(
        refusal.kind,
        refusal.message,
        retry_after_s=max(1, math.ceil(refusal.retry_after_s))
        if math.isfinite(refusal.retry_after_s)
        else 60,
    )


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(headers: MutableMapping[str, str], meters: tuple[Meter, ...], now: float) -> None:
    """OpenAI's `x-ratelimit-*` headers from the tightest per-minute bucket of each kind, or
    the upstream's own where it has less left."""
    for kind in (REQUESTS, TOKENS):
        buckets = [bucket for meter in meters for bucket in meter.rates if bucket.kind == kind]
        if not buckets:
            continue
        tightest = min(buckets, key=lambda bucket: bucket.remaining(now))
        upstream_left = headers.get(f"x-ratelimit-remaining-{kind}", "")
        if upstream_left.isdigit() and int(upstream_left) < tightest.remaining(now):
            continue  # the shared upstream key is the tighter limit: its headers stay
        headers[f"x-ratelimit-limit-{kind}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(tightest.remaining(now))
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(tightest.reset_in(now))


async def window_usage(limiter: Limiter, ledger: LedgerReader) -> Usage:
    """What each team and key used in the current hour, day and month, by the ledger."""
    now = limiter.wall_clock()
    totals: Usage = {}
    for period in ("hour", "day", "month"):
        start, _ = limiter.calendar.window(period, now)
        for team, key_id, requests, used_tokens, moved, spend in await ledger.tuples(
            _WINDOW_USAGE, (start,)
        ):
            for scope, name in (("team", team), ("key", key_id)):
                draws = totals.setdefault((scope, name), {})
                draw = draws.setdefault(period, Draw(requests=0))
                draw.requests += requests
                draw.tokens += used_tokens or 0
                draw.bytes += moved or 0
                draw.spend += spend or 0
    return totals


# Calls the gateway let through count against quotas; its own refusals do not.
_WINDOW_USAGE = """
SELECT team, key_id, COUNT(*), SUM(input_tokens + output_tokens),
       SUM(request_bytes + response_bytes), SUM(cost_nanousd)
FROM requests
WHERE started_at >= ? AND team IS NOT NULL AND outcome NOT IN ('rejected', 'queue_timeout')
GROUP BY team, key_id
"""


def iso_utc(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _limit_entries(meter: Meter, limiter: Limiter) -> dict[str, dict[str, object]]:
    now, wall = limiter.clock(), limiter.wall_clock()
    entries: dict[str, dict[str, object]] = {}
    for bucket in meter.rates:
        remaining = bucket.remaining(now)
        entries[bucket.name] = {
            "limit": bucket.limit,
            "used": bucket.limit - remaining,
            "remaining": remaining,
            "resets_at": iso_utc(wall + bucket.reset_in(now)),
        }
    for quota in meter.quotas:
        quota.roll(limiter.calendar, wall)
        name = CONFIG_NAMES.get(quota.name, quota.name)
        scale = 1e9 if quota.kind == SPEND else 1
        entries[name] = {
            "limit": quota.limit / scale if scale != 1 else quota.limit,
            "used": quota.used / scale if scale != 1 else quota.used,
            "remaining": quota.remaining() / scale if scale != 1 else quota.remaining(),
            "resets_at": iso_utc(quota.window_end),
        }
    if meter.max_concurrent is not None:
        entries["max_concurrent"] = {
            "limit": meter.max_concurrent,
            "used": meter.active,
            "remaining": max(0, meter.max_concurrent - meter.active),
            "resets_at": None,
        }
    return entries

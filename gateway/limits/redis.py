"""Limits shared by every replica through Redis (`limits.backend: redis`).

Each window lives in one Redis key: a per-minute bucket is a hash (level, time of level), a
calendar quota a counter named after its window's start that expires after the window ends,
a concurrency limit a sorted set of leases. One Lua script checks every window of a call's
key and team and takes the reservation from all of them, atomically and on Redis's own clock,
so replicas never disagree about time. Another settles the reservation to the call's real
usage when it ends. The local meters stay as a mirror of what Redis last said, for the
`x-ratelimit-*` headers.

If Redis cannot be reached, `on_backend_error` decides: `fail_closed` refuses calls with a
503 `limits_unavailable`, `fail_open` lets them through unlimited. Either way the outage is
logged once when it starts and once when it ends, counted in metrics, and Redis is tried
again after a short pause, so the gateway recovers on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial

from gateway.config.loader import GatewayConfig
from gateway.errors import LIMITS_UNAVAILABLE, GatewayError
from gateway.limits.admission import (
    Admission,
    Draw,
    Limiter,
    Meter,
    Quota,
    Refusal,
    TokenBucket,
    Usage,
    UsageSource,
    concurrency_refusal,
    quota_refusal,
    rate_refusal,
)
from gateway.limits.redis_client import (
    Argument,
    Execute,
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    Script,
)

log = logging.getLogger("gateway.limits")

KEY_PREFIX = "mgw:"
# A concurrency slot is a lease renewed while its call runs: a replica that dies frees its
# slots when their leases run out.
LEASE_S = 30
# Quota counters outlive their window a little, so a long call ending after midnight still
# settles into the day it was admitted in.
QUOTA_GRACE_S = 3600
# Redis on the same network answers in well under a millisecond: a reply this late means it
# is not answering. While it is down, calls do not each wait for it; it is retried this often.
TIMEOUT_S = 0.5
RETRY_AFTER_S = 1.0
_ERRORS = (RedisUnavailable, RedisReplyError, OSError, TimeoutError)

# Shared by the scripts: Redis's clock, and a bucket's level refilled up to it (a bucket
# with no key is full: keys expire once their bucket would have refilled).
_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function bucket_level(key, limit)
  local state = redis.call('HMGET', key, 'level', 'at')
  if not state[1] then return limit end
  return math.min(limit, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * limit / 60)
end
local function store_level(key, limit, level)
  redis.call('HSET', key, 'level', level, 'at', now)
  redis.call('EXPIRE', key, math.ceil((limit - level) * 60 / limit) + 1)
end
"""


def _with_prelude(script: str) -> str:
    return _PRELUDE + script


# KEYS: one per window. ARGV: lease member, lease seconds, then per window its kind, limit,
# amount and (quotas) the unix time its counter expires. Returns {0, level seen per window}
# when the call was admitted, else {window index, seconds to wait (-1: never), level seen}.
_ADMIT = _with_prelude("""
local member, lease = ARGV[1], tonumber(ARGV[2])
local seen = {}
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 4
  local kind, limit, amount = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if kind == 'rate' then
    local level = bucket_level(KEYS[i], limit)
    if amount > level then
      local wait = -1
      if amount <= limit then wait = (amount - level) * 60 / limit end
      return {i, tostring(wait), tostring(level)}
    end
    seen[i] = level
  elseif kind == 'quota' then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used + amount > limit or used >= limit then return {i, '0', tostring(used)} end
    seen[i] = used
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local active = redis.call('ZCARD', KEYS[i])
    if active >= limit then return {i, '0', tostring(active)} end
    seen[i] = active
  end
end
local reply = {0}
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 4
  local kind, limit = ARGV[at], tonumber(ARGV[at + 1])
  if kind == 'rate' then
    store_level(KEYS[i], limit, seen[i] - tonumber(ARGV[at + 2]))
  elseif kind == 'quota' then
    redis.call('INCRBY', KEYS[i], ARGV[at + 2])
    redis.call('EXPIREAT', KEYS[i], ARGV[at + 3])
  else
    redis.call('ZADD', KEYS[i], now + lease, member)
    redis.call('EXPIRE', KEYS[i], lease * 2)
  end
  reply[i + 1] = tostring(seen[i])
end
return reply
""")

# KEYS: the call's windows. ARGV: lease member, then per window its kind, limit and the
# difference between what the call used and what it reserved.
_SETTLE = _with_prelude("""
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 3
  local kind, limit, change = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if kind == 'rate' and change ~= 0 then
    local level = math.min(limit, bucket_level(KEYS[i], limit) - change)
    if level < limit then
      store_level(KEYS[i], limit, level)
    else
      redis.call('DEL', KEYS[i])
    end
  elseif kind == 'quota' and change ~= 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[at + 2]) end
  elseif kind == 'slots' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
return 1
""")

# KEYS: windows. ARGV: per window its kind and limit. Returns the level of each now.
_READ = _with_prelude("""
local reply = {}
for i = 1, #KEYS do
  local kind, limit = ARGV[i * 2 - 1], tonumber(ARGV[i * 2])
  if kind == 'rate' then
    reply[i] = tostring(bucket_level(KEYS[i], limit))
  elseif kind == 'quota' then
    reply[i] = redis.call('GET', KEYS[i]) or '0'
  else
    reply[i] = tostring(redis.call('ZCOUNT', KEYS[i], now, '+inf'))
  end
end
return reply
""")

# KEYS: concurrency sets. ARGV: lease seconds, then the member to renew in each set.
_RENEW = _with_prelude("""
local until_ = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', until_, ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return 1
""")


@dataclass(slots=True)
class Window:
    """One window of one meter, as Redis holds it."""

    key: str
    kind: str  # "rate", "quota" or "slots"
    limit: int
    meter: Meter
    source: TokenBucket | Quota | None = None  # the local mirror (None for slots)
    expire_at: int = 0

    def amount(self, draw: Draw) -> int:
        return draw.of(self.source.kind) if self.source is not None else 1


@dataclass(slots=True)
class Plan:
    """The windows of one key and its team, valid until the first of their quota windows
    ends (a new window is a new counter)."""

    windows: list[Window]
    keys: list[str]
    valid_until: float
    holds_slots: bool


@dataclass(slots=True)
class Ticket:
    """What settling a call in Redis needs: its lease name and its windows."""

    member: str
    plan: Plan


@dataclass
class BackendHealth:
    """Whether Redis answers, and what the outage policy did while it did not."""

    policy: str
    up: bool = True
    errors: int = 0
    outages: int = 0
    let_through: int = 0  # fail_open: calls admitted without limits
    refused: int = 0  # fail_closed: calls refused with 503
    down_since: float = 0.0
    retry_at: float = 0.0
    _at_outage_start: tuple[int, int] = (0, 0)  # (let_through, refused) when it began

    def worth_trying(self, now: float) -> bool:
        return self.up or now >= self.retry_at

    def failed(self, error: BaseException, now: float) -> None:
        self.errors += 1
        self.retry_at = now + RETRY_AFTER_S
        if self.up:
            self.up, self.down_since = False, now
            self.outages += 1
            self._at_outage_start = (self.let_through, self.refused)
            if self.policy == "fail_closed":
                action = "refusing calls (503)"
            else:
                action = "letting calls through without limits"
            log.error(
                "limits backend unreachable (%s): %s, as on_backend_error: %s says",
                _describe(error), action, self.policy,
            )  # fmt: skip

    def succeeded(self, now: float) -> None:
        if self.up:
            return
        self.up = True
        log.warning(
            "limits backend reachable again after %.1fs; meanwhile %d calls were let through "
            "without limits and %d refused",
            now - self.down_since,
            self.let_through - self._at_outage_start[0],
            self.refused - self._at_outage_start[1],
        )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def key_prefix(scope: str, name: str) -> str:
    """Where the windows of one key or team live: `mgw:<scope>:<name>:<limit>[:<start>]`."""
    return f"{KEY_PREFIX}{scope}:{name}:"


class RedisLimiter(Limiter):
    """The Limiter with its windows in Redis; queues stay per replica."""

    poll_interval_s = 0.05

    def __init__(self, config: GatewayConfig) -> None:
        settings = config.limits_backend
        self.health = BackendHealth(settings.on_backend_error)
        super().__init__(config)
        self.redis = RedisClient(settings.redis_url, TIMEOUT_S, on_connect=self._on_connect)
        self._admit, self._settle = Script(_ADMIT), Script(_SETTLE)
        self._read, self._renew = Script(_READ), Script(_RENEW)
        self._leases: dict[str, Ticket] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._names = (f"{os.getpid()}-{time.time_ns()}-{n}" for n in itertools.count())
        self._usage: UsageSource | None = None

    def apply(self, config: GatewayConfig) -> None:
        super().apply(config)
        self._plans: dict[tuple[int, ...], Plan] = {}
        self.health.policy = config.limits_backend.on_backend_error

    # ------------------------------------------------------------ lifecycle

    async def start(self, usage: UsageSource) -> None:
        """Connect (which loads the scripts and starts the quota counters Redis lacks from
        the ledger: see `_on_connect`) and renew leases from now on."""
        self._usage = usage
        try:
            await self.redis.execute(b"PING")
        except _ERRORS as exc:
            self.health.failed(exc, time.monotonic())
        self._renewer = asyncio.create_task(self._renew_leases(), name="limits-leases")

    async def _on_connect(self, execute: Execute) -> None:
        """Every new connection may reach a Redis that restarted empty: load the scripts, and
        restore the current windows' quota counters from the ledger where Redis has none."""
        scripts = (self._admit, self._settle, self._read, self._renew)
        await asyncio.gather(*(execute(b"SCRIPT", b"LOAD", s.source) for s in scripts))
        if self._usage is None:
            return
        try:
            usage = await self._usage()
        except Exception:
            log.exception("could not read the ledger to restore quota counters in Redis")
            return
        await asyncio.gather(
            *(
                execute(b"SET", key, value, b"NX", b"EXAT", expire_at)
                for key, value, expire_at in self._seed_commands(usage)
            )
        )

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._retries:
            await asyncio.wait(self._retries, timeout=2 * TIMEOUT_S)
        await self.redis.close(wait_s=2 * TIMEOUT_S)

    def backend_status(self) -> dict[str, object]:
        return {
            "up": self.health.up,
            "errors": self.health.errors,
            "outages": self.health.outages,
            "let_through": self.health.let_through,
            "refused": self.health.refused,
        }

    # ------------------------------------------------------------ admission

    async def _take(self, meters: tuple[Meter, ...], draw: Draw) -> tuple[Refusal | None, object]:
        plan = self._plan(meters)
        if not plan.windows:
            return None, None
        if not self.health.worth_trying(time.monotonic()):
            return self._unavailable()
        member = next(self._names)
        amounts = [window.amount(draw) for window in plan.windows]
        arguments: list[Argument] = [member, LEASE_S]
        for window, amount in zip(plan.windows, amounts, strict=True):
            arguments += (window.kind, window.limit, amount, window.expire_at)
        try:
            reply = await self.redis.run(self._admit, plan.keys, arguments)
        except _ERRORS as exc:
            self.health.failed(exc, time.monotonic())
            return self._unavailable()
        if not self.health.up:
            self.health.succeeded(time.monotonic())
        assert isinstance(reply, list)
        refused_at = int(reply[0])
        if refused_at:
            window = plan.windows[refused_at - 1]
            self._mirror(window, float(reply[2]), 0)
            return self._refusal(window, amounts[refused_at - 1], float(reply[1])), None
        for window, seen, amount in zip(plan.windows, reply[1:], amounts, strict=True):
            self._mirror(window, float(seen), amount)
        ticket = Ticket(member, plan)
        if plan.holds_slots:
            self._leases[member] = ticket
        return None, ticket

    def _plan(self, meters: tuple[Meter, ...]) -> Plan:
        """The windows of `meters`, in the order the in-process limiter checks them."""
        wall = self.wall_clock()
        cache_key = tuple(map(id, meters))
        plan = self._plans.get(cache_key)
        if plan is not None and wall < plan.valid_until:
            return plan
        windows, valid_until = [], math.inf
        for meter in meters:
            prefix = key_prefix(meter.scope, meter.name)
            if meter.max_concurrent is not None:
                windows.append(
                    Window(prefix + "max_concurrent", "slots", meter.max_concurrent, meter)
                )
            for bucket in meter.rates:
                windows.append(Window(prefix + bucket.name, "rate", bucket.limit, meter, bucket))
            for quota in meter.quotas:
                quota.roll(self.calendar, wall)
                key, expire_at, end = self._counter(meter, quota, wall)
                valid_until = min(valid_until, end)
                windows.append(Window(key, "quota", quota.limit, meter, quota, expire_at))
        plan = Plan(
            windows,
            [window.key for window in windows],
            valid_until,
            any(window.kind == "slots" for window in windows),
        )
        self._plans[cache_key] = plan
        return plan

    def _counter(self, meter: Meter, quota: Quota, wall: float) -> tuple[str, int, float]:
        """The Redis key of a quota's current window, when that key expires, and when the
        window ends."""
        start, end = self.calendar.window(quota.period, wall)
        key = f"{key_prefix(meter.scope, meter.name)}{quota.name}:{int(start)}"
        return key, int(end) + QUOTA_GRACE_S, end

    def _mirror(self, window: Window, seen: float, taken: int) -> None:
        """Keep the local meter in step with what Redis said, for headers and reports."""
        source = window.source
        if isinstance(source, TokenBucket):
            source.level = seen - taken
            source.updated = self.clock()
        elif isinstance(source, Quota):
            source.used = int(seen) + taken
        else:
            window.meter.active = int(seen) + taken

    def _refusal(self, window: Window, amount: int, wait: float) -> Refusal:
        source, meter = window.source, window.meter
        if isinstance(source, TokenBucket):
            return rate_refusal(meter, source, amount, wait if wait >= 0 else math.inf)
        if isinstance(source, Quota):
            source.roll(self.calendar, self.wall_clock())
            left = source.window_end - self.wall_clock()
            return quota_refusal(meter, source, left, self.calendar.zone)
        return concurrency_refusal(meter)

    def _unavailable(self) -> tuple[None, None]:
        if self.health.policy == "fail_open":
            self.health.let_through += 1
            return None, None
        self.health.refused += 1
        raise GatewayError(
            LIMITS_UNAVAILABLE,
            "The gateway cannot reach its limits backend, so it cannot check this call's "
            "limits; the call was not forwarded. Please retry shortly.",
            retry_after_s=1,
        )

    # ------------------------------------------------------------ settling

    def settle(self, admission: Admission, actual: Draw) -> None:
        if admission.settled:
            return
        admission.settled = True
        ticket = admission.ticket
        if isinstance(ticket, Ticket):
            self._leases.pop(ticket.member, None)
            self._settle_remote(ticket, admission.reserved, actual, admission.rates_returned)
        self._notify(admission.team)

    def return_rates(self, admission: Admission) -> None:
        # Given back with the settle, in the same script call: the rates then settle as used
        # not at all.
        if not admission.settled:
            admission.rates_returned = True

    def _settle_remote(
        self, ticket: Ticket, reserved: Draw, actual: Draw, rates_returned: bool = False
    ) -> None:
        """Send the settle without awaiting it: nothing waits on its reply but errors."""
        arguments: list[Argument] = [ticket.member]
        for window in ticket.plan.windows:
            change = 0
            if window.source is not None:
                kind = window.source.kind
                used = 0 if rates_returned and window.kind == "rate" else actual.of(kind)
                change = used - reserved.of(kind)
            arguments += (window.kind, window.limit, change)
        keys = ticket.plan.keys
        sent = self.redis.send(b"EVALSHA", self._settle.sha, len(keys), *keys, *arguments)
        if sent is None:
            self._retry(self.redis.run(self._settle, keys, arguments))
        else:
            sent.add_done_callback(partial(self._settled, keys, arguments))

    def _settled(self, keys: list[str], arguments: list[Argument], sent: asyncio.Future) -> None:
        error = None if sent.cancelled() else sent.exception()
        if error is None:
            return
        if isinstance(error, RedisReplyError) and str(error).startswith("NOSCRIPT"):
            self._retry(self.redis.run(self._settle, keys, arguments))
        else:
            # The reservation stays taken (the safe side) and the lease runs out by itself.
            self.health.failed(error, time.monotonic())

    def _retry(self, settling: Coroutine[object, object, object]) -> None:
        async def run() -> None:
            try:
                await settling
            except _ERRORS as exc:
                self.health.failed(exc, time.monotonic())

        task = asyncio.create_task(run())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            slots = [
                (window.key, ticket.member)
                for ticket in list(self._leases.values())
                for window in ticket.plan.windows
                if window.kind == "slots"
            ]
            if not slots:
                continue
            keys, members = zip(*slots, strict=True)
            try:
                await self.redis.run(self._renew, list(keys), [LEASE_S, *members])
            except _ERRORS as exc:
                self.health.failed(exc, time.monotonic())

    # ------------------------------------------------------------ reporting

    async def refresh(self, meters: tuple[Meter, ...]) -> None:
        plan = self._plan(meters)
        if not plan.windows or not self.health.worth_trying(time.monotonic()):
            return
        arguments: list[Argument] = []
        for window in plan.windows:
            arguments += (window.kind, window.limit)
        try:
            reply = await self.redis.run(self._read, plan.keys, arguments)
        except _ERRORS as exc:
            self.health.failed(exc, time.monotonic())
            return
        assert isinstance(reply, list)
        for window, seen in zip(plan.windows, reply, strict=True):
            self._mirror(window, float(seen), 0)

    def _seed_commands(self, totals: Usage) -> list[tuple[str, int, int]]:
        """(key, used, expiry) of each current quota window the ledger has usage for."""
        wall = self.wall_clock()
        commands = []
        for (scope, name), used in totals.items():
            meter = (self.teams if scope == "team" else self.keys).get(name)
            if meter is None:
                continue
            for quota in meter.quotas:
                if quota.period not in used:
                    continue
                key, expire_at, _ = self._counter(meter, quota, wall)
                commands.append((key, used[quota.period].of(quota.kind), expire_at))
        return commands

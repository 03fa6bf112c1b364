"""Windows shared by every replica through Redis (`limits.backend: redis`).

Each window lives in one Redis key: a per-minute bucket is a hash (level, time of level), a
calendar quota a counter named after its window's start that expires after the window ends,
a concurrency limit a sorted set of leases. One Lua script (`lua/admit.lua`) checks every
window of a call's key and team and takes the reservation from all of them, atomically and on
Redis's own clock, so replicas never disagree about time. Another (`lua/settle.lua`) settles
the reservation to the call's real usage when it ends. The registry's meters stay as a mirror
of what Redis last said, for the `x-ratelimit-*` headers; queues stay per replica, in the
admission policy.

If Redis cannot be reached, `on_backend_error` decides: `fail_closed` refuses calls with a
503 `limits_unavailable`, `fail_open` lets them through unlimited (see `health.py`); Redis is
tried again after a short pause, so the gateway recovers on its own.
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
from importlib import resources

from gateway.config.loader import GatewayConfig
from gateway.errors import LIMITS_UNAVAILABLE, GatewayError
from gateway.limits.health import BackendHealth
from gateway.limits.redis_client import (
    Argument,
    Execute,
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    Script,
)
from gateway.limits.refusals import Refusal, concurrency_refusal, quota_refusal, rate_refusal
from gateway.limits.store import Admission, Usage, UsageSource
from gateway.limits.windows import NOTHING, Draw, Meter, MeterRegistry, Quota, TokenBucket

log = logging.getLogger("gateway.limits")

KEY_PREFIX = "mgw:"
# A concurrency slot is a lease renewed while its call runs: a replica that dies frees its
# slots when their leases run out.
LEASE_S = 30
# Quota counters outlive their window a little, so a long call ending after midnight still
# settles into the day it was admitted in.
QUOTA_GRACE_S = 3600
# Redis on the same network answers in well under a millisecond: a reply this late means it
# is not answering.
TIMEOUT_S = 0.5
_ERRORS = (RedisUnavailable, RedisReplyError, OSError, TimeoutError)


def lua_script(name: str) -> Script:
    """`lua/<name>.lua`, after the prelude every script shares (Redis's clock, buckets)."""
    folder = resources.files("gateway.limits") / "lua"
    prelude = (folder / "prelude.lua").read_text(encoding="utf-8")
    return Script(prelude + (folder / f"{name}.lua").read_text(encoding="utf-8"))


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
        return draw.of(self.source.kind) if self.source is not None else draw.slots


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


def key_prefix(scope: str, name: str) -> str:
    """Where the windows of one key or team live: `mgw:<scope>:<name>:<limit>[:<start>]`."""
    return f"{KEY_PREFIX}{scope}:{name}:"


class RedisStore:
    """The registry's windows in Redis; its meters mirror what Redis last said."""

    # A slot may be freed on another replica, which cannot wake this one's queue.
    poll_interval_s = 0.05

    def __init__(self, registry: MeterRegistry, config: GatewayConfig) -> None:
        settings = config.limits_backend
        self.registry = registry
        self.health = BackendHealth(settings.on_backend_error)
        self.redis = RedisClient(settings.redis_url, TIMEOUT_S, on_connect=self._on_connect)
        self._admit, self._settle = lua_script("admit"), lua_script("settle")
        self._read, self._renew = lua_script("read"), lua_script("renew")
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._leases: dict[str, Ticket] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._names = (f"{os.getpid()}-{time.time_ns()}-{n}" for n in itertools.count())
        self._usage: UsageSource | None = None

    def apply(self, config: GatewayConfig) -> None:
        self._plans = {}
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

    def status(self) -> dict[str, object]:
        return self.health.status()

    # ------------------------------------------------------------ admission

    async def take(self, meters: tuple[Meter, ...], draw: Draw) -> tuple[Refusal | None, object]:
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
        if plan.holds_slots and draw.slots:
            self._leases[member] = ticket
        return None, ticket

    def _plan(self, meters: tuple[Meter, ...]) -> Plan:
        """The windows of `meters`, in the order the in-process store checks them."""
        wall = self.registry.wall_clock()
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
                quota.roll(self.registry.calendar, wall)
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
        start, end = self.registry.calendar.window(quota.period, wall)
        key = f"{key_prefix(meter.scope, meter.name)}{quota.name}:{int(start)}"
        return key, int(end) + QUOTA_GRACE_S, end

    def _mirror(self, window: Window, seen: float, taken: int) -> None:
        """Keep the local meter in step with what Redis said, for headers and reports."""
        source = window.source
        if isinstance(source, TokenBucket):
            source.level = seen - taken
            source.updated = self.registry.clock()
        elif isinstance(source, Quota):
            source.used = int(seen) + taken
        else:
            window.meter.active = int(seen) + taken

    def _refusal(self, window: Window, amount: int, wait: float) -> Refusal:
        source, meter = window.source, window.meter
        if isinstance(source, TokenBucket):
            return rate_refusal(meter, source, amount, wait if wait >= 0 else math.inf)
        if isinstance(source, Quota):
            calendar, wall_clock = self.registry.calendar, self.registry.wall_clock
            source.roll(calendar, wall_clock())
            return quota_refusal(meter, source, source.window_end - wall_clock(), calendar.zone)
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
        ticket = admission.ticket
        if isinstance(ticket, Ticket):
            self._leases.pop(ticket.member, None)
            self._settle_remote(ticket, admission.reserved, actual, admission.rates_returned)

    def charge(self, meters: tuple[Meter, ...], used: Draw) -> None:
        plan = self._plan(meters)
        if plan.windows and self.health.worth_trying(time.monotonic()):
            self._settle_remote(Ticket(next(self._names), plan), NOTHING, used)

    def return_rates(self, admission: Admission) -> bool:
        # Given back with the settle, in the same script call: the rates then settle as used
        # not at all.
        return False

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
            arguments += (window.kind, window.limit, change, window.expire_at)
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
        wall = self.registry.wall_clock()
        commands = []
        for (scope, name), used in totals.items():
            meter = self.registry.find(scope, name)
            if meter is None:
                continue
            for quota in meter.quotas:
                if quota.period not in used:
                    continue
                key, expire_at, _ = self._counter(meter, quota, wall)
                commands.append((key, used[quota.period].of(quota.kind), expire_at))
        return commands


"""The parts of limits/, each on its own with injected clocks: token buckets, calendar windows
(across daylight-saving changes), and the admission policy over the in-memory window store
(refusals, settling, shadow mode, concurrency slots, the team queue, reloads)."""

from __future__ import annotations

import asyncio
import math
import textwrap
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config.loader import GatewayConfig, parse_config
from gateway.errors import (
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    QUOTA_EXHAUSTED,
    RATE_LIMITED_REQUESTS,
    RATE_LIMITED_TOKENS,
    GatewayError,
)
from gateway.limits.admission import Limiter
from gateway.limits.memory import MemoryStore
from gateway.limits.redis import lua_script
from gateway.limits.report import rate_headers
from gateway.limits.store import Admission, Usage
from gateway.limits.windows import Calendar, Draw, Quota, TokenBucket
from tests.test_container_layout import REPO, package_files

NEW_YORK = ZoneInfo("America/New_York")
KEY_SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(
    team_limits: str = "{}",
    key_limits: str = "{}",
    on_limit: str = "reject",
    queue: str = "{}",
    enforce: str = "true",
) -> GatewayConfig:
    text = f"""\
        limits_timezone: America/New_York
        pricing:
          currency: USD
          models:
            gpt-4o-mini: {{input: 0.15, output: 0.60}}
        teams:
          research:
            on_limit: {on_limit}
            enforce: {enforce}
            queue: {queue}
            limits: {team_limits}
            keys:
              - id: research-dev
                sha256: "{KEY_SHA}"
                limits: {key_limits}
              - id: research-second
                sha256: "{OTHER_SHA}"
        """
    return parse_config(textwrap.dedent(text), Path("gw.yaml"))


class Gate:
    """A limiter over the in-memory store on fake clocks, and the calls of one key."""

    def __init__(self, gateway_config: GatewayConfig, wall: float = utc(2026, 3, 8, 12)) -> None:
        self.config = gateway_config
        self.clock, self.wall = Clock(1000.0), Clock(wall)
        self.limiter = Limiter(gateway_config, clock=self.clock, wall_clock=self.wall)
        self.team = gateway_config.teams["research"]
        self.key = self.team.keys[0]

    @property
    def meters(self) -> tuple:
        return self.limiter.meters_for(self.key, self.team)

    async def admit(self, draw: Draw | None = None) -> Admission:
        return await self.limiter.admit(self.team, self.meters, draw or Draw())

    async def refused(self, draw: Draw | None = None) -> GatewayError:
        with pytest.raises(GatewayError) as refusal:
            await self.admit(draw)
        return refusal.value


# ---------------------------------------------------------------- token buckets


def test_a_bucket_starts_full_and_refills_at_its_limit_per_minute() -> None:
    bucket = TokenBucket("tokens_per_minute", "tokens", 600, now=100.0)
    assert bucket.remaining(100.0) == 600
    bucket.take(600)
    assert bucket.remaining(100.0) == 0
    assert bucket.remaining(101.5) == 15  # 10 tokens a second
    assert bucket.reset_in(101.5) == 58.5


def test_a_bucket_says_how_long_until_an_amount_fits_and_never_for_more_than_its_limit() -> None:
    bucket = TokenBucket("tokens_per_minute", "tokens", 600, now=0.0)
    assert bucket.wait_for(600, 0.0) == 0.0
    bucket.take(500)
    assert bucket.wait_for(100, 0.0) == 0.0
    assert bucket.wait_for(300, 0.0) == 20.0
    assert bucket.wait_for(300, 5.0) == 15.0
    assert bucket.wait_for(601, 5.0) == math.inf


def test_a_bucket_goes_into_debt_and_waits_it_out() -> None:
    bucket = TokenBucket("tokens_per_minute", "tokens", 600, now=0.0)
    bucket.take(600)
    bucket.take(300)  # the call used 300 more than it reserved
    assert bucket.level == -300.0
    assert bucket.remaining(0.0) == 0
    assert bucket.wait_for(100, 0.0) == 40.0
    assert bucket.reset_in(0.0) == 90.0
    assert bucket.remaining(40.0) == 100


def test_a_bucket_never_holds_more_than_its_limit() -> None:
    bucket = TokenBucket("requests_per_minute", "requests", 120, now=0.0)
    bucket.take(10)
    assert bucket.remaining(3600.0) == 120
    bucket.give_back(50)
    assert bucket.level == 120.0


# ---------------------------------------------------------------- calendar windows


def test_the_day_clocks_spring_forward_is_a_23_hour_window() -> None:
    calendar = Calendar(NEW_YORK)
    start, end = calendar.window("day", utc(2026, 3, 8, 12))
    assert (start, end) == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)) == (1772946000, 1773028800)
    assert end - start == 23 * 3600
    assert datetime.fromtimestamp(end, NEW_YORK).isoformat() == "2026-03-09T00:00:00-04:00"


def test_the_day_clocks_fall_back_is_a_25_hour_window() -> None:
    calendar = Calendar(NEW_YORK)
    start, end = calendar.window("day", utc(2026, 11, 1, 12))
    assert (start, end) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5)) == (1793505600, 1793595600)
    assert end - start == 25 * 3600
    assert datetime.fromtimestamp(end, NEW_YORK).isoformat() == "2026-11-02T00:00:00-05:00"


def test_hour_and_month_windows_start_on_the_local_hour_and_the_first_of_the_month() -> None:
    calendar = Calendar(NEW_YORK, wall_clock=Clock(utc(2026, 3, 8, 12, 34, 56)))
    assert calendar.window("hour") == (utc(2026, 3, 8, 12), utc(2026, 3, 8, 13))
    # 1 a.m. EST to 3 a.m. EDT: the hour 2 a.m. never happens.
    assert calendar.window("hour", utc(2026, 3, 8, 6, 30)) == (
        utc(2026, 3, 8, 6),
        utc(2026, 3, 8, 7),
    )
    assert calendar.window("month") == (utc(2026, 3, 1, 5), utc(2026, 4, 1, 4))


def test_a_quota_rolls_over_exactly_at_the_end_of_its_23_hour_day() -> None:
    calendar = Calendar(NEW_YORK)
    quota = Quota("requests_per_day", "requests", "day", 10)
    quota.roll(calendar, utc(2026, 3, 8, 5))
    assert quota.window_end == 1773028800
    quota.used = 7
    quota.roll(calendar, utc(2026, 3, 9, 4) - 0.001)
    assert (quota.used, quota.window_end) == (7, 1773028800)
    quota.roll(calendar, utc(2026, 3, 9, 4))
    assert (quota.used, quota.window_end) == (0, utc(2026, 3, 10, 4))


def test_a_quota_rolls_over_exactly_at_the_end_of_its_25_hour_day() -> None:
    calendar = Calendar(NEW_YORK)
    quota = Quota("tokens_per_day", "tokens", "day", 1000)
    quota.roll(calendar, utc(2026, 11, 1, 4))
    assert quota.window_end == 1793595600
    quota.used = 900
    quota.roll(calendar, utc(2026, 11, 2, 4, 59, 59))  # midnight EDT would have been 04:00
    assert (quota.used, quota.window_end) == (900, 1793595600)
    quota.roll(calendar, utc(2026, 11, 2, 5))
    assert (quota.used, quota.window_end) == (0, utc(2026, 11, 3, 5))


def test_a_quota_admits_while_anything_is_left_only_what_fits() -> None:
    quota = Quota("requests_per_day", "requests", "day", 10)
    quota.used = 9
    assert quota.fits(1) and not quota.fits(2)
    quota.used = 10
    assert not quota.fits(0)
    assert quota.remaining() == 0


# ---------------------------------------------------------------- the policy, in memory


def test_the_limiter_is_a_policy_over_an_in_memory_store_by_default() -> None:
    gate = Gate(config("{requests_per_minute: 60}"))
    assert type(gate.limiter.store) is MemoryStore
    assert gate.limiter.store.registry is gate.limiter.registry
    assert gate.limiter.backend_status() is None


async def test_a_call_draws_from_its_key_and_its_team_and_the_tighter_refuses() -> None:
    gate = Gate(config("{requests_per_minute: 120}", "{tokens_per_minute: 600}"))
    key, team = gate.limiter.keys["research-dev"], gate.limiter.teams["research"]
    await gate.admit(Draw(tokens=500))
    assert key.rates[0].remaining(1000.0) == 100
    assert team.rates[0].remaining(1000.0) == 119
    error = await gate.refused(Draw(tokens=200))
    assert error.kind is RATE_LIMITED_TOKENS
    assert error.retry_after_s == 10
    assert error.message == (
        "Rate limit reached for research-dev on tokens_per_minute: limit 600, requested 200. "
        "Please try again in 10s."
    )
    # the refused call took nothing from either
    assert (key.rates[0].remaining(1000.0), team.rates[0].remaining(1000.0)) == (100, 119)
    assert (key.active, team.active) == (1, 1)


async def test_a_call_that_can_never_fit_is_told_so_with_a_minute_to_wait() -> None:
    gate = Gate(config(key_limits="{tokens_per_minute: 600}"))
    error = await gate.refused(Draw(tokens=601))
    assert error.retry_after_s == 60
    assert error.message.endswith("requested 601. This request can never fit that limit.")


async def test_a_quota_refusal_says_when_the_window_resets() -> None:
    gate = Gate(config("{requests_per_day: 2}"))
    await gate.admit()
    await gate.admit()
    error = await gate.refused()
    assert error.kind is QUOTA_EXHAUSTED
    assert error.retry_after_s == 16 * 3600  # noon UTC is 8 a.m. EDT; midnight EDT is 16 h on
    assert error.message == (
        "Quota exhausted for research: requests_per_day is used up; it resets at "
        "2026-03-09T00:00:00-04:00."
    )


async def test_settling_replaces_the_reservation_with_what_the_call_used() -> None:
    gate = Gate(config("{tokens_per_minute: 600, tokens_per_day: 10000, max_concurrent: 3}"))
    team = gate.limiter.teams["research"]
    admission = await gate.admit(Draw(tokens=400))
    assert (team.rates[0].remaining(1000.0), team.quotas[0].used, team.active) == (200, 400, 1)
    gate.limiter.settle(admission, Draw(tokens=250))
    assert (team.rates[0].remaining(1000.0), team.quotas[0].used, team.active) == (350, 250, 0)
    gate.limiter.settle(admission, Draw(tokens=9999))  # a second settle changes nothing
    assert (team.rates[0].remaining(1000.0), team.quotas[0].used, team.active) == (350, 250, 0)


async def test_a_call_using_more_than_it_reserved_puts_the_bucket_into_debt() -> None:
    gate = Gate(config("{tokens_per_minute: 600}"))
    bucket = gate.limiter.teams["research"].rates[0]
    gate.limiter.settle(await gate.admit(Draw(tokens=100)), Draw(tokens=900))
    assert bucket.level == -300.0
    error = await gate.refused(Draw(tokens=1))
    assert (error.kind, error.retry_after_s) == (RATE_LIMITED_TOKENS, 31)


async def test_a_call_the_upstream_never_answered_gives_back_its_rates_not_its_quotas() -> None:
    gate = Gate(config("{requests_per_minute: 60, requests_per_day: 100}"))
    team = gate.limiter.teams["research"]
    admission = await gate.admit()
    gate.limiter.return_rates(admission)
    assert (team.rates[0].remaining(1000.0), team.quotas[0].used) == (60, 1)
    gate.limiter.return_rates(admission)  # once only
    gate.limiter.settle(admission, Draw(requests=1))
    assert (team.rates[0].remaining(1000.0), team.quotas[0].used, team.active) == (60, 1, 0)


async def test_a_quota_whose_window_ended_before_the_call_settled_keeps_nothing_of_it() -> None:
    gate = Gate(config("{tokens_per_day: 1000}"), wall=utc(2026, 3, 9, 3, 59))
    quota = gate.limiter.teams["research"].quotas[0]
    admission = await gate.admit(Draw(tokens=300))
    gate.wall.now = utc(2026, 3, 9, 4, 1)
    gate.limiter.settle(admission, Draw(tokens=500))
    assert quota.used == 300  # the old day's count, rolled over at the next check
    await gate.admit(Draw(tokens=10))
    assert (quota.used, quota.window_end) == (10, utc(2026, 3, 10, 4))


async def test_shadow_mode_lets_a_refused_call_through_marked_and_taking_nothing() -> None:
    gate = Gate(config("{requests_per_minute: 1}", enforce="false"))
    bucket = gate.limiter.teams["research"].rates[0]
    first = await gate.admit()
    second = await gate.admit()
    assert (first.meters, first.shadow_rejected_by) == (gate.meters, None)
    assert (second.meters, second.shadow_rejected_by) == ((), "requests_per_minute")
    assert bucket.level == 0.0
    gate.limiter.settle(second, Draw())
    assert bucket.level == 0.0


async def test_concurrency_slots_are_held_per_call_and_freed_when_it_settles() -> None:
    gate = Gate(config("{max_concurrent: 2}", "{max_concurrent: 5}"))
    key, team = gate.limiter.keys["research-dev"], gate.limiter.teams["research"]
    first, _ = await gate.admit(), await gate.admit()
    assert (key.active, team.active) == (2, 2)
    error = await gate.refused()
    assert (error.kind, error.retry_after_s) == (RATE_LIMITED_REQUESTS, 1)
    assert error.message == "Too many concurrent requests for research: limit 2."
    gate.limiter.settle(first, Draw())
    assert (key.active, team.active) == (1, 1)
    await gate.admit()
    assert (key.active, team.active) == (2, 2)


async def test_queued_calls_are_admitted_in_order_as_slots_free() -> None:
    gate = Gate(config("{max_concurrent: 1}", on_limit="queue", queue="{max_wait_s: 30}"))
    running = await gate.admit()
    second = asyncio.create_task(gate.admit())
    await asyncio.sleep(0)
    third = asyncio.create_task(gate.admit())
    await asyncio.sleep(0)
    assert len(gate.limiter.queues["research"]) == 2
    gate.clock.now += 2.5
    gate.limiter.settle(running, Draw())
    admitted = await asyncio.wait_for(second, 1)
    assert admitted.queued_ms == 2500.0
    assert not third.done() and len(gate.limiter.queues["research"]) == 1
    gate.limiter.settle(admitted, Draw())
    await asyncio.wait_for(third, 1)
    assert not gate.limiter.queues["research"]


async def test_a_full_queue_refuses_at_once() -> None:
    gate = Gate(config("{max_concurrent: 1}", on_limit="queue", queue="{max_depth: 1}"))
    running = await gate.admit()
    waiting = asyncio.create_task(gate.admit())
    await asyncio.sleep(0)
    error = await gate.refused()
    assert (error.kind, error.retry_after_s) == (QUEUE_FULL, 1)
    assert error.message == "The queue of team 'research' is full (1 waiting)."
    gate.limiter.settle(running, Draw())
    await asyncio.wait_for(waiting, 1)


async def test_a_queued_call_woken_past_its_deadline_is_a_queue_timeout() -> None:
    gate = Gate(config("{max_concurrent: 1}", on_limit="queue", queue="{max_wait_s: 5}"))
    running = await gate.admit()
    waiting = asyncio.create_task(gate.admit())
    await asyncio.sleep(0)
    gate.clock.now += 6
    gate.limiter.return_rates(running)  # wakes the queue without freeing the slot
    with pytest.raises(GatewayError) as refusal:
        await asyncio.wait_for(waiting, 1)
    assert (refusal.value.kind, refusal.value.retry_after_s) == (QUEUE_TIMEOUT, 1)
    assert refusal.value.message == "Waited in the queue of team 'research' past its limit of 5s."
    assert not gate.limiter.queues["research"]


async def test_a_wait_longer_than_the_queue_allows_is_refused_without_queueing() -> None:
    gate = Gate(config("{requests_per_minute: 6}", on_limit="queue", queue="{max_wait_s: 5}"))
    for _ in range(6):
        await gate.admit()
    error = await gate.refused()
    assert (error.kind, error.retry_after_s) == (RATE_LIMITED_REQUESTS, 10)
    assert not gate.limiter.queues["research"]


async def test_a_reload_keeps_what_each_window_has_used() -> None:
    gate = Gate(config("{requests_per_minute: 60, requests_per_day: 100, max_concurrent: 4}"))
    await gate.admit()
    await gate.admit()
    gate.limiter.apply(config("{requests_per_minute: 30, requests_per_day: 50, max_concurrent: 4}"))
    team = gate.limiter.teams["research"]
    assert (team.rates[0].limit, team.rates[0].level) == (30, 30.0)  # capped at the new limit
    assert (team.quotas[0].limit, team.quotas[0].used, team.active) == (50, 2, 2)


async def test_start_seeds_the_quotas_from_the_ledger_usage() -> None:
    gate = Gate(config("{requests_per_day: 100, tokens_per_day: 5000}", "{requests_per_hour: 9}"))

    async def usage() -> Usage:
        return {
            ("team", "research"): {"day": Draw(requests=40, tokens=1200)},
            ("key", "research-dev"): {"hour": Draw(requests=8), "day": Draw(requests=30)},
            ("key", "gone"): {"day": Draw(requests=1)},
        }

    await gate.limiter.start(usage)
    team, key = gate.limiter.teams["research"], gate.limiter.keys["research-dev"]
    assert [q.used for q in team.quotas] == [40, 1200]
    assert [q.used for q in key.quotas] == [8]
    await gate.admit()
    error = await gate.refused()
    assert error.message.startswith("Quota exhausted for research-dev: requests_per_hour")


async def test_remaining_shows_each_limit_and_the_tighter_of_key_and_team() -> None:
    gate = Gate(
        config("{requests_per_minute: 60, spend_per_day_usd: 2}", "{requests_per_minute: 10}")
    )
    admission = await gate.admit(Draw(spend=0))
    gate.limiter.settle(admission, Draw(spend=500_000_000))
    assert gate.limiter.remaining(gate.key, gate.team) == {
        "requests_per_minute": {
            "limit": 10,
            "used": 1,
            "remaining": 9,
            "resets_at": "2026-03-08T12:00:06Z",
        },
        "spend_per_day_usd": {
            "limit": 2.0,
            "used": 0.5,
            "remaining": 1.5,
            "resets_at": "2026-03-09T04:00:00Z",
        },
    }


def test_rate_headers_show_the_tightest_bucket_unless_the_upstream_has_less_left() -> None:
    gate = Gate(config("{requests_per_minute: 60, tokens_per_minute: 600}"))
    bucket = gate.limiter.teams["research"].rates[1]
    bucket.take(450)
    headers: dict[str, str] = {"x-ratelimit-remaining-requests": "3"}
    rate_headers(headers, gate.meters, 1000.0)
    assert headers == {
        "x-ratelimit-remaining-requests": "3",  # the upstream's own: it has less left
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "150",
        "x-ratelimit-reset-tokens": "45s",
    }


def test_the_redis_scripts_are_read_from_the_packaged_lua_files() -> None:
    admit = lua_script("admit").source.decode()
    assert admit.startswith("-- Shared by the scripts")
    assert "redis.call('TIME')" in admit and "return reply" in admit


def test_no_module_of_limits_is_over_400_lines() -> None:
    folder = REPO / "gateway" / "limits"
    lengths = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert max(lengths.values()) <= 400, lengths


def test_the_lua_scripts_ship_in_the_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = set(package_files(pyproject["tool"]["setuptools"]))
    scripts = set((REPO / "gateway" / "limits" / "lua").glob("*.lua"))
    assert scripts and scripts <= shipped, sorted(p.name for p in scripts - shipped)

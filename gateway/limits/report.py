"""Limits as clients see them: OpenAI's `x-ratelimit-*` headers, and each configured limit's
use and reset time for `/gateway/me`, from the meters (in process, or as a shared store last
reported them)."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from datetime import UTC, datetime

from gateway.limits.windows import CONFIG_NAMES, REQUESTS, SPEND, TOKENS, Meter, MeterRegistry

_RATE_HEADER_NAMES = tuple(
    (kind, *(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset")))
    for kind in (REQUESTS, TOKENS)
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


def iso_utc(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def rate_headers(headers: MutableMapping[str, str], meters: tuple[Meter, ...], now: float) -> None:
    """OpenAI's `x-ratelimit-*` headers from the tightest per-minute bucket of each kind, or
    the upstream's own where it has less left."""
    for kind, limit_name, remaining_name, reset_name in _RATE_HEADER_NAMES:
        # One pass, each bucket's level read once: this runs on every limited call.
        tightest, left = None, 0
        for meter in meters:
            for bucket in meter.rates:
                if bucket.kind == kind:
                    bucket_left = bucket.remaining(now)
                    if tightest is None or bucket_left < left:
                        tightest, left = bucket, bucket_left
        if tightest is None:
            continue
        upstream_left = headers.get(remaining_name, "")
        if upstream_left.isdigit() and int(upstream_left) < left:
            continue  # the shared upstream key is the tighter limit: its headers stay
        headers[limit_name] = str(tightest.limit)
        headers[remaining_name] = str(left)
        headers[reset_name] = format_duration(tightest.reset_in(now))


def remaining(
    meters: tuple[Meter | None, ...], registry: MeterRegistry
) -> dict[str, dict[str, object]]:
    """Every configured limit of `meters` (a key's and its team's); where both set one, the
    tighter."""
    merged: dict[str, dict[str, object]] = {}
    for meter in meters:
        if meter is None:
            continue
        for name, entry in limit_entries(meter, registry).items():
            held = merged.get(name)
            if held is None or entry["remaining"] < held["remaining"]:  # type: ignore[operator]
                merged[name] = entry
    return merged


def limit_entries(meter: Meter, registry: MeterRegistry) -> dict[str, dict[str, object]]:
    """Each limit of one meter: limit, used, remaining (spend in USD) and when it resets."""
    now, wall = registry.clock(), registry.wall_clock()
    entries: dict[str, dict[str, object]] = {}
    for bucket in meter.rates:
        left = bucket.remaining(now)
        entries[bucket.name] = {
            "limit": bucket.limit,
            "used": bucket.limit - left,
            "remaining": left,
            "resets_at": iso_utc(wall + bucket.reset_in(now)),
        }
    for quota in meter.quotas:
        quota.roll(registry.calendar, wall)
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

"""Upstream-aware pacing: the shared real key's own rate limit, read from the upstream's
`x-ratelimit-*-requests` headers, so queued calls wait for its reset instead of meeting an
upstream 429.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

SAFETY_MARGIN_S = 0.05  # wake a little after the upstream's reset, not a little before
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(text: str) -> float | None:
    """OpenAI's reset durations: `20ms`, `1s`, `6m0s`, `1h2m3.5s` → seconds."""
    parts = _DURATION.findall(text or "")
    if not parts:
        return None
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


class UpstreamPacer:
    """What is left of the upstream's request budget, counting calls already on their way."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset_at: float | None = None
        self.in_flight = 0

    def wait_needed(self) -> float:
        """Seconds to wait before sending; 0 means send now (and the slot is taken)."""
        now = self.clock()
        if self.reset_at is not None and now >= self.reset_at:
            self.remaining, self.reset_at = self.limit, None
        if self.remaining is None or self.remaining > 0:
            if self.remaining is not None:
                self.remaining -= 1
            self.in_flight += 1
            return 0.0
        if self.reset_at is None:
            return 0.1  # spent, and the reset is not known yet: an answer will tell
        return self.reset_at - now + SAFETY_MARGIN_S

    def take_anyway(self) -> None:
        """A call forwarded although the budget looks spent (its team does not queue)."""
        self.in_flight += 1

    def answered(self, headers: Mapping[str, str] | None) -> None:
        """A call that took a slot is over; learn the upstream's budget from its headers."""
        self.in_flight = max(0, self.in_flight - 1)
        if not headers:
            return
        remaining = _int(headers.get("x-ratelimit-remaining-requests"))
        if remaining is None:
            return
        self.limit = _int(headers.get("x-ratelimit-limit-requests")) or self.limit
        # The upstream counted what it had received; calls still on their way are not in it.
        self.remaining = max(0, remaining - self.in_flight)
        reset = parse_reset(headers.get("x-ratelimit-reset-requests", ""))
        self.reset_at = self.clock() + reset if reset is not None else None

    def upstream_remaining(self) -> int | None:
        return self.remaining


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

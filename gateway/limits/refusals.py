"""Why a window refused a call, in the SPEC's words: the window, the error, how long to wait,
and the message; and that refusal as the 429 the client gets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway.errors import (
    QUOTA_EXHAUSTED,
    RATE_LIMITED_REQUESTS,
    RATE_LIMITED_TOKENS,
    ErrorKind,
    GatewayError,
)
from gateway.limits.report import format_duration
from gateway.limits.windows import CONFIG_NAMES, TOKENS, Meter, Quota, TokenBucket


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


def limit_error(refusal: Refusal) -> GatewayError:
    """The 429 a refusal answers with (retry-after rounded up; 60 s for "never fits")."""
    return GatewayError(
        refusal.kind,
        refusal.message,
        retry_after_s=max(1, math.ceil(refusal.retry_after_s))
        if math.isfinite(refusal.retry_after_s)
        else 60,
        limit=refusal.window,
    )

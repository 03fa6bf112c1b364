"""Quota usage rebuilt from the ledger: what each team and key used in the current hour, day
and month, summed from the calls it recorded, so a restart (or a Redis that restarted empty)
never hands out a fresh quota."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.ledger.readers import LedgerReader
from gateway.limits.store import Usage
from gateway.limits.windows import Draw

if TYPE_CHECKING:
    from gateway.limits.admission import Limiter

# Calls the gateway let through count against quotas; its own refusals do not.
_WINDOW_USAGE = """
SELECT team, key_id, COUNT(*), SUM(input_tokens + output_tokens),
       SUM(request_bytes + response_bytes), SUM(cost_nanousd)
FROM requests
WHERE started_at >= ? AND team IS NOT NULL AND outcome NOT IN ('rejected', 'queue_timeout')
GROUP BY team, key_id
"""


async def window_usage(limiter: Limiter, ledger: LedgerReader) -> Usage:
    """What each team and key used in the current hour, day and month, by the ledger (the
    windows of `limiter`'s calendar, at its wall clock)."""
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

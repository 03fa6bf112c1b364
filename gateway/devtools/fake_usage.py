"""The fake upstream's own Usage and Costs APIs, answered from the calls it handled, so
`reconcile` can be tested exactly (OpenAI's shapes, daily UTC buckets, grouped by model).

Totals are kept per day and model, so memory stays flat however many calls pass.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.pricing.table import PriceTable

DAY = 86_400
# (day start, model) → [requests, input tokens, cached input tokens, output tokens]
UsageTotals = defaultdict[tuple[int, str], list[int]]


def new_totals() -> UsageTotals:
    return defaultdict(lambda: [0, 0, 0, 0])


def record_usage(totals: UsageTotals, model: object, input_tokens: int, cached: int,
                 output_tokens: int) -> None:  # fmt: skip
    now = int(time.time())
    entry = totals[(now - now % DAY, str(model))]
    entry[0] += 1
    entry[1] += input_tokens
    entry[2] += cached
    entry[3] += output_tokens


def _check_admin(request: web.Request) -> None:
    expected = os.environ.get("FAKE_ADMIN_KEY")
    if expected and request.headers.get("Authorization") != f"Bearer {expected}":
        raise web.HTTPUnauthorized(
            text='{"error": {"message": "admin key needed", "type": "invalid_request_error"}}',
            content_type="application/json",
        )


def _page(request: web.Request, totals: UsageTotals, result: Callable) -> web.Response:
    start = int(request.query["start_time"])
    end = int(request.query.get("end_time", time.time() + 1))
    first = start - start % DAY
    data = []
    for day in range(first, end, DAY):
        results = [
            result(model, counts)
            for (bucket, model), counts in sorted(totals.items())
            if bucket == day
        ]
        data.append({"object": "bucket", "start_time": day, "end_time": min(day + DAY, end),
                     "results": results})  # fmt: skip
    return web.json_response({"object": "page", "data": data, "has_more": False,
                              "next_page": None})  # fmt: skip


Handler = Callable[[web.Request], Awaitable[web.Response]]


def usage_handlers(totals: UsageTotals, prices: PriceTable | None) -> tuple[Handler, Handler]:
    async def completions(request: web.Request) -> web.Response:
        _check_admin(request)
        return _page(
            request,
            totals,
            lambda model, c: {
                "object": "organization.usage.completions.result",
                "num_model_requests": c[0],
                "input_tokens": c[1],
                "input_cached_tokens": c[2],
                "output_tokens": c[3],
                "model": model,
            },  # fmt: skip
        )

    async def costs(request: web.Request) -> web.Response:
        _check_admin(request)
        table = prices or PriceTable()

        def amount(model: str, c: list[int]) -> dict:
            nano, _ = table.cost_nanousd(
                model, input_tokens=c[1], cached_input_tokens=c[2], output_tokens=c[3],
                request_bytes=0, response_bytes=0, billable=True,
            )  # fmt: skip
            nano += table.per_request_nanousd * (c[0] - 1) if c[0] else 0
            return {"object": "organization.costs.result", "line_item": model,
                    "amount": {"value": nano / 1e9, "currency": "usd"}}  # fmt: skip

        return _page(request, totals, amount)

    return completions, costs

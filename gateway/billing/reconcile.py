"""`metering-gateway reconcile --month YYYY-MM`: the gateway's figures beside the provider's.

Reads the upstream's Usage and Costs APIs (OpenAI's organization endpoints, with an admin key)
and the ledger, per UTC day and base model, and prints the drift. The gateway's cost includes
its own transfer and per-request fees where the price table sets them; the provider's does not.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.billing.queries import COMPLETION_PATHS
from gateway.config.loader import GatewayConfig
from gateway.ledger.readers import LedgerReader
from gateway.pricing.arithmetic import format_usd
from gateway.pricing.names import base_model_name

ADMIN_KEY_ENV = "OPENAI_ADMIN_KEY"


def _ledger_sql(utc_day: str) -> str:
    return f"""
SELECT {utc_day}, model, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_nanousd)
FROM requests
WHERE started_at >= ? AND started_at < ? AND status BETWEEN 200 AND 299
  AND path IN ({", ".join("?" * len(COMPLETION_PATHS))})
GROUP BY 1, 2
"""


@dataclass
class Figures:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanousd: int = 0


Table = dict[tuple[str, str], Figures]


def utc_month(month: str) -> tuple[int, int]:
    first = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    following = (first + timedelta(days=32)).replace(day=1)
    return int(first.timestamp()), int(following.timestamp())


async def gateway_figures(reader: LedgerReader, start: int, end: int) -> Table:
    table: Table = defaultdict(Figures)
    sql = _ledger_sql(reader.dialect.utc_day())
    for day, model, calls, inp, out, cost in await reader.tuples(
        sql, (start, end, *COMPLETION_PATHS)
    ):
        figures = table[(day, base_model_name(model or ""))]
        figures.requests += calls
        figures.input_tokens += inp or 0
        figures.output_tokens += out or 0
        figures.cost_nanousd += cost or 0
    return table


def _pages(url: str, params: dict[str, object], admin_key: str) -> list[dict]:
    buckets, page = [], None
    for _ in range(100):  # 100 pages of 31 days is far more than a month
        query = {**params, **({"page": page} if page else {})}
        request = urllib.request.Request(
            f"{url}?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.load(answer)
        buckets.extend(body.get("data", []))
        page = body.get("next_page")
        if not body.get("has_more") or not page:
            break
    return buckets


def provider_figures(base_url: str, admin_key: str, start: int, end: int) -> Table:
    table: Table = defaultdict(Figures)
    params: dict[str, object] = {"start_time": start, "end_time": end, "bucket_width": "1d",
                                 "limit": 31}  # fmt: skip
    usage = _pages(f"{base_url}/organization/usage/completions", {**params, "group_by": "model"},
                   admin_key)  # fmt: skip
    for bucket in usage:
        day = datetime.fromtimestamp(bucket["start_time"], UTC).date().isoformat()
        for result in bucket.get("results", []):
            figures = table[(day, base_model_name(result.get("model") or ""))]
            figures.requests += result.get("num_model_requests", 0)
            figures.input_tokens += result.get("input_tokens", 0)
            figures.output_tokens += result.get("output_tokens", 0)
    costs = _pages(f"{base_url}/organization/costs", {**params, "group_by": "line_item"},
                   admin_key)  # fmt: skip
    for bucket in costs:
        day = datetime.fromtimestamp(bucket["start_time"], UTC).date().isoformat()
        for result in bucket.get("results", []):
            # OpenAI names line items "<model>, input" / "<model>, output"; sum per model.
            model = (result.get("line_item") or "").split(",", 1)[0].strip()
            value = (result.get("amount") or {}).get("value") or 0
            table[(day, base_model_name(model))].cost_nanousd += round(value * 1e9)
    return table


def drift(ours: int, theirs: int) -> str:
    if theirs == 0:
        return "0.00%" if ours == 0 else "n/a"
    return f"{100 * (ours - theirs) / theirs:+.2f}%".replace("+0.00%", "0.00%")


def report_lines(gateway: Table, provider: Table) -> list[str]:
    lines = []
    for day, model in sorted(set(gateway) | set(provider)):
        ours, theirs = gateway.get((day, model), Figures()), provider.get((day, model), Figures())
        pairs = [
            ("requests", ours.requests, theirs.requests, str),
            ("input", ours.input_tokens, theirs.input_tokens, str),
            ("output", ours.output_tokens, theirs.output_tokens, str),
            ("cost USD", ours.cost_nanousd, theirs.cost_nanousd, format_usd),
        ]
        lines.append(
            f"{day} {model or '(no model)'}: "
            + ", ".join(f"{name} {show(a)}/{show(b)} ({drift(a, b)})" for name, a, b, show in pairs)
        )
    return lines or ["no completion calls in that month, on either side"]


async def reconcile(
    config: GatewayConfig, reader: LedgerReader, month: str, admin_key: str
) -> list[str]:
    start, end = utc_month(month)
    ours = await gateway_figures(reader, start, end)
    base_url = config.upstream.base_url.rstrip("/")
    theirs = await asyncio.to_thread(provider_figures, base_url, admin_key, start, end)
    header = "day model: gateway/provider (drift) for requests, input, output, cost"
    return [header, *report_lines(ours, theirs)]

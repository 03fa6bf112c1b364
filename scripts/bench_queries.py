"""Time the usage/cost queries on a large ledger (default 1M rows over 30 days).

    python scripts/bench_queries.py [--rows 1000000] [--keep PATH]

Writes a synthetic ledger through the real `Ledger` writer, then times the queries behind
/gateway/usage (with p50/p95), /v1/organization/usage/completions, /v1/organization/costs,
/gateway/me's spend, and each query of the portal (SPEC "The developer portal"): a key's and
the admin's usage over time (with p50/p95, by model / team,key,model), the latest calls (the
first page and one deep in the past), the refusals by limit and a team's invoice.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from gateway.billing.queries import (
    ADMIN_CALL_FIELDS,
    CALL_FIELDS,
    COMPLETION_PATHS,
    UsageQuery,
    bucket_page,
    latest_calls,
    refusals,
    spend_since,
)
from gateway.billing.reports import build_invoice
from gateway.config.loader import parse_config
from gateway.ledger.readers import SqliteReader
from gateway.ledger.rollups import seal_sqlite
from gateway.ledger.writer import CallRecord, Ledger
from gateway.web.api import summed_groups

DAY = 86_400
TEAMS = [f"team-{n}" for n in range(20)]
MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "o3-mini"]
PATHS = ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]


async def fill(path: Path, rows: int, start: float) -> float:
    ledger = Ledger(path, flush_interval_ms=10_000)
    await ledger.open()
    rng = random.Random(7)
    began = time.perf_counter()
    for n in range(rows):
        team = rng.choice(TEAMS)
        draw = rng.random()
        status = 200 if draw > 0.02 else 500 if draw > 0.005 else 429
        ledger.append(
            CallRecord(
                request_id=f"req_{n}",
                started_at=start + n * (30 * DAY / rows),
                team=team,
                key_id=f"{team}-key-{rng.randrange(5)}",
                method="POST",
                path=rng.choice(PATHS),
                model=rng.choice(MODELS),
                status=status,
                outcome={200: "ok", 429: "rejected"}.get(status, "upstream_error"),
                rejected_by="requests_per_minute" if status == 429 else None,
                input_tokens=rng.randrange(10, 2000),
                output_tokens=rng.randrange(0, 800),
                request_bytes=rng.randrange(200, 8000),
                response_bytes=rng.randrange(300, 6000),
                cost_nanousd=rng.randrange(0, 500_000),
                latency_ms=rng.uniform(50, 3000),
            )
        )
        if n % 100_000 == 99_999:
            await ledger.flush()
    await ledger.close()
    return rows / (time.perf_counter() - began)


def timed(label: str, action) -> float:  # type: ignore[no-untyped-def]
    """The best of three runs, in ms (the first also warms SQLite's page cache)."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        asyncio.run(action())
        best = min(best, 1000 * (time.perf_counter() - began))
    print(f"  {label:<66} {best:8.1f} ms")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the ledger here and keep it")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    path = args.keep or folder / "ledger.sqlite3"
    start = 1_790_000_000 - 1_790_000_000 % DAY
    rate = asyncio.run(fill(path, args.rows, start))
    print(f"{args.rows} rows written at {rate:,.0f} rows/s ({path.stat().st_size >> 20} MiB)")
    reader = SqliteReader(path)
    end = start + 30 * DAY
    last_day = end - DAY
    timed(
        "/gateway/usage 1d x 30, group_by team,model, p50/p95",
        lambda: bucket_page(
            reader,
            UsageQuery(start, end, "1d", ["team", "model"]),
            percentiles=True,
            limits=(31, 31),
        ),
    )
    timed(
        "/gateway/usage 1h x 24 (last day), group_by team, p50/p95",
        lambda: bucket_page(reader, UsageQuery(last_day, end, "1h", ["team"]), percentiles=True),
    )
    timed(
        "usage/completions 1d x 30, group_by project_id,model",
        lambda: bucket_page(
            reader,
            UsageQuery(start, end, "1d", ["project_id", "model"], paths=COMPLETION_PATHS,
                       billable_only=True, limit=31),
        ),
    )  # fmt: skip
    timed(
        "costs 1d x 30, one project, group_by line_item",
        lambda: bucket_page(
            reader,
            UsageQuery(start, end, "1d", ["line_item"], teams=["team-3"], billable_only=True,
                       limit=30),
            limits=(7, 180),
        ),
    )  # fmt: skip
    timed(
        "/gateway/me spend this month (one key)",
        lambda: spend_since(reader, "key_id", "team-3-key-1", start),
    )
    print("the portal's queries (target: each under 200 ms):")
    portal = {}
    first_of_14 = end - 14 * DAY
    key = "team-3-key-1"
    portal["me/usage"] = timed(
        "me/usage, one key, 1d x 30, totals with p50/p95 + by model",
        lambda: both(reader, UsageQuery(start, end, "1d", [], key_ids=[key], limit=30)),
    )
    portal["me/usage hourly"] = timed(
        "me/usage, one key, 1h x 48, totals with p50/p95 + by model",
        lambda: both(reader, UsageQuery(end - 2 * DAY, end, "1h", [], key_ids=[key], limit=48)),
    )
    timed(
        "(before rollups) me/usage, admin, 1d x 14, totals + by team,key,model",
        lambda: both(reader, UsageQuery(first_of_14, end, "1d", [], limit=14), rolled=False),
    )
    began = time.perf_counter()
    chunks = seal_sqlite(path, end + 2 * 3600)
    print(f"  sealing the hourly rollups: {chunks} chunks in {time.perf_counter() - began:.1f} s"
          " (once; then an hour at a time, beside the request path)")  # fmt: skip
    portal["me/usage admin"] = timed(
        "me/usage, admin, 1d x 14, totals + by team,key,model (rollups)",
        lambda: both(reader, UsageQuery(first_of_14, end, "1d", [], limit=14), rolled=True),
    )
    portal["me/usage admin 30d"] = timed(
        "me/usage, admin, 1d x 30, totals + by team,key,model (rollups)",
        lambda: both(reader, UsageQuery(start, end, "1d", [], limit=30), rolled=True),
    )
    portal["me/usage admin hourly"] = timed(
        "me/usage, admin, 1h x 48, totals + by team,key,model (rollups)",
        lambda: both(reader, UsageQuery(end - 2 * DAY, end, "1h", [], limit=48), rolled=True),
    )
    portal["me/calls"] = timed(
        "me/calls, one key, the latest 50",
        lambda: latest_calls(reader, CALL_FIELDS, {"key_id": key}, 51),
    )
    portal["me/calls deep"] = timed(
        "me/calls, one key, 50 before a call 25 days old",
        lambda: latest_calls(reader, CALL_FIELDS, {"key_id": key}, 51,
                             (start + 5 * DAY, "req_x")),
    )  # fmt: skip
    portal["me/calls admin"] = timed(
        "me/calls, admin, the latest 50 of one team",
        lambda: latest_calls(reader, ADMIN_CALL_FIELDS, {"team": "team-3"}, 51),
    )
    portal["refusals"] = timed("refusals by limit, 30 days", lambda: refusals(reader, start, end))
    config = parse_config(
        "limits_timezone: UTC\nteams:\n" + "".join(f"  {t}: {{keys: []}}\n" for t in TEAMS),
        Path("bench.yaml"),
    )
    month = time.strftime("%Y-%m", time.gmtime(start + 15 * DAY))
    portal["invoice"] = timed(
        f"me/invoice, one team, {month}", lambda: build_invoice(reader, config, "team-3", month)
    )
    slowest = max(portal, key=portal.__getitem__)
    verdict = "met" if portal[slowest] < 200 else "NOT MET"
    print(f"slowest portal query: {slowest}, {portal[slowest]:.1f} ms: {verdict}")


async def both(reader: SqliteReader, query: UsageQuery, rolled: bool | None = None) -> None:
    """What /gateway/me/usage runs: a key's totals with exact percentiles from its rows, then
    its sums by model (`rolled` None); the admin's sums by team, key and model from the
    rollups, whose per-bucket totals are summed from those groups (`rolled` True), or the same
    two queries as a key's over every row (`rolled` False: before rollups)."""
    if rolled:
        grouped = UsageQuery(**{**vars(query), "group_by": ["team", "key", "model"]})
        summed_groups(await bucket_page(reader, grouped, limits=(60, 1440), rollups=True))
        return
    await bucket_page(reader, query, percentiles=rolled is None, limits=(60, 1440))
    by = ["model"] if rolled is None else ["team", "key", "model"]
    await bucket_page(reader, UsageQuery(**{**vars(query), "group_by": by}), limits=(60, 1440))


if __name__ == "__main__":
    main()

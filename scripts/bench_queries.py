"""Time the usage/cost queries on a large ledger (default 1M rows over 30 days).

    python scripts/bench_queries.py [--rows 1000000] [--keep PATH]

Writes a synthetic ledger through the real `Ledger` writer, then times the queries behind
/gateway/usage (with p50/p95), /v1/organization/usage/completions, /v1/organization/costs,
/gateway/me's spend and the invoice.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from gateway.billing.queries import COMPLETION_PATHS, UsageQuery, bucket_page, spend_since
from gateway.ledger.readers import SqliteReader
from gateway.ledger.writer import CallRecord, Ledger

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
        ledger.append(
            CallRecord(
                request_id=f"req_{n}",
                started_at=start + n * (30 * DAY / rows),
                team=team,
                key_id=f"{team}-key-{rng.randrange(5)}",
                method="POST",
                path=rng.choice(PATHS),
                model=rng.choice(MODELS),
                status=200 if rng.random() > 0.02 else 500,
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


def timed(label: str, action) -> None:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    asyncio.run(action())
    print(f"  {label:<58} {1000 * (time.perf_counter() - began):8.1f} ms")


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


if __name__ == "__main__":
    main()

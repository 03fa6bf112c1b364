"""The hourly rollups (`gateway.ledger.rollups`) are a cache of `requests`: every usage query
answers the same from them as from the rows, before and after sealing, after a late row for a
sealed hour, and after a reprice."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from gateway.billing.queries import UsageQuery, bucket_page
from gateway.billing.reprice import reprice
from gateway.config.loader import parse_config
from gateway.ledger.rollups import SEAL_DELAY_S, seal_sqlite
from gateway.ledger.writer import CallRecord, Ledger

DAY, HOUR = 86_400, 3600
START = 1_790_000_000 - 1_790_000_000 % DAY  # a midnight
NOW = START + 3 * DAY + 5 * HOUR + 600  # three days and a bit later
TEAMS = ("alpha", "beta", None)


def records(count: int, seed: int = 3) -> list[CallRecord]:
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        team = rng.choice(TEAMS)
        rows.append(CallRecord(
            request_id=f"req_{seed}_{n}", started_at=START + rng.uniform(0, NOW - START),
            team=team, key_id=f"{team}-key-{rng.randrange(2)}" if team else None,
            model=rng.choice(("gpt-4o-mini", "gpt-4o", None)), method="POST",
            path="/v1/chat/completions", status=rng.choice((200, 200, 200, 429, 500)),
            outcome=rng.choice(("ok", "ok", "rejected", "upstream_error")),
            input_tokens=rng.randrange(0, 900), output_tokens=rng.randrange(0, 300),
            cached_input_tokens=rng.randrange(0, 5), reasoning_tokens=rng.randrange(0, 7),
            request_bytes=rng.randrange(100, 900), response_bytes=rng.randrange(100, 900),
            cost_nanousd=rng.randrange(0, 90_000),
        ))  # fmt: skip
    return rows


async def write(path: Path, rows: list[CallRecord]) -> Ledger:
    ledger = Ledger(path, flush_interval_ms=10)
    await ledger.open()
    for row in rows:
        ledger.append(row)
    await ledger.flush()
    return ledger


QUERIES = [
    UsageQuery(START, NOW, "1d", ["team", "key", "model"]),
    UsageQuery(START, NOW, "1d", []),
    UsageQuery(START + DAY, NOW, "1h", ["model"], limit=168),
    UsageQuery(START, NOW - 1234, "1h", ["team"], teams=["alpha"], limit=168),
    UsageQuery(START + 7 * HOUR + 5, NOW, "1d", ["key"], key_ids=["beta-key-1"]),
]


async def assert_same(ledger: Ledger) -> None:
    for query in QUERIES:
        plain = await bucket_page(ledger.reader, query, limits=(200, 200))
        rolled = await bucket_page(ledger.reader, query, limits=(200, 200), rollups=True)
        assert [(b.start_time, b.end_time) for b in rolled.buckets] == [
            (b.start_time, b.end_time) for b in plain.buckets
        ]
        for mine, theirs in zip(rolled.buckets, plain.buckets, strict=True):
            as_ints = [{k: (int(v or 0) if k not in ("team", "key_id", "model") else v)
                        for k, v in g.items()} for g in theirs.groups]  # fmt: skip
            assert mine.groups == as_ints, (query, mine.start_time)


def daily_until(path: Path) -> float:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT daily_until FROM rollup_state").fetchone()[0]


def sealed_until(path: Path) -> float:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT sealed_until FROM rollup_state").fetchone()[0]


async def test_rollups_answer_as_the_rows_do_sealed_or_not_after_late_rows_and_reprice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await write(path, records(3000))
    try:
        assert sealed_until(path) == 0
        await assert_same(ledger)  # nothing sealed: all from the rows

        chunks = seal_sqlite(path, NOW)
        target = (NOW - SEAL_DELAY_S) // HOUR * HOUR
        # Three days and a part: a chunk of hours a day, then one of whole days.
        assert sealed_until(path) == target and chunks == 4 + 1
        assert daily_until(path) == START + 3 * DAY
        assert seal_sqlite(path, NOW) == 0  # nothing more to do
        with sqlite3.connect(path) as db:
            summed = db.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0]
            below = db.execute("SELECT COUNT(*) FROM requests WHERE started_at < ?",
                               (target,)).fetchone()[0]  # fmt: skip
        assert summed == below
        await assert_same(ledger)

        # A late row for a sealed hour (a long call, a batch rewritten) unseals from its hour.
        late = records(1, seed=99)[0]
        late.started_at = START + DAY + 2 * HOUR + 17
        ledger.append(late)
        await ledger.flush()
        assert sealed_until(path) == START + DAY + 2 * HOUR
        assert daily_until(path) == START + DAY
        await assert_same(ledger)
        seal_sqlite(path, NOW)
        assert sealed_until(path) == target
        await assert_same(ledger)

        # A reprice rewrites costs of sealed hours: they are summed again.
        prices = "{gpt-4o-mini: {input: 9, output: 9}, gpt-4o: {input: 1, output: 1}}"
        config = parse_config(
            f"pricing: {{models: {prices}}}\nteams: {{alpha: {{keys: []}}, beta: {{keys: []}}}}\n",
            tmp_path / "g.yaml",
        )
        done = await reprice(ledger.reader, config, config.pricing, START + DAY, apply=True)
        assert done.changed > 0
        assert sealed_until(path) == START + DAY
        await assert_same(ledger)
        seal_sqlite(path, NOW)
        await assert_same(ledger)
    finally:
        await ledger.close()


@pytest.mark.parametrize("delay_hours", [0.5, 2])
async def test_only_hours_ended_a_delay_ago_are_sealed(tmp_path: Path, delay_hours: float):
    path = tmp_path / "ledger.sqlite3"
    ledger = await write(path, records(50))
    await ledger.close()
    now = START + 10 * HOUR + delay_hours * HOUR
    seal_sqlite(path, now)
    assert sealed_until(path) == (now - SEAL_DELAY_S) // HOUR * HOUR


async def test_rollups_on_postgres_answer_as_its_rows_do(
    make_gateway, postgres_server, monkeypatch
) -> None:
    from gateway.app import LEDGER, SEALER

    with postgres_server.new_database() as dsn:
        monkeypatch.setenv("TEST_ROLLUP_PG_DSN", dsn)
        gateway = await make_gateway(storage_extra=("backend: postgres",
                                                    "dsn_env: TEST_ROLLUP_PG_DSN"))  # fmt: skip
        ledger = gateway.app[LEDGER]
        for row in records(1500, seed=5):
            ledger.append(row)
        await ledger.flush()
        try:
            assert await gateway.app[SEALER].seal(NOW) == 4 + 1
            await assert_same(ledger)  # type: ignore[arg-type]
            late = records(1, seed=77)[0]
            late.started_at = START + 5 * HOUR + 1
            ledger.append(late)
            await ledger.flush()
            (state,) = await ledger.reader.rows("SELECT sealed_until FROM rollup_state", [])
            assert state["sealed_until"] == START + 5 * HOUR
            await assert_same(ledger)  # type: ignore[arg-type]
        finally:
            await gateway.server.close()

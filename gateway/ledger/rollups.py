"""Hourly and daily rollups of the ledger (`usage_hourly`, `usage_daily`), so usage over weeks
of every team is a sum of days and hours instead of a scan of every call (the portal's admin
view on a million-row ledger).

A rollup is only a cache of `requests`, never a second truth:
- an hour is *sealed* (summed into `usage_hourly`) once it ended more than `SEAL_DELAY_S` ago,
  in order, up to `rollup_state.sealed_until`;
- a row written for a sealed hour (a call that outlived the delay, a batch or a reprice
  rewriting a row) moves `sealed_until` back to that row's hour and drops the rollups from
  there, in the same transaction as the write: those hours are read from `requests` again
  until they are sealed again;
- whole (UTC) days below `sealed_until` are summed again into `usage_daily`, up to
  `rollup_state.daily_until`, which a late row moves back as well;
- a query sums `usage_daily` below `daily_until`, `usage_hourly` from there to `sealed_until`,
  and `requests` from there on.
So an answer from rollups is the answer `requests` alone gives, at every moment.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from gateway.ledger.readers import count_where

SEAL_DELAY_S = 3600.0
SEAL_CHUNK_S = 86_400  # the hours sealed per transaction: the write lock is held briefly
HOUR, DAY = 3600, 86_400
GROUPS = ("team", "key_id", "model")
SUMMED = (
    "requests", "errors", "request_bytes", "response_bytes", "input_tokens",
    "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_nanousd",
)  # fmt: skip
ROLLUP_COLUMN_TYPES = {
    "hour": "INTEGER NOT NULL",
    **{name: "TEXT" for name in GROUPS},
    **{name: "INTEGER" for name in SUMMED},
}
ROLLUP_STATE_COLUMN_TYPES = {"sealed_until": "REAL NOT NULL", "daily_until": "REAL NOT NULL"}
ROLLUP_STATEMENTS = [
    "CREATE INDEX IF NOT EXISTS usage_hourly_hour ON usage_hourly (hour)",
    "CREATE INDEX IF NOT EXISTS usage_daily_hour ON usage_daily (hour)",
    "INSERT INTO rollup_state (sealed_until, daily_until) SELECT 0, 0 WHERE NOT EXISTS "
    "(SELECT 1 FROM rollup_state)",
]
# The sums of a group of ledger rows (the usage queries' too), and of a group of rollup rows.
_ERRORS = count_where("outcome != 'ok'")
ROW_SUMS = ", ".join(
    ["COUNT(*) AS requests", f"{_ERRORS} AS errors"]
    + [f"SUM({name}) AS {name}" for name in SUMMED[2:]]
)
ROLLED_UP_SUMS = ", ".join(f"SUM({name}) AS {name}" for name in SUMMED)
SEAL = (
    f"INSERT INTO usage_hourly (hour, {', '.join(GROUPS)}, {', '.join(SUMMED)}) "
    f"SELECT CAST(FLOOR(started_at / {HOUR}) AS BIGINT) * {HOUR}, {', '.join(GROUPS)}, "
    f"{ROW_SUMS} "
    f"FROM requests WHERE started_at >= ? AND started_at < ? GROUP BY 1, {', '.join(GROUPS)}"
)
# Whole days from the sealed hours (the `hour` column of `usage_daily` holds the day's start).
SEAL_DAYS = (
    f"INSERT INTO usage_daily (hour, {', '.join(GROUPS)}, {', '.join(SUMMED)}) "
    f"SELECT CAST(FLOOR(hour / {DAY}) AS BIGINT) * {DAY}, {', '.join(GROUPS)}, "
    f"{ROLLED_UP_SUMS} FROM usage_hourly WHERE hour >= ? AND hour < ? "
    f"GROUP BY 1, {', '.join(GROUPS)}"
)
FIRST_ROW = "SELECT MIN(started_at) FROM requests WHERE started_at >= ?"
# A row for a sealed hour: unseal from its hour (and day) on, in the writer's transaction.
UNSEAL = "UPDATE rollup_state SET sealed_until = ? WHERE sealed_until > ?"
DROP_FROM = "DELETE FROM usage_hourly WHERE hour >= ?"
UNSEAL_DAYS = "UPDATE rollup_state SET daily_until = ? WHERE daily_until > ?"
DROP_DAYS_FROM = "DELETE FROM usage_daily WHERE hour >= ?"


def unseal(first: float) -> list[tuple[str, tuple[float, ...]]]:
    """What a row started at `first` undoes, after `UNSEAL` said it undid something (the days
    are sealed no further than the hours); parameters typed as PostgreSQL's columns are."""
    hour, day = hour_of(first), day_of(first)
    return [
        (DROP_FROM, (hour,)),
        (UNSEAL_DAYS, (float(day), float(first))),
        (DROP_DAYS_FROM, (day,)),
    ]


def hour_of(moment: float) -> int:
    return int(moment // HOUR) * HOUR


def day_of(moment: float) -> int:
    return int(moment // DAY) * DAY


def seal_target(now: float) -> int:
    """Every hour before this one may be sealed now."""
    return hour_of(now - SEAL_DELAY_S)


def next_step(sealed_until: float, first_row: float | None, target: int) -> tuple[float, int]:
    """The [start, end) range the next seal covers: from the first row not sealed yet (hours
    without rows are sealed by skipping them), at most a chunk."""
    if first_row is None or hour_of(first_row) >= target:
        return sealed_until, target  # nothing to sum: only the mark moves
    start = max(sealed_until, hour_of(first_row))
    return start, min(target, hour_of(start) + SEAL_CHUNK_S)


def seal_sqlite(path: Path, now: float) -> int:
    """Seal what may be sealed, a chunk per transaction (blocking: run it in a thread).
    The chunks sealed; a concurrent sealer (another process) waits on the write lock and
    finds the work done."""
    chunks = 0
    with contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
        db.create_function("FLOOR", 1, _floor, deterministic=True)
        target = seal_target(now)
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                sealed_until, daily_until = db.execute(
                    "SELECT sealed_until, daily_until FROM rollup_state"
                ).fetchone()
                if sealed_until >= target:
                    days = day_of(sealed_until)
                    if daily_until < days:
                        db.execute(DROP_DAYS_FROM, (daily_until,))
                        db.execute(SEAL_DAYS, (daily_until, days))
                        db.execute("UPDATE rollup_state SET daily_until = ?", (days,))
                        chunks += 1
                    db.execute("COMMIT")
                    return chunks
                (first,) = db.execute(FIRST_ROW, (sealed_until,)).fetchone()
                start, end = next_step(sealed_until, first, target)
                db.execute(DROP_FROM, (sealed_until,))
                if start < end and first is not None:
                    db.execute(SEAL, (start, end))
                db.execute("UPDATE rollup_state SET sealed_until = ?", (end,))
                db.execute("COMMIT")
                chunks += 1
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise


async def seal_postgres(pool: Any, now: float) -> int:
    """The same on PostgreSQL: the state row locked FOR UPDATE, so one replica seals."""
    from gateway.ledger.postgres import numbered

    chunks = 0
    target = seal_target(now)
    while True:
        async with pool.acquire() as connection, connection.transaction():
            sealed_until, daily_until = await connection.fetchrow(
                "SELECT sealed_until, daily_until FROM rollup_state FOR UPDATE"
            )
            if sealed_until >= target:
                days = day_of(sealed_until)
                if daily_until < days:
                    await connection.execute(numbered(DROP_DAYS_FROM), int(daily_until))
                    await connection.execute(numbered(SEAL_DAYS), int(daily_until), days)
                    await connection.execute(
                        "UPDATE rollup_state SET daily_until = $1", float(days)
                    )
                    chunks += 1
                return chunks
            first = await connection.fetchval(numbered(FIRST_ROW), sealed_until)
            start, end = next_step(sealed_until, first, target)
            await connection.execute(numbered(DROP_FROM), sealed_until)
            if start < end and first is not None:
                await connection.execute(numbered(SEAL), start, end)
            await connection.execute("UPDATE rollup_state SET sealed_until = $1", float(end))
            chunks += 1


def _floor(value: float) -> int:
    return int(value // 1)


def first_started(batch: list[tuple]) -> float:
    """The earliest `started_at` of a batch of ledger rows (its second column)."""
    return min(row[1] for row in batch)

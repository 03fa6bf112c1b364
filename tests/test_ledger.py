"""The ledger: schema per SPEC, batched commits, a flush on close, nothing dropped."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.ledger.writer import STORED_COLUMNS, CallRecord, Ledger

SPEC_COLUMNS = {
    "request_id": "TEXT",
    "started_at": "REAL",
    "finished_at": "REAL",
    "team": "TEXT",
    "key_id": "TEXT",
    "method": "TEXT",
    "path": "TEXT",
    "model": "TEXT",
    "stream": "INTEGER",
    "status": "INTEGER",
    "outcome": "TEXT",
    "request_bytes": "INTEGER",
    "response_bytes": "INTEGER",
    "input_tokens": "INTEGER",
    "cached_input_tokens": "INTEGER",
    "output_tokens": "INTEGER",
    "reasoning_tokens": "INTEGER",
    "tokens_estimated": "INTEGER",
    "cost_nanousd": "INTEGER",
    "latency_ms": "REAL",
    "ttfb_ms": "REAL",
    "queued_ms": "REAL",
    "shadow_rejected_by": "TEXT",
    "upstream_request_id": "TEXT",
    "pricing_hash": "TEXT",
}


def record(n: int) -> CallRecord:
    return CallRecord(
        request_id=f"req_{n}",
        started_at=1_700_000_000 + n,
        team="research",
        key_id="k",
        model="gpt-4o-mini",
        status=200,
        input_tokens=n,
        output_tokens=2 * n,
        cost_nanousd=1000 * n,
    )


def table_info(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return {row[1]: row[2].split()[0] for row in db.execute("PRAGMA table_info(requests)")}


async def test_schema_has_every_spec_column_in_wal_mode(tmp_path: Path):
    path = tmp_path / "l.sqlite3"
    ledger = Ledger(path, flush_interval_ms=10)
    await ledger.open()
    await ledger.close()
    columns = table_info(path)
    for name, kind in SPEC_COLUMNS.items():
        assert columns[name] == kind, name
    assert tuple(columns) == STORED_COLUMNS
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_rows_are_committed_in_batches_by_the_background_flush(tmp_path: Path):
    path = tmp_path / "l.sqlite3"
    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    for n in range(500):
        ledger.append(record(n))
    assert ledger.pending == 500
    for _ in range(100):
        if ledger.pending == 0 and ledger.rows_written == 500:
            break
        await asyncio.sleep(0.02)
    with sqlite3.connect(path) as db:
        count, tokens, cost = db.execute(
            "SELECT COUNT(*), SUM(output_tokens), SUM(cost_nanousd) FROM requests"
        ).fetchone()
    await ledger.close()
    assert (count, tokens, cost) == (500, 2 * sum(range(500)), 1000 * sum(range(500)))


async def test_close_flushes_everything_still_pending(tmp_path: Path):
    path = tmp_path / "l.sqlite3"
    ledger = Ledger(path, flush_interval_ms=60_000)
    await ledger.open()
    for n in range(1234):
        ledger.append(record(n))
    await ledger.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1234


async def test_failed_write_keeps_rows_for_the_next_flush(tmp_path: Path):
    path = tmp_path / "l.sqlite3"
    ledger = Ledger(path, flush_interval_ms=60_000)
    await ledger.open()
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("PRAGMA busy_timeout=0")
    blocker.execute("BEGIN EXCLUSIVE")
    assert ledger._db is not None
    await ledger._db.execute("PRAGMA busy_timeout=0")  # fail at once instead of waiting 5 s
    ledger.append(record(1))
    with pytest.raises(sqlite3.OperationalError):
        await ledger.flush()
    assert ledger.pending == 1 and not ledger.writable
    blocker.rollback()
    blocker.close()
    await ledger.flush()
    assert ledger.pending == 0 and ledger.writable
    await ledger.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT request_id FROM requests").fetchall() == [("req_1",)]

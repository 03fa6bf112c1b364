"""The ledger: one row per call, written in batches off the hot path.

`append` only puts a row on a list; a background task commits the list every
`flush_interval_ms` (SQLite through aiosqlite's own thread; PostgreSQL in `gateway.postgres`),
so the event loop never waits on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path

import aiosqlite

from gateway.readers import SqliteReader

log = logging.getLogger("gateway.ledger")


@dataclass(slots=True)
class CallRecord:
    """One call as the ledger stores it (column order = field order)."""

    request_id: str
    started_at: float
    finished_at: float = 0.0
    team: str | None = None
    key_id: str | None = None
    method: str = ""
    path: str = ""
    model: str | None = None
    stream: int = 0
    status: int = 0
    outcome: str = "ok"
    request_bytes: int = 0
    response_bytes: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    tokens_estimated: int = 0
    cost_nanousd: int = 0
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    queued_ms: float = 0.0
    error_code: str | None = None
    upstream_request_id: str | None = None
    shadow_rejected_by: str | None = None
    pricing_hash: str | None = None
    price_unknown: int = 0


_COLUMN_TYPES = {
    "request_id": "TEXT PRIMARY KEY",
    "started_at": "REAL NOT NULL",
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
    "error_code": "TEXT",
    "upstream_request_id": "TEXT",
    "shadow_rejected_by": "TEXT",
    "pricing_hash": "TEXT",
    "price_unknown": "INTEGER",
}
COLUMNS = tuple(f.name for f in fields(CallRecord))
assert tuple(_COLUMN_TYPES) == COLUMNS, "CallRecord and the schema must list the same columns"
_as_row = attrgetter(*COLUMNS)


def create_table(name: str, column_types: dict[str, str], typed: Callable[[str], str] = str) -> str:
    """`CREATE TABLE IF NOT EXISTS` of these columns, each type through `typed` (a store's
    spelling of the SQLite type)."""
    columns = ",\n  ".join(f"{column} {typed(kind)}" for column, kind in column_types.items())
    return f"CREATE TABLE IF NOT EXISTS {name} (\n  {columns}\n)"


REQUEST_INDEXES = [
    "CREATE INDEX IF NOT EXISTS requests_started_at ON requests (started_at)",
    "CREATE INDEX IF NOT EXISTS requests_team_started_at ON requests (team, started_at)",
    "CREATE INDEX IF NOT EXISTS requests_key_started_at ON requests (key_id, started_at)",
]
# Who owns each object created through the gateway (`gateway.objects`).
OBJECT_COLUMN_TYPES = {
    "object_id": "TEXT PRIMARY KEY",
    "kind": "TEXT",
    "team": "TEXT",
    "key_id": "TEXT",
    "created_at": "REAL",
    "deleted_at": "REAL",
}
OBJECT_INDEXES = ["CREATE INDEX IF NOT EXISTS objects_team_kind ON objects (team, kind)"]
SCHEMA = [
    create_table("requests", _COLUMN_TYPES),
    *REQUEST_INDEXES,
    create_table("objects", OBJECT_COLUMN_TYPES),
    *OBJECT_INDEXES,
]
_INSERT = (
    f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(COLUMNS))})"
)
_PRAGMAS = ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000"]


def prepare_database(path: Path) -> None:
    """Create the file, schema and WAL mode (blocking; called before serving starts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        for statement in _PRAGMAS + SCHEMA:
            db.execute(statement)


class LedgerWriter:
    """Appends call records and commits them in batches; a store subclasses it with its own
    connection and batch write. A batch that fails to commit is kept and retried, never dropped."""

    # What a failed write of the store raises; anything else is a bug and propagates.
    write_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, flush_interval_ms: int) -> None:
        self._interval_s = flush_interval_ms / 1000
        self._pending: list[tuple] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._oldest_pending = 0.0
        self.on_flush: list[Callable[[], Awaitable[None]]] = []
        self._closing = False
        self.rows_written = 0
        self.last_error: str | None = None

    async def open(self) -> None:
        await self._connect()
        self._flusher = asyncio.create_task(self._flush_periodically(), name="ledger-flush")

    def append(self, record: CallRecord) -> None:
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(_as_row(record))

    def write_lag(self) -> float:
        """Seconds the oldest uncommitted row has waited."""
        return time.monotonic() - self._oldest_pending if self._pending else 0.0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def writable(self) -> bool:
        return self._connected and self.last_error is None

    async def flush(self) -> None:
        """Commit every row appended so far (waits for a flush already under way)."""
        async with self._flush_lock:
            if not self._pending or not self._connected:
                return
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except self.write_errors as exc:
                # Keep the rows: they are retried on the next flush, never dropped.
                self._pending = batch + self._pending
                self.last_error = str(exc)
                log.error("ledger write failed, %d rows kept for retry: %s", len(batch), exc)
                raise
            self.last_error = None
            self.rows_written += len(batch)

    async def _flush_periodically(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            try:
                for hook in self.on_flush:
                    await hook()
                await self.flush()
            except self.write_errors:
                await asyncio.sleep(min(1.0, self._interval_s * 10))

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        await self._disconnect()

    # ------------------------------------------------------------ what a store provides

    @property
    def _connected(self) -> bool:
        raise NotImplementedError

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _write(self, batch: list[tuple]) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError


class Ledger(LedgerWriter):
    """The SQLite ledger (WAL), written through aiosqlite's own thread."""

    write_errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path, flush_interval_ms: int) -> None:
        super().__init__(flush_interval_ms)
        self.path = path
        self.reader = SqliteReader(path)
        self._db: aiosqlite.Connection | None = None

    @property
    def _connected(self) -> bool:
        return self._db is not None

    async def _connect(self) -> None:
        prepare_database(self.path)
        self._db = await aiosqlite.connect(self.path)
        for statement in _PRAGMAS:
            await self._db.execute(statement)

    async def _write(self, batch: list[tuple]) -> None:
        assert self._db is not None
        await self._db.executemany(_INSERT, batch)
        await self._db.commit()

    async def _disconnect(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

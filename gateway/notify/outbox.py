"""The notifications outbox, in the ledger's database (SQLite or Postgres): an event is put
once per webhook (its row id says which), and a row is taken for an attempt by moving its
`next_attempt_at` past the attempt's own timeout in one conditional UPDATE, so of several
replicas only one sends it; it stays until a receiver answers 2xx."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.config.loader import StorageConfig
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import NOTIFICATION_COLUMN_TYPES, prepare_database

COLUMNS = tuple(NOTIFICATION_COLUMN_TYPES)


class OutboxUnavailable(StorageError):
    """The outbox cannot be read or written now."""


@dataclass(frozen=True, slots=True)
class Pending:
    id: str
    event_id: str
    webhook: str
    body: str
    attempts: int


class Outbox:
    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def put(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows in `COLUMNS` order; an id already there is left as it is. The count added."""
        raise NotImplementedError

    async def due(self, now: float, limit: int) -> list[Pending]:
        raise NotImplementedError

    async def claim(self, row_id: str, now: float, until: float) -> bool:
        """Take a due row for one attempt (False: another replica has it, or it is done)."""
        raise NotImplementedError

    async def delivered(self, row_id: str, now: float) -> None:
        raise NotImplementedError

    async def failed(self, row_id: str, retry_at: float, error: str) -> None:
        raise NotImplementedError

    async def pending_count(self) -> int:
        raise NotImplementedError


_DUE = (
    "SELECT id, event_id, webhook, body, attempts FROM notifications "
    "WHERE delivered_at IS NULL AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
)
_CLAIM = (
    "UPDATE notifications SET next_attempt_at = ? "
    "WHERE id = ? AND delivered_at IS NULL AND next_attempt_at <= ?"
)
_DELIVERED = "UPDATE notifications SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?"
_FAILED = (
    "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
    "WHERE id = ?"
)
_PENDING = "SELECT COUNT(*) FROM notifications WHERE delivered_at IS NULL"


class SqliteOutbox(Outbox):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            await asyncio.to_thread(prepare_database, self.path)
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise OutboxUnavailable(f"notifications table in {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def _run(self, sql: str, args: tuple[Any, ...], fetch: bool = False) -> Any:
        if self._db is None:
            raise OutboxUnavailable("the outbox is not open")
        try:
            async with self._lock:
                cursor = await self._db.execute(sql, args)
                rows = await cursor.fetchall() if fetch else None
                count = cursor.rowcount
                await cursor.close()
                if not fetch:
                    await self._db.commit()
                return rows if fetch else count
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"notifications table in {self.path}: {exc}") from None

    async def put(self, rows: list[tuple[Any, ...]]) -> int:
        if self._db is None:
            raise OutboxUnavailable("the outbox is not open")
        marks = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT OR IGNORE INTO notifications ({', '.join(COLUMNS)}) VALUES ({marks})"
        try:
            async with self._lock:
                before = self._db.total_changes
                await self._db.executemany(sql, rows)
                await self._db.commit()
                return self._db.total_changes - before
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"notifications table in {self.path}: {exc}") from None

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(*row) for row in await self._run(_DUE, (now, limit), fetch=True)]

    async def claim(self, row_id: str, now: float, until: float) -> bool:
        return await self._run(_CLAIM, (until, row_id, now)) == 1

    async def delivered(self, row_id: str, now: float) -> None:
        await self._run(_DELIVERED, (now, row_id))

    async def failed(self, row_id: str, retry_at: float, error: str) -> None:
        await self._run(_FAILED, (retry_at, error[:500], row_id))

    async def pending_count(self) -> int:
        rows = await self._run(_PENDING, (), fetch=True)
        return int(rows[0][0])


def _numbered(sql: str) -> str:
    parts = sql.split("?")
    return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, 1))


class PostgresOutbox(Outbox):
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        from gateway.ledger.postgres import create_schema, safe_dsn

        try:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=2, timeout=5)
            async with self._pool.acquire() as connection:
                await create_schema(connection, safe_dsn(self._dsn))
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            await self.close()
            raise OutboxUnavailable(f"notifications table: {exc}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        import asyncpg

        if self._pool is None:
            raise OutboxUnavailable("the outbox is not open")
        try:
            return await getattr(self._pool, method)(_numbered(sql), *args)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise OutboxUnavailable(f"notifications table: {exc}") from None

    async def put(self, rows: list[tuple[Any, ...]]) -> int:
        marks = ", ".join("?" * len(COLUMNS))
        sql = (
            f"INSERT INTO notifications ({', '.join(COLUMNS)}) VALUES ({marks}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        added = 0
        for row in rows:
            status = await self._run("execute", sql, *row)
            added += status.endswith(" 1")
        return added

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(*row) for row in await self._run("fetch", _DUE, now, limit)]

    async def claim(self, row_id: str, now: float, until: float) -> bool:
        return (await self._run("execute", _CLAIM, until, row_id, now)).endswith(" 1")

    async def delivered(self, row_id: str, now: float) -> None:
        await self._run("execute", _DELIVERED, now, row_id)

    async def failed(self, row_id: str, retry_at: float, error: str) -> None:
        await self._run("execute", _FAILED, retry_at, error[:500], row_id)

    async def pending_count(self) -> int:
        return int(await self._run("fetchval", _PENDING))


def make_outbox(storage: StorageConfig) -> Outbox:
    if storage.backend == "postgres":
        return PostgresOutbox(postgres_dsn(storage))
    return SqliteOutbox(storage.sqlite_path)

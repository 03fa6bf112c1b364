"""A connection of its own to the ledger's database, for the small tables beside `requests`
(API keys, the notifications outbox): SQLite's file (WAL: the ledger's writer goes on at the
same time) or a two-connection pool on Postgres, the ledger's schema created or upgraded
first. Errors of the store become the table's own `StorageError`."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.ledger.readers import Step
from gateway.ledger.storage import StorageError
from gateway.ledger.writer import prepare_database


class SqliteSideTable:
    def __init__(self, path: Path, unavailable: type[StorageError], what: str) -> None:
        self.path = path
        self._unavailable = unavailable
        self._what = what
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one statement sequence at a time on the connection

    def error(self, exc: BaseException) -> StorageError:
        return self._unavailable(f"{self._what} in {self.path}: {exc}")

    async def open(self) -> None:
        try:
            await asyncio.to_thread(prepare_database, self.path)
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise self.error(exc) from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        db = self._connection()
        try:
            async with self._lock, db.execute(sql, args) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    async def change(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        """Run `sql` for each of `rows` in one transaction; the rows it changed."""
        db = self._connection()
        try:
            async with self._lock:
                before = db.total_changes
                await db.executemany(sql, rows)
                await db.commit()
                return db.total_changes - before
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    async def transaction(self, steps: Sequence[Step], guard: int | None = None) -> bool:
        """Run each step (a statement, once per parameter tuple) in one transaction; False,
        and nothing written, when the statement at `guard` changed no row."""
        db = self._connection()
        try:
            async with self._lock:
                for index, (sql, rows) in enumerate(steps):
                    before = db.total_changes
                    await db.executemany(sql, rows)
                    if index == guard and db.total_changes == before:
                        await db.rollback()
                        return False
                await db.commit()
                return True
        except sqlite3.Error as exc:
            await db.rollback()
            raise self.error(exc) from None

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise self._unavailable(f"the {self._what} is not open")
        return self._db


class PostgresSideTable:
    def __init__(self, dsn: str, unavailable: type[StorageError], what: str) -> None:
        self._dsn = dsn
        self._unavailable = unavailable
        self._what = what
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
            raise self._unavailable(f"{self._what}: {exc}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def transaction(self, steps: Sequence[Step], guard: int | None = None) -> bool:
        """As `SqliteSideTable.transaction`."""
        import asyncpg

        from gateway.ledger.postgres import numbered

        if self._pool is None:
            raise self._unavailable(f"the {self._what} is not open")
        try:
            async with self._pool.acquire() as connection:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    for index, (sql, rows) in enumerate(steps):
                        if index != guard:
                            await connection.executemany(numbered(sql), rows)
                            continue
                        changed = 0  # the guard's rows one by one: executemany counts none
                        for row in rows:
                            status = await connection.execute(numbered(sql), *row)
                            changed += int(status.rsplit(" ", 1)[-1] or 0)
                        if not changed:
                            await transaction.rollback()
                            return False
                except BaseException:
                    await transaction.rollback()
                    raise
                await transaction.commit()
                return True
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise self._unavailable(f"{self._what}: {exc}") from None

    async def run(self, method: str, sql: str, *args: Any) -> Any:
        """The pool's `method` (`fetch`, `fetchrow`, `fetchval`, `execute`) on `sql`, whose
        `?` marks become `$1`, `$2`, ..."""
        import asyncpg

        from gateway.ledger.postgres import numbered

        if self._pool is None:
            raise self._unavailable(f"the {self._what} is not open")
        try:
            return await getattr(self._pool, method)(numbered(sql), *args)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise self._unavailable(f"{self._what}: {exc}") from None

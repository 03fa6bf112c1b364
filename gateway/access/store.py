"""Keys issued over the admin API, kept in the ledger's database (`api_keys`), so every
replica and the CLI see the same keys; only a secret's sha256 is stored.

A `KeyStore` reads and changes rows; `changes_marker` is what replicas poll (cheap: one
aggregate) to notice another's change. The rows become `KeyConfig`s in `gateway.access.keyset`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway.config.loader import StorageConfig
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import API_KEY_COLUMN_TYPES, prepare_database

COLUMNS = tuple(API_KEY_COLUMN_TYPES)


class KeyStoreUnavailable(StorageError):
    """The keys table cannot be read or written now."""


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: str
    team: str
    sha256: str  # hex
    expires: date | None
    limits: dict[str, Any]  # as the API took them: config names, USD for spend caps
    created_at: float
    revoked_at: float | None = None
    previous_sha256: str | None = None  # a rotated-out secret, valid until previous_until
    previous_until: float | None = None
    updated_at: float = 0.0

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.id, self.team, self.sha256,
            self.expires.isoformat() if self.expires else None,
            orjson.dumps(self.limits).decode(), self.created_at, self.revoked_at,
            self.previous_sha256, self.previous_until, self.updated_at,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: Any) -> StoredKey:
        (key_id, team, sha256, expires, limits, created_at, revoked_at, previous, until,
         updated_at) = row  # fmt: skip
        return cls(
            id=key_id,
            team=team,
            sha256=sha256,
            expires=date.fromisoformat(expires) if expires else None,
            limits=orjson.loads(limits),
            created_at=created_at,
            revoked_at=revoked_at,
            previous_sha256=previous,
            previous_until=until,
            updated_at=updated_at,
        )


class KeyStore:
    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def all(self) -> list[StoredKey]:
        raise NotImplementedError

    async def changes_marker(self) -> tuple[Any, ...]:
        """Moves whenever a row is added or changed, on any replica."""
        raise NotImplementedError

    async def insert(self, key: StoredKey) -> bool:
        """False when the id is taken."""
        raise NotImplementedError

    async def update(self, key: StoredKey) -> None:
        raise NotImplementedError


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM api_keys ORDER BY id"
_MARKER = "SELECT COUNT(*), MAX(updated_at) FROM api_keys"
_SET = ", ".join(f"{name} = ?" for name in COLUMNS[1:])


class SqliteKeyStore(KeyStore):
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
            raise KeyStoreUnavailable(f"api_keys table in {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise KeyStoreUnavailable("the key store is not open")
        return self._db

    async def _fetch(self, sql: str) -> list[Any]:
        db = self._connection()
        try:
            async with self._lock, db.execute(sql) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise KeyStoreUnavailable(f"api_keys table in {self.path}: {exc}") from None

    async def all(self) -> list[StoredKey]:
        return [StoredKey.from_row(row) for row in await self._fetch(_SELECT)]

    async def changes_marker(self) -> tuple[Any, ...]:
        return tuple((await self._fetch(_MARKER))[0])

    async def insert(self, key: StoredKey) -> bool:
        db = self._connection()
        marks = ", ".join("?" * len(COLUMNS))
        try:
            async with self._lock:
                cursor = await db.execute(
                    f"INSERT OR IGNORE INTO api_keys ({', '.join(COLUMNS)}) VALUES ({marks})",
                    key.as_row(),
                )
                await db.commit()
                return cursor.rowcount == 1
        except sqlite3.Error as exc:
            raise KeyStoreUnavailable(f"api_keys table in {self.path}: {exc}") from None

    async def update(self, key: StoredKey) -> None:
        db = self._connection()
        row = key.as_row()
        try:
            async with self._lock:
                await db.execute(f"UPDATE api_keys SET {_SET} WHERE id = ?", (*row[1:], row[0]))
                await db.commit()
        except sqlite3.Error as exc:
            raise KeyStoreUnavailable(f"api_keys table in {self.path}: {exc}") from None


class PostgresKeyStore(KeyStore):
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
            raise KeyStoreUnavailable(f"api_keys table: {exc}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        import asyncpg

        if self._pool is None:
            raise KeyStoreUnavailable("the key store is not open")
        try:
            return await getattr(self._pool, method)(sql, *args)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise KeyStoreUnavailable(f"api_keys table: {exc}") from None

    async def all(self) -> list[StoredKey]:
        return [StoredKey.from_row(tuple(row)) for row in await self._run("fetch", _SELECT)]

    async def changes_marker(self) -> tuple[Any, ...]:
        return tuple(await self._run("fetchrow", _MARKER))

    async def insert(self, key: StoredKey) -> bool:
        marks = ", ".join(f"${n}" for n in range(1, len(COLUMNS) + 1))
        status = await self._run(
            "execute",
            f"INSERT INTO api_keys ({', '.join(COLUMNS)}) VALUES ({marks}) "
            "ON CONFLICT (id) DO NOTHING",
            *key.as_row(),
        )
        return status.endswith(" 1")

    async def update(self, key: StoredKey) -> None:
        sets = ", ".join(f"{name} = ${n}" for n, name in enumerate(COLUMNS[1:], start=2))
        await self._run("execute", f"UPDATE api_keys SET {sets} WHERE id = $1", *key.as_row())


def make_key_store(storage: StorageConfig) -> KeyStore:
    if storage.backend == "postgres":
        return PostgresKeyStore(postgres_dsn(storage))
    return SqliteKeyStore(storage.sqlite_path)

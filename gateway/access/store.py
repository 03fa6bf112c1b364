"""Keys issued over the admin API, kept in the ledger's database (`api_keys`), so every
replica and the CLI see the same keys; only a secret's sha256 is stored.

A `KeyStore` reads and changes rows; `changes_marker` is what replicas poll (cheap: one
aggregate) to notice another's change. The rows become `KeyConfig`s in `gateway.access.keyset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from gateway.config.loader import StorageConfig
from gateway.ledger.side_tables import PostgresSideTable, SqliteSideTable
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import API_KEY_COLUMN_TYPES

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


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM api_keys ORDER BY id"
_MARKER = "SELECT COUNT(*), MAX(updated_at) FROM api_keys"
_UPDATE = f"UPDATE api_keys SET {', '.join(f'{name} = ?' for name in COLUMNS[1:])} WHERE id = ?"
_MARKS = ", ".join("?" * len(COLUMNS))


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


def _update_args(key: StoredKey) -> tuple[Any, ...]:
    row = key.as_row()
    return (*row[1:], row[0])


class SqliteKeyStore(KeyStore):
    def __init__(self, path: Path) -> None:
        self.table = SqliteSideTable(path, KeyStoreUnavailable, "api_keys table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def all(self) -> list[StoredKey]:
        return [StoredKey.from_row(row) for row in await self.table.fetch(_SELECT)]

    async def changes_marker(self) -> tuple[Any, ...]:
        return tuple((await self.table.fetch(_MARKER))[0])

    async def insert(self, key: StoredKey) -> bool:
        sql = f"INSERT OR IGNORE INTO api_keys ({', '.join(COLUMNS)}) VALUES ({_MARKS})"
        return await self.table.change(sql, [key.as_row()]) == 1

    async def update(self, key: StoredKey) -> None:
        await self.table.change(_UPDATE, [_update_args(key)])


class PostgresKeyStore(KeyStore):
    def __init__(self, dsn: str) -> None:
        self.table = PostgresSideTable(dsn, KeyStoreUnavailable, "api_keys table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def all(self) -> list[StoredKey]:
        return [StoredKey.from_row(tuple(row)) for row in await self.table.run("fetch", _SELECT)]

    async def changes_marker(self) -> tuple[Any, ...]:
        return tuple(await self.table.run("fetchrow", _MARKER))

    async def insert(self, key: StoredKey) -> bool:
        sql = (
            f"INSERT INTO api_keys ({', '.join(COLUMNS)}) VALUES ({_MARKS}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        return (await self.table.run("execute", sql, *key.as_row())).endswith(" 1")

    async def update(self, key: StoredKey) -> None:
        await self.table.run("execute", _UPDATE, *_update_args(key))


def make_key_store(storage: StorageConfig) -> KeyStore:
    if storage.backend == "postgres":
        return PostgresKeyStore(postgres_dsn(storage))
    return SqliteKeyStore(storage.sqlite_path)

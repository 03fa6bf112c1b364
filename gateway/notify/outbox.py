"""The notifications outbox, in the ledger's database (SQLite or Postgres): an event is put
once per webhook (its row id says which), and a row is taken for an attempt by moving its
`next_attempt_at` past the attempt's own timeout in one conditional UPDATE, so of several
replicas only one sends it; it stays until a receiver answers 2xx."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config.loader import StorageConfig
from gateway.ledger.side_tables import PostgresSideTable, SqliteSideTable
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import NOTIFICATION_COLUMN_TYPES

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


_PUT = (
    f"INSERT OR IGNORE INTO notifications ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(COLUMNS))})"
)


class SqliteOutbox(Outbox):
    def __init__(self, path: Path) -> None:
        self.table = SqliteSideTable(path, OutboxUnavailable, "notifications table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def put(self, rows: list[tuple[Any, ...]]) -> int:
        return await self.table.change(_PUT, rows)

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(*row) for row in await self.table.fetch(_DUE, (now, limit))]

    async def claim(self, row_id: str, now: float, until: float) -> bool:
        return await self.table.change(_CLAIM, [(until, row_id, now)]) == 1

    async def delivered(self, row_id: str, now: float) -> None:
        await self.table.change(_DELIVERED, [(now, row_id)])

    async def failed(self, row_id: str, retry_at: float, error: str) -> None:
        await self.table.change(_FAILED, [(retry_at, error[:500], row_id)])

    async def pending_count(self) -> int:
        return int((await self.table.fetch(_PENDING))[0][0])


class PostgresOutbox(Outbox):
    def __init__(self, dsn: str) -> None:
        self.table = PostgresSideTable(dsn, OutboxUnavailable, "notifications table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def put(self, rows: list[tuple[Any, ...]]) -> int:
        sql = _PUT.replace("INSERT OR IGNORE", "INSERT") + " ON CONFLICT (id) DO NOTHING"
        added = 0
        for row in rows:
            added += (await self.table.run("execute", sql, *row)).endswith(" 1")
        return added

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(*row) for row in await self.table.run("fetch", _DUE, now, limit)]

    async def claim(self, row_id: str, now: float, until: float) -> bool:
        return (await self.table.run("execute", _CLAIM, until, row_id, now)).endswith(" 1")

    async def delivered(self, row_id: str, now: float) -> None:
        await self.table.run("execute", _DELIVERED, now, row_id)

    async def failed(self, row_id: str, retry_at: float, error: str) -> None:
        await self.table.run("execute", _FAILED, retry_at, error[:500], row_id)

    async def pending_count(self) -> int:
        return int(await self.table.run("fetchval", _PENDING))


def make_outbox(storage: StorageConfig) -> Outbox:
    if storage.backend == "postgres":
        return PostgresOutbox(postgres_dsn(storage))
    return SqliteOutbox(storage.sqlite_path)

"""The batches created through the gateway, in the ledger's database (SQLite or Postgres):
who created each, and whether its one row is written yet.

A batch is pending until `billed_at`. Billing it is claimed first, by setting
`billed_request_id` in one conditional UPDATE, so of several replicas only one bills it; a
claim older than `CLAIM_S` whose row never came (the replica died) may be taken again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config.loader import StorageConfig
from gateway.ledger.side_tables import PostgresSideTable, SqliteSideTable
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import BATCH_COLUMN_TYPES

COLUMNS = tuple(BATCH_COLUMN_TYPES)
CLAIM_S = 120.0


class BatchStoreUnavailable(StorageError):
    """The batches table cannot be read or written now."""


@dataclass(frozen=True, slots=True)
class PendingBatch:
    batch_id: str
    team: str
    key_id: str | None
    created_at: float
    model: str | None


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A batch as its create's answer describes it, and who created it."""

    batch_id: str
    team: str
    key_id: str | None
    created_at: float
    endpoint: str | None
    model: str | None
    status: str | None


def billed_request_id(batch_id: str) -> str:
    """The ledger row of a batch: one id per batch, so a row written twice is still one."""
    return f"req_{batch_id}"


_REMEMBER = (
    "INSERT INTO batches (batch_id, team, key_id, created_at, endpoint, model, status) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_PENDING = (
    "SELECT batch_id, team, key_id, created_at, model FROM batches "
    "WHERE billed_at IS NULL ORDER BY created_at"
)
_ONE_PENDING = (
    "SELECT batch_id, team, key_id, created_at, model FROM batches "
    "WHERE batch_id = ? AND billed_at IS NULL"
)
_CHECKED = "UPDATE batches SET status = ?, checked_at = ? WHERE batch_id = ? AND billed_at IS NULL"
_CLAIM = (
    "UPDATE batches SET billed_request_id = ?, checked_at = ?, status = ? "
    "WHERE batch_id = ? AND billed_at IS NULL AND (billed_request_id IS NULL OR checked_at < ?)"
)
_BILLED = "UPDATE batches SET billed_at = ? WHERE batch_id = ?"


class BatchStore:
    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def remember(self, batch: NewBatch) -> None:
        """Keep a batch created through the gateway (again: nothing changes)."""
        raise NotImplementedError

    async def pending(self, batch_id: str | None = None) -> list[PendingBatch]:
        """Every pending batch, or the one named (if pending)."""
        raise NotImplementedError

    async def checked(self, batch_id: str, status: str, now: float) -> None:
        raise NotImplementedError

    async def claim(self, batch_id: str, status: str, now: float) -> bool:
        """Take the batch for billing (False: billed, or another replica bills it now)."""
        raise NotImplementedError

    async def billed(self, batch_id: str, now: float) -> None:
        raise NotImplementedError


class SqliteBatchStore(BatchStore):
    def __init__(self, path: Path) -> None:
        self.table = SqliteSideTable(path, BatchStoreUnavailable, "batches table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def remember(self, batch: NewBatch) -> None:
        await self.table.change(_REMEMBER.replace("INSERT", "INSERT OR IGNORE"), [_values(batch)])

    async def pending(self, batch_id: str | None = None) -> list[PendingBatch]:
        if batch_id is None:
            return [PendingBatch(*row) for row in await self.table.fetch(_PENDING)]
        return [PendingBatch(*row) for row in await self.table.fetch(_ONE_PENDING, (batch_id,))]

    async def checked(self, batch_id: str, status: str, now: float) -> None:
        await self.table.change(_CHECKED, [(status, now, batch_id)])

    async def claim(self, batch_id: str, status: str, now: float) -> bool:
        row = (billed_request_id(batch_id), now, status, batch_id, now - CLAIM_S)
        return await self.table.change(_CLAIM, [row]) == 1

    async def billed(self, batch_id: str, now: float) -> None:
        await self.table.change(_BILLED, [(now, batch_id)])


class PostgresBatchStore(BatchStore):
    def __init__(self, dsn: str) -> None:
        self.table = PostgresSideTable(dsn, BatchStoreUnavailable, "batches table")

    async def open(self) -> None:
        await self.table.open()

    async def close(self) -> None:
        await self.table.close()

    async def remember(self, batch: NewBatch) -> None:
        sql = _REMEMBER + " ON CONFLICT (batch_id) DO NOTHING"
        await self.table.run("execute", sql, *_values(batch))

    async def pending(self, batch_id: str | None = None) -> list[PendingBatch]:
        if batch_id is None:
            rows = await self.table.run("fetch", _PENDING)
        else:
            rows = await self.table.run("fetch", _ONE_PENDING, batch_id)
        return [PendingBatch(*row) for row in rows]

    async def checked(self, batch_id: str, status: str, now: float) -> None:
        await self.table.run("execute", _CHECKED, status, now, batch_id)

    async def claim(self, batch_id: str, status: str, now: float) -> bool:
        done = await self.table.run(
            "execute", _CLAIM, billed_request_id(batch_id), now, status, batch_id, now - CLAIM_S
        )
        return done.endswith(" 1")

    async def billed(self, batch_id: str, now: float) -> None:
        await self.table.run("execute", _BILLED, now, batch_id)


def _values(batch: NewBatch) -> tuple[object, ...]:
    return (
        batch.batch_id, batch.team, batch.key_id, batch.created_at, batch.endpoint, batch.model,
        batch.status,
    )  # fmt: skip


def make_batch_store(storage: StorageConfig) -> BatchStore:
    if storage.backend == "postgres":
        return PostgresBatchStore(postgres_dsn(storage))
    return SqliteBatchStore(storage.sqlite_path)

"""Which store holds the ledger (`storage.backend`): the writer for `serve` and a reader for
the commands that only read (report, invoice, reprice, reconcile)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.config.loader import StorageConfig
from gateway.ledger.readers import LedgerReader, SqliteReader
from gateway.ledger.writer import Ledger, LedgerWriter, upgrade_for_reading


class StorageError(RuntimeError):
    """The ledger's store cannot be used; the message is safe to print (no password)."""


class StorageConfigError(StorageError):
    """The store is configured incompletely (a usage error: exit 2)."""


class LedgerTooNew(StorageError):
    """The ledger's schema version is newer than this code knows: a newer metering-gateway
    wrote it, and this one would neither read nor write it right."""


def postgres_dsn(storage: StorageConfig) -> str:
    dsn = os.environ.get(storage.dsn_env, "").strip()
    if not dsn:
        raise StorageConfigError(
            f"storage.backend is postgres, but ${storage.dsn_env} (storage.dsn_env) is not set:"
            " set it to the PostgreSQL DSN, postgresql://user:password@host:5432/database"
        )
    return dsn


def make_ledger(storage: StorageConfig) -> LedgerWriter:
    """The ledger writer of the configured store (not yet open)."""
    if storage.backend == "postgres":
        from gateway.ledger.postgres import PostgresLedger

        return PostgresLedger(postgres_dsn(storage), storage.flush_interval_ms)
    return Ledger(storage.sqlite_path, storage.flush_interval_ms)


@asynccontextmanager
async def open_reader(storage: StorageConfig) -> AsyncIterator[LedgerReader]:
    """A reader of the configured store, for one command. A ledger of an older schema version
    is upgraded first, as `serve` would (a newer one is refused)."""
    if storage.backend != "postgres":
        await asyncio.to_thread(upgrade_for_reading, storage.sqlite_path)
        yield SqliteReader(storage.sqlite_path)
        return
    from gateway.ledger.postgres import WRITE_ERRORS, PostgresReader, safe_dsn

    dsn = postgres_dsn(storage)
    reader = PostgresReader(dsn)
    try:
        try:
            await reader.open()
            await reader.upgrade(safe_dsn(dsn))
        except (*WRITE_ERRORS, ValueError) as exc:
            raise StorageError(f"PostgreSQL at {safe_dsn(dsn)}: {exc}") from None
        yield reader
    finally:
        await reader.close()

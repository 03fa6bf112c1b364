"""Keeps the hourly rollups up to date beside the request path: every `INTERVAL_S` it seals the
hours that may be sealed (`gateway.ledger.rollups`), on the ledger's SQLite file (in a thread)
or its PostgreSQL database (a two-connection pool of its own). A failure is logged and tried
again at the next beat: the queries read `requests` for whatever is not sealed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

from gateway.config.loader import StorageConfig
from gateway.ledger.rollups import seal_postgres, seal_sqlite
from gateway.ledger.storage import postgres_dsn
from gateway.loop import cancel_and_wait, pause

log = logging.getLogger("gateway.ledger")
INTERVAL_S = 60.0


class RollupSealer:
    def __init__(self, storage: StorageConfig, interval_s: float = INTERVAL_S) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._pool: Any = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollup-sealer")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def seal(self, now: float | None = None) -> int:
        """Seal what may be sealed now; the chunks sealed."""
        moment = time.time() if now is None else now
        if self.storage.backend == "postgres":
            if self._pool is None:
                import asyncpg

                self._pool = await asyncpg.create_pool(
                    postgres_dsn(self.storage), min_size=1, max_size=2, timeout=5
                )
            return await seal_postgres(self._pool, moment)
        return await asyncio.to_thread(seal_sqlite, self.storage.sqlite_path, moment)

    async def _run(self) -> None:
        while True:
            try:
                sealed = await self.seal()
                if sealed:
                    log.info("ledger rollups: %d chunk(s) of hours sealed", sealed)
            except (OSError, sqlite3.Error, TimeoutError) as exc:
                log.warning("ledger rollups not sealed now: %s", exc)
            except Exception:
                log.exception("ledger rollups not sealed now")
            await pause(self.interval_s)

"""Reading the ledger the same way on every store: SQL written once with `?` placeholders, the
few dialect differences behind `Dialect`, rows as dicts keyed by column name or alias.

SQLite reads run blocking sqlite3 in a thread, on their own read-only connection, so the
ledger writer is never held up (WAL lets both run at once). PostgreSQL reads are in
`gateway.ledger.postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

Row = dict[str, Any]


@dataclass(frozen=True)
class Dialect:
    """The SQL expressions that differ between the stores."""

    name: str

    def bucket_index(self, column: str = "started_at") -> str:
        """Which bucket a row falls in, from two parameters: the first bucket's start and the
        width. SQLite's CAST truncates, PostgreSQL's rounds: floor explicitly there."""
        if self.name == "postgres":
            return f"CAST(FLOOR(({column} - ?) / ?) AS BIGINT)"
        return f"CAST(({column} - ?) / ? AS INTEGER)"

    def local_day(self, zone: ZoneInfo, column: str = "started_at") -> str:
        """`YYYY-MM-DD` of a unix time in a timezone."""
        name = _literal(str(zone.key))
        if self.name == "postgres":
            return f"to_char(to_timestamp({column}) AT TIME ZONE {name}, 'YYYY-MM-DD')"
        return f"local_day({column}, {name})"

    def utc_day(self, column: str = "started_at") -> str:
        """`YYYY-MM-DD` of a unix time in UTC."""
        if self.name == "postgres":
            return f"to_char(to_timestamp({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        return f"date({column}, 'unixepoch')"

    def nulls_first(self, order: str) -> str:
        """An ORDER BY list with NULLs first on every term, as SQLite sorts them by default."""
        if self.name == "postgres":
            return ", ".join(f"{term.strip()} NULLS FIRST" for term in order.split(","))
        return order


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgres")


def count_where(condition: str) -> str:
    """How many rows of a group meet a condition (SQLite sums booleans; PostgreSQL cannot)."""
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# A statement and the parameters it is run with, once per entry.
Step = tuple[str, Sequence[Sequence[object]]]


class LedgerReader(Protocol):
    """Queries over the `requests` table. An absent ledger or table reads as no rows."""

    dialect: Dialect

    async def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    async def tuples(self, sql: str, params: Sequence[object] = ()) -> list[tuple]: ...

    async def execute_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        """Write statements in one transaction (maintenance commands such as reprice)."""
        ...

    async def transaction(self, steps: Sequence[Step]) -> None:
        """Several statements, each run for its list of parameters, in one transaction."""
        ...


class SqliteReader:
    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path

    async def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return await asyncio.to_thread(self._read, sql, tuple(params), sqlite3.Row)

    async def tuples(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return await asyncio.to_thread(self._read, sql, tuple(params), None)

    async def execute_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        await self.transaction([(sql, list(params))])

    async def transaction(self, steps: Sequence[Step]) -> None:
        await asyncio.to_thread(self._write, steps)

    def _read(self, sql: str, params: tuple, row_factory: Any) -> list[Any]:
        if not self.path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
            db.create_function("local_day", 2, _local_day, deterministic=True)
            db.row_factory = row_factory
            try:
                found = db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        return [dict(row) for row in found] if row_factory else found

    def _write(self, steps: Sequence[Step]) -> None:
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            for sql, params in steps:
                db.executemany(sql, params)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local_day(timestamp: float, zone: str) -> str:
    return datetime.fromtimestamp(timestamp, _zone(zone)).date().isoformat()

"""Who owns each object made through the gateway: the `objects` table of the ledger's
database (SQLite or PostgreSQL, the schema in `gateway.ledger.writer`), behind an in-memory
cache of the owners already seen.

Teams share one upstream key, so the upstream sees every team's files, batches, vector stores
... as one organization's. The gateway records the team that created each object here and
checks it before forwarding a call that names one (`gateway.pipeline.walls`); which objects a
call names is `gateway.pipeline.object_ids`'.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from gateway.config.loader import StorageConfig
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import _PRAGMAS, prepare_database

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("gateway.objects")


@dataclass(frozen=True, slots=True)
class Owner:
    team: str
    key_id: str | None
    kind: str
    deleted: bool


class ObjectStoreUnavailable(StorageError):
    """The objects table could not be read or written; the message is safe to print."""


DEFAULT_MAX_CACHED = 100_000
_SQLITE_CHUNK = 5_000  # ids per SELECT ... IN (?, ...): well under SQLite's 32766 variables
_COLUMNS = "object_id, kind, team, key_id, deleted_at"
_Row = tuple[str, str, str, str | None, float]  # object_id, kind, team, key_id, created_at


class ObjectStore:
    """Who owns each object: the `objects` table of the ledger's database, behind an
    in-memory cache of the owners already seen.

    `owners` asks the database only for the ids not cached (another replica may have made
    them), in one query; an id found nowhere is not cached, so a replica sees an object
    another one records later. `record` commits before it returns (the creating call's
    answer waits for it, so that another replica already sees the owner when the caller uses
    the object) and never takes an object from another team (the first owner wins). A
    deletion made through another replica is not seen in this one's cache until the entry is
    evicted: it only means the owner's call is forwarded and the upstream says 404.

    The store's failures raise `ObjectStoreUnavailable`.
    """

    def __init__(
        self, max_cached: int = DEFAULT_MAX_CACHED, clock: Callable[[], float] = time.time
    ) -> None:
        self._cache: dict[str, Owner] = {}
        self._max_cached = max_cached
        self._clock = clock

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def owners(self, ids: Sequence[str]) -> dict[str, Owner]:
        """The owner of each of these ids that has one (unknown ids are left out)."""
        found: dict[str, Owner] = {}
        missing: list[str] = []
        for object_id in dict.fromkeys(ids):
            owner = self._cache.get(object_id)
            if owner is None:
                missing.append(object_id)
            else:
                found[object_id] = owner
        if missing:
            for object_id, owner in (await self._select(missing)).items():
                self._remember(object_id, owner)
                found[object_id] = owner
        return found

    async def visible_to(self, team: str, ids: Sequence[str]) -> set[str]:
        """Those of these ids that are objects of this team, not deleted (for `collect_list`)."""
        return {
            object_id
            for object_id, owner in (await self.owners(ids)).items()
            if owner.team == team and not owner.deleted
        }

    async def record(self, pairs: list[tuple[str, str]], team: str, key_id: str | None) -> None:
        """Make this team the owner of these (object_id, kind) objects, committed on return; an
        object another team already owns keeps its owner (a warning is logged). An object
        whose owner is cached is not written again: an owner never changes (so recording a
        batch's output file on each retrieval costs nothing after the first)."""
        kinds: dict[str, str] = {}
        for object_id, kind in pairs:
            if object_id:
                kinds.setdefault(object_id, kind)  # an id twice: its first kind
        known = {
            object_id: self._cache[object_id] for object_id in kinds if object_id in self._cache
        }
        rows = [
            (object_id, kind, team, key_id, self._clock())
            for object_id, kind in kinds.items()
            if object_id not in known
        ]
        stored = await self._insert(rows) if rows else {}
        for object_id, owner in stored.items():
            self._remember(object_id, owner)
        for object_id, owner in {**known, **stored}.items():
            if owner.team != team:
                log.warning(
                    "object %s (%s) belongs to team %s: not recorded for team %s",
                    object_id, kinds[object_id], owner.team, team,
                )  # fmt: skip

    async def mark_deleted(self, object_id: str) -> None:
        """The owner's DELETE of the object succeeded."""
        await self._update_deleted(object_id, self._clock())
        owner = self._cache.get(object_id)
        if owner is not None:
            self._cache[object_id] = Owner(owner.team, owner.key_id, owner.kind, True)

    def _remember(self, object_id: str, owner: Owner) -> None:
        self._cache.pop(object_id, None)
        self._cache[object_id] = owner
        while len(self._cache) > self._max_cached:
            del self._cache[next(iter(self._cache))]  # the oldest entry

    # ------------------------------------------------------------ what a backend provides

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        raise NotImplementedError

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        """Insert the rows whose id is new; the owner of each id afterwards."""
        raise NotImplementedError

    async def _update_deleted(self, object_id: str, when: float) -> None:
        raise NotImplementedError


def _owner(row: Sequence[Any]) -> tuple[str, Owner]:
    object_id, kind, team, key_id, deleted_at = row
    return object_id, Owner(team, key_id, kind, deleted_at is not None)


_SQLITE_INSERT = (
    "INSERT INTO objects (object_id, kind, team, key_id, created_at, deleted_at) "
    "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (object_id) DO NOTHING"
)
_MARK_DELETED = "UPDATE objects SET deleted_at = ? WHERE object_id = ? AND deleted_at IS NULL"


class SqliteObjectStore(ObjectStore):
    """The objects table in the SQLite ledger's file, on a connection of its own (WAL, so the
    ledger's writer and other processes on the file go on at the same time)."""

    def __init__(
        self,
        path: Path,
        max_cached: int = DEFAULT_MAX_CACHED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_cached, clock)
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one statement sequence at a time on the connection

    async def open(self) -> None:
        try:
            await asyncio.to_thread(prepare_database, self.path)
            self._db = await aiosqlite.connect(self.path)
            for statement in _PRAGMAS:
                await self._db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ObjectStoreUnavailable("the objects store is not open")
        return self._db

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        db = self._connection()
        found: dict[str, Owner] = {}
        try:
            async with self._lock:
                for start in range(0, len(ids), _SQLITE_CHUNK):
                    chunk = ids[start : start + _SQLITE_CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    sql = f"SELECT {_COLUMNS} FROM objects WHERE object_id IN ({marks})"
                    async with db.execute(sql, chunk) as cursor:
                        found.update(_owner(row) for row in await cursor.fetchall())
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None
        return found

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        db = self._connection()
        ids = [row[0] for row in rows]
        marks = ", ".join("?" * len(ids))
        try:
            async with self._lock:
                try:
                    await db.executemany(_SQLITE_INSERT, rows)
                    sql = f"SELECT {_COLUMNS} FROM objects WHERE object_id IN ({marks})"
                    async with db.execute(sql, ids) as cursor:
                        stored = dict(_owner(row) for row in await cursor.fetchall())
                    await db.commit()
                except BaseException:
                    await db.rollback()
                    raise
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None
        return stored

    async def _update_deleted(self, object_id: str, when: float) -> None:
        db = self._connection()
        try:
            async with self._lock:
                await db.execute(_MARK_DELETED, (when, object_id))
                await db.commit()
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None


_PG_SELECT = f"SELECT {_COLUMNS} FROM objects WHERE object_id = ANY($1::text[])"
_PG_INSERT = (
    "INSERT INTO objects (object_id, kind, team, key_id, created_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[]) "
    "ON CONFLICT (object_id) DO NOTHING"
)
_PG_MARK_DELETED = "UPDATE objects SET deleted_at = $1 WHERE object_id = $2 AND deleted_at IS NULL"
PG_POOL_SIZE = 4


class PostgresObjectStore(ObjectStore):
    """The objects table in the PostgreSQL ledger's database (created with the ledger's
    schema, whichever starts first), over a small pool of its own."""

    def __init__(
        self,
        dsn: str,
        max_cached: int = DEFAULT_MAX_CACHED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_cached, clock)
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        import asyncpg

        from gateway.ledger.postgres import CONNECT_TIMEOUT_S, WRITE_ERRORS, create_schema, safe_dsn

        try:
            # min_size 0: a connection lost in an outage is replaced on the next acquire.
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=PG_POOL_SIZE, timeout=CONNECT_TIMEOUT_S
            )
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                await create_schema(connection, safe_dsn(self._dsn))
        except (*WRITE_ERRORS, ValueError) as exc:  # ValueError: a malformed DSN
            await self.close()
            raise self._unavailable(exc) from None
        except StorageError:  # a ledger this version cannot use
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _unavailable(self, exc: BaseException) -> ObjectStoreUnavailable:
        from gateway.ledger.postgres import safe_dsn

        return ObjectStoreUnavailable(f"objects table at {safe_dsn(self._dsn)}: {exc}")

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        from gateway.ledger.postgres import CONNECT_TIMEOUT_S, WRITE_ERRORS

        if self._pool is None:
            raise ObjectStoreUnavailable("the objects store is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                return await work(connection)
        except WRITE_ERRORS as exc:
            raise self._unavailable(exc) from None

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        records = await self._run(lambda connection: connection.fetch(_PG_SELECT, ids))
        return dict(_owner(tuple(record)) for record in records)

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        columns = [list(column) for column in zip(*rows, strict=True)]
        ids = columns[0]

        async def insert(connection: asyncpg.Connection) -> list[Any]:
            async with connection.transaction():
                await connection.execute(_PG_INSERT, *columns)
                return await connection.fetch(_PG_SELECT, ids)

        return dict(_owner(tuple(record)) for record in await self._run(insert))

    async def _update_deleted(self, object_id: str, when: float) -> None:
        await self._run(lambda connection: connection.execute(_PG_MARK_DELETED, when, object_id))


def make_object_store(
    storage: StorageConfig,
    max_cached: int = DEFAULT_MAX_CACHED,
    clock: Callable[[], float] = time.time,
) -> ObjectStore:
    """The objects store of the configured ledger store (not yet open): the SQLite file of
    `storage.sqlite_path`, or the PostgreSQL database of `$storage.dsn_env`."""
    if storage.backend == "postgres":
        return PostgresObjectStore(postgres_dsn(storage), max_cached, clock)
    return SqliteObjectStore(storage.sqlite_path, max_cached, clock)

"""The PostgreSQL ledger (`storage.backend: postgres`): the same `requests` table and indexes
as SQLite, written in batches with COPY, read through a small connection pool.

A batch is COPYed into a per-connection staging table and merged with ON CONFLICT in one
transaction, so a batch retried after a commit whose answer was lost (the server went away
at that moment) replaces its rows instead of failing forever on the primary key.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

import asyncpg

from gateway.ledger.readers import POSTGRES, Row, Step
from gateway.ledger.rollups import (
    ROLLUP_COLUMN_TYPES,
    ROLLUP_STATE_COLUMN_TYPES,
    ROLLUP_STATEMENTS,
    UNSEAL,
    first_started,
    hour_of,
    unseal,
)
from gateway.ledger.storage import StorageError
from gateway.ledger.writer import (
    _COLUMN_TYPES,
    API_KEY_COLUMN_TYPES,
    BATCH_COLUMN_TYPES,
    BATCH_INDEXES,
    CHANGE_CLOCK,
    CHANGE_CLOCK_COLUMN_TYPES,
    CHANGE_SEQ,
    COLUMNS,
    EXPORT_COLUMN_TYPES,
    EXPORT_INDEXES,
    EXPORT_ROW_COLUMN_TYPES,
    EXPORT_ROW_KEY,
    NOTIFICATION_COLUMN_TYPES,
    NOTIFICATION_INDEXES,
    NOW_SEQ,
    OBJECT_COLUMN_TYPES,
    OBJECT_INDEXES,
    REQUEST_INDEXES,
    SCHEMA_VERSION,
    STORED_COLUMN_TYPES,
    TICK,
    VERSION_COLUMN_TYPES,
    WRITE_VERSION,
    LedgerWriter,
    add_column,
    check_version,
    create_table,
    schema_version,
)

log = logging.getLogger("gateway.ledger")

CONNECT_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 60.0
READ_POOL_SIZE = 4

# Integer columns hold nano-USD and byte counts that overflow int4; text compares bytewise
# (COLLATE "C") so rows sort as they do in SQLite.
_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": 'TEXT COLLATE "C"'}
_CONVERTERS: dict[str, Callable[[Any], Any]] = {"INTEGER": int, "REAL": float, "TEXT": str}


def _column_type(sqlite_type: str) -> str:
    kind, _, constraints = sqlite_type.partition(" ")
    return f"{_TYPES[kind]} {constraints}".strip()


SCHEMA_SQL = [  # SQLite's tables and indexes: same names, same columns
    create_table("requests", STORED_COLUMN_TYPES, _column_type),
    *REQUEST_INDEXES,
    create_table("objects", OBJECT_COLUMN_TYPES, _column_type),
    *OBJECT_INDEXES,
    create_table("api_keys", API_KEY_COLUMN_TYPES, _column_type),
    create_table("notifications", NOTIFICATION_COLUMN_TYPES, _column_type),
    *NOTIFICATION_INDEXES,
    create_table("batches", BATCH_COLUMN_TYPES, _column_type),
    *BATCH_INDEXES,
    create_table("usage_hourly", ROLLUP_COLUMN_TYPES, _column_type),
    create_table("usage_daily", ROLLUP_COLUMN_TYPES, _column_type),
    create_table("rollup_state", ROLLUP_STATE_COLUMN_TYPES, _column_type),
    *ROLLUP_STATEMENTS,
    create_table("change_clock", CHANGE_CLOCK_COLUMN_TYPES, _column_type),
    *CHANGE_CLOCK,
    create_table("exports", EXPORT_COLUMN_TYPES, _column_type),
    create_table(
        "export_rows", EXPORT_ROW_COLUMN_TYPES, _column_type, constraints=(EXPORT_ROW_KEY,)
    ),
    *EXPORT_INDEXES,
    create_table("gateway_schema", VERSION_COLUMN_TYPES, _column_type),
]
# Gateways sharing one database may start together: one creates or upgrades it at a time.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('metering-gateway schema'))"
_STAGING = "CREATE TEMP TABLE requests_batch (LIKE requests) ON COMMIT DELETE ROWS"
_MERGE = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}, {CHANGE_SEQ}) "
    f"SELECT {', '.join(COLUMNS)}, {NOW_SEQ} "
    "FROM requests_batch ON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in (*COLUMNS[1:], CHANGE_SEQ))
)
_CONVERT = tuple(_CONVERTERS[kind.split()[0]] for kind in _COLUMN_TYPES.values())
WRITE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresUnavailable(StorageError):
    """PostgreSQL could not be reached or set up; the message never holds the password."""


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{parts.scheme}://{user}{host}{port}{parts.path}"
    except ValueError:
        return "(unparsable DSN)"


@lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1..$n` (none of our SQL has a `?` in a literal,
    but quoted text is skipped anyway)."""
    counter = iter(range(1, 10_000))
    pieces = re.split(r"('(?:[^']|'')*')", sql)
    return "".join(
        piece if piece.startswith("'") else re.sub(r"\?", lambda _: f"${next(counter)}", piece)
        for piece in pieces
    )


def _typed(row: tuple) -> tuple:
    """Each value as its column's type: binary COPY refuses an int for a float and the like,
    and such a batch would otherwise be retried forever."""
    return tuple(
        None if value is None else convert(value)
        for value, convert in zip(row, _CONVERT, strict=True)
    )


# The columns `requests` has, as the unqualified name resolves (the search path).
_PRESENT_COLUMNS = (
    "SELECT attname FROM pg_attribute"
    " WHERE attrelid = to_regclass('requests') AND attnum > 0 AND NOT attisdropped"
)


async def schema_state(connection: asyncpg.Connection) -> tuple[int | None, list[str]]:
    """The ledger's schema version (None: no ledger in this database yet) and the `requests`
    columns it lacks."""
    present = {record[0] for record in await connection.fetch(_PRESENT_COLUMNS)}
    recorded = None
    if await connection.fetchval("SELECT to_regclass('gateway_schema') IS NOT NULL"):
        recorded = await connection.fetchval("SELECT MAX(version) FROM gateway_schema")
    missing = [name for name in STORED_COLUMN_TYPES if present and name not in present]
    return schema_version(recorded, bool(present)), missing


async def create_schema(connection: asyncpg.Connection, target: str) -> None:
    """Create the schema, or upgrade an older ledger in place (the columns it lacks added,
    existing rows given their defaults, the version written) in one transaction under the
    advisory lock; a ledger of a newer version is refused. `target`: the DSN without its
    password, for the refusal."""
    async with connection.transaction():
        await connection.execute(_SCHEMA_LOCK)
        version, missing = await schema_state(connection)
        check_version(version, target)
        for name in missing:  # first: the indexes below may name the new columns
            await connection.execute(add_column(name, _column_type))
        for statement in SCHEMA_SQL:
            await connection.execute(statement)
        if version != SCHEMA_VERSION:
            await connection.execute(WRITE_VERSION[0])
            await connection.execute(numbered(WRITE_VERSION[1]), SCHEMA_VERSION)
    if missing or version not in (None, SCHEMA_VERSION):
        log.info(
            "ledger %s: schema version %s upgraded to %d (columns added: %s)",
            target, version, SCHEMA_VERSION, ", ".join(missing) or "none",
        )  # fmt: skip


class PostgresLedger(LedgerWriter):
    """Rows go to PostgreSQL over one writer connection, re-opened after the server comes back;
    reports and usage APIs read through `reader`'s own pool."""

    write_errors = WRITE_ERRORS

    def __init__(self, dsn: str, flush_interval_ms: int) -> None:
        super().__init__(flush_interval_ms)
        self._dsn = dsn
        self.target = safe_dsn(dsn)
        self._connection: asyncpg.Connection | None = None
        self._open = False
        self.reader = PostgresReader(dsn)

    @property
    def _connected(self) -> bool:
        return self._open

    async def _connect(self) -> None:
        try:
            connection = await self._new_connection()
            self._connection = connection
            await create_schema(connection, self.target)
            await connection.execute(_STAGING)
        except (*WRITE_ERRORS, ValueError) as exc:
            await self._drop_connection()
            raise PostgresUnavailable(f"PostgreSQL at {self.target}: {exc}") from None
        except StorageError:  # a ledger this version cannot use
            await self._drop_connection()
            raise
        await self.reader.open()
        self._open = True
        log.info("ledger: PostgreSQL at %s", self.target)

    async def _new_connection(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._dsn, timeout=CONNECT_TIMEOUT_S, command_timeout=WRITE_TIMEOUT_S
        )

    async def _writer_connection(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await self._new_connection()
            await self._connection.execute(_STAGING)
        return self._connection

    async def _write(self, batch: list[tuple]) -> None:
        # The last row of a request id wins, as INSERT OR REPLACE does in SQLite.
        records = [_typed(row) for row in {row[0]: row for row in batch}.values()]
        try:
            connection = await self._writer_connection()
            async with connection.transaction():
                await connection.copy_records_to_table(
                    "requests_batch", records=records, columns=COLUMNS
                )
                await connection.execute(TICK)  # its row lock is held to the commit
                await connection.execute(_MERGE)
                first = first_started(records)
                hour = float(hour_of(first))
                if (await connection.execute(numbered(UNSEAL), hour, first)).endswith(" 1"):
                    for statement, params in unseal(first):
                        await connection.execute(numbered(statement), *params)
        except BaseException:
            # Whatever state the connection is in, the retry starts on a fresh one.
            await self._drop_connection()
            raise

    async def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _disconnect(self) -> None:
        self._open = False
        if self._connection is not None and not self._connection.is_closed():
            try:
                await self._connection.close(timeout=CONNECT_TIMEOUT_S)
            except WRITE_ERRORS:
                self._connection.terminate()
        self._connection = None
        await self.reader.close()


class PostgresReader:
    """`LedgerReader` over a small asyncpg pool; SUMs of BIGINT (numeric) come back as int."""

    dialect = POSTGRES

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        # min_size 0: nothing to connect now, and a connection lost in an outage is
        # replaced on the next acquire.
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=0, max_size=READ_POOL_SIZE, timeout=CONNECT_TIMEOUT_S
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def upgrade(self, target: str) -> None:
        """Before a command reads: refuse a newer ledger, bring an older one to this version
        (as `serve` would). A database without a ledger yet is left as it is."""
        async with self._acquire() as connection:
            version, missing = await schema_state(connection)
            check_version(version, target)
            if version is not None and (missing or version != SCHEMA_VERSION):
                await create_schema(connection, target)

    async def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return [
            {name: _plain(value) for name, value in record.items()}
            for record in await self._fetch(sql, params)
        ]

    async def tuples(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return [
            tuple(_plain(value) for value in record) for record in await self._fetch(sql, params)
        ]

    async def execute_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        await self.transaction([(sql, list(params))])

    async def transaction(self, steps: Sequence[Step]) -> None:
        async with self._acquire() as connection, connection.transaction():
            for sql, params in steps:
                await connection.executemany(numbered(sql), params)

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[asyncpg.Record]:
        async with self._acquire() as connection:
            try:
                return await connection.fetch(numbered(sql), *params)
            except asyncpg.UndefinedTableError:
                return []  # no gateway has written to this database yet

    def _acquire(self) -> Any:
        if self._pool is None:
            raise PostgresUnavailable("the PostgreSQL reader is not open")
        return self._pool.acquire(timeout=CONNECT_TIMEOUT_S)


def _plain(value: object) -> object:
    return int(value) if isinstance(value, Decimal) else value

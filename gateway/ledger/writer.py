"""The ledger: one row per call, written in batches off the hot path.

`append` only puts a row on a list; a background task commits the list every
`flush_interval_ms` (SQLite through aiosqlite's own thread; PostgreSQL in
`gateway.ledger.postgres`), so the event loop never waits on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path

import aiosqlite

from gateway.ledger.readers import SqliteReader
from gateway.ledger.rollups import (
    ROLLUP_COLUMN_TYPES,
    ROLLUP_STATE_COLUMN_TYPES,
    ROLLUP_STATEMENTS,
    UNSEAL,
    first_started,
    hour_of,
    unseal,
)

log = logging.getLogger("gateway.ledger")


@dataclass(slots=True)
class CallRecord:
    """One call as the ledger stores it (column order = field order)."""

    request_id: str
    started_at: float
    finished_at: float = 0.0
    team: str | None = None
    key_id: str | None = None
    method: str = ""
    path: str = ""
    model: str | None = None
    stream: int = 0
    status: int = 0
    outcome: str = "ok"
    request_bytes: int = 0
    response_bytes: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    tokens_estimated: int = 0
    cost_nanousd: int = 0
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    queued_ms: float = 0.0
    error_code: str | None = None
    upstream_request_id: str | None = None
    shadow_rejected_by: str | None = None
    pricing_hash: str | None = None
    price_unknown: int = 0
    # Schema version 2 (SPEC "Prices from a maintained source"): each count a subset of the
    # token column it names, as the upstream reports it.
    cache_write_tokens: int = 0  # of input
    audio_input_tokens: int = 0  # of input
    audio_output_tokens: int = 0  # of output
    image_input_tokens: int = 0  # of input
    image_output_tokens: int = 0  # of output
    rejected_prediction_tokens: int = 0  # of output
    web_search_calls: int = 0
    file_search_calls: int = 0
    service_tier: str | None = None  # the tier the response says served the call
    batch: int = 0  # 1 for Batch API usage
    audio_seconds: float = 0.0  # duration-priced transcription
    input_characters: int = 0  # character-priced speech
    # Version 3 (SPEC "Performance"): the time waiting on the upstream, request sent to last
    # byte (summed over the exchanges of a call that had several); None: never forwarded.
    upstream_ms: float | None = None
    # Version 5 (SPEC "Every OpenAI surface"): the WebSocket session a response was part of.
    ws_session_id: str | None = None
    # The limit that refused a call (its config name, `queue` for a full or timed-out queue).
    rejected_by: str | None = None


_COLUMN_TYPES = {
    "request_id": "TEXT PRIMARY KEY",
    "started_at": "REAL NOT NULL",
    "finished_at": "REAL",
    "team": "TEXT",
    "key_id": "TEXT",
    "method": "TEXT",
    "path": "TEXT",
    "model": "TEXT",
    "stream": "INTEGER",
    "status": "INTEGER",
    "outcome": "TEXT",
    "request_bytes": "INTEGER",
    "response_bytes": "INTEGER",
    "input_tokens": "INTEGER",
    "cached_input_tokens": "INTEGER",
    "output_tokens": "INTEGER",
    "reasoning_tokens": "INTEGER",
    "tokens_estimated": "INTEGER",
    "cost_nanousd": "INTEGER",
    "latency_ms": "REAL",
    "ttfb_ms": "REAL",
    "queued_ms": "REAL",
    "error_code": "TEXT",
    "upstream_request_id": "TEXT",
    "shadow_rejected_by": "TEXT",
    "pricing_hash": "TEXT",
    "price_unknown": "INTEGER",
    # Version 2. The defaults fill the rows of a ledger upgraded in place (and the rows of a
    # gateway of an older release still writing to an upgraded ledger).
    "cache_write_tokens": "INTEGER DEFAULT 0",
    "audio_input_tokens": "INTEGER DEFAULT 0",
    "audio_output_tokens": "INTEGER DEFAULT 0",
    "image_input_tokens": "INTEGER DEFAULT 0",
    "image_output_tokens": "INTEGER DEFAULT 0",
    "rejected_prediction_tokens": "INTEGER DEFAULT 0",
    "web_search_calls": "INTEGER DEFAULT 0",
    "file_search_calls": "INTEGER DEFAULT 0",
    "service_tier": "TEXT",
    "batch": "INTEGER DEFAULT 0",
    "audio_seconds": "REAL DEFAULT 0.0",
    "input_characters": "INTEGER DEFAULT 0",
    # Version 3.
    "upstream_ms": "REAL",
    # Version 5.
    "ws_session_id": "TEXT",
    "rejected_by": "TEXT",
}
COLUMNS = tuple(f.name for f in fields(CallRecord))
assert tuple(_COLUMN_TYPES) == COLUMNS, "CallRecord and the schema must list the same columns"
_as_row = attrgetter(*COLUMNS)
# Version 6 (SPEC "Billing export"): the order rows were written or last changed in, the billing
# exports' cursor (`gateway.export`). Every commit of the ledger's writer (and every reprice)
# first moves the one-row `change_clock` on, in its own transaction, and stamps its rows with
# the new value: commits take the clock one at a time (SQLite's write lock; the row lock on
# PostgreSQL, held to the commit), so a cursor at (change_seq, request_id) never passes a row
# still to be committed. Rows of older releases read 0, as a VACUUM-proof rowid would not.
CHANGE_SEQ = "change_seq"
STORED_COLUMN_TYPES = {**_COLUMN_TYPES, CHANGE_SEQ: "INTEGER DEFAULT 0"}
STORED_COLUMNS = tuple(STORED_COLUMN_TYPES)  # `requests` as stored: a CallRecord, then its seq
CHANGE_CLOCK_COLUMN_TYPES = {"seq": "INTEGER NOT NULL"}
CHANGE_CLOCK = [
    "INSERT INTO change_clock (seq) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM change_clock)"
]
TICK = "UPDATE change_clock SET seq = seq + 1"
NOW_SEQ = "(SELECT seq FROM change_clock)"


def create_table(
    name: str,
    column_types: dict[str, str],
    typed: Callable[[str], str] = str,
    constraints: tuple[str, ...] = (),
) -> str:
    """`CREATE TABLE IF NOT EXISTS` of these columns, each type through `typed` (a store's
    spelling of the SQLite type), then the table's `constraints`."""
    parts = [f"{column} {typed(kind)}" for column, kind in column_types.items()]
    columns = ",\n  ".join([*parts, *constraints])
    return f"CREATE TABLE IF NOT EXISTS {name} (\n  {columns}\n)"


REQUEST_INDEXES = [
    "CREATE INDEX IF NOT EXISTS requests_started_at ON requests (started_at)",
    "CREATE INDEX IF NOT EXISTS requests_team_started_at ON requests (team, started_at)",
    "CREATE INDEX IF NOT EXISTS requests_key_started_at ON requests (key_id, started_at)",
    # The few refused calls, for the portal's "which limits are hit" without a range scan.
    "CREATE INDEX IF NOT EXISTS requests_refused ON requests (started_at)"
    " WHERE outcome IN ('rejected', 'queue_timeout')",
    "CREATE INDEX IF NOT EXISTS requests_changes ON requests (change_seq, request_id)",
]
# Who owns each object created through the gateway (`gateway.ledger.object_store`).
OBJECT_COLUMN_TYPES = {
    "object_id": "TEXT PRIMARY KEY",
    "kind": "TEXT",
    "team": "TEXT",
    "key_id": "TEXT",
    "created_at": "REAL",
    "deleted_at": "REAL",
}
OBJECT_INDEXES = ["CREATE INDEX IF NOT EXISTS objects_team_kind ON objects (team, kind)"]
# Keys issued over the admin API (`gateway.access.store`): only a secret's sha256 is kept. A
# rotated key's previous digest stays valid until `previous_until`; `updated_at` moves on every
# change, which is how other replicas notice one.
API_KEY_COLUMN_TYPES = {
    "id": "TEXT PRIMARY KEY",
    "team": "TEXT NOT NULL",
    "sha256": "TEXT NOT NULL",
    "expires": "TEXT",
    "limits": "TEXT NOT NULL",
    "created_at": "REAL NOT NULL",
    "revoked_at": "REAL",
    "previous_sha256": "TEXT",
    "previous_until": "REAL",
    "updated_at": "REAL NOT NULL",
}
# The notifications outbox (`gateway.notify.outbox`): one row per event and webhook, sent until
# a 2xx answer; the row's id (the event's id and the webhook's) makes each event once per
# webhook, whichever replica or restart found it.
NOTIFICATION_COLUMN_TYPES = {
    "id": "TEXT PRIMARY KEY",
    "event_id": "TEXT NOT NULL",
    "webhook": "TEXT NOT NULL",
    "body": "TEXT NOT NULL",
    "created_at": "REAL NOT NULL",
    "attempts": "INTEGER NOT NULL",
    "next_attempt_at": "REAL NOT NULL",
    "delivered_at": "REAL",
    "last_error": "TEXT",
}
NOTIFICATION_INDEXES = [
    "CREATE INDEX IF NOT EXISTS notifications_due ON notifications (delivered_at, next_attempt_at)"
]
# Batches created through the gateway (`gateway.batches`): pending until `billed_at`, when the
# one ledger row of the batch (`billed_request_id`, derived from the batch id) is written.
BATCH_COLUMN_TYPES = {
    "batch_id": "TEXT PRIMARY KEY",
    "team": "TEXT NOT NULL",
    "key_id": "TEXT",
    "created_at": "REAL NOT NULL",
    "endpoint": "TEXT",
    "model": "TEXT",
    "status": "TEXT",
    "checked_at": "REAL",
    "billed_request_id": "TEXT",
    "billed_at": "REAL",
}
BATCH_INDEXES = ["CREATE INDEX IF NOT EXISTS batches_pending ON batches (billed_at)"]
# The billing exports (`gateway.export`): each export's cursor, its lease (one exporter at a
# time, whichever replica), and what it has done with each row it has reached: `sent` (the
# billing system holds `value` under `event_id`), `refused` (the service said no: `note`),
# `skipped` (too old for the service). `ledger_value`: a row repriced after it was sent, where
# the service takes no correction.
EXPORT_COLUMN_TYPES = {
    "name": "TEXT PRIMARY KEY",
    "kind": "TEXT NOT NULL",
    "cursor_seq": "INTEGER NOT NULL",
    "cursor_id": "TEXT NOT NULL",
    "holder": "TEXT",
    "lease_until": "REAL",
    "delivered": "INTEGER NOT NULL",
    "last_delivered_at": "REAL",
    "last_error": "TEXT",
    "last_error_at": "REAL",
    "created_at": "REAL NOT NULL",
}
EXPORT_ROW_COLUMN_TYPES = {
    "export": "TEXT NOT NULL",
    "request_id": "TEXT NOT NULL",
    "event_id": "TEXT NOT NULL",
    "value": "INTEGER",
    "state": "TEXT NOT NULL",
    "at": "REAL NOT NULL",
    "note": "TEXT",
    "ledger_value": "INTEGER",
}
EXPORT_ROW_KEY = "PRIMARY KEY (export, request_id)"
EXPORT_INDEXES = ["CREATE INDEX IF NOT EXISTS export_rows_state ON export_rows (export, state)"]
# The ledger's schema version, one row of `gateway_schema`. Version 1 is the ledger of the
# releases that recorded none (no `gateway_schema` table); version 2 added the columns from
# `cache_write_tokens` on, version 3 `upstream_ms`, version 4 the `api_keys` and
# `notifications` tables (a gateway of an older release would not see the keys issued or
# revoked there), version 5 `ws_session_id`, `rejected_by`, the `batches` table and the hourly
# rollups (`gateway.ledger.rollups`: a cache, rebuilt from `requests`), version 6
# `change_seq`, `change_clock` and the billing exports' tables. An older
# ledger is upgraded in place at start by adding what it lacks; a newer one is refused (this
# code would not write what its readers expect).
SCHEMA_VERSION = 6
VERSION_COLUMN_TYPES = {"version": "INTEGER NOT NULL"}
SCHEMA = [
    create_table("requests", STORED_COLUMN_TYPES),
    *REQUEST_INDEXES,
    create_table("objects", OBJECT_COLUMN_TYPES),
    *OBJECT_INDEXES,
    create_table("api_keys", API_KEY_COLUMN_TYPES),
    create_table("notifications", NOTIFICATION_COLUMN_TYPES),
    *NOTIFICATION_INDEXES,
    create_table("batches", BATCH_COLUMN_TYPES),
    *BATCH_INDEXES,
    create_table("usage_hourly", ROLLUP_COLUMN_TYPES),
    create_table("usage_daily", ROLLUP_COLUMN_TYPES),
    create_table("rollup_state", ROLLUP_STATE_COLUMN_TYPES),
    *ROLLUP_STATEMENTS,
    create_table("change_clock", CHANGE_CLOCK_COLUMN_TYPES),
    *CHANGE_CLOCK,
    create_table("exports", EXPORT_COLUMN_TYPES),
    create_table("export_rows", EXPORT_ROW_COLUMN_TYPES, constraints=(EXPORT_ROW_KEY,)),
    *EXPORT_INDEXES,
    create_table("gateway_schema", VERSION_COLUMN_TYPES),
]
WRITE_VERSION = ["DELETE FROM gateway_schema", "INSERT INTO gateway_schema (version) VALUES (?)"]
_INSERT = (
    f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}, {CHANGE_SEQ}) "
    f"VALUES ({', '.join('?' * len(COLUMNS))}, {NOW_SEQ})"
)
_PRAGMAS = ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000"]


def add_column(name: str, typed: Callable[[str], str] = str) -> str:
    """The `ALTER TABLE` that adds a `requests` column a ledger lacks (with its default)."""
    return f"ALTER TABLE requests ADD COLUMN {name} {typed(STORED_COLUMN_TYPES[name])}"


def schema_version(recorded: int | None, has_requests: bool) -> int | None:
    """A ledger's version from its `gateway_schema` row (None: no row or no table); None for
    a database without a ledger yet."""
    if recorded is not None:
        return recorded
    return 1 if has_requests else None


def check_version(version: int | None, where: str) -> None:
    """Refuse a ledger written by a newer metering-gateway."""
    if version is not None and version > SCHEMA_VERSION:
        from gateway.ledger.storage import (
            LedgerTooNew,  # gateway.ledger.storage imports this module
        )

        raise LedgerTooNew(
            f"the ledger at {where} has schema version {version}; this metering-gateway knows"
            f" up to {SCHEMA_VERSION}: upgrade metering-gateway"
        )


def sqlite_schema(db: sqlite3.Connection) -> tuple[int | None, list[str]]:
    """The ledger's schema version and the `requests` columns it lacks."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    present = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
    recorded = None
    if "gateway_schema" in tables:
        (recorded,) = db.execute("SELECT MAX(version) FROM gateway_schema").fetchone()
    version = schema_version(recorded, "requests" in tables)
    missing = [name for name in STORED_COLUMN_TYPES if present and name not in present]
    return version, missing


def prepare_database(path: Path) -> None:
    """Create the file, schema and WAL mode, or upgrade an older ledger in place: the columns
    it lacks added (existing rows get their defaults) and the version written, in one
    transaction (blocking; called before serving starts). A newer ledger is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for statement in _PRAGMAS:
            db.execute(statement)
        # IMMEDIATE: the write lock first, so of several processes starting on one ledger
        # (workers, the objects store) one upgrades it and the others find it done.
        db.execute("BEGIN IMMEDIATE")
        version, missing = sqlite_schema(db)
        try:
            check_version(version, str(path))
            for name in missing:  # first: the indexes below may name the new columns
                db.execute(add_column(name))
            for statement in SCHEMA:
                db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(WRITE_VERSION[0])
                db.execute(WRITE_VERSION[1], (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and version is not None:
                from gateway.ledger.storage import StorageError

                raise StorageError(
                    f"the ledger at {path} (schema version {version}) could not be brought"
                    f" to version {SCHEMA_VERSION}: {exc}"
                ) from exc
            raise
    if missing or version not in (None, SCHEMA_VERSION):
        log.info(
            "ledger %s: schema version %s upgraded to %d (columns added: %s)",
            path, version, SCHEMA_VERSION, ", ".join(missing) or "none",
        )  # fmt: skip


def upgrade_for_reading(path: Path) -> None:
    """Before a command reads an existing ledger: refuse a newer one, bring an older one to
    this version (as `serve` would), so every column the readers name is there. A file
    without a ledger is left as it is (it reads as no rows)."""
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            version, missing = sqlite_schema(db)
    except sqlite3.Error:
        return  # not readable as a ledger: the reads say why, as before
    check_version(version, str(path))
    if version is not None and (missing or version != SCHEMA_VERSION):
        prepare_database(path)


class LedgerWriter:
    """Appends call records and commits them in batches; a store subclasses it with its own
    connection and batch write. A batch that fails to commit is kept and retried, never dropped."""

    # What a failed write of the store raises; anything else is a bug and propagates.
    write_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, flush_interval_ms: int) -> None:
        self._interval_s = flush_interval_ms / 1000
        self._pending: list[tuple] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._oldest_pending = 0.0
        self.on_flush: list[Callable[[], Awaitable[None]]] = []
        self._closing = False
        self.rows_written = 0
        self.last_error: str | None = None

    async def open(self) -> None:
        await self._connect()
        self._flusher = asyncio.create_task(self._flush_periodically(), name="ledger-flush")

    def append(self, record: CallRecord) -> None:
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(_as_row(record))

    def write_lag(self) -> float:
        """Seconds the oldest uncommitted row has waited."""
        return time.monotonic() - self._oldest_pending if self._pending else 0.0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def writable(self) -> bool:
        return self._connected and self.last_error is None

    async def flush(self) -> None:
        """Commit every row appended so far (waits for a flush already under way)."""
        async with self._flush_lock:
            if not self._pending or not self._connected:
                return
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except self.write_errors as exc:
                # Keep the rows: they are retried on the next flush, never dropped.
                self._pending = batch + self._pending
                self.last_error = str(exc)
                log.error("ledger write failed, %d rows kept for retry: %s", len(batch), exc)
                raise
            self.last_error = None
            self.rows_written += len(batch)

    async def _flush_periodically(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            try:
                for hook in self.on_flush:
                    await hook()
                await self.flush()
            except self.write_errors:
                await asyncio.sleep(min(1.0, self._interval_s * 10))

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        await self._disconnect()

    # ------------------------------------------------------------ what a store provides

    @property
    def _connected(self) -> bool:
        raise NotImplementedError

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _write(self, batch: list[tuple]) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError


class Ledger(LedgerWriter):
    """The SQLite ledger (WAL), written through aiosqlite's own thread."""

    write_errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path, flush_interval_ms: int) -> None:
        super().__init__(flush_interval_ms)
        self.path = path
        self.reader = SqliteReader(path)
        self._db: aiosqlite.Connection | None = None

    @property
    def _connected(self) -> bool:
        return self._db is not None

    async def _connect(self) -> None:
        prepare_database(self.path)
        self._db = await aiosqlite.connect(self.path)
        for statement in _PRAGMAS:
            await self._db.execute(statement)

    async def _write(self, batch: list[tuple]) -> None:
        assert self._db is not None
        await self._db.execute(TICK)  # first: the write lock, held to the commit
        await self._db.executemany(_INSERT, batch)
        # A row for an hour already summed into the rollups unseals it, in this transaction.
        first = first_started(batch)
        unsealed = await self._db.execute(UNSEAL, (hour_of(first), first))
        if unsealed.rowcount:
            for statement, params in unseal(first):
                await self._db.execute(statement, params)
        await self._db.commit()

    async def _disconnect(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

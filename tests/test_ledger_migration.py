"""Ledger schema versions: a ledger written by an older release (version 1, no version
recorded) is upgraded in place at start with every row and value kept; a newer one is refused
with a message; rows written after the upgrade carry the new columns. SQLite (the fixture
ledger of commit 0c35914) and a real PostgreSQL (the DDL of that commit)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from gateway.config.loader import StorageConfig
from gateway.ledger.postgres import PostgresLedger, safe_dsn
from gateway.ledger.storage import LedgerTooNew, StorageError, open_reader
from gateway.ledger.writer import (
    COLUMNS,
    SCHEMA_VERSION,
    STORED_COLUMNS,
    CallRecord,
    Ledger,
    prepare_database,
)
from tests.processes import TEAMS, Stack, free_port
from tests.services import PostgresServer

FIXTURE_LEDGER = Path("/work/shared/fixtures/ledger-0c35914.sqlite3")
DSN_ENV = "TEST_MIGRATION_PG_DSN"
NEW_COLUMNS = (
    "cache_write_tokens", "audio_input_tokens", "audio_output_tokens", "image_input_tokens",
    "image_output_tokens", "rejected_prediction_tokens", "web_search_calls", "file_search_calls",
    "service_tier", "batch", "audio_seconds", "input_characters",
    "upstream_ms",  # version 3
    "ws_session_id", "rejected_by",  # version 5
)  # fmt: skip
OLD_COLUMNS = COLUMNS[: -len(NEW_COLUMNS)]
NEW_DEFAULTS = (0, 0, 0, 0, 0, 0, 0, 0, None, 0, 0.0, 0, None, None, None)
# A call written after the upgrade, every new field a value of its own.
AFTER_UPGRADE = CallRecord(
    request_id="req_after_upgrade",
    started_at=1_796_200_000.25,
    finished_at=1_796_200_001.5,
    team="legacy",
    key_id="legacy-key",
    method="POST",
    path="/v1/responses",
    model="gpt-4o-mini",
    status=200,
    input_tokens=1000,
    cached_input_tokens=100,
    output_tokens=500,
    reasoning_tokens=50,
    cost_nanousd=123_456,
    latency_ms=12.5,
    ttfb_ms=3.25,
    cache_write_tokens=11,
    audio_input_tokens=13,
    audio_output_tokens=17,
    image_input_tokens=19,
    image_output_tokens=23,
    rejected_prediction_tokens=29,
    web_search_calls=3,
    file_search_calls=5,
    service_tier="flex",
    batch=1,
    audio_seconds=42.75,
    input_characters=4321,
    upstream_ms=7.5,
    ws_session_id="sess_after_upgrade",
    rejected_by="requests_per_day",
)
# `requests` as commit 0c35914 created it on PostgreSQL (`gateway.ledger.postgres.SCHEMA_SQL`).
POSTGRES_V1_DDL = [
    """CREATE TABLE requests (
  request_id TEXT COLLATE "C" PRIMARY KEY,
  started_at DOUBLE PRECISION NOT NULL,
  finished_at DOUBLE PRECISION,
  team TEXT COLLATE "C",
  key_id TEXT COLLATE "C",
  method TEXT COLLATE "C",
  path TEXT COLLATE "C",
  model TEXT COLLATE "C",
  stream BIGINT,
  status BIGINT,
  outcome TEXT COLLATE "C",
  request_bytes BIGINT,
  response_bytes BIGINT,
  input_tokens BIGINT,
  cached_input_tokens BIGINT,
  output_tokens BIGINT,
  reasoning_tokens BIGINT,
  tokens_estimated BIGINT,
  cost_nanousd BIGINT,
  latency_ms DOUBLE PRECISION,
  ttfb_ms DOUBLE PRECISION,
  queued_ms DOUBLE PRECISION,
  error_code TEXT COLLATE "C",
  upstream_request_id TEXT COLLATE "C",
  shadow_rejected_by TEXT COLLATE "C",
  pricing_hash TEXT COLLATE "C",
  price_unknown BIGINT
)""",
    "CREATE INDEX requests_started_at ON requests (started_at)",
    "CREATE INDEX requests_team_started_at ON requests (team, started_at)",
    "CREATE INDEX requests_key_started_at ON requests (key_id, started_at)",
]


def old_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    shutil.copy(FIXTURE_LEDGER, path)
    path.chmod(0o644)
    return path


def fixture_rows() -> list[tuple]:
    return sqlite_old_rows(FIXTURE_LEDGER)


def _old_part(record: CallRecord) -> tuple:
    return dataclasses.astuple(record)[: len(OLD_COLUMNS)]


def checksums(rows: list[tuple]) -> dict[str, str]:
    """Per column, a SHA-256 of every row's value (its repr: 1 and 1.0 differ)."""
    return {
        name: hashlib.sha256(repr([row[i] for row in rows]).encode()).hexdigest()
        for i, name in enumerate(OLD_COLUMNS)
    }


def sqlite_read(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute(sql, params).fetchall()


def sqlite_old_rows(path: Path) -> list[tuple]:
    return sqlite_read(path, f"SELECT {', '.join(OLD_COLUMNS)} FROM requests ORDER BY request_id")


def sqlite_columns(path: Path) -> list[tuple[str, str, str | None]]:
    return [(row[1], row[2], row[4]) for row in sqlite_read(path, "PRAGMA table_info(requests)")]


def set_sqlite_version(path: Path, version: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version INTEGER NOT NULL)")
        db.execute("DELETE FROM gateway_schema")
        db.execute("INSERT INTO gateway_schema (version) VALUES (?)", (version,))


def write_config(folder: Path, ledger: Path, backend: str = "sqlite") -> Path:
    path = folder / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            listen: {{host: 127.0.0.1, port: {free_port()}}}
            upstream: {{base_url: "http://127.0.0.1:9/v1", api_key_env: TEST_UPSTREAM_KEY}}
            storage: {{backend: {backend}, dsn_env: {DSN_ENV}, sqlite_path: {ledger},
                       flush_interval_ms: 20}}
            pricing: {{models: {{gpt-4o-mini: {{input: 0.15, output: 0.60}}}}}}
            """
        )
        + TEAMS
    )
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def too_new_message(where: str) -> str:
    return (
        f"the ledger at {where} has schema version {SCHEMA_VERSION + 1}; this metering-gateway"
        f" knows up to {SCHEMA_VERSION}:"
        " upgrade metering-gateway"
    )


# ---------------------------------------------------------------- SQLite


def test_the_schema_version_this_code_writes_is_6():
    assert SCHEMA_VERSION == 6
    assert COLUMNS[-len(NEW_COLUMNS) :] == NEW_COLUMNS
    assert dataclasses.astuple(CallRecord("r", 0.0))[-len(NEW_COLUMNS) :] == NEW_DEFAULTS


def test_a_new_sqlite_ledger_is_created_at_the_current_version_with_every_column(tmp_path: Path):
    path = tmp_path / "data" / "ledger.sqlite3"

    prepare_database(path)

    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    assert sqlite_read(path, "SELECT COUNT(*) FROM requests") == [(0,)]


async def test_the_0c35914_ledger_is_upgraded_in_place_with_every_value_kept(tmp_path: Path):
    path = old_ledger(tmp_path)
    before = sqlite_old_rows(path)
    assert len(before) == 10
    assert sqlite_read(path, "SELECT name FROM sqlite_master WHERE name = 'gateway_schema'") == []

    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()

    after = sqlite_old_rows(path)
    assert len(after) == 10
    assert after == before
    assert checksums(after) == checksums(fixture_rows())
    new_values = sqlite_read(
        path, f"SELECT {', '.join(NEW_COLUMNS)} FROM requests ORDER BY request_id"
    )
    assert new_values == [NEW_DEFAULTS] * 10
    assert sqlite_read(path, "SELECT typeof(audio_seconds), typeof(service_tier) FROM requests")[
        0
    ] == ("real", "null")
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    assert sqlite_columns(path)[-len(NEW_COLUMNS) - 1 :] == [
        ("cache_write_tokens", "INTEGER", "0"),
        ("audio_input_tokens", "INTEGER", "0"),
        ("audio_output_tokens", "INTEGER", "0"),
        ("image_input_tokens", "INTEGER", "0"),
        ("image_output_tokens", "INTEGER", "0"),
        ("rejected_prediction_tokens", "INTEGER", "0"),
        ("web_search_calls", "INTEGER", "0"),
        ("file_search_calls", "INTEGER", "0"),
        ("service_tier", "TEXT", None),
        ("batch", "INTEGER", "0"),
        ("audio_seconds", "REAL", "0.0"),
        ("input_characters", "INTEGER", "0"),
        ("upstream_ms", "REAL", None),
        ("ws_session_id", "TEXT", None),
        ("rejected_by", "TEXT", None),
        ("change_seq", "INTEGER", "0"),  # version 6: old rows were never sequenced
    ]
    tables = {name for (name,) in sqlite_read(path, "SELECT name FROM sqlite_master")}
    assert {"requests", "objects", "api_keys", "batches", "gateway_schema"} <= tables
    assert sqlite_read(path, "SELECT COUNT(*) FROM api_keys") == [(0,)]


async def test_a_second_open_of_an_upgraded_ledger_changes_nothing(tmp_path: Path):
    path = old_ledger(tmp_path)
    prepare_database(path)
    # SQLite's own schema cookie moves with every schema change.
    cookie = sqlite_read(path, "PRAGMA schema_version")
    version_row = sqlite_read(path, "SELECT rowid, version FROM gateway_schema")
    rows = sqlite_read(path, "SELECT * FROM requests ORDER BY request_id")

    prepare_database(path)
    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()

    assert sqlite_read(path, "PRAGMA schema_version") == cookie
    assert sqlite_read(path, "SELECT rowid, version FROM gateway_schema") == version_row
    assert version_row == [(1, SCHEMA_VERSION)]
    assert sqlite_read(path, "SELECT * FROM requests ORDER BY request_id") == rows


async def test_rows_written_after_the_sqlite_upgrade_carry_every_new_field(tmp_path: Path):
    path = old_ledger(tmp_path)
    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    ledger.append(AFTER_UPGRADE)
    await ledger.close()

    reader = ledger.reader
    (row,) = await reader.rows(
        "SELECT * FROM requests WHERE request_id = ?", [AFTER_UPGRADE.request_id]
    )
    assert row == {**dataclasses.asdict(AFTER_UPGRADE), "change_seq": 1}
    assert {name: row[name] for name in NEW_COLUMNS} == {
        "cache_write_tokens": 11,
        "audio_input_tokens": 13,
        "audio_output_tokens": 17,
        "image_input_tokens": 19,
        "image_output_tokens": 23,
        "rejected_prediction_tokens": 29,
        "web_search_calls": 3,
        "file_search_calls": 5,
        "service_tier": "flex",
        "batch": 1,
        "audio_seconds": 42.75,
        "input_characters": 4321,
        "upstream_ms": 7.5,
        "ws_session_id": "sess_after_upgrade",
        "rejected_by": "requests_per_day",
    }
    assert sqlite_old_rows(path) == sorted([*fixture_rows(), _old_part(AFTER_UPGRADE)])


def test_a_ledger_claiming_version_2_without_the_new_columns_is_repaired(tmp_path: Path):
    path = old_ledger(tmp_path)
    set_sqlite_version(path, 2)

    prepare_database(path)

    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    assert sqlite_old_rows(path) == fixture_rows()
    assert sqlite_read(path, f"SELECT DISTINCT {', '.join(NEW_COLUMNS)} FROM requests") == [
        NEW_DEFAULTS
    ]
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]


async def test_a_version_2_ledger_gains_upstream_ms_with_every_row_kept(tmp_path: Path):
    # A ledger as version 2 wrote it: every column but upstream_ms, version 2 recorded.
    path = old_ledger(tmp_path)
    prepare_database(path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("ALTER TABLE requests DROP COLUMN upstream_ms")
    set_sqlite_version(path, 2)
    rows = sqlite_read(path, "SELECT * FROM requests ORDER BY request_id")
    assert len(rows) == 10

    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    ledger.append(AFTER_UPGRADE)
    await ledger.close()

    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert sqlite_columns(path)[-1] == ("upstream_ms", "REAL", None)
    after = sqlite_read(path, "SELECT * FROM requests ORDER BY request_id")
    assert [row[:-1] for row in after if row[0] != AFTER_UPGRADE.request_id] == rows
    assert sqlite_read(path, "SELECT COUNT(*) FROM requests WHERE upstream_ms IS NULL") == [(10,)]
    assert sqlite_read(
        path, "SELECT upstream_ms FROM requests WHERE request_id = ?", (AFTER_UPGRADE.request_id,)
    ) == [(7.5,)]


def test_a_newer_sqlite_ledger_is_refused_and_left_untouched(tmp_path: Path):
    path = old_ledger(tmp_path)
    set_sqlite_version(path, SCHEMA_VERSION + 1)
    schema = sqlite_read(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    with pytest.raises(LedgerTooNew) as refused:
        prepare_database(path)

    assert isinstance(refused.value, StorageError)
    assert str(refused.value) == too_new_message(str(path))
    assert sqlite_read(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema
    assert sqlite_old_rows(path) == fixture_rows()
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION + 1,)]


def test_serve_and_report_on_a_newer_sqlite_ledger_exit_1_with_the_message(tmp_path: Path):
    path = old_ledger(tmp_path)
    set_sqlite_version(path, SCHEMA_VERSION + 1)
    config = str(write_config(tmp_path, path))

    serve = run_cli("serve", "--config", config)
    report = run_cli("report", "--config", config, "--format", "json")

    assert serve.returncode == 1
    assert serve.stderr.splitlines()[-1] == "serve: " + too_new_message(str(path))
    assert report.returncode == 1
    assert report.stderr.splitlines() == ["report: " + too_new_message(str(path))]
    assert report.stdout == ""
    assert "Traceback" not in serve.stderr + report.stderr


def test_report_on_an_old_ledger_upgrades_it_first_and_counts_every_row(tmp_path: Path):
    path = old_ledger(tmp_path)
    config = str(write_config(tmp_path, path))

    report = run_cli("report", "--config", config, "--format", "json", "--by", "team")

    assert report.returncode == 0, report.stderr
    legacy = [row for row in json.loads(report.stdout) if row["team"] == "legacy"]
    assert [(row["calls"], row["cost_nanousd"]) for row in legacy] == [
        (9, 6 * 8100 + 132_500 + 40 + 7500)
    ]
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    assert sqlite_old_rows(path) == fixture_rows()


def test_an_absent_ledger_is_not_created_by_a_read(tmp_path: Path):
    path = tmp_path / "nothing-yet.sqlite3"
    config = str(write_config(tmp_path, path))

    report = run_cli("report", "--config", config, "--format", "json")

    assert (report.returncode, report.stdout.strip()) == (0, "[]")
    assert not path.exists()


def test_several_processes_opening_one_old_ledger_at_once_upgrade_it_once(tmp_path: Path):
    path = old_ledger(tmp_path)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            prepare_database(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert sqlite_old_rows(path) == fixture_rows()


def test_a_failed_upgrade_changes_nothing_and_says_why(tmp_path: Path):
    # A version-1 `requests` without its primary key: SQLite cannot add that column, so the
    # upgrade stops there, and the tables it had created before are rolled back with it.
    path = tmp_path / "ledger.sqlite3"
    kept = ", ".join(f"{name} TEXT" for name in OLD_COLUMNS[1:])
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(f"CREATE TABLE requests ({kept})")
        db.execute("INSERT INTO requests (started_at, team) VALUES (1, 'legacy')")
    schema = sqlite_read(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    with pytest.raises(StorageError) as failed:
        prepare_database(path)

    assert str(failed.value) == (
        f"the ledger at {path} (schema version 1) could not be brought to version {SCHEMA_VERSION}:"
        " Cannot add a PRIMARY KEY column"
    )
    assert sqlite_read(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema
    assert sqlite_read(path, "SELECT started_at, team FROM requests") == [("1", "legacy")]


def test_a_serve_process_upgrades_the_old_ledger_and_appends_after_it(tmp_path: Path):
    path = old_ledger(tmp_path)
    stack = Stack(tmp_path)  # serve on tmp_path / "ledger.sqlite3"
    try:
        reply = stack.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    finally:
        stack.stop()

    assert reply.choices
    assert stack.gateway.returncode == 0
    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert [name for name, _, _ in sqlite_columns(path)] == list(STORED_COLUMNS)
    rows = sqlite_old_rows(path)
    assert len(rows) == 11
    assert [row for row in rows if row[0].startswith("req_c863702a832d1936")] == fixture_rows()
    (new,) = [row for row in rows if not row[0].startswith("req_c863702a832d1936")]
    assert (new[3], new[9]) == ("research", 200)  # team, status
    assert f"schema version 1 upgraded to {SCHEMA_VERSION}" in stack.log_text()


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with postgres_server.new_database() as dsn:
        monkeypatch.setenv(DSN_ENV, dsn)
        yield dsn


async def make_postgres_v1(dsn: str, version: int | None = None) -> None:
    """The version-1 ledger of commit 0c35914 holding the fixture's rows; `version`: a
    `gateway_schema` row as well."""
    connection = await asyncpg.connect(dsn)
    try:
        for statement in POSTGRES_V1_DDL:
            await connection.execute(statement)
        marks = ", ".join(f"${n}" for n in range(1, len(OLD_COLUMNS) + 1))
        await connection.executemany(
            f"INSERT INTO requests ({', '.join(OLD_COLUMNS)}) VALUES ({marks})", fixture_rows()
        )
        if version is not None:
            await connection.execute("CREATE TABLE gateway_schema (version INTEGER NOT NULL)")
            await connection.execute("INSERT INTO gateway_schema VALUES ($1)", version)
    finally:
        await connection.close()


async def pg_fetch(dsn: str, sql: str, *params: object) -> list[tuple]:
    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(record) for record in await connection.fetch(sql, *params)]
    finally:
        await connection.close()


async def pg_old_rows(dsn: str) -> list[tuple]:
    return await pg_fetch(dsn, f"SELECT {', '.join(OLD_COLUMNS)} FROM requests ORDER BY request_id")


_PG_COLUMNS = (
    "SELECT column_name, data_type, column_default FROM information_schema.columns"
    " WHERE table_name = 'requests' ORDER BY ordinal_position"
)


async def test_a_new_postgres_ledger_is_created_at_version_2_with_every_column(pg_dsn: str):
    ledger = PostgresLedger(pg_dsn, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()

    assert await pg_fetch(pg_dsn, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert [row[0] for row in await pg_fetch(pg_dsn, _PG_COLUMNS)] == list(STORED_COLUMNS)
    assert await pg_fetch(pg_dsn, "SELECT COUNT(*) FROM requests") == [(0,)]


async def test_a_version_1_postgres_ledger_is_upgraded_in_place_with_every_value_kept(
    pg_dsn: str,
):
    await make_postgres_v1(pg_dsn)
    before = await pg_old_rows(pg_dsn)
    assert before == fixture_rows()

    ledger = PostgresLedger(pg_dsn, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()

    after = await pg_old_rows(pg_dsn)
    assert after == before
    assert checksums(after) == checksums(fixture_rows())
    new_values = await pg_fetch(
        pg_dsn, f"SELECT {', '.join(NEW_COLUMNS)} FROM requests ORDER BY request_id"
    )
    assert new_values == [NEW_DEFAULTS] * 10
    assert await pg_fetch(pg_dsn, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    columns = await pg_fetch(pg_dsn, _PG_COLUMNS)
    assert [name for name, _, _ in columns] == list(STORED_COLUMNS)
    assert columns[-len(NEW_COLUMNS) - 1 :] == [
        ("cache_write_tokens", "bigint", "0"),
        ("audio_input_tokens", "bigint", "0"),
        ("audio_output_tokens", "bigint", "0"),
        ("image_input_tokens", "bigint", "0"),
        ("image_output_tokens", "bigint", "0"),
        ("rejected_prediction_tokens", "bigint", "0"),
        ("web_search_calls", "bigint", "0"),
        ("file_search_calls", "bigint", "0"),
        ("service_tier", "text", None),
        ("batch", "bigint", "0"),
        ("audio_seconds", "double precision", "0.0"),
        ("input_characters", "bigint", "0"),
        ("upstream_ms", "double precision", None),
        ("ws_session_id", "text", None),
        ("rejected_by", "text", None),
        ("change_seq", "bigint", "0"),
    ]

    # A second open: nothing to do; the version row is the one the upgrade wrote.
    version_row = await pg_fetch(pg_dsn, "SELECT xmin::text, version FROM gateway_schema")
    again = PostgresLedger(pg_dsn, flush_interval_ms=20)
    await again.open()
    await again.close()
    assert await pg_fetch(pg_dsn, "SELECT xmin::text, version FROM gateway_schema") == version_row
    assert await pg_fetch(pg_dsn, _PG_COLUMNS) == columns


async def test_rows_written_after_the_postgres_upgrade_carry_every_new_field(pg_dsn: str):
    await make_postgres_v1(pg_dsn)
    ledger = PostgresLedger(pg_dsn, flush_interval_ms=20)
    await ledger.open()
    ledger.append(AFTER_UPGRADE)
    await ledger.flush()
    (row,) = await ledger.reader.rows(
        "SELECT * FROM requests WHERE request_id = ?", [AFTER_UPGRADE.request_id]
    )
    await ledger.close()

    assert row == {**dataclasses.asdict(AFTER_UPGRADE), "change_seq": 1}
    assert (row["service_tier"], row["batch"], row["audio_seconds"]) == ("flex", 1, 42.75)
    assert (row["cache_write_tokens"], row["input_characters"]) == (11, 4321)
    assert await pg_old_rows(pg_dsn) == sorted([*fixture_rows(), _old_part(AFTER_UPGRADE)])


async def test_a_postgres_ledger_claiming_version_2_without_the_new_columns_is_repaired(
    pg_dsn: str,
):
    await make_postgres_v1(pg_dsn, version=2)

    ledger = PostgresLedger(pg_dsn, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()

    assert [row[0] for row in await pg_fetch(pg_dsn, _PG_COLUMNS)] == list(STORED_COLUMNS)
    assert await pg_fetch(pg_dsn, f"SELECT DISTINCT {', '.join(NEW_COLUMNS)} FROM requests") == [
        NEW_DEFAULTS
    ]
    assert await pg_fetch(pg_dsn, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]


async def test_a_newer_postgres_ledger_is_refused_and_left_untouched(pg_dsn: str):
    await make_postgres_v1(pg_dsn, version=SCHEMA_VERSION + 1)
    columns = await pg_fetch(pg_dsn, _PG_COLUMNS)

    ledger = PostgresLedger(pg_dsn, flush_interval_ms=20)
    with pytest.raises(LedgerTooNew) as refused:
        await ledger.open()

    assert str(refused.value) == too_new_message(safe_dsn(pg_dsn))
    assert await pg_fetch(pg_dsn, _PG_COLUMNS) == columns
    assert await pg_fetch(pg_dsn, "SELECT to_regclass('objects')::text") == [(None,)]
    assert await pg_old_rows(pg_dsn) == fixture_rows()
    assert await pg_fetch(pg_dsn, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION + 1,)]


async def test_serve_and_report_on_a_newer_postgres_ledger_exit_1_with_the_message(
    pg_dsn: str, tmp_path: Path
):
    await make_postgres_v1(pg_dsn, version=SCHEMA_VERSION + 1)
    config = str(write_config(tmp_path, tmp_path / "unused.sqlite3", backend="postgres"))

    # $TEST_MIGRATION_PG_DSN is set (the pg_dsn fixture): the processes inherit it.
    serve = await asyncio.to_thread(run_cli, "serve", "--config", config)
    report = await asyncio.to_thread(run_cli, "report", "--config", config)

    assert serve.returncode == 1
    assert serve.stderr.splitlines()[-1] == "serve: " + too_new_message(safe_dsn(pg_dsn))
    assert report.returncode == 1
    assert report.stderr.splitlines() == ["report: " + too_new_message(safe_dsn(pg_dsn))]
    assert "Traceback" not in serve.stderr + report.stderr


async def test_a_postgres_read_command_upgrades_an_old_ledger_first(pg_dsn: str):
    await make_postgres_v1(pg_dsn)
    storage = StorageConfig(backend="postgres", dsn_env=DSN_ENV)

    async with open_reader(storage) as reader:
        rows = await reader.tuples(
            "SELECT COUNT(*), SUM(cost_nanousd), SUM(cache_write_tokens),"
            " COUNT(service_tier) FROM requests"
        )

    assert rows == [(10, 6 * 8100 + 132_500 + 40 + 7500, 0, 0)]
    assert await pg_fetch(pg_dsn, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert await pg_old_rows(pg_dsn) == fixture_rows()


async def test_a_postgres_read_of_an_empty_database_creates_nothing(pg_dsn: str):
    storage = StorageConfig(backend="postgres", dsn_env=DSN_ENV)

    async with open_reader(storage) as reader:
        rows = await reader.rows("SELECT COUNT(*) AS n FROM requests")

    assert rows == []  # no such table: no rows, as before
    assert await pg_fetch(pg_dsn, "SELECT to_regclass('gateway_schema')::text") == [(None,)]


async def test_a_version_4_ledger_gains_the_version_5_columns_and_the_batches_table(
    tmp_path: Path,
):
    # A ledger as version 4 wrote it: no ws_session_id or rejected_by, no batches table.
    path = old_ledger(tmp_path)
    prepare_database(path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP INDEX requests_refused")
        db.execute("ALTER TABLE requests DROP COLUMN ws_session_id")
        db.execute("ALTER TABLE requests DROP COLUMN rejected_by")
        db.execute("DROP TABLE batches")
    set_sqlite_version(path, 4)
    rows = sqlite_read(path, "SELECT * FROM requests ORDER BY request_id")

    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    ledger.append(AFTER_UPGRADE)
    await ledger.close()

    assert sqlite_read(path, "SELECT version FROM gateway_schema") == [(SCHEMA_VERSION,)]
    assert sqlite_columns(path)[-2:] == [("ws_session_id", "TEXT", None),
                                         ("rejected_by", "TEXT", None)]  # fmt: skip
    after = sqlite_read(path, "SELECT * FROM requests ORDER BY request_id")
    assert [row[:-2] for row in after if row[0] != AFTER_UPGRADE.request_id] == rows
    assert sqlite_read(path, "SELECT COUNT(*) FROM requests WHERE ws_session_id IS NULL") == [(10,)]
    assert sqlite_read(path, "SELECT COUNT(*) FROM batches") == [(0,)]

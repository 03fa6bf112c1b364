"""`storage.backend: postgres`: the same rows, reports, invoices and usage APIs as SQLite, on a
real PostgreSQL (Debian's package, started once for the session; missing, the tests fail)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import HANDLER, LEDGER, build_app
from gateway.billing.queries import UsageQuery, bucket_page, spend_since
from gateway.billing.reconcile import gateway_figures
from gateway.billing.reports import ReportQuery, build_invoice, usage_rows
from gateway.config.loader import load_config
from gateway.ledger.postgres import PostgresLedger, numbered, safe_dsn
from gateway.ledger.readers import LedgerReader
from gateway.ledger.writer import STORED_COLUMNS, CallRecord, Ledger
from tests.conftest import PRICING, PRODUCT_KEY, RESEARCH_KEY, Fake, Gateway, sha
from tests.processes import free_port, wait_for_port
from tests.services import PostgresServer

DSN_ENV = "TEST_GATEWAY_PG_DSN"
ADMIN_KEY = "mgw-admin-test-secret"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
CHAT_COST = 7 * 150 + 12 * 600  # 7 input, 12 output tokens at 0.15 / 0.60 per 1M
CACHED_CHAT_COST = 5 * 150 + 2 * 75 + 12 * 600
EMBEDDING_COST = 3 * 20
TEAMS = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
  product:
    models: [gpt-4o-mini, text-embedding-3-small]
    billing: {{plan: per_request, rate_usd: 0.01}}
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""
# What differs between two runs of the same calls: ids, clocks, the upstream's own id.
RUN_SPECIFIC = {
    "request_id", "started_at", "finished_at", "latency_ms", "ttfb_ms", "queued_ms",
    "upstream_request_id", "upstream_ms",
    "change_seq",  # the commit a row came in: how the calls fell into the writer's batches
}  # fmt: skip


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database for one test, its DSN in $TEST_GATEWAY_PG_DSN."""
    with postgres_server.new_database() as dsn:
        monkeypatch.setenv(DSN_ENV, dsn)
        monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
        yield dsn


def write_config(folder: Path, backend: str, upstream_url: str, port: int = 8787) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gateway-{backend}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            listen: {{host: 127.0.0.1, port: {port}}}
            upstream:
              base_url: {upstream_url}
              api_key_env: TEST_UPSTREAM_KEY
              forward_headers: ["x-fake-*"]
              connect_timeout_s: 2
              timeout_s: 5
            storage:
              backend: {backend}
              dsn_env: {DSN_ENV}
              sqlite_path: {folder / f"ledger-{backend}.sqlite3"}
              flush_interval_ms: 20
            """
        )
        + "pricing:"
        + PRICING
        + "teams:"
        + TEAMS
    )
    return path


StartGateway = Callable[[str], Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path, fake: Fake, pg_dsn: str) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(backend: str) -> Gateway:
        config = load_config(write_config(tmp_path / str(len(started)), backend, fake.base_url))
        app = build_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        started.append(Gateway(server, app, config, config.storage.sqlite_path))
        return started[-1]

    yield start
    for gateway in started:
        for client in gateway.clients:
            await client.close()
        await gateway.server.close()


async def settled(gateway: Gateway) -> None:
    """Every call finished and its row committed."""
    for _ in range(500):
        if gateway.app[HANDLER].in_flight == 0:
            break
        await asyncio.sleep(0.01)
    await gateway.app[LEDGER].flush()


async def stored_rows(gateway: Gateway) -> list[dict[str, Any]]:
    """The ledger's rows, read straight from the store (not through the gateway's reader)."""
    await settled(gateway)
    if gateway.config.storage.backend == "postgres":
        connection = await asyncpg.connect(os.environ[DSN_ENV])
        try:
            records = await connection.fetch("SELECT * FROM requests ORDER BY started_at")
        finally:
            await connection.close()
        return [dict(record) for record in records]
    with sqlite3.connect(gateway.ledger_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY started_at")]


def _seen(response: Any) -> dict[str, Any]:
    """What the client saw of one call: the gateway's request id and the body bytes."""
    http = getattr(response, "http_response", response)
    return {
        "request_id": http.headers["x-gateway-request-id"],
        "request_bytes": len(http.request.content),
        "response_bytes": len(http.content),
    }


def _expected(seen: dict, team: str, key: str, model: str, status: int, outcome: str,
              inp: int, cached: int, out: int, cost: int) -> dict[str, Any]:  # fmt: skip
    return {
        **seen, "team": team, "key_id": key, "model": model, "status": status,
        "outcome": outcome, "input_tokens": inp, "cached_input_tokens": cached,
        "output_tokens": out, "cost_nanousd": cost,
    }  # fmt: skip


async def traffic(gateway: Gateway) -> list[dict[str, Any]]:
    """The same calls on any gateway; returns each call's expected ledger row."""
    research, product = gateway.client(RESEARCH_KEY), gateway.client(PRODUCT_KEY)
    expected = []
    for _ in range(3):
        raw = await research.chat.completions.with_raw_response.create(**CHAT)
        expected.append(_expected(_seen(raw), "research", "research-dev", "gpt-4o-mini",
                                  200, "ok", 7, 0, 12, CHAT_COST))  # fmt: skip
    raw = await research.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="a b c"
    )
    expected.append(_expected(_seen(raw), "research", "research-dev", "text-embedding-3-small",
                              200, "ok", 3, 0, 0, EMBEDDING_COST))  # fmt: skip
    for _ in range(2):
        raw = await product.chat.completions.with_raw_response.create(
            **CHAT, extra_headers={"x-fake-cached-tokens": "2"}
        )
        expected.append(_expected(_seen(raw), "product", "product-web", "gpt-4o-mini",
                                  200, "ok", 7, 2, 12, CACHED_CHAT_COST))  # fmt: skip
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await product.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    # The gateway's own refusals count no response bytes: nothing came from the upstream.
    seen = {**_seen(refused.value.response), "response_bytes": 0}
    expected.append(_expected(seen, "product", "product-web", "gpt-4o", 403, "rejected",
                              0, 0, 0, 0))  # fmt: skip
    return expected


def _checked_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in _expected({}, "", "", "", 0, "", 0, 0, 0, 0)} | {
        "request_id": row["request_id"],
        "request_bytes": row["request_bytes"],
        "response_bytes": row["response_bytes"],
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_each_call_is_one_exact_row_on_either_store(start_gateway: StartGateway, backend):
    gateway = await start_gateway(backend)
    expected = await traffic(gateway)
    rows = await stored_rows(gateway)
    assert [_checked_columns(row) for row in rows] == expected
    assert sum(row["cost_nanousd"] for row in rows) == (
        3 * CHAT_COST + EMBEDDING_COST + 2 * CACHED_CHAT_COST
    )
    assert all(row["response_bytes"] > 0 for row in rows if row["status"] == 200)
    assert gateway.app[LEDGER].rows_written == 7 and gateway.app[LEDGER].pending == 0


async def test_postgres_schema_is_the_sqlite_schema_with_wide_integers(pg_dsn: str):
    ledger = PostgresLedger(pg_dsn, flush_interval_ms=10)
    await ledger.open()
    await ledger.close()
    connection = await asyncpg.connect(pg_dsn)
    try:
        columns = await connection.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'requests' ORDER BY ordinal_position"
        )
        indexes = await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'requests' ORDER BY 1"
        )
    finally:
        await connection.close()
    assert tuple(c["column_name"] for c in columns) == STORED_COLUMNS
    types = dict(tuple(c) for c in columns)
    assert types["cost_nanousd"] == types["request_bytes"] == types["status"] == "bigint"
    assert types["started_at"] == types["latency_ms"] == "double precision"
    assert types["request_id"] == types["team"] == "text"
    assert [i["indexname"] for i in indexes] == [
        "requests_changes", "requests_key_started_at", "requests_pkey", "requests_refused",
        "requests_started_at", "requests_team_started_at",
    ]  # fmt: skip


async def test_values_beyond_32_bits_and_a_rewritten_row_are_stored_exactly(pg_dsn: str):
    ledger = PostgresLedger(pg_dsn, flush_interval_ms=60_000)
    await ledger.open()
    huge = CallRecord("req_big", started_at=1_790_000_000, team="t", cost_nanousd=5 * 10**12,
                      request_bytes=3 * 2**31, latency_ms=12)  # fmt: skip
    ledger.append(huge)
    await ledger.flush()
    ledger.append(CallRecord("req_big", started_at=1_790_000_000, team="t", cost_nanousd=7))
    await ledger.close()  # a row written again replaces the first, as in SQLite
    connection = await asyncpg.connect(pg_dsn)
    try:
        rows = await connection.fetch("SELECT request_id, cost_nanousd FROM requests")
    finally:
        await connection.close()
    assert [tuple(r) for r in rows] == [("req_big", 7)]
    assert ledger.rows_written == 2


# ---------------------------------------------------------------- the same answers on both


def _without_run_specific(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in RUN_SPECIFIC} for row in rows]


async def api(gateway: Gateway, path: str, key: str, **params: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url(path)), params=params,
                 headers={"Authorization": f"Bearer {key}"}) as response,
    ):  # fmt: skip
        assert response.status == 200, await response.text()
        return await response.json()


async def answers(gateway: Gateway) -> dict[str, Any]:
    """Everything the gateway answers about its ledger, bar latencies."""
    day = int(time.time()) // 86400 * 86400
    today = {"start_time": day, "end_time": day + 86400}  # the same buckets on both runs
    reader = gateway.app[LEDGER].reader
    config = gateway.config
    month = time.strftime("%Y-%m", time.gmtime())
    usage = await api(gateway, "/gateway/usage", ADMIN_KEY, **today, bucket_width="1d",
                      group_by="team,key,model")  # fmt: skip
    for bucket in usage["data"]:
        for result in bucket["results"]:
            result.pop("latency_p50_ms"), result.pop("latency_p95_ms")
    me_usage = await api(gateway, "/gateway/me/usage", RESEARCH_KEY, **today)
    for bucket in me_usage["data"]:  # the run's own timings
        bucket.pop("latency_p50_ms"), bucket.pop("latency_p95_ms")
    return {
        "rows": _without_run_specific(await stored_rows(gateway)),
        "report": await usage_rows(reader, ReportQuery(by=["team", "key", "model", "day"])),
        "report_by_outcome": await usage_rows(reader, ReportQuery(by=["outcome", "status"])),
        "invoices": [await build_invoice(reader, config, team, month) for team in config.teams],
        "completions": await api(gateway, "/v1/organization/usage/completions", ADMIN_KEY,
                                 **today, group_by=["project_id", "model"]),
        "costs": await api(gateway, "/v1/organization/costs", ADMIN_KEY, **today,
                           group_by=["project_id", "line_item"]),
        "me_usage": me_usage,
        "me": (await api(gateway, "/gateway/me", PRODUCT_KEY))["spend_usd"],
        "usage": usage,
    }  # fmt: skip


async def test_reports_invoices_and_usage_apis_answer_the_same_on_both_stores(
    start_gateway: StartGateway,
):
    on = {}
    for backend in ("sqlite", "postgres"):
        gateway = await start_gateway(backend)
        await traffic(gateway)
        on[backend] = await answers(gateway)
    assert on["postgres"] == on["sqlite"]
    # and the numbers themselves
    postgres = on["postgres"]
    research = next(i for i in postgres["invoices"] if i["team"] == "research")
    assert research["total_nanousd"] == 3 * CHAT_COST + EMBEDDING_COST
    product = next(i for i in postgres["invoices"] if i["team"] == "product")
    assert product["lines"][0]["calls"] == 2 and product["total_nanousd"] == 2 * 10_000_000
    results = {r["project_id"]: r for r in postgres["completions"]["data"][0]["results"]}
    assert results["research"]["num_model_requests"] == 3
    assert results["product"]["input_cached_tokens"] == 4
    costs = {(r["project_id"], r["line_item"]): r["amount"]["value"]
             for r in postgres["costs"]["data"][0]["results"]}  # fmt: skip
    assert costs == {
        ("product", "gpt-4o-mini"): 2 * CACHED_CHAT_COST / 1e9,
        ("research", "gpt-4o-mini"): 3 * CHAT_COST / 1e9,
        ("research", "text-embedding-3-small"): EMBEDDING_COST / 1e9,
    }
    assert postgres["me"]["today"] == 2 * CACHED_CHAT_COST / 1e9
    assert [(r["outcome"], r["status"], r["calls"]) for r in postgres["report_by_outcome"]] == [
        ("ok", 200, 6), ("rejected", 403, 1),
    ]  # fmt: skip
    assert postgres["me_usage"]["data"][-1]["requests"] == 4


async def write_both(records: list[CallRecord], sqlite_path: Path, dsn: str) -> list[Any]:
    readers: list[Any] = []
    for ledger in (Ledger(sqlite_path, 60_000), PostgresLedger(dsn, 60_000)):
        await ledger.open()
        for record in records:
            ledger.append(record)
        await ledger.flush()
        readers.append(ledger)
    return readers


async def test_buckets_days_and_nulls_match_sqlite_to_the_edge(tmp_path: Path, pg_dsn: str):
    from zoneinfo import ZoneInfo

    nov_1 = 1_793_491_200  # 2026-11-01T00:00:00Z
    records = [
        # 0.9 of a bucket in: bucket 0 (PostgreSQL's CAST alone would round it up to 1)
        CallRecord("a", started_at=nov_1 + 3240, team="t", key_id="k", model=None, status=200,
                   cost_nanousd=5, latency_ms=10, path="/v1/chat/completions"),
        CallRecord("b", started_at=nov_1 + 23 * 3600, team="t", key_id="k", model="gpt-4o-mini",
                   status=200, cost_nanousd=7, outcome="upstream_error", latency_ms=30,
                   path="/v1/chat/completions", input_tokens=4, output_tokens=2),
        CallRecord("c", started_at=nov_1 + 3 * 86400 + 0.5, team=None, key_id=None, status=401,
                   outcome="rejected"),
        CallRecord("d", started_at=nov_1 + 3601, team="u", key_id="k2", model="gpt-4o-mini",
                   status=200, cost_nanousd=11, shadow_rejected_by="requests_per_day"),
    ]  # fmt: skip
    sqlite_ledger, postgres_ledger = await write_both(records, tmp_path / "l.sqlite3", pg_dsn)
    try:
        results = []
        for reader in (sqlite_ledger.reader, postgres_ledger.reader):
            results.append(await _all_queries(reader, nov_1, ZoneInfo("Asia/Tokyo")))
    finally:
        await sqlite_ledger.close()
        await postgres_ledger.close()
    sqlite_answers, postgres_answers = results
    assert postgres_answers == sqlite_answers
    hourly = postgres_answers["hourly"]
    assert [(b.start_time - nov_1, [g["requests"] for g in b.groups]) for b in hourly][:2] == [
        (0, [1]), (3600, [1]),
    ]  # fmt: skip
    assert [(r["day"], r["calls"]) for r in postgres_answers["by_day"]] == [
        ("2026-11-01", 2), ("2026-11-02", 1), ("2026-11-04", 1),
    ]  # fmt: skip
    assert postgres_answers["by_team"][0]["team"] is None  # NULLs first, as SQLite sorts them
    assert postgres_answers["spend"] == 12


async def _all_queries(reader: LedgerReader, start: int, zone: Any) -> dict[str, Any]:
    end = start + 7 * 86400
    hourly = await bucket_page(reader, UsageQuery(start, start + 86400, "1h", ["team", "model"]),
                               percentiles=True)  # fmt: skip
    figures = await gateway_figures(reader, start, end)
    return {
        "hourly": hourly.buckets,
        "by_day": await usage_rows(reader, ReportQuery(by=["day"], zone=zone)),
        "by_team": await usage_rows(reader, ReportQuery(by=["team", "key", "model", "shadow"])),
        "spend": await spend_since(reader, "key_id", "k", start),
        "figures": sorted((k, vars(v)) for k, v in figures.items()),
    }


def test_sql_is_written_once_with_question_marks():
    assert numbered("SELECT ? , '?' , ?, 'it''s ?' WHERE x IN (?, ?)") == (
        "SELECT $1 , '?' , $2, 'it''s ?' WHERE x IN ($3, $4)"
    )
    assert safe_dsn("postgresql://me:s3cret@db.internal:5433/ledger") == (
        "postgresql://me@db.internal:5433/ledger"
    )


# ---------------------------------------------------------------- outages


async def test_rows_wait_out_a_postgres_outage_and_are_written_when_it_is_back(
    tmp_path: Path, fake: Fake, monkeypatch: pytest.MonkeyPatch
):
    server = PostgresServer.start()  # its own server: this test kills it
    try:
        monkeypatch.setenv(DSN_ENV, server.dsn)
        monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
        config = load_config(write_config(tmp_path, "postgres", fake.base_url))
        app = build_app(config)
        test_server = TestServer(app, host="127.0.0.1")
        await test_server.start_server()
        gateway = Gateway(test_server, app, config, config.storage.sqlite_path)
        client = gateway.client(RESEARCH_KEY)
        await client.chat.completions.create(**CHAT)
        await settled(gateway)
        ledger = app[LEDGER]
        assert ledger.rows_written == 1

        await asyncio.to_thread(server.kill)
        for _ in range(3):  # calls are still answered: appends only enqueue
            await client.chat.completions.create(**CHAT)
        await _until(lambda: ledger.last_error is not None)
        assert ledger.pending == 3 and not ledger.writable
        async with (
            aiohttp.ClientSession() as http,
            http.get(str(test_server.make_url("/readyz"))) as response,
        ):
            assert response.status == 503
            assert (await response.json())["ledger_pending_rows"] == 3

        await asyncio.to_thread(server.restart)
        await _until(lambda: ledger.pending == 0 and ledger.writable, within_s=15)
        assert ledger.rows_written == 4
        count, cost = server.psql("SELECT COUNT(*), SUM(cost_nanousd) FROM requests").split("|")
        assert (int(count), int(cost)) == (4, 4 * CHAT_COST)
        me = await api(gateway, "/gateway/me", RESEARCH_KEY)  # reads reconnect too
        assert me["spend_usd"]["today"] == 4 * CHAT_COST / 1e9
        await client.close()
        await test_server.close()
    finally:
        server.stop()


async def _until(condition: Callable[[], bool], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- the commands


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


async def test_report_invoice_and_reprice_commands_work_on_postgres(
    start_gateway: StartGateway, pg_dsn: str, tmp_path: Path
):
    gateway = await start_gateway("postgres")
    await traffic(gateway)
    await settled(gateway)
    config = str(gateway.config.path)
    month = time.strftime("%Y-%m", time.gmtime())
    report = run_cli("report", "--config", config, "--format", "json", "--by", "team")
    assert report.returncode == 0, report.stderr
    assert [(r["team"], r["calls"], r["cost_nanousd"]) for r in json.loads(report.stdout)] == [
        ("product", 3, 2 * CACHED_CHAT_COST),
        ("research", 4, 3 * CHAT_COST + EMBEDDING_COST),
    ]
    invoice = run_cli("invoice", "--config", config, "--team", "research", "--month", month,
                      "--format", "json")  # fmt: skip
    assert invoice.returncode == 0, invoice.stderr
    assert json.loads(invoice.stdout)["total_nanousd"] == 3 * CHAT_COST + EMBEDDING_COST

    prices = tmp_path / "doubled.yaml"
    prices.write_text("models:\n  gpt-4o-mini: {input: 0.30, cached_input: 0.15, output: 1.20}\n")
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    dry = run_cli("reprice", "--config", config, "--since", since, "--pricing", str(prices),
                  "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (
        "7 rows examined, 6 with a new cost (dry run: nothing written)"
    )
    applied = run_cli("reprice", "--config", config, "--since", since, "--pricing", str(prices))
    assert applied.returncode == 0, applied.stderr
    rows = await stored_rows(gateway)
    costs = sorted((row["model"], row["status"], row["cost_nanousd"]) for row in rows)
    assert costs == sorted(
        [("gpt-4o-mini", 200, 2 * CHAT_COST)] * 3
        + [("gpt-4o-mini", 200, 2 * CACHED_CHAT_COST)] * 2
        + [("text-embedding-3-small", 200, 0)]  # not in the new table: unpriced
        + [("gpt-4o", 403, 0)]
    )


def test_serve_without_the_dsn_says_which_variable_to_set(tmp_path: Path):
    config = write_config(tmp_path, "postgres", "http://127.0.0.1:9/v1")
    env = {k: v for k, v in os.environ.items() if k != DSN_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"serve: storage.backend is postgres, but ${DSN_ENV} (storage.dsn_env) is not set: set"
        " it to the PostgreSQL DSN, postgresql://user:password@host:5432/database"
    )
    report = subprocess.run(
        [sys.executable, "-m", "gateway", "report", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert report.returncode == 2 and DSN_ENV in report.stderr


def test_a_serve_process_writes_postgres_and_never_logs_the_password(
    tmp_path: Path, postgres_server: PostgresServer, pg_dsn: str
):
    password_dsn = pg_dsn.replace(f"{postgres_server.user}@", f"{postgres_server.user}:s3cret@")
    fake_port, port = free_port(), free_port()
    config = write_config(tmp_path, "postgres", f"http://127.0.0.1:{fake_port}/v1", port)
    env = {**os.environ, DSN_ENV: password_dsn, "TEST_UPSTREAM_KEY": "sk-x",
           "FAKE_UPSTREAM_KEY": "sk-x"}  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        fake = subprocess.Popen(
            [sys.executable, "-m", "gateway", "fake-upstream", "--port", str(fake_port)],
            env=env, stdout=output, stderr=output,
        )  # fmt: skip
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            env=env, stdout=output, stderr=output,
        )  # fmt: skip
    try:
        wait_for_port(fake_port, fake, log)
        wait_for_port(port, gateway, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=RESEARCH_KEY,
                               max_retries=0)  # fmt: skip
        for _ in range(2):
            client.chat.completions.create(**CHAT)
        gateway.send_signal(signal.SIGTERM)  # the drain flushes what is pending
        assert gateway.wait(timeout=30) == 0
    finally:
        for process in (gateway, fake):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert _count(postgres_server, pg_dsn) == 2
    text = log.read_text()
    assert "s3cret" not in text
    assert f"ledger: PostgreSQL at {safe_dsn(pg_dsn)}" in text


def _count(server: PostgresServer, dsn: str) -> int:
    database = dsn.rsplit("/", 1)[1]
    return int(
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                server.user,
                "-d",
                database,
                "-At",
                "-c",
                "SELECT COUNT(*) FROM requests",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    )

"""Invoices: the ledger turned into money under each team's plan, exact to the nano-dollar."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

from gateway.billing.reports import build_invoice, render_invoice
from gateway.config.loader import GatewayConfig, load_config
from gateway.ledger.readers import SqliteReader
from gateway.ledger.writer import CallRecord, Ledger
from gateway.pricing.arithmetic import format_usd
from tests.conftest import RESEARCH_KEY, Gateway, sha

NOV_1 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DAY = 86_400


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            storage: {{sqlite_path: {tmp_path / "ledger.sqlite3"}}}
            pricing:
              models:
                gpt-4o-mini: {{input: 0.15, cached_input: 0.075, output: 0.60}}
            teams:
              usage:
                pricing: {{transfer_per_mb: 0.01, per_request: 0.1}}
              flat:
                billing: {{plan: per_request, rate_usd: 0.01}}
              capped:
                billing: {{plan: capped_per_request, rate_usd: 0.01, max_requests_per_day: 200}}
            """
        )
    )
    return path


def rows(team: str, per_day: int, days: int, status: int = 200, **fields) -> list[CallRecord]:
    return [
        CallRecord(
            request_id=f"{team}-{status}-{day}-{n}",
            started_at=NOV_1 + day * DAY + n,
            team=team,
            key_id=f"{team}-key",
            model="gpt-4o-mini",
            status=status,
            **fields,
        )
        for day in range(days)
        for n in range(per_day)
    ]


async def invoice_of(config: GatewayConfig, team: str, month: str) -> dict:
    return await build_invoice(SqliteReader(config.storage.sqlite_path), config, team, month)


async def write_ledger(path: Path, records: list[CallRecord]) -> None:
    ledger = Ledger(path, flush_interval_ms=1000)
    await ledger.open()
    for record in records:
        ledger.append(record)
    await ledger.close()


async def test_worked_example_ten_one_megabyte_calls_a_day_cost_1_10(tmp_path: Path):
    config = load_config(write_config(tmp_path))
    prices = config.team_prices("usage")
    cost, priced = prices.cost_nanousd(
        "gpt-4o-mini",
        input_tokens=0,
        cached_input_tokens=0,
        output_tokens=0,
        request_bytes=400_000,
        response_bytes=600_000,
        billable=True,
    )
    assert (cost, priced) == (110_000_000, True)  # 1 MB × 0.01 + 0.1
    await write_ledger(
        config.storage.sqlite_path,
        rows("usage", 10, 1, request_bytes=400_000, response_bytes=600_000, cost_nanousd=cost),
    )
    invoice = await invoice_of(config, "usage", "2026-11")
    assert invoice["total_nanousd"] == 1_100_000_000
    assert invoice["total_usd"] == 1.1
    assert invoice["lines"] == [
        {
            "model": "gpt-4o-mini", "calls": 10, "input_tokens": 0, "cached_input_tokens": 0,
            "output_tokens": 0, "reasoning_tokens": 0, "request_bytes": 4_000_000,
            "response_bytes": 6_000_000, "amount_nanousd": 1_100_000_000,
        }
    ]  # fmt: skip
    assert invoice["adjustments"] == []


async def test_capped_plan_never_bills_more_than_the_cap(tmp_path: Path):
    config = load_config(write_config(tmp_path))
    records = rows("capped", 250, 30, cost_nanousd=1000)
    records += rows("capped", 7, 3, status=429) + rows("capped", 4, 2, status=500)
    await write_ledger(config.storage.sqlite_path, records)
    invoice = await invoice_of(config, "capped", "2026-11")
    assert invoice["lines"][0]["calls"] == 7500
    assert invoice["adjustments"] == [
        {"description": "usage charges replaced by plan capped_per_request",
         "amount_nanousd": -7_500_000},
        {"description": "min(7500 calls, 200/day x 30 days = 6000) x 0.01 USD",
         "amount_nanousd": 60_000_000_000},
    ]  # fmt: skip
    assert invoice["total_nanousd"] == 6000 * 10_000_000
    under = await invoice_of(config, "capped", "2026-10")
    assert under["total_nanousd"] == 0 and under["lines"] == []


async def test_per_request_plan_bills_only_answered_calls(tmp_path: Path):
    config = load_config(write_config(tmp_path))
    await write_ledger(
        config.storage.sqlite_path,
        rows("flat", 37, 1, cost_nanousd=5) + rows("flat", 5, 1, status=503),
    )
    invoice = await invoice_of(config, "flat", "2026-11")
    assert invoice["total_nanousd"] == 37 * 10_000_000
    text = render_invoice(invoice, "table")
    assert text.splitlines()[0] == "invoice: team flat, 2026-11, plan per_request, USD"
    assert text.splitlines()[-1].split()[-1] == "0.37"


async def test_invoice_of_real_traffic_equals_the_hand_computation(make_gateway, tmp_path):
    teams = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""
    gateway: Gateway = await make_gateway(teams=teams)
    client = gateway.client()
    await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "say hello to me"}],
        extra_headers={"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "7"},
    )
    await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c d e"])
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x y"}], stream=True
    )
    async for _ in stream:
        pass
    await asyncio.wait_for(gateway.rows(), 10)
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = await build_invoice(
        SqliteReader(gateway.ledger_path), gateway.config, "research", month
    )
    chat = (7 - 3) * 150 + 3 * 75 + 19 * 600 + 5 * 150 + 12 * 600
    embeddings = 5 * 20
    by_model = {line["model"]: line for line in invoice["lines"]}
    assert by_model["gpt-4o-mini"]["amount_nanousd"] == chat
    assert by_model["gpt-4o-mini"]["calls"] == 2
    assert (
        by_model["gpt-4o-mini"]["cached_input_tokens"],
        by_model["gpt-4o-mini"]["reasoning_tokens"],
    ) == (3, 7)
    assert by_model["text-embedding-3-small"]["amount_nanousd"] == embeddings
    assert invoice["total_nanousd"] == chat + embeddings


def test_invoice_command_formats(tmp_path: Path):
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    asyncio.run(write_ledger(config.storage.sqlite_path, rows("flat", 3, 2, cost_nanousd=7)))

    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "invoice", "--config", str(config_path),
             "--team", "flat", "--month", "2026-11", *args],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip

    document = json.loads(run("--format", "json"))
    assert document["total_nanousd"] == 6 * 10_000_000 and document["plan"] == "per_request"
    table = list(csv.DictReader(io.StringIO(run("--format", "csv"))))
    assert [row["item"] for row in table] == [
        "gpt-4o-mini",
        "usage charges replaced by plan per_request",
        "6 calls x 0.01 USD",
        "total",
    ]
    assert table[-1]["amount_usd"] == "0.06"


async def test_report_by_day_uses_the_limits_timezone_and_since_until(tmp_path: Path):
    from zoneinfo import ZoneInfo

    from gateway.billing.reports import ReportQuery, parse_when, usage_rows

    path = tmp_path / "l.sqlite3"
    late_evening_utc = NOV_1 + 23 * 3600  # 2026-11-02 08:00 in Tokyo
    records = [
        CallRecord(request_id="a", started_at=NOV_1 + 3600, team="t", cost_nanousd=5),
        CallRecord(request_id="b", started_at=late_evening_utc, team="t", cost_nanousd=7),
        CallRecord(request_id="c", started_at=NOV_1 + 3 * DAY, team="t", cost_nanousd=11),
    ]
    await write_ledger(path, records)
    tokyo = ZoneInfo("Asia/Tokyo")
    by_day = await usage_rows(SqliteReader(path), ReportQuery(by=["day"], zone=tokyo))
    assert [(r["day"], r["calls"], r["cost_nanousd"]) for r in by_day] == [
        ("2026-11-01", 1, 5),
        ("2026-11-02", 1, 7),
        ("2026-11-04", 1, 11),
    ]
    utc = ZoneInfo("UTC")
    window = ReportQuery(
        by=["team"], since=parse_when("2026-11-01", utc), until=parse_when("2026-11-02", utc)
    )
    in_window = await usage_rows(SqliteReader(path), window)
    assert [(r["calls"], r["cost_usd"]) for r in in_window] == [(2, "0.000000012")]
    now = datetime(2026, 11, 5, tzinfo=UTC)
    assert parse_when("7d", utc, now) == now.timestamp() - 7 * DAY


def test_reprice_recomputes_costs_exactly_and_dry_run_writes_nothing(tmp_path: Path):
    import sqlite3

    from gateway.pricing.table import load_price_table

    config_path = write_config(tmp_path)
    config = load_config(config_path)
    records = rows("flat", 2, 1, input_tokens=1000, output_tokens=100, cost_nanousd=210_000)
    records += rows("usage", 1, 1, input_tokens=1000, request_bytes=500_000, response_bytes=500_000)
    records += rows("flat", 1, 1, status=429)
    asyncio.run(write_ledger(config.storage.sqlite_path, records))
    new_prices = tmp_path / "new.yaml"
    new_prices.write_text("models:\n  gpt-4o-mini: {input: 0.30, output: 1.20}\n")

    def run(*extra: str) -> list[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "reprice", "--config", str(config_path),
             "--since", "2026-11-01", "--pricing", str(new_prices), *extra],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.splitlines()  # fmt: skip

    def costs() -> dict[str, int]:
        with sqlite3.connect(config.storage.sqlite_path) as db:
            return dict(db.execute("SELECT request_id, cost_nanousd FROM requests"))

    before = costs()
    flat_cost = 1000 * 300 + 100 * 1200  # 420,000 nano-USD
    usage_cost = 1000 * 300 + 1_000_000 * 10 + 100_000_000  # the team's transfer and fee stay
    preview = run("--dry-run")
    assert preview[0] == "4 rows examined, 3 with a new cost (dry run: nothing written)"
    assert preview[1] == f"total: 0.00042 -> {format_usd(2 * flat_cost + usage_cost)} USD"
    assert costs() == before
    run()
    after = costs()
    assert after["flat-200-0-0"] == after["flat-200-0-1"] == flat_cost
    assert after["usage-200-0-0"] == usage_cost
    assert after["flat-429-0-0"] == 0
    with sqlite3.connect(config.storage.sqlite_path) as db:
        hashes = {h for (h,) in db.execute("SELECT pricing_hash FROM requests WHERE team='flat'")}
    assert hashes == {load_price_table(new_prices).content_hash}

"""Billing exports end to end (SPEC "Billing export"): calls through the gateway (the openai
SDK, the fake upstream) become meter events in the local fakes of Stripe, OpenMeter, Lago and
a webhook receiver, each exactly once, through outages, lost answers, a kill -9 of the
gateway, a reprice and a backfill."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import EXPORTERS, LEDGER
from gateway.cli import build_parser
from gateway.commands.export import cmd_export
from gateway.devtools.fake_billing import FakeBilling, build_fake_billing_app
from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, Gateway, GatewayFactory
from tests.processes import KEY, TEAMS, Stack

STRIPE_KEY = "sk_test_export_secret_0123456789"
LAGO_KEY = "lago_export_secret_0123456789"
OPENMETER_KEY = "om_export_secret_0123456789"
HOOK_SECRET = "hook-signing-secret-0123"
SECRETS = (STRIPE_KEY, LAGO_KEY, OPENMETER_KEY, HOOK_SECRET)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count to three"}]}
SERVICES = ("stripe", "openmeter", "lago", "webhook")


@dataclass
class Billing:
    state: FakeBilling
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def billing(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Billing]:
    monkeypatch.setenv("STRIPE_TEST_KEY", STRIPE_KEY)
    monkeypatch.setenv("LAGO_TEST_KEY", LAGO_KEY)
    monkeypatch.setenv("OPENMETER_TEST_KEY", OPENMETER_KEY)
    monkeypatch.setenv("HOOK_TEST_SECRET", HOOK_SECRET)
    state = FakeBilling(
        api_keys={"stripe": STRIPE_KEY, "lago": LAGO_KEY, "openmeter": OPENMETER_KEY,
                  "webhook": None},
        value_property="total_tokens", webhook_secret=HOOK_SECRET,
    )  # fmt: skip
    server = TestServer(build_fake_billing_app(state), host="127.0.0.1")
    await server.start_server()
    yield Billing(state, server)
    await server.close()


def exports_yaml(url: str, interval_s: float = 0.05) -> str:
    """The four exports, each counting something else (the fakes' `value_property` is the
    one OpenMeter and Lago carry: total_tokens)."""
    return f"""
export:
  - kind: stripe
    name: spend
    url: {url}
    api_key_env: STRIPE_TEST_KEY
    event_name: llm_spend
    value: cost_nanousd
    customers: {{research: cus_research, product: cus_product}}
    interval_s: {interval_s}
  - kind: openmeter
    url: {url}
    api_key_env: OPENMETER_TEST_KEY
    event_name: llm_tokens
    value: total_tokens
    customers: {{research: subject-research, product: subject-product}}
    interval_s: {interval_s}
  - kind: lago
    url: {url}
    api_key_env: LAGO_TEST_KEY
    event_name: llm_tokens
    value: total_tokens
    customers: {{research: sub_research, product: sub_product}}
    interval_s: {interval_s}
  - kind: webhook
    name: hook
    url: {url}/webhook
    secret_env: HOOK_TEST_SECRET
    value: requests
    interval_s: {interval_s}
"""


def ledger_rows(path: Path) -> dict[str, sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return {row["request_id"]: row for row in db.execute("SELECT * FROM requests")}


async def make_calls(gateway: Gateway, research: int = 8, product: int = 4) -> None:
    for key, count in ((RESEARCH_KEY, research), (PRODUCT_KEY, product)):
        client = gateway.client(key)
        for index in range(count):
            if index % 2:
                stream = await client.chat.completions.create(
                    **CHAT, stream=True, stream_options={"include_usage": True}
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(**CHAT)


async def not_billable(gateway: Gateway) -> None:
    """A refused key and an upstream error: ledger rows, never events."""
    with pytest.raises(openai.AuthenticationError):
        await gateway.client("mgw-not-a-key").chat.completions.create(**CHAT)
    with pytest.raises(openai.InternalServerError):
        await gateway.client().chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "status=500"}
        )


async def until(done: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def settled_in(
    state: FakeBilling, services: tuple[str, ...], count: int, timeout_s: float = 15.0
) -> None:
    """Each service holds `count` events (and no more arrive for a moment)."""
    try:
        await until(lambda: all(len(state.events(s)) >= count for s in services), timeout_s)
    except AssertionError:
        found = {service: len(state.events(service)) for service in services}
        raise AssertionError(f"not all services got {count} events: {found}") from None
    await asyncio.sleep(0.3)


async def settled(billing: Billing, count: int, timeout_s: float = 15.0) -> None:
    await settled_in(billing.state, SERVICES, count, timeout_s)


def assert_exactly_the_ledger(billing: Billing, rows: dict[str, sqlite3.Row]) -> None:
    """Every billable row once in each service, with its customer, value and time."""
    billable = {rid: row for rid, row in rows.items() if 200 <= row["status"] < 300}
    customers = {
        "stripe": {"research": "cus_research", "product": "cus_product"},
        "openmeter": {"research": "subject-research", "product": "subject-product"},
        "lago": {"research": "sub_research", "product": "sub_product"},
        "webhook": {"research": "research", "product": "product"},
    }
    prefixes = {"stripe": "spend:", "openmeter": "", "lago": "", "webhook": "hook:"}
    for service in SERVICES:
        events = billing.state.events(service)
        ids = [event.id for event in events]
        assert len(ids) == len(set(ids)), f"{service}: an event twice"
        assert sorted(ids) == sorted(prefixes[service] + rid for rid in billable), service
        for event in events:
            row = billable[event.id.removeprefix(prefixes[service])]
            assert event.customer == customers[service][row["team"]], service
            total = row["input_tokens"] + row["output_tokens"]
            expected = {"stripe": row["cost_nanousd"], "openmeter": total, "lago": total,
                        "webhook": 1}[service]  # fmt: skip
            assert event.value == expected, service
            started = row["started_at"]
            timestamp = {"stripe": int(started), "lago": int(started),
                         "openmeter": math.floor(started * 1000) / 1000,
                         "webhook": started}[service]  # fmt: skip
            assert event.timestamp == pytest.approx(timestamp, abs=1e-6), service


async def test_twelve_calls_become_twelve_events_in_each_billing_system(
    make_gateway: GatewayFactory, billing: Billing, caplog: pytest.LogCaptureFixture
):
    gateway = await make_gateway(extra_yaml=exports_yaml(billing.url))
    with caplog.at_level(logging.INFO):
        await make_calls(gateway)
        await not_billable(gateway)
        await settled(billing, 12)
    rows = ledger_rows(gateway.ledger_path)
    assert len(rows) == 14
    assert sum(200 <= row["status"] < 300 for row in rows.values()) == 12
    assert_exactly_the_ledger(billing, rows)
    assert all(row["cost_nanousd"] > 0 for row in rows.values() if row["status"] == 200)

    exporters = gateway.app[EXPORTERS]
    for exporter in exporters:
        await exporter.refresh_lag()
    assert [(e.label, e.lag, e.errors) for e in exporters] == [
        ("spend", 0, 0), ("openmeter", 0, 0), ("lago", 0, 0), ("hook", 0, 0)
    ]  # fmt: skip
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/metrics"))) as answer,
    ):
        metrics = await answer.text()
    assert 'gateway_export_lag_rows{export="spend"} 0.0' in metrics
    assert 'gateway_export_errors_total{export="lago"} 0.0' in metrics
    assert not any(secret in caplog.text for secret in SECRETS)


async def test_outages_rate_limits_and_lost_answers_end_with_the_same_events_none_twice(
    make_gateway: GatewayFactory, billing: Billing, caplog: pytest.LogCaptureFixture
):
    faults = billing.state
    faults.outage("stripe", 2)
    faults.rate_limit("lago", 2, retry_after_s=1)
    faults.lose_answers("openmeter", 1)
    faults.down("webhook")
    gateway = await make_gateway(extra_yaml=exports_yaml(billing.url))
    with caplog.at_level(logging.INFO, logger="gateway.export"):
        await make_calls(gateway, research=6, product=0)
        await asyncio.sleep(0.5)
        assert billing.state.events("webhook") == []
        faults.up("webhook")
        await make_calls(gateway, research=4, product=2)
        await settled(billing, 12, timeout_s=20)
    assert_exactly_the_ledger(billing, ledger_rows(gateway.ledger_path))
    errors = {exporter.label: exporter.errors for exporter in gateway.app[EXPORTERS]}
    assert errors["spend"] == 2 and errors["lago"] == 2 and errors["openmeter"] == 1
    assert errors["hook"] >= 1
    # the lost answer was resent: OpenMeter got the batch twice and kept it once
    statuses = [status for service, status in billing.state.requests if service == "openmeter"]
    assert statuses[0] == 0 and len(statuses) >= 2
    for label in ("spend", "openmeter", "lago", "hook"):
        began = [r for r in caplog.records if r.getMessage().startswith(f"export {label}: ")
                 and "is not taking events" in r.getMessage()]  # fmt: skip
        ended = [r for r in caplog.records if r.getMessage().startswith(f"export {label}: ")
                 and "takes events again" in r.getMessage()]  # fmt: skip
        assert (len(began), len(ended)) == (1, 1), label
    assert not any(secret in caplog.text for secret in SECRETS)


async def test_a_reprice_after_export_is_corrected_where_the_service_can_else_listed(
    make_gateway: GatewayFactory, billing: Billing, tmp_path: Path, monkeypatch
):
    from gateway.billing.reprice import reprice
    from gateway.ledger.readers import SqliteReader
    from gateway.pricing.book import PriceBook
    from gateway.pricing.table import load_price_table

    by_cost = FakeBilling(api_keys={"openmeter": None}, value_property="cost_nanousd")
    cost_server = TestServer(build_fake_billing_app(by_cost), host="127.0.0.1")
    await cost_server.start_server()
    cost_url = str(cost_server.make_url("")).rstrip("/")
    yaml = (
        exports_yaml(billing.url).split("  - kind: openmeter")[0]
        + f"""\
  - kind: openmeter
    name: om-cost
    url: {cost_url}
    event_name: llm_spend
    value: cost_nanousd
    customers: {{research: subject-research}}
    interval_s: 0.05
  - kind: webhook
    name: hook
    url: {billing.url}/webhook
    secret_env: HOOK_TEST_SECRET
    value: cost_nanousd
    interval_s: 0.05
"""
    )
    try:
        gateway = await make_gateway(extra_yaml=yaml)
        await make_calls(gateway, research=3, product=0)
        await settled_in(billing.state, ("stripe", "webhook"), 3)
        await settled_in(by_cost, ("openmeter",), 3)
        before = ledger_rows(gateway.ledger_path)

        doubled = tmp_path / "doubled.yaml"
        doubled.write_text(
            "models:\n  gpt-4o-mini: {input: 0.30, cached_input: 0.15, output: 1.20}\n"
        )
        result = await reprice(SqliteReader(gateway.ledger_path), gateway.config,
                               PriceBook(load_price_table(doubled)), 0.0, True)  # fmt: skip
        assert result.changed == 3
        after = ledger_rows(gateway.ledger_path)
        assert all(after[r]["cost_nanousd"] == 2 * before[r]["cost_nanousd"] for r in before)
        await until(lambda: len(billing.state.events("webhook")) >= 6)
        await asyncio.sleep(0.3)

        # Stripe: each first event cancelled, the new cost sent under a new identifier
        assert sorted(billing.state.cancelled) == sorted(f"spend:{r}" for r in before)
        stripe = {event.id: event.value for event in billing.state.events("stripe")}
        assert sorted(stripe.values()) == sorted(row["cost_nanousd"] for row in after.values())
        assert all(":" in event_id.removeprefix("spend:") for event_id in stripe)
        # the webhook: one correction per row, carrying the difference
        corrections = [e for e in billing.state.events("webhook") if "adjusts" in e.body]
        assert sorted((e.body["adjusts"], e.value) for e in corrections) == sorted(
            (f"hook:{r}", before[r]["cost_nanousd"]) for r in before
        )
        # OpenMeter takes no correction: its events are as they were, and the rows are listed
        assert sorted(e.value for e in by_cost.events("openmeter")) == sorted(
            row["cost_nanousd"] for row in before.values()
        )
    finally:
        await cost_server.close()
    config_path = gateway.config.path
    args = build_parser().parse_args(["export", "--config", str(config_path), "--status"])
    code, status = await run_command(cmd_export, args)
    assert code == 0
    assert "om-cost (openmeter" in status
    assert "repriced after it was sent, not corrected: 3 row(s)" in status
    for request_id, row in after.items():
        assert f"{request_id}  sent {before[request_id]['cost_nanousd']}, ledger now" \
               f" {row['cost_nanousd']}" in status  # fmt: skip


async def run_command(command, args) -> tuple[int, str]:
    """A CLI command in a thread (it runs an event loop of its own): its exit code and output."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()

    def run() -> int:
        with redirect_stdout(out):
            return command(args)

    code = await asyncio.to_thread(run)
    return code, out.getvalue()


def cli(config: Path, *extra: str) -> tuple[str, ...]:
    return ("export", "--config", str(config), *extra)


async def test_a_new_export_starts_at_the_end_and_backfills_on_demand_once(
    make_gateway: GatewayFactory, billing: Billing, tmp_path: Path
):
    ledger = tmp_path / "shared.sqlite3"
    plain = await make_gateway(ledger_path=ledger)  # history, before any export
    await make_calls(plain, research=3, product=2)
    await plain.app[LEDGER].flush()
    gateway = await make_gateway(ledger_path=ledger, extra_yaml=exports_yaml(billing.url))
    await make_calls(gateway, research=1, product=0)
    await settled(billing, 1)
    assert all(len(billing.state.events(service)) == 1 for service in SERVICES)

    since = datetime.fromtimestamp(time.time() - 3600).date().isoformat()
    parse = build_parser().parse_args
    code, out = await run_command(cmd_export, parse(cli(gateway.config.path, "--since", since,
                                                        "--dry-run")))  # fmt: skip
    assert code == 0
    assert (
        out.splitlines()[0] == "spend: 5 row(s) would be sent (0 skipped); nothing sent (--dry-run)"
    )
    assert all(len(billing.state.events(service)) == 1 for service in SERVICES)

    code, out = await run_command(cmd_export, parse(cli(gateway.config.path, "--since", since)))
    assert code == 0
    assert (
        out.splitlines()[0] == "spend: 5 sent, 0 refused, 0 skipped; 0 row(s) not yet acknowledged"
    )
    assert_exactly_the_ledger(billing, ledger_rows(ledger))
    code, out = await run_command(cmd_export, parse(cli(gateway.config.path, "--since", since)))
    assert out.splitlines()[0].startswith("spend: 0 sent")
    requests_before = len(billing.state.requests)
    code, out = await run_command(
        cmd_export, parse(cli(gateway.config.path, "--since", since, "--resend"))
    )
    assert code == 0 and out.splitlines()[0].startswith("spend: 6 sent")
    assert len(billing.state.requests) > requests_before
    assert_exactly_the_ledger(billing, ledger_rows(ledger))  # resent, and kept once


async def test_a_team_without_a_customer_is_skipped_with_one_warning_and_is_not_lag(
    make_gateway: GatewayFactory, billing: Billing, caplog: pytest.LogCaptureFixture
):
    yaml = exports_yaml(billing.url).replace(", product: cus_product", "")
    with caplog.at_level(logging.WARNING, logger="gateway.export"):
        gateway = await make_gateway(extra_yaml=yaml)
        await make_calls(gateway, research=2, product=3)
        await settled_in(billing.state, ("openmeter",), 5)
        await asyncio.sleep(0.3)
    stripe = billing.state.events("stripe")
    assert sorted(event.customer for event in stripe) == ["cus_research", "cus_research"]
    warnings = [r.getMessage() for r in caplog.records if "has no customer" in r.getMessage()]
    assert warnings == [
        "export spend: team product has no customer in export.customers: its rows are not sent"
    ]
    spend = next(e for e in gateway.app[EXPORTERS] if e.label == "spend")
    assert await spend.refresh_lag() == 0


async def test_an_old_row_is_skipped_for_stripe_and_listed_and_a_refusal_is_listed(
    make_gateway: GatewayFactory, billing: Billing, tmp_path: Path
):
    from gateway.ledger.writer import CallRecord, Ledger

    ledger_path = tmp_path / "old.sqlite3"
    gateway = await make_gateway(ledger_path=ledger_path, extra_yaml=exports_yaml(billing.url))
    now = time.time()

    async def write() -> None:  # a writer of its own, as another process would be
        writer = Ledger(ledger_path, flush_interval_ms=60_000)
        await writer.open()
        writer.append(
            CallRecord(
                "req_old",
                started_at=now - 40 * 86400,
                team="research",
                key_id="research-dev",
                status=200,
                cost_nanousd=7,
            )
        )
        writer.append(
            CallRecord(
                "req_bad",
                started_at=now - 60,
                team="research",
                key_id="research-dev",
                status=200,
                cost_nanousd=-1,
            )
        )
        await writer.close()  # fmt: skip

    await asyncio.to_thread(asyncio.run, write())
    spend = next(e for e in gateway.app[EXPORTERS] if e.label == "spend")
    deadline = time.monotonic() + 10
    while await spend.refresh_lag() != 1:  # what remains: the refused row
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    parse = build_parser().parse_args
    code, status = await run_command(cmd_export, parse(cli(gateway.config.path, "--status")))
    assert "  skipped: 1 row(s)\n    req_old  older than Stripe's 35 days" in status
    assert "  refused: 1 row(s)\n    req_bad  Invalid payload value: must be a whole number." \
        in status  # fmt: skip
    assert "  last error: row req_bad refused: Invalid payload value" in status
    assert "  lag: 1 billable row(s) not yet acknowledged" in status
    # a backfill tries the refused row again (refused again: exit 1); the skipped one stays
    since = datetime.fromtimestamp(now - 41 * 86400).date().isoformat()
    code, out = await run_command(cmd_export, parse(cli(gateway.config.path, "--since", since)))
    assert code == 1
    assert out.splitlines()[0] == (
        "spend: 0 sent, 1 refused, 0 skipped; 1 row(s) not yet acknowledged"
    )
    assert [e.customer for e in billing.state.events("stripe")] == []


async def test_two_replicas_on_postgres_export_every_row_once_one_exporter_at_a_time(
    make_gateway: GatewayFactory, billing: Billing, postgres_server, monkeypatch
):
    import asyncpg

    with postgres_server.new_database() as dsn:
        monkeypatch.setenv("TEST_EXPORT_PG_DSN", dsn)
        storage = ("backend: postgres", "dsn_env: TEST_EXPORT_PG_DSN")
        yaml = exports_yaml(billing.url)
        one = await make_gateway(storage_extra=storage, extra_yaml=yaml)
        two = await make_gateway(storage_extra=storage, extra_yaml=yaml)
        await asyncio.gather(make_calls(one, research=4, product=2),
                             make_calls(two, research=4, product=2))  # fmt: skip
        await settled(billing, 12)
        connection = await asyncpg.connect(dsn)
        try:
            rows = {row["request_id"]: dict(row) for row in await connection.fetch(
                "SELECT * FROM requests")}  # fmt: skip
            seqs = await connection.fetch("SELECT DISTINCT change_seq FROM requests")
        finally:
            await connection.close()
        for gateway in (one, two):  # before the database goes
            await gateway.server.close()
    assert len(rows) == 12 and all(seq["change_seq"] > 0 for seq in seqs)
    assert_exactly_the_ledger(billing, rows)  # type: ignore[arg-type]


async def test_a_kill_9_of_the_gateway_during_export_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, billing: Billing
):
    billing.state.lose_answers("stripe", 3)  # stored, but the answers never reach the gateway
    billing.state.lose_answers("lago", 1)
    yaml = exports_yaml(billing.url, interval_s=0.2)
    for team in ("product",):  # the process stack has one team
        yaml = yaml.replace(f", {team}: cus_{team}", "").replace(f", {team}: subject-{team}", "")
        yaml = yaml.replace(f", {team}: sub_{team}", "")
    stack = Stack(tmp_path, teams=TEAMS, extra=yaml)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY,
                                    max_retries=0)  # fmt: skip
        for _ in range(12):
            await client.chat.completions.create(**CHAT)
        await client.close()
        await until(lambda: len(read(stack.ledger, "SELECT request_id FROM requests")) == 12)
        # kill -9 once Stripe has stored events whose answers the gateway never got
        await until(lambda: [s for name, s in billing.state.requests if name == "stripe"]
                    .count(0) == 3)  # fmt: skip
        os.kill(stack.gateway.pid, signal.SIGKILL)
        stack.gateway.wait(timeout=10)
        stack.restart_gateway()
        delivered = "SELECT name, delivered FROM exports ORDER BY name"
        await until(lambda: read(stack.ledger, delivered) == [
            ("hook", 12), ("lago", 12), ("openmeter", 12), ("spend", 12)
        ], timeout_s=60)  # the dead one's lease runs out first  # fmt: skip
        with contextlib.closing(sqlite3.connect(stack.ledger)) as db:
            db.row_factory = sqlite3.Row
            rows = {row["request_id"]: row for row in db.execute("SELECT * FROM requests")}
    finally:
        stack.stop()
    assert len(rows) == 12
    assert_exactly_the_ledger(billing, rows)
    stripe_requests = [status for service, status in billing.state.requests if service == "stripe"]
    assert stripe_requests.count(0) == 3 and len(stripe_requests) >= 15  # resent, kept once
    assert not any(secret in stack.log_text() for secret in SECRETS)


def read(path: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            return list(db.execute(sql))
        except sqlite3.OperationalError:  # not created yet
            return []

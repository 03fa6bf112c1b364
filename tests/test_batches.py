"""Batch metering (SPEC "Every OpenAI surface"): a batch created through the gateway with the
official SDK yields exactly one row, at batch prices, when it ends — found by a client's fetch
or by the gateway's own look — and a restart neither bills it twice nor forgets it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson

from gateway.app import BATCHES, LEDGER, LIMITER
from gateway.batches.watcher import summed_output_usage
from tests.conftest import RESEARCH_KEY, Fake, Gateway, GatewayFactory, sha

PROMPTS = ["one two three", "four five", "six seven eight nine ten"]
# The fake counts a prompt's words + 3 a message, and answers 12 words.
PROMPT_TOKENS = [3 + 3, 2 + 3, 5 + 3]
INPUT, OUTPUT = sum(PROMPT_TOKENS), 12 * len(PROMPTS)  # 19, 36
# gpt-4o-mini at the test table's $0.15 / $0.60 per 1M, half for the Batch API, rounded once.
BATCH_COST = (INPUT * 150 + OUTPUT * 600) // 2  # 19 * 150 + 36 * 600 = 24,450 → 12,225
LIMITED_TEAMS = f"""
  research:
    limits: {{tokens_per_day: 1000, spend_per_day_usd: 1.0}}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""


def batch_input() -> bytes:
    lines = [
        {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}}
        for n, prompt in enumerate(PROMPTS)
    ]  # fmt: skip
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


async def create_batch(gateway: Gateway, metadata: dict[str, str] | None = None) -> str:
    client = gateway.client()
    upload = await client.files.create(file=("in.jsonl", batch_input()), purpose="batch")
    batch = await client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    assert batch.status == "validating"
    return batch.id


async def batch_rows(gateway: Gateway, wait_s: float = 3.0) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        rows = [row for row in await gateway.rows() if row["batch"] == 1]
        if rows or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


def batches_table(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT batch_id, team, key_id, status, billed_request_id, "
                               "billed_at IS NOT NULL FROM batches"))  # fmt: skip


async def test_a_fetched_batch_that_completed_is_one_row_at_batch_prices(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway()
    batch_id = await create_batch(gateway)
    assert await batch_rows(gateway, wait_s=0.2) == []  # nothing billed while it runs

    client = gateway.client()
    done = await client.batches.retrieve(batch_id)
    assert done.status == "completed"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (INPUT, OUTPUT)
    (row,) = await batch_rows(gateway)
    await client.batches.retrieve(batch_id)  # fetched again: still one row
    await asyncio.sleep(0.2)

    assert [r for r in await gateway.rows() if r["batch"] == 1] == [row]
    picked = {name: row[name] for name in (
        "request_id", "method", "path", "model", "status", "outcome", "team", "key_id",
        "upstream_request_id", "input_tokens", "output_tokens", "cost_nanousd", "price_unknown",
        "stream")}  # fmt: skip
    assert picked == {
        "request_id": f"req_{batch_id}", "method": "POST", "path": "/v1/batches",
        "model": "gpt-4o-mini", "status": 200, "outcome": "ok", "team": "research",
        "key_id": "research-dev", "upstream_request_id": batch_id, "input_tokens": INPUT,
        "output_tokens": OUTPUT, "cost_nanousd": BATCH_COST, "price_unknown": 0, "stream": 0,
    }  # fmt: skip
    # The client's own calls (upload, create, two fetches) are rows of their own, unbilled.
    calls = [(r["method"], r["path"]) for r in await gateway.rows() if r["batch"] == 0]
    fetch = ("GET", f"/v1/batches/{batch_id}")
    assert calls == [("POST", "/v1/files"), ("POST", "/v1/batches"), fetch, fetch]
    assert batches_table(gateway.ledger_path) == [
        (batch_id, "research", "research-dev", "completed", f"req_{batch_id}", 1)
    ]


async def test_the_poller_bills_a_batch_nobody_fetches_from_its_output_file(
    make_gateway: GatewayFactory, fake: Fake
) -> None:
    gateway = await make_gateway(extra_yaml="batches: {poll_interval_s: 0.1}\n")
    batch_id = await create_batch(gateway, metadata={"fake_usage": "output_only"})

    (row,) = await batch_rows(gateway)
    assert (row["input_tokens"], row["output_tokens"], row["cost_nanousd"]) == (
        INPUT, OUTPUT, BATCH_COST
    )  # fmt: skip
    # The gateway's looks reached the upstream (the batch, then its output file) but are no calls.
    looked = [r.path for r in fake.state.received if r.method == "GET"]
    assert looked[:2] == [f"/v1/batches/{batch_id}", looked[1]]
    assert looked[1].startswith("/v1/files/") and looked[1].endswith("/content")
    assert [r["path"] for r in await gateway.rows()] == ["/v1/files", "/v1/batches",
                                                         "/v1/batches"]  # fmt: skip
    await asyncio.sleep(0.3)  # more polls: nothing pending, nothing fetched
    assert len([r for r in fake.state.received if r.method == "GET"]) == 2


async def test_a_restart_neither_forgets_a_pending_batch_nor_bills_it_twice(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "shared-ledger.sqlite3"
    first = await make_gateway(ledger_path=ledger)  # polls every 300 s: never, here
    batch_id = await create_batch(first)
    await first.server.close()
    assert batches_table(ledger) == [(batch_id, "research", "research-dev", "validating", None, 0)]

    second = await make_gateway(ledger_path=ledger, extra_yaml="batches: {poll_interval_s: 0.1}\n")
    (row,) = await batch_rows(second)
    assert row["cost_nanousd"] == BATCH_COST
    await second.server.close()

    third = await make_gateway(ledger_path=ledger, extra_yaml="batches: {poll_interval_s: 0.1}\n")
    await third.client().batches.retrieve(batch_id)
    await asyncio.sleep(0.4)
    assert [r["request_id"] for r in await third.rows() if r["batch"] == 1] == [f"req_{batch_id}"]


async def test_a_crash_after_the_row_before_the_mark_bills_the_same_row_again(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway()
    batch_id = await create_batch(gateway)
    watcher = gateway.app[BATCHES]
    billed = watcher.store.billed

    async def crash(batch: str, now: float) -> None:
        raise OSError("killed before the mark")

    watcher.store.billed = crash  # type: ignore[method-assign]
    await watcher.poll_once()
    assert len(await batch_rows(gateway)) == 1
    watcher.store.billed = billed  # type: ignore[method-assign]
    with sqlite3.connect(gateway.ledger_path) as db:  # the claim of the dead replica expired
        db.execute("UPDATE batches SET checked_at = 0")
    await watcher.poll_once()
    rows = await batch_rows(gateway)
    assert [(r["request_id"], r["cost_nanousd"]) for r in rows] == [(f"req_{batch_id}", BATCH_COST)]
    assert batches_table(gateway.ledger_path)[0][-1] == 1


async def test_a_completed_batch_counts_against_the_teams_quotas_then(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=LIMITED_TEAMS)
    limiter, config = gateway.app[LIMITER], gateway.config
    team = config.teams["research"]

    def used() -> tuple[object, object]:
        remaining = limiter.remaining(team.keys[0], team)
        return remaining["tokens_per_day"]["used"], remaining["spend_per_day_usd"]["used"]

    batch_id = await create_batch(gateway)
    before = used()
    await gateway.client().batches.retrieve(batch_id)
    await batch_rows(gateway)
    tokens, spend = used()
    assert tokens == before[0] + INPUT + OUTPUT  # type: ignore[operator]
    assert round(float(spend) - float(before[1]), 9) == BATCH_COST / 1e9  # type: ignore[arg-type]


def test_an_output_files_usages_are_summed_and_its_model_found() -> None:
    lines = [
        {"response": {"status_code": 200, "body": {"model": "gpt-4o-mini-2024-07-18", "usage": {
            "prompt_tokens": 10, "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 6}}}}},
        {"response": {"status_code": 400, "body": {"error": {"message": "bad"}}}},
        {"response": {"status_code": 200, "body": {"model": "gpt-4o-mini-2024-07-18", "usage": {
            "prompt_tokens": 5, "completion_tokens": 7,
            "completion_tokens_details": {"reasoning_tokens": 2}}}}},
    ]  # fmt: skip
    content = b"\n".join(orjson.dumps(line) for line in lines) + b"\nnot json\n"
    usage, model = summed_output_usage(content, None)
    assert model == "gpt-4o-mini-2024-07-18"
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
            usage.reasoning_tokens) == (15, 6, 11, 2)  # fmt: skip
    assert summed_output_usage(b"", "gpt-4o") == (None, "gpt-4o")


async def test_two_replicas_on_postgres_bill_a_batch_once(
    make_gateway: GatewayFactory, postgres_server, monkeypatch
) -> None:
    import asyncpg

    with postgres_server.new_database() as dsn:
        monkeypatch.setenv("TEST_BATCH_PG_DSN", dsn)
        storage = ("backend: postgres", "dsn_env: TEST_BATCH_PG_DSN")
        one = await make_gateway(storage_extra=storage)
        two = await make_gateway(storage_extra=storage)
        batch_id = await create_batch(one)
        await asyncio.gather(one.app[BATCHES].poll_once(), two.app[BATCHES].poll_once())
        await two.client().batches.retrieve(batch_id)  # the other replica's fetch: billed already
        await asyncio.sleep(0.2)
        for gateway in (one, two):
            await gateway.app[BATCHES].poll_once()
            await gateway.app[LEDGER].flush()
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch(
                "SELECT request_id, cost_nanousd, input_tokens, output_tokens FROM requests "
                "WHERE batch = 1"
            )
            marks = await connection.fetch("SELECT billed_at IS NOT NULL FROM batches")
        finally:
            await connection.close()
        for gateway in (one, two):  # before the database goes
            await gateway.server.close()
    assert [tuple(row) for row in rows] == [(f"req_{batch_id}", BATCH_COST, INPUT, OUTPUT)]
    assert [tuple(mark) for mark in marks] == [(True,)]

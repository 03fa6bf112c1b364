"""Real usage objects through the gateway, priced by the builtin price database: each ledger
cost equals the hand computation from OpenAI's list prices, to the nano-dollar.

List prices used (USD per 1M tokens unless said): gpt-4o-mini 0.15 / cached 0.075 / output
0.60; gpt-5 and gpt-5.1 1.25 / 0.125 / 10, flex half, priority 2.50 / 0.25 / 20;
text-embedding-3-small 0.02; gpt-4o-transcribe text 2.50, audio 6, output 10; whisper-1
0.006 per minute; tts-1 15 per 1M characters; gpt-image-1 text 5, image input 10, output 40;
web search 10 per 1,000 calls. 1 USD per 1M tokens is 1,000 nano-USD per token.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.billing.reports import build_invoice
from gateway.config.loader import load_config
from gateway.ledger.readers import SqliteReader
from tests.conftest import RESEARCH_KEY, Gateway, GatewayFactory, sha
from tests.raw_upstream import RawUpstream

TEAM = f"""
  research:
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
"""


@pytest.fixture
async def canned() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


def chat(model: str, usage: dict, **extra: Any) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": usage, **extra,
    }  # fmt: skip


CASES = [
    pytest.param(
        "/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        chat(
            "gpt-4o-mini-2024-07-18",
            {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
             "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0}},
        ),
        600 * 150 + 400 * 75 + 200 * 600,
        {"cached_input_tokens": 400, "service_tier": None},
        id="chat-cached",
    ),
    pytest.param(
        "/chat/completions",
        {"model": "gpt-5", "messages": [{"role": "user", "content": "think"}]},
        chat(
            "gpt-5-2025-08-07",
            {"prompt_tokens": 2000, "completion_tokens": 3000, "total_tokens": 5000,
             "prompt_tokens_details": {"cached_tokens": 1000},
             "completion_tokens_details": {"reasoning_tokens": 2500,
                                           "rejected_prediction_tokens": 0}},
            service_tier="default",
        ),
        1000 * 1250 + 1000 * 125 + 3000 * 10_000,
        {"reasoning_tokens": 2500, "service_tier": "default"},
        id="chat-reasoning-default-tier",
    ),
    pytest.param(
        "/chat/completions",
        {"model": "gpt-5", "service_tier": "flex",
         "messages": [{"role": "user", "content": "think"}]},
        chat(
            "gpt-5-2025-08-07",
            {"prompt_tokens": 2000, "completion_tokens": 3000, "total_tokens": 5000,
             "prompt_tokens_details": {"cached_tokens": 1000},
             "completion_tokens_details": {"reasoning_tokens": 2500}},
            service_tier="flex",
        ),
        (1000 * 1250 + 1000 * 125 + 3000 * 10_000) // 2,
        {"service_tier": "flex"},
        id="chat-flex-tier-half-price",
    ),
    pytest.param(
        "/chat/completions",
        # The request asks for flex; the answer says priority served it: priority is billed.
        {"model": "gpt-5", "service_tier": "flex",
         "messages": [{"role": "user", "content": "think"}]},
        chat(
            "gpt-5-2025-08-07",
            {"prompt_tokens": 2000, "completion_tokens": 3000, "total_tokens": 5000,
             "prompt_tokens_details": {"cached_tokens": 1000},
             "completion_tokens_details": {"reasoning_tokens": 2500}},
            service_tier="priority",
        ),
        1000 * 2500 + 1000 * 250 + 3000 * 20_000,
        {"service_tier": "priority"},
        id="chat-tier-from-the-answer-not-the-request",
    ),
    pytest.param(
        "/responses",
        {"model": "gpt-5.1", "input": "news?", "tools": [{"type": "web_search"}]},
        {
            "id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
            "model": "gpt-5.1-2025-11-13", "service_tier": "default",
            "output": [
                {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                {"type": "web_search_call", "id": "ws_2", "status": "completed"},
                {"type": "message", "id": "msg_1", "role": "assistant",
                 "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
            ],
            "usage": {"input_tokens": 500, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 100, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 600},
        },
        500 * 1250 + 100 * 10_000 + 2 * 10_000_000,
        {"web_search_calls": 2},
        id="responses-after-2025-08-with-two-web-searches",
    ),
    pytest.param(
        "/embeddings",
        {"model": "text-embedding-3-small", "input": "hello"},
        {"object": "list", "model": "text-embedding-3-small",
         "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1]}],
         "usage": {"prompt_tokens": 1000, "total_tokens": 1000}},
        1000 * 20,
        {"input_tokens": 1000},
        id="embeddings",
    ),
]


@pytest.mark.parametrize(("path", "body", "answer", "nanousd", "columns"), CASES)
async def test_a_real_usage_object_costs_its_list_price_to_the_nano_dollar(
    make_gateway: GatewayFactory,
    canned: RawUpstream,
    path: str,
    body: dict,
    answer: dict,
    nanousd: int,
    columns: dict,
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    canned.answers.append(("application/json", orjson.dumps(answer)))
    client = gateway.client()
    resource = {
        "/chat/completions": client.chat.completions,
        "/responses": client.responses,
        "/embeddings": client.embeddings,
    }[path]
    response = await resource.with_raw_response.create(**body)
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["cost_nanousd"], row["price_unknown"], row["tokens_estimated"]) == (nanousd, 0, 0)
    assert {name: row[name] for name in columns} == columns
    assert row["pricing_hash"] == gateway.config.team_prices("research").content_hash


async def test_transcriptions_are_priced_by_their_seconds_or_their_audio_tokens(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    client = gateway.client()
    canned.answers += [
        ("application/json", orjson.dumps(
            {"text": "hi", "usage": {"type": "duration", "seconds": 90}}
        )),
        ("application/json", orjson.dumps(
            {"text": "hi", "usage": {"type": "tokens", "input_tokens": 1000,
                                     "input_token_details": {"text_tokens": 100,
                                                             "audio_tokens": 900},
                                     "output_tokens": 50, "total_tokens": 1050}}
        )),
    ]  # fmt: skip
    rows = []
    for model in ("whisper-1", "gpt-4o-transcribe"):
        response = await client.audio.transcriptions.with_raw_response.create(
            model=model, file=("a.wav", b"RIFF" + b"\0" * 400)
        )
        rows.append(await gateway.row(response.headers["x-gateway-request-id"]))
    whisper, tokens = rows
    assert (whisper["audio_seconds"], whisper["cost_nanousd"]) == (90.0, 9_000_000)
    assert (tokens["audio_input_tokens"], tokens["input_tokens"], tokens["output_tokens"]) == (
        900,
        1000,
        50,
    )
    assert tokens["cost_nanousd"] == 100 * 2_500 + 900 * 6_000 + 50 * 10_000


async def test_speech_is_priced_by_the_characters_of_its_input(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    canned.answers.append(("audio/mpeg", b"ID3" + b"\0" * 2000))
    response = await gateway.client().audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="héllo world"
    )
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["input_characters"], row["cost_nanousd"], row["price_unknown"]) == (
        11,
        11 * 15_000,
        0,
    )


async def test_a_model_unknown_to_the_database_is_estimated_from_its_family_and_flagged(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    canned.answers.append(("application/json", orjson.dumps(chat(
        "gpt-5-acme-preview", {"prompt_tokens": 1000, "completion_tokens": 100}
    ))))  # fmt: skip
    response = await gateway.client().chat.completions.with_raw_response.create(
        model="gpt-5-acme-preview", messages=[{"role": "user", "content": "hi"}]
    )
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["cost_nanousd"], row["price_unknown"]) == (1000 * 1250 + 100 * 10_000, 1)


async def test_reject_refuses_an_unpriced_model_before_forwarding_it(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(
        teams=TEAM,
        upstream_url=canned.base_url,
        pricing="\n  table: builtin\n  unknown_model: reject\n",
    )
    client = gateway.client()
    with pytest.raises(Exception) as caught:
        await client.chat.completions.create(
            model="acme-9000", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 400  # type: ignore[attr-defined]
    assert caught.value.code == "model_not_priced"  # type: ignore[attr-defined]
    assert canned.requests == []
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.id == "chatcmpl-raw"


async def test_an_image_generation_is_priced_by_its_text_and_image_tokens(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    canned.answers.append(("application/json", orjson.dumps({
        "created": 1,
        "data": [{"b64_json": "aGVsbG8="}],
        "usage": {"total_tokens": 4310, "input_tokens": 150, "output_tokens": 4160,
                  "input_tokens_details": {"text_tokens": 50, "image_tokens": 100}},
    })))  # fmt: skip
    response = await gateway.client().images.with_raw_response.generate(
        model="gpt-image-1", prompt="a cat"
    )
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["input_tokens"], row["image_input_tokens"], row["output_tokens"]) == (
        150,
        100,
        4160,
    )
    assert (row["image_output_tokens"], row["price_unknown"]) == (4160, 0)
    assert row["cost_nanousd"] == 50 * 5_000 + 100 * 10_000 + 4160 * 40_000


async def test_unpriced_calls_are_counted_and_the_invoice_shows_the_units_they_used(
    make_gateway: GatewayFactory, canned: RawUpstream
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    client = gateway.client()
    canned.answers += [
        ("application/json", orjson.dumps(chat(
            "gpt-5-acme-preview", {"prompt_tokens": 10, "completion_tokens": 1}
        ))),
        ("application/json", orjson.dumps(CASES[4].values[2])),  # two web searches
    ]  # fmt: skip
    await client.chat.completions.create(
        model="gpt-5-acme-preview", messages=[{"role": "user", "content": "hi"}]
    )
    await client.responses.create(**CASES[4].values[1])
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/metrics"))) as answer,
    ):
        metrics = await answer.text()
    # The acme model is neither priced itself nor allow-listed: its label is `other`.
    assert 'gateway_unpriced_calls_total{model="other",team="research"} 1.0' in metrics
    await gateway.rows()
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = await build_invoice(
        SqliteReader(gateway.ledger_path), gateway.config, "research", month
    )
    lines = {line["model"]: line for line in invoice["lines"]}
    assert lines["gpt-5.1"]["web_search_calls"] == 2
    assert lines["gpt-5-acme-preview"]["web_search_calls"] == 0
    assert "audio_seconds" not in lines["gpt-5.1"]  # units no call used stay out


def sse(*events: dict, framing: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + orjson.dumps(event) + framing for event in events)


async def post_stream(gateway: Gateway, path: str, body: dict) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            str(gateway.server.make_url("/v1" + path)),
            json=body,
            headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
        ) as answer,
    ):
        await answer.read()
        request_id = answer.headers["x-gateway-request-id"]
    return await gateway.row(request_id)


@pytest.mark.parametrize("framing", [b"\n\n", b"\r\n\r\n"])
async def test_streams_are_priced_from_their_final_usage_and_tier(
    make_gateway: GatewayFactory, canned: RawUpstream, framing: bytes
):
    gateway = await make_gateway(teams=TEAM, upstream_url=canned.base_url, pricing=None)
    response = {
        "id": "resp_s", "object": "response", "status": "incomplete", "model": "gpt-5",
        "service_tier": "flex", "output": [{"type": "file_search_call", "id": "fs_1"}],
        "usage": {"input_tokens": 4000, "input_tokens_details": {"cached_tokens": 2000},
                  "output_tokens": 800, "output_tokens_details": {"reasoning_tokens": 600}},
    }  # fmt: skip
    canned.answers += [
        ("text/event-stream", sse(
            {"type": "response.created", "response": {**response, "usage": None}},
            {"type": "response.output_text.delta", "delta": "x"},
            {"type": "response.incomplete", "response": response},
            framing=framing,
        )),
        ("text/event-stream", sse(
            {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
             "service_tier": "default", "choices": [{"index": 0, "delta": {"content": "x"}}]},
            {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
             "service_tier": "default", "choices": [],
             "usage": {"prompt_tokens": 1000, "completion_tokens": 10,
                       "prompt_tokens_details": {"cached_tokens": 500}}},
            framing=framing,
        ) + b"data: [DONE]" + framing),
    ]  # fmt: skip
    responses = await post_stream(
        gateway, "/responses", {"model": "gpt-5", "input": "x", "stream": True}
    )
    flex = {"input": 625, "cached": 62.5, "output": 5_000}  # nano-USD per token, flex
    assert (responses["service_tier"], responses["file_search_calls"]) == ("flex", 1)
    assert responses["cost_nanousd"] == round(
        2000 * flex["input"] + 2000 * flex["cached"] + 800 * flex["output"] + 2_500_000
    )
    chat_row = await post_stream(
        gateway,
        "/chat/completions",
        {"model": "gpt-4o-mini", "stream": True,
         "messages": [{"role": "user", "content": "hi"}]},
    )  # fmt: skip
    assert (chat_row["service_tier"], chat_row["cached_input_tokens"]) == ("default", 500)
    assert chat_row["cost_nanousd"] == 500 * 150 + 500 * 75 + 10 * 600


def test_a_batch_row_is_repriced_at_the_databases_batch_price_to_the_nano_dollar(
    tmp_path: Path,
):
    from tests.test_invoice import rows, write_config, write_ledger

    config_path = write_config(tmp_path)
    config = load_config(config_path)
    # Batch API usage, as issue "Every OpenAI surface" records it: batch = 1. gpt-4o-mini's
    # batch price is half its list price: 0.075 input / 0.30 output per 1M tokens.
    batch = rows("usage", 1, 1, input_tokens=10_001, output_tokens=333)
    batch[0].request_id, batch[0].batch = "batch-row", 1
    standard = rows("usage", 1, 1, input_tokens=10_001, output_tokens=333)
    asyncio.run(write_ledger(config.storage.sqlite_path, batch + standard))
    subprocess.run(
        [sys.executable, "-m", "gateway", "reprice", "--config", str(config_path),
         "--since", "2026-11-01", "--pricing", "builtin"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    with sqlite3.connect(config.storage.sqlite_path) as db:
        costs = dict(db.execute("SELECT request_id, cost_nanousd FROM requests"))
    # The config's team `usage` carries its own transfer and per-request fees (never halved).
    table_fees = costs["usage-200-0-0"] - (10_001 * 150 + 333 * 600)
    # 10,001 × 75 + 333 × 300 = 850,075 nano-USD; exact, so no rounding.
    assert costs["batch-row"] - table_fees == 10_001 * 75 + 333 * 300

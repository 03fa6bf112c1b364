"""The portal's JSON answers (SPEC "The developer portal"): usage per model, the latest calls
with paging, the invoice as JSON and CSV, refusals by limit and the prices in force — each
compared with the ledger (or the `invoice` command) value for value."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, Gateway, GatewayFactory, sha

ADMIN_KEY = "mgw-portal-admin-secret"
LIMITED_KEY = "mgw-portal-limited"
TEAMS = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
  product:
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
  interns:
    limits: {{requests_per_minute: 1}}
    keys:
      - id: intern-laptop
        sha256: {sha(LIMITED_KEY)}
"""


@pytest.fixture(autouse=True)
def _admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)


async def get(gateway: Gateway, path: str, key: str, **query: Any) -> tuple[int, Any, Any]:
    url = str(gateway.server.make_url(path))
    async with aiohttp.ClientSession() as http:
        answer = await http.get(url, params=query, headers={"Authorization": f"Bearer {key}"})
        body = await (answer.json() if answer.content_type == "application/json" else answer.text())
        return answer.status, body, answer.headers


async def traffic(gateway: Gateway) -> None:
    research, product = gateway.client(RESEARCH_KEY), gateway.client(PRODUCT_KEY)
    for n in range(4):
        await research.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"secret prompt {n}"}]
        )
    await research.embeddings.create(model="text-embedding-3-small", input="one two")
    await product.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )


async def test_the_latest_calls_come_newest_first_a_page_at_a_time_as_the_ledger_has_them(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=TEAMS)
    await traffic(gateway)
    rows = sorted(await gateway.rows(), key=lambda r: (r["started_at"], r["request_id"]))
    own = [r for r in rows if r["key_id"] == "research-dev"][::-1]

    pages, before = [], None
    while True:
        query = {"limit": "2"} | ({"before": before} if before else {})
        status, body, _ = await get(gateway, "/gateway/me/calls", RESEARCH_KEY, **query)
        assert status == 200
        pages.append([call["request_id"] for call in body["data"]])
        if not body["has_more"]:
            break
        before = body["data"][-1]["request_id"]
    assert pages == [[r["request_id"] for r in own[i : i + 2]] for i in (0, 2, 4)]

    status, body, _ = await get(gateway, "/gateway/me/calls", RESEARCH_KEY)
    fields = ["request_id", "started_at", "path", "model", "stream", "status", "outcome",
              "error_code", "input_tokens", "output_tokens", "cost_nanousd", "latency_ms",
              "ttfb_ms"]  # fmt: skip
    assert body == {"data": [{f: r[f] for f in fields} for r in own], "has_more": False}
    assert "secret prompt" not in str(body)

    # The admin sees every call, with its team and key; a team filter narrows it.
    status, body, _ = await get(gateway, "/gateway/me/calls", ADMIN_KEY, team="product")
    assert [(c["team"], c["key_id"], c["model"]) for c in body["data"]] == [
        ("product", "product-web", "gpt-4o-mini")
    ]
    status, body, _ = await get(gateway, "/gateway/me/calls", ADMIN_KEY, limit="500")
    assert len(body["data"]) == len(rows)

    # Another key's request id is no cursor for this key; limits are bounded.
    product_id = next(r["request_id"] for r in rows if r["key_id"] == "product-web")
    status, body, _ = await get(gateway, "/gateway/me/calls", RESEARCH_KEY, before=product_id)
    assert (status, body["error"]["param"]) == (400, "before")
    status, body, _ = await get(gateway, "/gateway/me/calls", RESEARCH_KEY, limit="501")
    assert (status, body["error"]["param"]) == (400, "limit")
    status, body, _ = await get(gateway, "/gateway/me/calls", "mgw-nobody")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_usage_per_model_for_a_key_and_per_team_key_and_model_for_the_admin(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=TEAMS)
    await traffic(gateway)
    rows = await gateway.rows()
    start = int(min(r["started_at"] for r in rows)) // 86400 * 86400

    status, body, _ = await get(
        gateway, "/gateway/me/usage", RESEARCH_KEY, start_time=str(start), group_by="model"
    )
    assert status == 200
    (bucket,) = [b for b in body["data"] if b["requests"]]
    own = [r for r in rows if r["key_id"] == "research-dev"]
    assert bucket["requests"] == len(own) == 5
    assert bucket["cost_nanousd"] == sum(r["cost_nanousd"] for r in own)
    latencies = sorted(r["latency_ms"] for r in own)
    assert bucket["latency_p50_ms"] == round(latencies[2], 3)  # nearest rank: the 3rd of 5
    assert bucket["latency_p95_ms"] == round(latencies[4], 3)
    by_model = {r["model"]: r for r in bucket["results"]}
    assert sorted(by_model) == ["gpt-4o-mini", "text-embedding-3-small"]
    for model, result in by_model.items():
        mine = [r for r in own if r["model"] == model]
        assert (result["requests"], result["input_tokens"], result["output_tokens"],
                result["cost_nanousd"]) == (
            len(mine), sum(r["input_tokens"] for r in mine),
            sum(r["output_tokens"] for r in mine), sum(r["cost_nanousd"] for r in mine),
        )  # fmt: skip

    status, body, _ = await get(gateway, "/gateway/me/usage", RESEARCH_KEY,
                                start_time=str(start), group_by="team")  # fmt: skip
    assert (status, body["error"]["param"]) == (400, "group_by")

    status, body, _ = await get(gateway, "/gateway/me/usage", ADMIN_KEY, start_time=str(start),
                                group_by="team,key,model")  # fmt: skip
    (bucket,) = [b for b in body["data"] if b["requests"]]
    assert body["key_id"] is None
    assert sorted((r["team"], r["key"], r["model"], r["requests"]) for r in bucket["results"]) == [
        ("product", "product-web", "gpt-4o-mini", 1),
        ("research", "research-dev", "gpt-4o-mini", 4),
        ("research", "research-dev", "text-embedding-3-small", 1),
    ]
    assert bucket["cost_nanousd"] == sum(r["cost_nanousd"] for r in rows)


async def test_the_invoice_as_json_and_csv_is_what_the_invoice_command_prints(
    make_gateway: GatewayFactory, tmp_path
) -> None:
    gateway = await make_gateway(teams=TEAMS)
    await traffic(gateway)
    month = datetime.now(UTC).strftime("%Y-%m")

    status, document, _ = await get(gateway, "/gateway/me/invoice", RESEARCH_KEY)
    assert status == 200 and document["team"] == "research" and document["month"] == month
    status, csv_text, headers = await get(gateway, "/gateway/me/invoice", RESEARCH_KEY,
                                          month=month, format="csv")  # fmt: skip
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert headers["Content-Disposition"] == f'attachment; filename="invoice-research-{month}.csv"'
    await gateway.rows()  # flushed
    config = tmp_path / "gateway-0.yaml"
    printed = {}
    for fmt in ("json", "csv"):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "invoice", "--config", str(config), "--team",
             "research", "--month", month, "--format", fmt],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        printed[fmt] = done.stdout
    assert document == json.loads(printed["json"])
    assert csv_text == printed["csv"]
    assert document["total_nanousd"] == sum(
        r["cost_nanousd"] for r in await gateway.rows() if r["team"] == "research"
    )

    status, body, _ = await get(gateway, "/gateway/me/invoice", RESEARCH_KEY, month="2026-13")
    assert (status, body["error"]["param"]) == (400, "month")
    status, body, _ = await get(gateway, "/gateway/me/invoice", ADMIN_KEY)
    assert (status, body["error"]["param"]) == (400, "team")
    status, body, _ = await get(gateway, "/gateway/me/invoice", ADMIN_KEY, team="product")
    assert (status, body["team"]) == (200, "product")


async def test_the_admin_sees_which_limits_refuse_calls_and_the_prices_in_force(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=TEAMS)
    interns = gateway.client(LIMITED_KEY)
    first = [{"role": "user", "content": "a"}]
    await interns.chat.completions.create(model="gpt-4o-mini", messages=first)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            await interns.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}]
            )
    start = str(int(time.time()) - 60)

    status, body, _ = await get(gateway, "/gateway/refusals", ADMIN_KEY, start_time=start)
    assert status == 200
    assert body == {"data": [{"team": "interns", "key_id": "intern-laptop",
                              "rejected_by": "requests_per_minute",
                              "error_code": "rate_limit_exceeded", "status": 429,
                              "refused": 2}]}  # fmt: skip
    rows = await gateway.rows()
    assert [r["rejected_by"] for r in rows] == [None, "requests_per_minute", "requests_per_minute"]
    status, body, _ = await get(gateway, "/gateway/refusals", RESEARCH_KEY, start_time=start)
    assert (status, body["error"]["code"]) == (401, "invalid_admin_key")

    status, body, _ = await get(gateway, "/gateway/prices", ADMIN_KEY)
    entries = {entry["model"]: entry for entry in body["data"]}
    assert entries["gpt-4o-mini"]["usd_per_million"]["input"] == 0.15
    assert entries["gpt-4o-mini"]["usd_per_million"]["output"] == 0.6
    assert entries["text-embedding-3-small"]["usd_per_million"]["input"] == 0.02
    status, body, _ = await get(gateway, "/gateway/prices", PRODUCT_KEY)
    assert status == 401

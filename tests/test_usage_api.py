"""Self-service and admin usage: /gateway/me, /gateway/usage, and OpenAI's organization usage
and costs APIs (through the official SDK's admin client) agree with the ledger exactly."""

from __future__ import annotations

import time

import aiohttp
import openai
import pytest

from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, Gateway, sha

ADMIN_KEY = "mgw-admin-test-secret"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
TEAMS = f"""
  research:
    limits: {{requests_per_minute: 50, requests_per_day: 100, spend_per_day_usd: 1}}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
        expires: 2999-01-01
        limits: {{requests_per_day: 10}}
  product:
    billing: {{plan: per_request, rate_usd: 0.01}}
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""


@pytest.fixture(autouse=True)
def _admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)


@pytest.fixture
async def traffic(make_gateway) -> Gateway:
    gateway = await make_gateway(teams=TEAMS)
    research, product = gateway.client(RESEARCH_KEY), gateway.client(PRODUCT_KEY)
    for _ in range(3):
        await research.chat.completions.create(**CHAT)
    await research.embeddings.create(model="text-embedding-3-small", input="a b c")
    for _ in range(2):
        await product.chat.completions.create(**CHAT, extra_headers={"x-fake-cached-tokens": "2"})
    with pytest.raises(openai.InternalServerError):
        await product.chat.completions.create(**CHAT, extra_headers={"x-fake-fault": "status=500"})
    await gateway.rows()
    return gateway


async def get(gateway: Gateway, path: str, key: str | None, **params) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url(path)), params=params, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_me_shows_own_team_limits_and_spend(traffic: Gateway):
    status, me = await get(traffic, "/gateway/me", RESEARCH_KEY)
    assert status == 200
    assert (me["team"], me["key_id"], me["expires"], me["plan"]) == (
        "research", "research-dev", "2999-01-01", "usage",
    )  # fmt: skip
    assert me["days_left"] > 300_000
    limits = me["limits"]
    assert set(limits) == {"requests_per_minute", "requests_per_day", "spend_per_day_usd"}
    # the key's own daily limit (10) is tighter than the team's (100)
    assert {k: limits["requests_per_day"][k] for k in ("limit", "used", "remaining")} == {
        "limit": 10, "used": 4, "remaining": 6,
    }  # fmt: skip
    assert limits["requests_per_minute"]["limit"] == 50
    assert limits["requests_per_minute"]["remaining"] in (46, 47)
    chat_cost = 7 * 150 + 12 * 600
    spent = (3 * chat_cost + 3 * 20) / 1e9
    assert limits["spend_per_day_usd"]["used"] == spent
    assert limits["requests_per_day"]["resets_at"].endswith("T00:00:00Z")
    assert me["spend_usd"] == {"today": spent, "month": spent}


async def test_me_needs_a_valid_key(traffic: Gateway):
    status, body = await get(traffic, "/gateway/me", "mgw-nobody")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, other = await get(traffic, "/gateway/me", PRODUCT_KEY)
    assert (other["team"], other["plan"], other["limits"]) == ("product", "per_request", {})


@pytest.mark.parametrize(
    "path", ["/gateway/usage", "/v1/organization/usage/completions", "/v1/organization/costs"]
)
@pytest.mark.parametrize("key", [None, "wrong-admin", RESEARCH_KEY])
async def test_admin_endpoints_refuse_without_the_admin_key(traffic: Gateway, path, key):
    status, body = await get(traffic, path, key, start_time=0)
    assert status == 401
    assert body["error"]["code"] == "invalid_admin_key"


async def test_sdk_admin_usage_completions_match_the_ledger(traffic: Gateway):
    admin = openai.AsyncOpenAI(
        admin_api_key=ADMIN_KEY, api_key="unused", base_url=traffic.base_url, max_retries=0
    )
    start = int(time.time()) // 86400 * 86400
    page = await admin.admin.organization.usage.completions(
        start_time=start, group_by=["project_id", "model"], bucket_width="1d"
    )
    assert page.object == "page" and page.has_more is False and len(page.data) == 1
    results = {r.project_id: r for r in page.data[0].results}
    assert set(results) == {"research", "product"}  # embeddings are not completions
    research, product = results["research"], results["product"]
    assert (research.num_model_requests, research.input_tokens, research.output_tokens) == (
        3, 21, 36,
    )  # fmt: skip
    assert (product.num_model_requests, product.input_cached_tokens) == (2, 4)
    assert research.model == "gpt-4o-mini" and research.api_key_id is None
    await admin.close()


async def test_sdk_admin_costs_match_the_ledger(traffic: Gateway):
    admin = openai.AsyncOpenAI(
        admin_api_key=ADMIN_KEY, api_key="unused", base_url=traffic.base_url, max_retries=0
    )
    start = int(time.time()) // 86400 * 86400
    page = await admin.admin.organization.usage.costs(
        start_time=start, group_by=["project_id", "line_item"]
    )
    amounts = {
        (r.project_id, r.line_item): (r.amount.value, r.amount.currency)
        for r in page.data[0].results
    }
    chat = 7 * 150 + 12 * 600
    cached_chat = 5 * 150 + 2 * 75 + 12 * 600
    assert amounts == {
        ("product", "gpt-4o-mini"): (2 * cached_chat / 1e9, "usd"),
        ("research", "gpt-4o-mini"): (3 * chat / 1e9, "usd"),
        ("research", "text-embedding-3-small"): (3 * 20 / 1e9, "usd"),
    }
    rows = await traffic.rows()
    assert sum(r["cost_nanousd"] for r in rows) == 2 * cached_chat + 3 * chat + 60
    await admin.close()


async def test_gateway_usage_groups_errors_bytes_and_latency(traffic: Gateway):
    start = int(time.time()) // 3600 * 3600
    status, body = await get(
        traffic, "/gateway/usage", ADMIN_KEY, start_time=start, bucket_width="1h",
        group_by="team,model",
    )  # fmt: skip
    assert status == 200
    results = {(r["team"], r["model"]): r for r in body["data"][0]["results"]}
    rows = await traffic.rows()
    product = results[("product", "gpt-4o-mini")]
    product_rows = [r for r in rows if r["team"] == "product"]
    assert (product["requests"], product["errors"]) == (3, 1)
    assert product["request_bytes"] == sum(r["request_bytes"] for r in product_rows)
    assert product["response_bytes"] == sum(r["response_bytes"] for r in product_rows)
    latencies = sorted(r["latency_ms"] for r in product_rows)
    assert product["latency_p50_ms"] == round(latencies[1], 3)
    assert product["latency_p95_ms"] == round(latencies[2], 3)
    assert product["cost_usd"] == "0.0000162"


async def test_pagination_walks_every_bucket_once(traffic: Gateway):
    end = int(time.time()) // 3600 * 3600 + 3600
    start = end - 30 * 3600
    seen, page, pages = [], None, 0
    while True:
        params = {"start_time": start, "end_time": end, "bucket_width": "1h", "limit": 24}
        if page:
            params["page"] = page
        status, body = await get(traffic, "/v1/organization/usage/completions", ADMIN_KEY,
                                 **params)  # fmt: skip
        assert status == 200
        pages += 1
        seen += [bucket["start_time"] for bucket in body["data"]]
        page = body["next_page"]
        if not body["has_more"]:
            break
    assert pages == 2
    assert seen == list(range(start, end, 3600))
    requests = sum(r["num_model_requests"] for bucket in body["data"] for r in bucket["results"])
    assert requests == 5


async def test_bad_query_is_a_400_naming_the_parameter(traffic: Gateway):
    status, body = await get(traffic, "/gateway/usage", ADMIN_KEY, start_time="yesterday")
    assert status == 400 and body["error"]["param"] == "start_time"
    status, body = await get(
        traffic, "/v1/organization/costs", ADMIN_KEY, start_time=0, bucket_width="1h"
    )
    assert status == 400 and body["error"]["param"] == "bucket_width"


async def test_metrics_agree_with_the_ledger(traffic: Gateway):
    from datetime import UTC, date, datetime

    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as http,
        http.get(str(traffic.server.make_url("/metrics"))) as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    rows = await traffic.rows()
    research = {"team": "research", "model": "gpt-4o-mini"}
    assert value("gateway_requests_total", **research, status="200", outcome="ok") == 3
    assert value("gateway_requests_total", team="product", model="gpt-4o-mini", status="500",
                 outcome="upstream_error") == 1  # fmt: skip
    assert value("gateway_tokens_total", **research, kind="input") == 21
    assert value("gateway_tokens_total", **research, kind="output") == 36
    assert value("gateway_cost_usd_total", **research) == 3 * 8250 / 1e9
    product_rows = [r for r in rows if r["team"] == "product"]
    assert value("gateway_body_bytes_total", team="product", direction="out") == sum(
        r["response_bytes"] for r in product_rows
    )
    assert value("gateway_request_duration_seconds_count", team="product") == 3
    assert value("gateway_in_flight") == 0
    assert value("gateway_ledger_pending_rows") == 0
    left = (date(2999, 1, 1) - datetime.now(UTC).date()).days
    assert value("gateway_key_days_left", team="research", key="research-dev") == left

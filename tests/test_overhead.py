"""The gateway's own time per call, for production: the ledger's `upstream_ms` (request sent
upstream to its answer's last byte) and the `gateway_overhead_seconds` histogram (a call's
time minus that), per team."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
SLOW = {"x-fake-fault": "latency_ms=150"}


async def overhead(gateway: Gateway) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/metrics"))) as response,
    ):
        text = await response.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_overhead_seconds":
            for sample in family.samples:
                if sample.labels["team"] == "research" and "le" not in sample.labels:
                    found[sample.name.removeprefix("gateway_overhead_seconds_")] = sample.value
    return found


async def test_upstream_time_and_the_gateways_own_time_per_call(make_gateway):
    gateway = await make_gateway()
    client = gateway.client()
    whole = await client.chat.completions.with_raw_response.create(**CHAT, extra_headers=SLOW)
    stream = await client.chat.completions.with_raw_response.create(
        **CHAT, stream=True, extra_headers=SLOW
    )
    async for _ in stream.parse():
        pass
    with pytest.raises(openai.AuthenticationError):
        await gateway.client("mgw-not-a-key").chat.completions.create(**CHAT)

    rows = {r["request_id"]: r for r in await gateway.rows()}
    calls = [rows[r.headers["x-gateway-request-id"]] for r in (whole, stream)]
    for row in calls:
        # The fake waits 150 ms before answering: that time is the upstream's, not ours.
        assert 150 <= row["upstream_ms"] <= row["latency_ms"]
    refused = [r for r in rows.values() if r["status"] == 401]
    assert [r["upstream_ms"] for r in refused] == [None]  # never forwarded

    observed = await overhead(gateway)
    assert observed["count"] == 2  # the two forwarded calls, not the refused one
    expected = sum((r["latency_ms"] - r["upstream_ms"]) / 1000 for r in calls)
    assert observed["sum"] == pytest.approx(expected, abs=1e-9)
    assert observed["sum"] < 0.15  # the gateway's own part is well under the upstream's wait


async def test_a_client_gone_before_a_streams_head_is_a_disconnect_not_a_fault(
    make_gateway, monkeypatch: pytest.MonkeyPatch
):
    # What wrk's stop does to streams in flight: the transport is closing when the gateway
    # writes the answer's head.
    prepare = web.StreamResponse.prepare

    gateway = await make_gateway()

    async def closing(self, request):  # type: ignore[no-untyped-def]
        if type(self) is web.StreamResponse and request.app is gateway.app:  # not the fake's
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", closing)
    with pytest.raises(openai.APIConnectionError):
        await gateway.client().chat.completions.create(**CHAT, stream=True)
    monkeypatch.setattr(web.StreamResponse, "prepare", prepare)
    [row] = await gateway.rows()
    assert (row["status"], row["outcome"], row["error_code"]) == (200, "client_disconnect", None)
    assert (row["response_bytes"], row["ttfb_ms"]) == (0, None)

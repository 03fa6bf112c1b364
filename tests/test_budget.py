"""Budgets enforced during a stream: with `cut`, a stream that crosses the team's daily token
budget ends at it with an `insufficient_quota` event and [DONE], billed for exactly what the
client received; with `finish` (the default) it completes and later calls are refused."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from gateway.metering import tokens
from tests.conftest import RESEARCH_KEY, Gateway, sha

PROMPT = [{"role": "user", "content": "say hello to me"}]
LONG = {"x-fake-reply-words": "100"}


def team(mode: str, limits: str = "{tokens_per_day: 40}") -> str:
    return f"""
  research:
    on_budget_exhausted_mid_stream: {mode}
    limits: {limits}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""


async def raw_stream(gateway: Gateway) -> list[bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": PROMPT, "stream": True},
            headers={"Authorization": f"Bearer {RESEARCH_KEY}", **LONG},
        ) as response,
    ):
        assert response.status == 200
        body = await response.read()
    return [event for event in body.split(b"\n\n") if event]


def delivered_text(events: list[bytes]) -> str:
    text = []
    for event in events:
        payload = event.removeprefix(b"data: ")
        if payload == b"[DONE]":
            continue
        chunk = orjson.loads(payload)
        for choice in chunk.get("choices", []):
            text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def test_cut_ends_the_stream_at_the_budget_and_bills_what_was_delivered(make_gateway):
    gateway = await make_gateway(teams=team("cut"))
    events = await raw_stream(gateway)
    assert events[-1] == b"data: [DONE]"
    error = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    text = delivered_text(events[:-2])
    prompt = tokens.estimate_prompt_tokens("/v1/chat/completions", {"messages": PROMPT})
    allowed = 40 - prompt  # the day's whole budget, less the prompt
    delivered = tokens.count_text("gpt-4o-mini", text)
    assert allowed - 2 <= delivered <= allowed  # ended within one chunk of the budget
    assert len(text.split()) < 100
    row = (await gateway.rows())[-1]
    assert (row["input_tokens"], row["output_tokens"], row["tokens_estimated"]) == (
        prompt, delivered, 1,
    )  # fmt: skip
    assert row["cost_nanousd"] == prompt * 150 + delivered * 600
    assert row["error_code"] == "insufficient_quota_mid_stream"
    assert row["status"] == 200
    with pytest.raises(openai.RateLimitError) as refused:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert refused.value.code == "insufficient_quota"


async def test_the_sdk_sees_a_clean_error_at_the_cut(make_gateway):
    gateway = await make_gateway(teams=team("cut"))
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=PROMPT, stream=True, extra_headers=LONG
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert "budget" in str(caught.value)
    assert 0 < len("".join(received).split()) < 100


async def test_finish_lets_the_stream_complete_and_refuses_the_next_call(make_gateway):
    gateway = await make_gateway(teams=team("finish"))
    events = await raw_stream(gateway)
    assert events[-1] == b"data: [DONE]"
    assert len(delivered_text(events).split()) == 100
    row = (await gateway.rows())[-1]
    assert (row["output_tokens"], row["tokens_estimated"]) == (100, 0)  # the upstream's usage
    with pytest.raises(openai.RateLimitError):
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=PROMPT)


async def test_spend_budget_cuts_too(make_gateway):
    # 0.00002 USD: prompt 11 × 150 = 1,650 nano, then 600 nano per output token → 30 tokens
    gateway = await make_gateway(teams=team("cut", "{spend_per_day_usd: 0.00002}"))
    events = await raw_stream(gateway)
    assert b"insufficient_quota" in events[-2]
    row = (await gateway.rows())[-1]
    assert row["cost_nanousd"] <= 20_000
    assert row["output_tokens"] >= 28

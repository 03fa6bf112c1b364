"""Upstream-aware pacing: the shared key's own limit (the upstream's x-ratelimit headers)
holds queued calls until its reset, and a queueing team waits out an upstream 429 once."""

from __future__ import annotations

import asyncio

import openai
import pytest

from gateway.upstream.pacing import UpstreamPacer, parse_reset
from tests.conftest import RESEARCH_KEY, Fake, direct_client, sha

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}


def team(on_limit: str, limits: str = "") -> str:
    return f"""
  research:
    on_limit: {on_limit}
    queue: {{max_wait_s: 10, max_depth: 50}}
    {f"limits: {limits}" if limits else ""}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""


async def call(client: openai.AsyncOpenAI) -> int:
    try:
        await client.chat.completions.create(**CHAT)
        return 200
    except openai.APIStatusError as error:
        return error.status_code


@pytest.mark.parametrize(
    ("text", "seconds"), [("20ms", 0.02), ("1s", 1.0), ("6m0s", 360.0), ("1h2m3.5s", 3723.5)]
)
def test_openai_reset_durations_parse(text, seconds):
    assert parse_reset(text) == pytest.approx(seconds)


def test_pacer_counts_calls_still_on_their_way():
    now = [100.0]
    pacer = UpstreamPacer(clock=lambda: now[0])
    assert pacer.wait_needed() == 0  # nothing known yet
    assert pacer.wait_needed() == 0
    pacer.answered(
        {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
         "x-ratelimit-reset-requests": "2s"}
    )  # fmt: skip
    # the upstream said 2 left, but one call of ours is still on its way: 1 left
    assert pacer.remaining == 1
    assert pacer.wait_needed() == 0
    assert pacer.wait_needed() == pytest.approx(2.05)
    now[0] = 102.1
    assert pacer.wait_needed() == 0 and pacer.remaining == 2  # the limit again after the reset


async def test_queued_calls_wait_for_the_upstream_reset_and_none_meets_its_429(
    fake: Fake, make_gateway
):
    fake.state.faults.update({"org_requests": "3", "org_window_s": "1.5"})
    gateway = await make_gateway(teams=team("queue"))
    client = gateway.client()
    assert await call(client) == 200  # the gateway learns the upstream's budget
    statuses = await asyncio.gather(*(call(client) for _ in range(7)))
    assert statuses == [200] * 7
    assert fake.state.org_rejections == 0
    rows = await gateway.rows()
    assert sum(1 for row in rows if row["queued_ms"] > 500) >= 4  # waited for a reset


async def test_rejecting_teams_get_the_upstreams_429_passed_through(fake: Fake, make_gateway):
    fake.state.faults.update({"org_requests": "3", "org_window_s": "5"})
    gateway = await make_gateway(teams=team("reject"))
    client = gateway.client()
    statuses = await asyncio.gather(*(call(client) for _ in range(5)))
    assert sorted(statuses) == [200, 200, 200, 429, 429]
    assert fake.state.org_rejections == 2


async def test_a_queueing_team_waits_out_an_upstream_429_once(fake: Fake, make_gateway):
    fake.state.faults.update({"org_requests": "3", "org_window_s": "1.5"})
    gateway = await make_gateway(teams=team("queue"))
    direct = direct_client(fake)
    for _ in range(3):  # another user of the same key spends the upstream's whole window
        await direct.chat.completions.create(**CHAT)
    await direct.close()
    # the gateway has seen no headers yet: its call meets the 429, waits it out, succeeds
    assert await call(gateway.client()) == 200
    assert fake.state.org_rejections == 1
    rows = await gateway.rows()
    assert [row["status"] for row in rows] == [200]
    assert rows[0]["queued_ms"] == 0 and rows[0]["latency_ms"] >= 1000


async def test_client_sees_the_tighter_of_gateway_and_upstream_budget(fake: Fake, make_gateway):
    fake.state.faults.update({"org_requests": "3", "org_window_s": "5"})
    gateway = await make_gateway(teams=team("reject", "{requests_per_minute: 100}"))
    response = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
    assert response.headers["x-ratelimit-remaining-requests"] == "2"  # the upstream's
    assert response.headers["x-ratelimit-limit-requests"] == "3"

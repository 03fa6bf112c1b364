"""Limits are exact: rates, quotas, spend and concurrency stop traffic at the boundary, in
reject and in queue mode, and a key is held to its own limits and its team's."""

from __future__ import annotations

import asyncio
import socket
import time

import openai
import pytest

from gateway.app import LIMITER
from gateway.limits.report import format_duration
from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, sha

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
OTHER_KEY = "mgw-test-research-second"


def team(limits: str, on_limit: str = "reject", queue: str = "", key_limits: str = "") -> str:
    return f"""
  research:
    on_limit: {on_limit}
    {f"queue: {queue}" if queue else ""}
    limits: {limits}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
        {f"limits: {key_limits}" if key_limits else ""}
      - id: research-second
        sha256: {sha(OTHER_KEY)}
  product:
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""


async def call(client: openai.AsyncOpenAI, **extra) -> object:
    try:
        return await client.chat.completions.with_raw_response.create(**CHAT, **extra)
    except openai.APIStatusError as error:
        return error


def statuses(results: list) -> list[int]:
    return [
        r.status_code if isinstance(r, openai.APIStatusError) else r.http_response.status_code
        for r in results
    ]


async def test_rate_of_20_per_minute_lets_exactly_20_of_100_concurrent_calls_through(
    make_gateway,
):
    gateway = await make_gateway(teams=team("{requests_per_minute: 20}"))
    client = gateway.client()
    results = await asyncio.gather(*(call(client) for _ in range(100)))
    assert statuses(results).count(200) == 20
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 80
    for error in refused:
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert error.body["type"] == "requests"
        assert int(error.response.headers["retry-after"]) >= 1
        assert "requests_per_minute" in error.message
    rows = await gateway.rows()
    assert [r["outcome"] for r in rows].count("ok") == 20
    assert [r["outcome"] for r in rows].count("rejected") == 80
    assert {r["status"] for r in rows if r["outcome"] == "rejected"} == {429}


async def test_queue_mode_lets_all_through_paced_at_the_rate_and_none_early(make_gateway):
    gateway = await make_gateway(
        teams=team("{requests_per_minute: 120}", "queue", "{max_wait_s: 10, max_depth: 50}")
    )
    client = gateway.client()
    started = time.time()
    results = await asyncio.gather(*(call(client) for _ in range(126)))
    assert statuses(results) == [200] * 126
    rows = await gateway.rows()
    # (admitted, arrived), in seconds after the first call was sent, in order of admission
    moments = sorted(
        (r["started_at"] + r["queued_ms"] / 1000 - started, r["started_at"] - started)
        for r in rows
    )
    queued = moments[120:]
    # 2 per second after the burst of 120: the k-th extra call not before k/2 s, and not
    # later than 1 s after both its arrival and its turn (on a busy machine the burst itself
    # can take seconds to arrive: a call is late only against its own arrival).
    for k, (admitted, arrived) in enumerate(queued, start=1):
        assert admitted >= k * 0.5 - 0.02, (k, admitted)
        assert admitted <= max(arrived, k * 0.5) + 1.0, (k, admitted, arrived)
    # Only the 6 over the burst ever wait (fewer when the burst took long to arrive: the
    # bucket refilled meanwhile); the pacing itself is the lower bound above.
    assert sum(1 for r in rows if r["queued_ms"] > 100) <= 6


async def test_key_and_team_limits_combine_and_the_tighter_wins(make_gateway):
    gateway = await make_gateway(
        teams=team("{requests_per_minute: 5}", key_limits="{requests_per_minute: 2}")
    )
    first = gateway.client(RESEARCH_KEY)
    second = gateway.client(OTHER_KEY)
    assert statuses([await call(first) for _ in range(3)]) == [200, 200, 429]
    assert statuses([await call(second) for _ in range(4)]) == [200, 200, 200, 429]
    assert statuses([await call(gateway.client(PRODUCT_KEY))]) == [200]


async def test_ratelimit_headers_show_the_tighter_per_minute_budget(make_gateway):
    gateway = await make_gateway(
        teams=team(
            "{requests_per_minute: 10, tokens_per_minute: 1000}",
            key_limits="{requests_per_minute: 4}",
        )
    )
    response = await call(gateway.client())
    headers = response.headers
    assert headers["x-ratelimit-limit-requests"] == "4"
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert headers["x-ratelimit-reset-requests"] in ("15s", "14s")
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    # when the headers were written the call held its reservation: body bytes / 4, no max_tokens
    row = await gateway.row(headers["x-gateway-request-id"])
    assert row["request_bytes"] == 80  # the SDK's JSON for this body
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 80 // 4)


async def test_daily_token_quota_stops_at_the_exact_boundary(make_gateway):
    # each call reserves 80 // 4 = 20 (its body bytes / 4) and uses 7 + 12 = 19 as reported
    gateway = await make_gateway(teams=team("{tokens_per_day: 40}"))
    results = [await call(gateway.client()) for _ in range(3)]
    assert statuses(results) == [200, 200, 429]
    assert results[2].code == "insufficient_quota"
    assert "tokens_per_day" in results[2].message
    quota = gateway.app[LIMITER].teams["research"].quotas[0]
    assert quota.used == 38


async def test_daily_spend_cap_refuses_once_spent(make_gateway):
    # each call costs 7·150 + 12·600 = 8250 nano-USD; the cap is 20000
    gateway = await make_gateway(teams=team("{spend_per_day_usd: 0.00002}"))
    results = [await call(gateway.client()) for _ in range(4)]
    assert statuses(results) == [200, 200, 200, 429]
    assert results[3].code == "insufficient_quota"
    assert "spend_per_day_usd" in results[3].message
    rows = await gateway.rows()
    assert sum(r["cost_nanousd"] for r in rows) == 3 * 8250


async def test_daily_byte_quota_counts_both_directions(make_gateway):
    gateway = await make_gateway(teams=team("{bytes_per_day: 1000}"))
    results = [await call(gateway.client()) for _ in range(4)]
    rows = await gateway.rows()
    moved = [r["request_bytes"] + r["response_bytes"] for r in rows if r["outcome"] == "ok"]
    assert statuses(results).count(200) == len(moved)
    assert sum(moved[:-1]) < 1000 <= sum(moved)
    assert statuses(results)[len(moved)] == 429


async def test_concurrency_limit_rejects_the_overflow(make_gateway):
    gateway = await make_gateway(teams=team("{max_concurrent: 2}"))
    slow = {"extra_headers": {"x-fake-fault": "latency_ms=300"}}
    results = await asyncio.gather(*(call(gateway.client(), **slow) for _ in range(5)))
    assert sorted(statuses(results)) == [200, 200, 429, 429, 429]
    assert all(r.code == "rate_limit_exceeded" for r in results if isinstance(r, Exception))
    assert gateway.app[LIMITER].teams["research"].active == 0


async def test_queue_wait_past_max_wait_is_a_429_queue_timeout(make_gateway):
    gateway = await make_gateway(
        teams=team("{max_concurrent: 1}", "queue", "{max_wait_s: 0.3, max_depth: 5}")
    )
    slow = {"extra_headers": {"x-fake-fault": "latency_ms=1000"}}
    results = await asyncio.gather(call(gateway.client(), **slow), call(gateway.client()))
    assert statuses(results) == [200, 429]
    rows = {r["outcome"]: r for r in await gateway.rows()}
    assert rows["queue_timeout"]["status"] == 429
    assert 280 <= rows["queue_timeout"]["queued_ms"] < 900


async def test_full_queue_is_refused_at_once(make_gateway):
    gateway = await make_gateway(
        teams=team("{max_concurrent: 1}", "queue", "{max_wait_s: 5, max_depth: 1}")
    )
    slow = {"extra_headers": {"x-fake-fault": "latency_ms=500"}}
    results = await asyncio.gather(*(call(gateway.client(), **slow) for _ in range(3)))
    assert sorted(statuses(results)) == [200, 200, 429]
    refused = [r for r in results if isinstance(r, Exception)][0]
    assert "full" in refused.message


async def test_client_leaving_the_queue_consumes_nothing(make_gateway):
    gateway = await make_gateway(
        teams=team(
            "{max_concurrent: 1, requests_per_day: 10}", "queue", "{max_wait_s: 5, max_depth: 5}"
        )
    )
    slow = {"extra_headers": {"x-fake-fault": "latency_ms=600"}}
    holder = asyncio.create_task(call(gateway.client(), **slow))
    await asyncio.sleep(0.1)
    waiter = asyncio.create_task(call(gateway.client()))
    await asyncio.sleep(0.2)
    assert len(gateway.app[LIMITER].queues["research"]) == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await holder
    rows = await gateway.rows()
    assert sorted(r["outcome"] for r in rows) == ["client_disconnect", "ok"]
    meter = gateway.app[LIMITER].teams["research"]
    assert meter.quotas[0].used == 1 and meter.active == 0
    assert not gateway.app[LIMITER].queues["research"]


async def test_restart_keeps_the_days_request_count(make_gateway, tmp_path):
    limits = team("{requests_per_day: 5}")
    first = await make_gateway(teams=limits)
    assert statuses([await call(first.client()) for _ in range(3)]) == [200] * 3
    await first.rows()  # flushed to the ledger, as a restart would find it
    second = await make_gateway(teams=limits, ledger_path=first.ledger_path)
    results = [await call(second.client()) for _ in range(3)]
    assert statuses(results) == [200, 200, 429]
    assert results[2].code == "insufficient_quota"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_durations_use_openais_format(seconds, text):
    assert format_duration(seconds) == text


BIG = {"extra_headers": {"x-fake-reply-words": "40"}}


@pytest.mark.parametrize(
    ("limits", "sequence", "expected"),
    [
        (
            "{requests_per_minute: 3, tokens_per_day: 100}",
            [BIG, {}, {}, {}, {}],
            [None, None, None, "requests_per_minute", "requests_per_minute"],
        ),
        (
            "{requests_per_minute: 30, tokens_per_day: 60}",
            [BIG, {}, {}],
            [None, "tokens_per_day", "tokens_per_day"],
        ),
    ],
)
async def test_shadow_mode_refuses_nothing_and_marks_exactly_what_reject_mode_refuses(
    make_gateway, limits, sequence, expected
):
    rejecting = await make_gateway(teams=team(limits))
    shadow = await make_gateway(teams=team(limits).replace("on_limit: reject", "enforce: false"))
    refused = [
        isinstance(await call(rejecting.client(), **extra), openai.APIStatusError)
        for extra in sequence
    ]
    shadowed = [await call(shadow.client(), **extra) for extra in sequence]
    assert statuses(shadowed) == [200] * len(sequence)
    rows = await shadow.rows()
    assert [row["shadow_rejected_by"] for row in rows] == expected
    assert [mark is not None for mark in expected] == refused
    assert all(row["outcome"] == "ok" for row in rows)
    reject_rows = await rejecting.rows()
    assert [row["outcome"] == "rejected" for row in reject_rows] == refused


async def test_report_shows_what_each_limit_would_have_done(make_gateway):
    from gateway.app import LEDGER
    from gateway.billing.reports import ReportQuery, usage_rows

    limits = "{requests_per_minute: 2}"
    shadow = await make_gateway(teams=team(limits).replace("on_limit: reject", "enforce: false"))
    for _ in range(5):
        await call(shadow.client())
    await shadow.rows()
    rows = await usage_rows(shadow.app[LEDGER].reader, ReportQuery(by=["team", "shadow"]))
    assert [(r["shadow"], r["calls"], r["shadow_refused"]) for r in rows] == [
        (None, 2, 0),
        ("requests_per_minute", 3, 3),
    ]


async def test_a_call_the_upstream_never_answered_takes_nothing_from_the_rates(make_gateway):
    closed = socket.socket()  # bound, never listening: every connection is refused
    closed.bind(("127.0.0.1", 0))
    gateway = await make_gateway(
        teams=team("{requests_per_minute: 3, tokens_per_minute: 1000, requests_per_day: 100}"),
        upstream_url=f"http://127.0.0.1:{closed.getsockname()[1]}/v1",
    )
    results = [await call(gateway.client()) for _ in range(5)]
    closed.close()
    assert statuses(results) == [502] * 5  # never 429: no call happened
    for refused in results:
        headers = refused.response.headers
        assert headers["x-ratelimit-remaining-requests"] == "3"
        assert headers["x-ratelimit-remaining-tokens"] == "1000"
    # The calendar quota counts each call let through, as its rebuild from the ledger does.
    meter = gateway.app[LIMITER].teams["research"]
    assert [quota.used for quota in meter.quotas] == [5] and meter.active == 0

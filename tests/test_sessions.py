"""WebSocket sessions through the gateway (SPEC "Every OpenAI surface"): Realtime and the
Responses API over WebSocket, with the official openai SDK's clients and a raw aiohttp client,
against the fake upstream's sockets. Every row is checked to the token and the nano-USD."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.sessions import events
from tests.conftest import RESEARCH_KEY, UPSTREAM_KEY, Fake, GatewayFactory, sha
from tests.processes import KEY, Stack

LIMITED_KEY = "mgw-test-sessions-limited"
VOICE_TEAMS = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
  voice:
    models: [gpt-realtime, gpt-4o-mini]
    limits: {{requests_per_day: 2, max_concurrent: 1}}
    keys:
      - id: voice-app
        sha256: {sha(LIMITED_KEY)}
"""
SOUND = base64.b64encode(b"\x01\x02" * 4800).decode()  # 9,600 bytes: 2 audio tokens
SILENCE = base64.b64encode(b"\0" * 480).decode()


def realtime_url(base_url: str, model: str = "gpt-realtime") -> str:
    return base_url.replace("http", "ws", 1) + f"/realtime?model={model}"


async def two_realtime_responses(connection: Any) -> list[Any]:
    """A text response, then one with audio in and out: the second's input is the whole
    conversation (3 + 12 text words, 2 audio tokens), of which the first's 3 are cached."""
    await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
    item = {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "hello there you"}]}  # fmt: skip
    await connection.conversation.item.create(item=item)
    await connection.response.create()
    done = []
    async for event in connection:
        if event.type == "response.done":
            done.append(event)
            if len(done) == 1:
                await connection.input_audio_buffer.append(audio=SOUND)
                await connection.input_audio_buffer.commit()
                await connection.response.create(response={"output_modalities": ["audio"]})
            else:
                break
    return done


# ---------------------------------------------------------------- Realtime


async def test_the_sdks_realtime_client_gets_one_exact_row_per_response(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(pricing=None)  # the builtin database: audio has its prices
    client = gateway.client()
    async with client.realtime.connect(model="gpt-realtime") as connection:
        done = await two_realtime_responses(connection)

    first, second = (event.response.usage for event in done)
    assert (first.input_tokens, first.output_tokens) == (3, 12)
    assert (second.input_tokens, second.output_tokens) == (17, 36)
    await asyncio.sleep(0.05)
    rows = await gateway.rows()
    assert len(rows) == 2
    session_ids = {row["ws_session_id"] for row in rows}
    assert len(session_ids) == 1 and next(iter(session_ids)).startswith("sess_")
    picked = ["method", "path", "model", "stream", "status", "outcome", "team", "key_id",
              "input_tokens", "cached_input_tokens", "audio_input_tokens", "output_tokens",
              "audio_output_tokens", "tokens_estimated", "cost_nanousd",
              "upstream_request_id"]  # fmt: skip
    common = {"method": "GET", "path": "/v1/realtime", "model": "gpt-realtime", "stream": 1,
              "status": 200, "outcome": "ok", "team": "research", "key_id": "research-dev",
              "tokens_estimated": 0}  # fmt: skip
    assert [{name: row[name] for name in picked} for row in rows] == [
        {**common, "input_tokens": 3, "cached_input_tokens": 0, "audio_input_tokens": 0,
         "output_tokens": 12, "audio_output_tokens": 0, "upstream_request_id": done[0].response.id,
         # 3 text in at $4/M, 12 text out at $16/M
         "cost_nanousd": 3 * 4_000 + 12 * 16_000},
        {**common, "input_tokens": 17, "cached_input_tokens": 3, "audio_input_tokens": 2,
         "output_tokens": 36, "audio_output_tokens": 24, "upstream_request_id": done[1].response.id,
         # 12 uncached text in at $4/M, 3 cached at $0.40/M, 2 audio in at $32/M;
         # 12 text out at $16/M, 24 audio out at $64/M
         "cost_nanousd": 12 * 4_000 + 3 * 400 + 2 * 32_000 + 12 * 16_000 + 24 * 64_000},
    ]  # fmt: skip
    assert all(row["latency_ms"] > 0 and row["ttfb_ms"] is not None for row in rows)


async def test_frames_pass_unchanged_and_the_rows_bytes_add_up_to_what_passed(
    make_gateway: GatewayFactory, fake: Fake
) -> None:
    gateway = await make_gateway()
    script = [
        '{"type": "session.update", '
        '"session": {"type": "realtime", "output_modalities": ["text"]}}',
        '{"type":"conversation.item.create","item":{"type":"message","role":"user",'
        '"content":[{"type":"input_text","text":"caf\u00e9 au lait"}]}}',
        '{ "type" : "response.create" , "event_id": "evt_client_1" }',
    ]  # fmt: skip

    async def converse(url: str, key: str) -> tuple[list[str], dict[str, str]]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url, headers={"Authorization": f"Bearer {key}"}) as ws,
        ):
            for text in script:
                await ws.send_str(text)
            received = []
            async for message in ws:
                received.append(message.data)
                if '"response.done"' in message.data:
                    break
            return received, dict(ws._response.headers)

    direct, _ = await converse(realtime_url(fake.base_url), UPSTREAM_KEY)
    through, headers = await converse(realtime_url(gateway.base_url), RESEARCH_KEY)

    assert through == direct  # every server frame, byte for byte, in order
    assert len(through) == 1 + 1 + 1 + 1 + 12 + 1  # session created/updated, item, 12 deltas
    (row,) = await gateway.rows()
    assert row["ws_session_id"] == headers["x-gateway-request-id"]
    sent = sum(len(text.encode()) for text in script)
    assert row["request_bytes"] == sent
    assert row["response_bytes"] == sum(len(text.encode()) for text in through)
    assert (row["input_tokens"], row["output_tokens"]) == (3, 12)
    await asyncio.sleep(0.1)  # the session has ended on the gateway's side too
    async with aiohttp.ClientSession() as http:
        metrics = await (await http.get(gateway.base_url.replace("/v1", "/metrics"))).text()
    assert f'gateway_websocket_bytes_total{{direction="up"}} {sent}.0' in metrics
    assert "gateway_websocket_sessions 0.0" in metrics


async def test_a_bad_key_a_model_off_the_list_and_a_used_up_limit_are_refused_before_upgrading(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=VOICE_TEAMS)

    async def connect(key: str, model: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(
                    realtime_url(gateway.base_url, model),
                    headers={"Authorization": f"Bearer {key}"},
                ):
                    return 101, {}
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status, {}

    async with aiohttp.ClientSession() as http:
        answer = await http.get(
            realtime_url(gateway.base_url).replace("ws", "http", 1),
            headers={"Authorization": "Bearer nope", "Upgrade": "websocket",
                     "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()},
        )  # fmt: skip
        body = await answer.json()
    assert answer.status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert await connect(LIMITED_KEY, "gpt-4o-realtime-preview") == (403, {})
    # Two responses use up the day's two requests; the connect after it is refused.
    client = gateway.client(LIMITED_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        for _ in range(2):
            await connection.response.create()
            async for event in connection:
                if event.type == "response.done":
                    break
    await asyncio.sleep(0.05)
    assert await connect(LIMITED_KEY, "gpt-realtime") == (429, {})

    rows = await gateway.rows()
    assert [(r["team"], r["status"], r["outcome"], r["error_code"], r["model"]) for r in rows] == [
        (None, 401, "rejected", "invalid_api_key", "gpt-realtime"),
        ("voice", 403, "rejected", "model_not_allowed", "gpt-4o-realtime-preview"),
        ("voice", 200, "ok", None, "gpt-realtime"),
        ("voice", 200, "ok", None, "gpt-realtime"),
        ("voice", 429, "rejected", "insufficient_quota", "gpt-realtime"),
    ]


async def test_a_response_create_over_a_limit_gets_an_error_event_and_is_not_forwarded(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=VOICE_TEAMS)
    client = gateway.client(LIMITED_KEY)
    seen: list[str] = []
    async with client.realtime.connect(model="gpt-realtime") as connection:
        for number in range(3):
            await connection.send({"type": "response.create", "event_id": f"evt_{number}"})
            async for event in connection:
                seen.append(event.type)
                if event.type in ("response.done", "error"):
                    break
            if number == 2:
                refused = event
    assert seen.count("response.created") == 2 and seen.count("response.done") == 2
    assert refused.type == "error"
    assert refused.error.code == "insufficient_quota"
    assert refused.error.type == "insufficient_quota"
    assert refused.error.event_id == "evt_2"
    assert "requests_per_day" in refused.error.message
    rows = await gateway.rows()
    assert [(r["status"], r["outcome"], r["error_code"]) for r in rows] == [
        (200, "ok", None), (200, "ok", None), (429, "rejected", "insufficient_quota")
    ]  # fmt: skip
    # The SDK's own spelling of the refused event: it is the one counted.
    assert rows[2]["request_bytes"] == len('{"type": "response.create", "event_id": "evt_2"}')


async def test_max_concurrent_counts_open_sessions_not_responses(
    make_gateway: GatewayFactory,
) -> None:
    teams = VOICE_TEAMS.replace("requests_per_day: 2, ", "")
    gateway = await make_gateway(teams=teams)
    client = gateway.client(LIMITED_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        for _ in range(3):  # responses inside the one session are not held by the slot
            await connection.response.create()
            async for event in connection:
                if event.type == "response.done":
                    break
        with pytest.raises(Exception) as second:
            async with gateway.client(LIMITED_KEY).realtime.connect(model="gpt-realtime") as c:
                await c.recv()
        assert "429" in str(second.value)
    await asyncio.sleep(0.1)
    async with gateway.client(LIMITED_KEY).realtime.connect(model="gpt-realtime") as again:
        created = await again.recv()
        assert created.type == "session.created"
    rows = await gateway.rows()
    assert [(r["status"], r["error_code"]) for r in rows] == [
        (200, None), (200, None), (200, None), (429, "rate_limit_exceeded")
    ]  # fmt: skip


async def test_a_response_the_upstream_begins_itself_is_metered_and_cancelled_over_a_limit(
    make_gateway: GatewayFactory,
) -> None:
    teams = VOICE_TEAMS.replace("requests_per_day: 2", "requests_per_day: 1")
    gateway = await make_gateway(teams=teams)
    client = gateway.client(LIMITED_KEY)
    vad = {"type": "realtime", "output_modalities": ["text"],
           "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}  # fmt: skip
    events_seen: list[Any] = []
    async with client.realtime.connect(
        model="gpt-realtime", extra_headers={"x-fake-fault": "chunk_delay_ms=20"}
    ) as connection:
        await connection.session.update(session=vad)
        for _ in range(2):  # two turns: speech, then silence
            await connection.input_audio_buffer.append(audio=SOUND)
            await connection.input_audio_buffer.append(audio=SILENCE)
            async for event in connection:
                events_seen.append(event)
                if event.type == "response.done":
                    break
    kinds = [event.type for event in events_seen]
    assert kinds.count("response.done") == 2
    assert "error" in kinds
    error = next(event for event in events_seen if event.type == "error")
    assert error.error.code == "insufficient_quota"
    statuses = [event.response.status for event in events_seen if event.type == "response.done"]
    assert statuses == ["completed", "cancelled"]
    rows = await gateway.rows()
    assert [(r["status"], r["outcome"]) for r in rows] == [(200, "ok"), (200, "ok")]
    assert rows[0]["output_tokens"] == 12
    assert rows[1]["output_tokens"] < 12  # cut when the gateway cancelled it
    # Each turn commits 9,600 + 480 bytes: 3 audio tokens, and the second's input has both.
    assert (rows[0]["audio_input_tokens"], rows[1]["audio_input_tokens"]) == (3, 6)


# ---------------------------------------------------------------- Responses over WebSocket


async def test_the_sdks_responses_websocket_gets_a_row_per_response_and_the_model_list_holds(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(teams=VOICE_TEAMS.replace("requests_per_day: 2, ", ""))
    client = gateway.client(LIMITED_KEY)
    finished = []
    async with client.responses.connect() as connection:
        for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini"):
            await connection.send(
                {
                    "type": "response.create",
                    "model": model,
                    "input": "one two three four",
                    "max_output_tokens": 5,
                }  # fmt: skip
            )
            async for event in connection:
                if event.type in ("response.completed", "response.incomplete", "error"):
                    finished.append(event)
                    break
    assert [event.type for event in finished] == ["response.completed", "error",
                                                  "response.completed"]  # fmt: skip
    assert finished[1].error.code == "model_not_allowed"
    assert finished[0].response.usage.output_tokens == 5
    rows = await gateway.rows()
    assert [(r["path"], r["model"], r["status"], r["error_code"], r["input_tokens"],
             r["output_tokens"], r["cost_nanousd"]) for r in rows] == [
        ("/v1/responses", "gpt-4o-mini", 200, None, 4, 5, 4 * 150 + 5 * 600),
        ("/v1/responses", "gpt-4o", 403, "model_not_allowed", 0, 0, 0),
        ("/v1/responses", "gpt-4o-mini", 200, None, 4, 5, 4 * 150 + 5 * 600),
    ]  # fmt: skip
    assert len({r["ws_session_id"] for r in rows}) == 1


async def test_a_plain_get_of_a_responses_path_is_still_a_call(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as http:
        answer = await http.get(
            gateway.base_url + "/realtime", headers={"Authorization": f"Bearer {RESEARCH_KEY}"}
        )
        assert answer.status == 400  # the upstream's answer to a GET that is no WebSocket
    (row,) = await gateway.rows()
    assert (row["path"], row["status"], row["ws_session_id"]) == ("/v1/realtime", 400, None)


# ---------------------------------------------------------------- drain


def test_sigterm_lets_a_running_response_finish_then_closes_the_session_with_its_row(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path, extra="shutdown_grace_s: 10\n")
    try:
        url = f"ws://127.0.0.1:{stack.port}/v1/realtime?model=gpt-realtime"

        async def converse() -> tuple[list[str], int | None]:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(
                    url,
                    headers={
                        "Authorization": f"Bearer {KEY}",
                        "x-fake-fault": "chunk_delay_ms=50",
                    },  # fmt: skip
                ) as ws,
            ):
                await ws.send_str('{"type":"response.create"}')
                kinds = []
                async for message in ws:
                    kind = orjson.loads(message.data)["type"]
                    kinds.append(kind)
                    if kind == "response.created":
                        stack.gateway.send_signal(signal.SIGTERM)
                return kinds, ws.close_code

        started = time.monotonic()
        kinds, code = asyncio.run(converse())
        assert stack.gateway.wait(timeout=15) == 0
        assert time.monotonic() - started < 8
    finally:
        stack.stop()
    # The whole response went out (audio, the session's default: a transcript delta a word).
    assert kinds.count("response.output_audio_transcript.delta") == 12
    assert "response.done" in kinds
    assert code == 1001
    rows = stack.rows()
    picked = [(r["path"], r["status"], r["output_tokens"], r["audio_output_tokens"]) for r in rows]
    assert picked == [("/v1/realtime", 200, 12 + 24, 24)]


# ---------------------------------------------------------------- the parts


def test_only_a_response_create_is_parsed_from_client_frames_whatever_its_spacing() -> None:
    assert events.client_create('{"type":"input_audio_buffer.append","audio":"AAAA"}') is None
    assert events.client_create('{ "type" :  "response.create" }') == {"type": "response.create"}
    assert events.client_create('{"type":"response\\u002ecreate"}') == {"type": "response.create"}
    assert events.client_create('{"type":"session.update","x":"response.create"}') is None
    assert events.client_create("not json response.create") is None


def test_what_a_response_create_reserves() -> None:
    realtime = {"type": "response.create", "response": {"max_output_tokens": 300}}
    assert events.max_output_tokens(events.REALTIME, realtime) == 300
    beta = {"type": "response.create", "response": {"max_response_output_tokens": 40}}
    assert events.max_output_tokens(events.REALTIME, beta) == 40
    unbounded = {"type": "response.create", "response": {"max_output_tokens": "inf"}}
    assert events.max_output_tokens(events.REALTIME, unbounded) == 0
    assert events.max_output_tokens(events.RESPONSES, {"max_output_tokens": 64}) == 64
    assert events.max_output_tokens(events.RESPONSES, {"max_output_tokens": True}) == 0


def test_a_failed_response_is_the_upstreams_error_with_its_usage() -> None:
    failed = {"type": "response.failed", "response": {
        "id": "resp_1", "model": "gpt-4o-mini", "status": "failed",
        "error": {"code": "server_error", "message": "boom"},
        "usage": {"input_tokens": 7, "output_tokens": 2}}}  # fmt: skip
    ending = events.ending(events.RESPONSES, failed)
    assert (ending.response_id, ending.status, ending.error_code) == ("resp_1", 500, "server_error")
    assert ending.usage is not None and ending.usage.input_tokens == 7
    realtime_failed = {"type": "response.done", "response": {
        "id": "resp_2", "status": "failed",
        "status_details": {
            "error": {"type": "invalid_request_error", "code": "bad_audio"}}}}  # fmt: skip
    ending = events.ending(events.REALTIME, realtime_failed)
    assert (ending.status, ending.error_code, ending.usage) == (400, "bad_audio", None)
    assert events.server_event('{"type":"response.output_text.delta","delta":"x"}') is None
    assert events.server_event('{"type": "response.done", "response": {}}') is not None

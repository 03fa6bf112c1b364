from __future__ import annotations

import asyncio
import base64
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI

from gateway.devtools.fake_http import FAKE_STATE, MAX_RECEIVED, FakeState, Received
from gateway.devtools.fake_upstream import build_fake_app

pytestmark = pytest.mark.asyncio

REPLY_12 = "lorem ipsum dolor sit amet consectetur adipiscing elit lorem ipsum dolor sit"
AUTH = {"Authorization": "Bearer sk-test"}
USER_HI = [{"role": "user", "content": "hi"}]


@pytest_asyncio.fixture
async def server(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> TestServer:
    monkeypatch.delenv("FAKE_UPSTREAM_KEY", raising=False)
    return await aiohttp_server(build_fake_app())


@pytest_asyncio.fixture
async def client(server: TestServer) -> AsyncIterator[AsyncOpenAI]:
    base_url = str(server.make_url("/v1"))
    async with AsyncOpenAI(api_key="sk-test", base_url=base_url, max_retries=0) as sdk:
        yield sdk


@pytest_asyncio.fixture
async def http(server: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(str(server.make_url("/")), headers=AUTH) as session:
        yield session


def state_of(server: TestServer) -> FakeState:
    return server.app[FAKE_STATE]


def expected_vector(index: int, tokens: int, dims: int) -> list[float]:
    return [((31 * index + 7 * tokens + 13 * j) % 256 - 128) / 128 for j in range(dims)]


async def raw_events(
    http: aiohttp.ClientSession, path: str, body: dict[str, Any], **headers: str
) -> list[bytes]:
    async with http.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        data = await resp.read()
    assert data.endswith(b"\n\n")
    return data[:-2].split(b"\n\n")


def json_of(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: ")
    return orjson.loads(event[6:])


async def test_chat_non_stream_exact_usage_and_headers(client: AsyncOpenAI) -> None:
    user_parts = [
        {"type": "text", "text": "hello there friend"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": user_parts},
        ],
        extra_headers={"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "5"},
    )
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == REPLY_12
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 17, 28)
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert raw.headers["x-request-id"].startswith("req_fake_")
    assert raw.headers["x-ratelimit-remaining-tokens"] == "9999000"
    assert raw.headers["x-ratelimit-reset-requests"] == "6ms"
    assert raw.headers["content-type"] == "application/json"
    content = raw.http_response.content
    assert b'"finish_reason":"stop"}],"usage":{"prompt_tokens":11,' in content
    assert content.endswith(b',"service_tier":"default","system_fingerprint":"fp_fake"}')


async def test_chat_max_tokens_and_cached_clamp(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o",
        messages=USER_HI,
        max_tokens=3,
        extra_headers={"x-fake-cached-tokens": "100"},
    )
    assert completion.choices[0].message.content == "lorem ipsum dolor"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 3
    assert completion.usage.prompt_tokens_details.cached_tokens == 4


async def test_chat_stream_without_include_usage(
    client: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_HI,
        stream=True,
        extra_headers={"x-fake-chunk-words": "5"},
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY_12
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    events = await raw_events(http, "/v1/chat/completions", {"messages": USER_HI, "stream": True})
    assert events[-1] == b"data: [DONE]"
    assert all(b'"usage"' not in event for event in events)


async def test_chat_stream_include_usage_raw_bytes(http: aiohttp.ClientSession) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": USER_HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await raw_events(
        http, "/v1/chat/completions", body, **{"x-fake-chunk-words": "5", "x-fake-reply-words": "7"}
    )
    assert len(events) == 6
    assert all(event.endswith(b',"usage":null}') for event in events[:4])
    deltas = [json_of(event)["choices"][0]["delta"] for event in events[:4]]
    assert deltas == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "lorem ipsum dolor sit amet"},
        {"content": " consectetur adipiscing"},
        {},
    ]
    usage_chunk = json_of(events[4])
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 4
    assert usage_chunk["usage"]["completion_tokens"] == 7
    assert usage_chunk["usage"]["total_tokens"] == 11
    assert events[5] == b"data: [DONE]"


async def test_chat_stream_sdk_include_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_HI,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-reasoning-tokens": "2"},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY_12
    assert all(c.usage is None for c in chunks[:-1])
    final = chunks[-1].usage
    assert final is not None
    assert (final.prompt_tokens, final.completion_tokens, final.total_tokens) == (4, 14, 18)


async def test_legacy_completions(client: AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    completion = await client.completions.create(
        model="gpt-4o-mini", prompt=["one two", "three"], max_tokens=2
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "lorem ipsum"
    assert completion.usage is not None
    assert completion.usage.model_dump() == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    body = {"prompt": "a b", "stream": True, "stream_options": {"include_usage": True}}
    events = await raw_events(http, "/v1/completions", body)
    assert all(event.endswith(b',"usage":null}') for event in events[:-2])
    assert "".join(json_of(e)["choices"][0]["text"] for e in events[:-2]) == REPLY_12
    assert json_of(events[-2])["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 12,
        "total_tokens": 14,
    }


async def test_responses_non_stream(client: AsyncOpenAI) -> None:
    raw = await client.responses.with_raw_response.create(
        model="gpt-4o-mini",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "four words right here"}]},
            {"role": "user", "content": "two more"},
        ],
        extra_headers={"x-fake-cached-tokens": "2", "x-fake-reasoning-tokens": "3"},
    )
    response = raw.parse()
    assert response.status == "completed"
    assert response.output_text == REPLY_12
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (6, 15, 21)
    assert usage.input_tokens_details.cached_tokens == 2
    assert usage.output_tokens_details.reasoning_tokens == 3
    assert raw.http_response.content.endswith(b',"total_tokens":21},"user":null,"metadata":{}}')


async def test_responses_stream(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="gpt-4o-mini", input="hello world", max_output_tokens=4, stream=True
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(12))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "lorem ipsum dolor sit"
    completed = events[-1].response
    assert completed.output_text == "lorem ipsum dolor sit"
    assert completed.usage is not None
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (2, 4)


async def test_embeddings_base64_default(client: AsyncOpenAI, server: TestServer) -> None:
    result = await client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    assert orjson.loads(state_of(server).received[-1].body)["encoding_format"] == "base64"
    assert [item.embedding for item in result.data] == [
        expected_vector(0, 3, 8),
        expected_vector(1, 1, 8),
    ]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (4, 4)


async def test_embeddings_float_and_token_arrays(http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "input": [[1, 2, 3], [4, 5]], "encoding_format": "float", "dimensions": 3}
    async with http.post("/v1/embeddings", json=body) as resp:
        result = await resp.json()
    assert [item["embedding"] for item in result["data"]] == [
        expected_vector(0, 3, 3),
        expected_vector(1, 2, 3),
    ]
    assert result["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    body = {"model": "m", "input": [7, 8, 9, 10], "encoding_format": "base64"}
    async with http.post("/v1/embeddings", json=body) as resp:
        result = await resp.json()
    assert len(result["data"]) == 1
    decoded = struct.unpack("<8f", base64.b64decode(result["data"][0]["embedding"]))
    assert list(decoded) == expected_vector(0, 4, 8)


async def test_files_roundtrip(client: AsyncOpenAI, server: TestServer) -> None:
    data = random.Random(7).randbytes(3_000_000)
    uploaded = await client.files.create(file=("data.bin", data), purpose="batch")
    assert uploaded.id.startswith("file-fake")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (3_000_000, "data.bin", "batch")
    assert uploaded.status == "processed"
    received = state_of(server).received[-1]
    assert received.body_size > 3_000_000
    assert received.body == b""
    content = await client.files.content(uploaded.id)
    assert content.content == data
    assert state_of(server).files[uploaded.id] == data


async def test_small_file_upload_keeps_body(client: AsyncOpenAI, server: TestServer) -> None:
    uploaded = await client.files.create(file=("tiny.txt", b"tiny payload"), purpose="user_data")
    assert uploaded.bytes == 12
    received = state_of(server).received[-1]
    assert b"tiny payload" in received.body
    assert received.body_size == len(received.body)
    assert state_of(server).files[uploaded.id] == b"tiny payload"


async def test_audio_speech_binary(client: AsyncOpenAI) -> None:
    first = await client.audio.speech.create(model="tts-1", voice="alloy", input="say three words")
    second = await client.audio.speech.create(model="tts-1", voice="alloy", input="say three words")
    assert len(first.content) == 3000
    assert first.content == second.content
    assert first.response.headers["content-type"] == "audio/mpeg"
    big = await client.audio.speech.create(
        model="tts-1", voice="alloy", input="x", extra_headers={"x-fake-body-bytes": "200000"}
    )
    assert len(big.content) == 200_000


async def test_audio_transcription_usage(client: AsyncOpenAI) -> None:
    result = await client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", b"\0" * 12_345)
    )
    assert result.text == REPLY_12
    assert result.usage is not None
    assert result.usage.model_dump() == {
        "type": "tokens",
        "input_tokens": 12,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 12},
        "output_tokens": 12,
        "total_tokens": 24,
    }


async def test_models(client: AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]
    assert models == [
        "gpt-4o-mini",
        "gpt-4o",
        "o3-mini",
        "text-embedding-3-small",
        "whisper-1",
        "tts-1",
    ]
    model = await client.models.retrieve("o3-mini")
    assert (model.id, model.object, model.owned_by) == ("o3-mini", "model", "system")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("nope")
    assert caught.value.code == "model_not_found"


async def test_auth_required(server: TestServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/v1/models")) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["x-request-id"].startswith("req_fake_")
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None


async def test_configured_upstream_key(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-real-upstream")
    server = await aiohttp_server(build_fake_app())
    base_url = str(server.make_url("/v1"))
    async with AsyncOpenAI(api_key="sk-client", base_url=base_url, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
    async with AsyncOpenAI(api_key="sk-real-upstream", base_url=base_url, max_retries=0) as right:
        assert (await right.models.retrieve("gpt-4o")).id == "gpt-4o"


async def test_status_faults(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as server_error:
        await client.chat.completions.create(
            model="m", messages=USER_HI, extra_headers={"x-fake-fault": "status=500"}
        )
    assert server_error.value.status_code == 500
    assert server_error.value.type == "server_error"
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="m", messages=USER_HI, extra_headers={"x-fake-fault": "status=429; retry_after=7"}
        )
    headers = limited.value.response.headers
    assert headers["retry-after"] == "7"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.type == "requests"


async def test_reset_after_chunks_breaks_sdk_stream(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=USER_HI,
        stream=True,
        extra_headers={"x-fake-fault": "reset_after_chunks=3"},
    )
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert seen == ["", "lorem", " ipsum"]


async def test_download_and_reset(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/fake/download", params={"bytes": "200000"}) as resp:
        first = await resp.read()
    async with http.get("/v1/fake/download?bytes=200000") as resp:
        assert resp.headers["Content-Length"] == "200000"
        second = await resp.read()
    assert len(first) == 200_000
    assert first == second
    faulted = {"x-fake-fault": "reset_after_chunks=1"}
    async with http.get("/v1/fake/download?bytes=200000", headers=faulted) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_no_usage_via_control_endpoint(
    client: AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer
) -> None:
    async with http.post("/_fake/faults", json={"no_usage": True}) as resp:
        assert await resp.json() == {"no_usage": ""}
    assert state_of(server).faults == {"no_usage": ""}
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER_HI)
    assert raw.parse().usage is None
    assert b'"usage"' not in raw.http_response.content
    body = {"messages": USER_HI, "stream": True, "stream_options": {"include_usage": True}}
    events = await raw_events(http, "/v1/chat/completions", body)
    assert len(events) == 15
    assert all(b'"usage"' not in event for event in events)
    response = await client.responses.create(model="m", input="hi")
    assert response.usage is None
    async with http.delete("/_fake/faults") as resp:
        assert resp.status == 204
    assert state_of(server).faults == {}


async def test_close_before_response(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="m", messages=USER_HI, extra_headers={"x-fake-fault": "close_before_response"}
        )


async def test_latency_and_chunk_delay(http: aiohttp.ClientSession) -> None:
    started = time.perf_counter()
    async with http.get("/v1/models", headers={"x-fake-fault": "latency_ms=100"}) as resp:
        assert resp.status == 200
    assert time.perf_counter() - started >= 0.1
    body = {"messages": USER_HI, "stream": True}
    headers = {"x-fake-fault": "chunk_delay_ms=40", "x-fake-reply-words": "2"}
    started = time.perf_counter()
    async with http.post("/v1/chat/completions", json=body, headers=headers) as resp:
        pieces = [piece async for piece in resp.content.iter_any()]
    assert time.perf_counter() - started >= 0.16
    assert len(pieces) == 5
    assert all(piece.startswith(b"data: ") for piece in pieces)


async def test_malformed_sse(client: AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    body = {"messages": USER_HI, "stream": True}
    events = await raw_events(
        http, "/v1/chat/completions", body, **{"x-fake-fault": "malformed_sse"}
    )
    assert events[7] == b'data: {"id": broken'
    stream = await client.chat.completions.create(
        model="m", messages=USER_HI, stream=True, extra_headers={"x-fake-fault": "malformed_sse"}
    )
    with pytest.raises(ValueError):
        async for _ in stream:
            pass


async def test_gzip_fault(client: AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    headers = {"x-fake-fault": "gzip", "Accept-Encoding": "gzip"}
    async with http.post(
        "/v1/chat/completions", json={"messages": USER_HI}, headers=headers
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        result = await resp.json()
    assert result["choices"][0]["message"]["content"] == REPLY_12
    completion = await client.chat.completions.create(
        model="m", messages=USER_HI, extra_headers={"x-fake-fault": "gzip"}
    )
    assert completion.choices[0].message.content == REPLY_12


async def test_error_bodies(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing/here") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_url"
    async with http.post("/v1/models") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "Invalid URL (POST /v1/models)"
    async with http.post("/v1/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["message"].startswith("We could not parse the JSON body of your request.")
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", None, None)


async def test_received_log_and_control(http: aiohttp.ClientSession, server: TestServer) -> None:
    async with http.post("/v1/chat/completions?trace=1", json={"messages": USER_HI}) as resp:
        assert resp.status == 200
    received = state_of(server).received[-1]
    assert (received.method, received.path, received.query) == (
        "POST",
        "/v1/chat/completions",
        "trace=1",
    )
    assert received.headers["authorization"] == "Bearer sk-test"
    assert orjson.loads(received.body) == {"messages": USER_HI}
    assert received.body_size == len(received.body)
    async with http.get("/_fake/received") as resp:
        listed = await resp.json()
    assert listed == [
        {
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": received.headers,
            "body_size": received.body_size,
        }
    ]
    async with http.delete("/_fake/received") as resp:
        assert resp.status == 204
    assert state_of(server).received == []


async def test_chunked_request_body_is_recorded(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    payload = orjson.dumps({"model": "m", "input": "one two three"})

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 7):
            yield payload[start : start + 7]
            await asyncio.sleep(0)

    async with http.post("/v1/embeddings", data=body()) as resp:
        assert (await resp.json())["usage"]["prompt_tokens"] == 3
    received = state_of(server).received[-1]
    assert received.headers["transfer-encoding"] == "chunked"
    assert (received.body, received.body_size) == (payload, len(payload))


async def test_received_is_bounded() -> None:
    state = FakeState()
    for index in range(MAX_RECEIVED + 5):
        state.record(Received("GET", f"/{index}", "", {}, 0, b""))
    assert len(state.received) == MAX_RECEIVED
    assert state.received[0].path == "/5"

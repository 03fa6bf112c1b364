"""The gateway is transparent: what the client gets equals going direct, byte for byte, and
every call lands in the ledger with exactly the tokens and bytes that moved."""

from __future__ import annotations

import hashlib

import aiohttp
import openai
import pytest

from tests.conftest import PRODUCT_KEY, RESEARCH_KEY, SOON_KEY, UPSTREAM_KEY, Fake, Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}


async def raw_stream(client: openai.AsyncOpenAI, **kwargs) -> tuple[bytes, dict[str, str]]:
    async with client.chat.completions.with_streaming_response.create(
        stream=True, **kwargs
    ) as response:
        body = b"".join([chunk async for chunk in response.iter_bytes()])
        return body, dict(response.headers)


async def test_chat_completion_body_is_byte_identical_to_direct(
    gateway: Gateway, direct: openai.AsyncOpenAI
):
    via = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
    straight = await direct.chat.completions.with_raw_response.create(**CHAT)

    assert via.http_response.content == straight.http_response.content
    assert via.parse().choices[0].message.content == straight.parse().choices[0].message.content
    request_id = via.headers["x-gateway-request-id"]
    row = await gateway.row(request_id)
    usage = straight.parse().usage
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["tokens_estimated"] == 0
    assert row["response_bytes"] == len(straight.http_response.content)
    assert row["status"] == 200 and row["outcome"] == "ok" and row["stream"] == 0
    assert (row["team"], row["key_id"], row["model"]) == ("research", "research-dev", "gpt-4o-mini")
    assert row["method"] == "POST" and row["path"] == "/v1/chat/completions"


async def test_request_bytes_are_the_client_body_length(gateway: Gateway):
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}'
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {RESEARCH_KEY}", "Content-Type": "application/json"},
        ) as response,
    ):
        content = await response.read()
        request_id = response.headers["x-gateway-request-id"]
    row = await gateway.row(request_id)
    assert row["request_bytes"] == len(body) == 79
    assert row["response_bytes"] == len(content)
    # prompt: 2 words + 3 per message (the fake's counting); reply: 2 words (max 12 by default)
    assert row["input_tokens"] == 5


async def test_cached_and_reasoning_tokens_are_recorded(gateway: Gateway):
    response = await gateway.client().chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "7"}
    )
    usage = response.parse().usage
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert usage.prompt_tokens == 7 and usage.completion_tokens == 19
    assert (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    ) == (7, 3, 19, 7)
    # gpt-4o-mini: (7-3)·150 + 3·75 + 19·600 nano-USD
    assert row["cost_nanousd"] == 4 * 150 + 3 * 75 + 19 * 600


async def test_stream_without_usage_request_is_identical_to_direct_and_metered(
    gateway: Gateway, direct: openai.AsyncOpenAI, fake: Fake
):
    via, headers = await raw_stream(gateway.client(), **CHAT)
    straight, _ = await raw_stream(direct, **CHAT)

    assert via == straight
    assert b'"usage"' not in via
    forwarded = [r for r in fake.state.received if r.path == "/v1/chat/completions"][0]
    assert b'"stream_options":{"include_usage":true}' in forwarded.body
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["input_tokens"], row["output_tokens"], row["tokens_estimated"]) == (7, 12, 0)
    assert row["stream"] == 1 and row["status"] == 200 and row["outcome"] == "ok"
    assert row["response_bytes"] == len(via)
    assert row["ttfb_ms"] is not None and 0 < row["ttfb_ms"] <= row["latency_ms"]


async def test_stream_split_into_tiny_reads_is_still_identical(
    gateway: Gateway, direct: openai.AsyncOpenAI
):
    slow = {"x-fake-fault": "chunk_delay_ms=1", "x-fake-chunk-words": "1"}
    via, headers = await raw_stream(gateway.client(), **CHAT, extra_headers=slow)
    straight, _ = await raw_stream(direct, **CHAT, extra_headers=slow)
    assert via == straight
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["input_tokens"], row["output_tokens"]) == (7, 12)


async def test_stream_with_client_usage_passes_usage_chunk_through(
    gateway: Gateway, direct: openai.AsyncOpenAI
):
    options = {"stream_options": {"include_usage": True}}
    via, headers = await raw_stream(gateway.client(), **CHAT, **options)
    straight, _ = await raw_stream(direct, **CHAT, **options)
    assert via == straight
    assert b'"usage":{"prompt_tokens":7,"completion_tokens":12' in via
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["input_tokens"], row["output_tokens"], row["tokens_estimated"]) == (7, 12, 0)


async def test_sdk_stream_iterates_normally_through_gateway(gateway: Gateway):
    stream = await gateway.client().chat.completions.create(**CHAT, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "lorem ipsum dolor sit amet consectetur adipiscing elit lorem ipsum dolor sit"


async def test_completions_embeddings_and_responses_are_metered(gateway: Gateway):
    client = gateway.client()
    completion = await client.completions.with_raw_response.create(
        model="gpt-4o-mini", prompt="one two three", max_tokens=4
    )
    embedding = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a b", "c d e"]
    )
    response = await client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="tell me a story", extra_headers={"x-fake-cached-tokens": "2"}
    )
    rows = {
        r["path"]: r
        for r in await gateway.rows()
        if r["request_id"]
        in {x.headers["x-gateway-request-id"] for x in (completion, embedding, response)}
    }
    assert (rows["/v1/completions"]["input_tokens"], rows["/v1/completions"]["output_tokens"]) == (
        3,
        4,
    )
    assert (rows["/v1/embeddings"]["input_tokens"], rows["/v1/embeddings"]["output_tokens"]) == (
        5,
        0,
    )
    assert rows["/v1/embeddings"]["cost_nanousd"] == 5 * 20
    resp_row = rows["/v1/responses"]
    assert (resp_row["input_tokens"], resp_row["cached_input_tokens"]) == (4, 2)
    assert resp_row["output_tokens"] == 12
    assert response.parse().output_text == (
        "lorem ipsum dolor sit amet consectetur adipiscing elit lorem ipsum dolor sit"
    )


async def test_responses_stream_is_metered_from_its_completed_event(gateway: Gateway):
    async with gateway.client().responses.with_streaming_response.create(
        model="gpt-4o-mini", input="count these four words", stream=True
    ) as response:
        body = b"".join([c async for c in response.iter_bytes()])
        request_id = response.headers["x-gateway-request-id"]
    assert b"event: response.completed" in body
    row = await gateway.row(request_id)
    assert (row["input_tokens"], row["output_tokens"], row["tokens_estimated"]) == (4, 12, 0)
    assert row["response_bytes"] == len(body)


async def test_legacy_completion_stream_gets_usage_injected_and_stripped(
    gateway: Gateway, direct: openai.AsyncOpenAI
):
    async def raw(client: openai.AsyncOpenAI) -> tuple[bytes, dict]:
        async with client.completions.with_streaming_response.create(
            model="gpt-4o-mini", prompt="a b c d e", max_tokens=5, stream=True
        ) as response:
            return b"".join([c async for c in response.iter_bytes()]), dict(response.headers)

    via, headers = await raw(gateway.client())
    straight, _ = await raw(direct)
    assert via == straight
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["input_tokens"], row["output_tokens"]) == (5, 5)


async def test_upstream_gets_real_key_and_never_the_gateway_key(gateway: Gateway, fake: Fake):
    await gateway.client().chat.completions.create(
        **CHAT, extra_headers={"OpenAI-Organization": "org-client", "Connection": "keep-alive"}
    )
    seen = fake.state.received[-1]
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert RESEARCH_KEY not in str(seen.headers)
    assert "openai-organization" not in seen.headers
    assert "connection" not in seen.headers or seen.headers["connection"] != "keep-alive"


async def test_multipart_upload_and_binary_download_are_intact(gateway: Gateway, fake: Fake):
    payload = hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32)
    client = gateway.client()
    uploaded = await client.files.create(file=("data.jsonl", payload), purpose="batch")
    assert uploaded.bytes == len(payload)
    upload_received = [r for r in fake.state.received if r.path == "/v1/files"][-1]
    downloaded = await client.files.with_raw_response.content(uploaded.id)
    assert downloaded.http_response.content == payload

    rows = await gateway.rows()
    upload_row = [r for r in rows if r["path"] == "/v1/files"][0]
    download_row = [r for r in rows if r["path"].endswith("/content")][0]
    assert upload_row["request_bytes"] == upload_received.body_size
    assert upload_row["status"] == 200
    assert download_row["response_bytes"] == len(payload)
    assert download_row["tokens_estimated"] == 0 and download_row["input_tokens"] == 0


async def test_audio_speech_binary_passes_and_transcription_model_is_recorded(
    gateway: Gateway,
):
    client = gateway.client()
    speech = await client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="four words of speech"
    )
    audio = speech.http_response.content
    assert len(audio) == 4000
    transcript = await client.audio.transcriptions.with_raw_response.create(
        model="gpt-4o-mini-transcribe", file=("a.mp3", audio)
    )
    assert transcript.http_response.status_code == 200
    row = await gateway.row(transcript.headers["x-gateway-request-id"])
    assert row["model"] == "gpt-4o-mini-transcribe"
    assert row["input_tokens"] == 4 and row["output_tokens"] > 0


async def test_models_listing_passes_through(gateway: Gateway, direct: openai.AsyncOpenAI):
    via = await gateway.client().models.with_raw_response.list()
    straight = await direct.models.with_raw_response.list()
    assert via.http_response.content == straight.http_response.content
    row = await gateway.row(via.headers["x-gateway-request-id"])
    assert (row["method"], row["status"], row["request_bytes"]) == ("GET", 200, 0)


@pytest.mark.parametrize("status", [500, 503, 400])
async def test_upstream_errors_pass_through_unchanged(gateway: Gateway, fake: Fake, status: int):
    fault = {"x-fake-fault": f"status={status}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {RESEARCH_KEY}", **fault},
        ) as via:
            via_body, request_id = await via.read(), via.headers["x-gateway-request-id"]
            assert via.status == status
        async with http.post(
            fake.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}", **fault},
        ) as straight:
            assert via_body == await straight.read()
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["cost_nanousd"]) == (status, "upstream_error", 0)


async def test_upstream_429_keeps_retry_after(gateway: Gateway):
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.client().chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "status=429; retry_after=7"}
        )
    assert caught.value.response.headers["retry-after"] == "7"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"]) == (429, "upstream_error")


async def test_key_expiring_soon_gets_a_warning_header(gateway: Gateway):
    response = await gateway.client(SOON_KEY).chat.completions.with_raw_response.create(**CHAT)
    assert response.headers["x-gateway-key-expires-in"] == "3d"
    ordinary = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
    assert "x-gateway-key-expires-in" not in ordinary.headers


async def test_no_warning_before_the_renewal_window(make_gateway):
    gateway = await make_gateway(renew_warning_days=2)
    response = await gateway.client(SOON_KEY).chat.completions.with_raw_response.create(**CHAT)
    assert "x-gateway-key-expires-in" not in response.headers


async def test_other_team_uses_its_own_key(gateway: Gateway):
    response = await gateway.client(PRODUCT_KEY).chat.completions.with_raw_response.create(**CHAT)
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["team"], row["key_id"]) == ("product", "product-web")


async def test_gzip_response_passes_compressed_and_is_metered(gateway: Gateway):
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(
            gateway.base_url + "/chat/completions",
            json=CHAT,
            headers={
                "Authorization": f"Bearer {RESEARCH_KEY}",
                "Accept-Encoding": "gzip, br",
                "x-fake-fault": "gzip",
            },
        ) as response,
    ):
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        request_id = response.headers["x-gateway-request-id"]
    assert raw[:2] == b"\x1f\x8b"
    row = await gateway.row(request_id)
    assert (row["input_tokens"], row["output_tokens"], row["response_bytes"]) == (7, 12, len(raw))


async def test_deleting_a_file_no_team_created_is_404_and_never_forwarded(
    gateway: Gateway, fake: Fake
):
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.client().files.delete("file-missing")
    # The same words as OpenAI's own 404, but from the gateway: the upstream never saw it.
    assert caught.value.message == "Error code: 404 - No such File object: file-missing"
    assert caught.value.code == "not_found"
    assert [r for r in fake.state.received if r.path.startswith("/v1/files")] == []
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["method"], row["path"], row["status"], row["outcome"]) == (
        "DELETE",
        "/v1/files/file-missing",
        404,
        "rejected",
    )


async def test_unknown_paths_pass_through_with_the_upstreams_status(gateway: Gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.client().get("/no-such-endpoint", cast_to=object)
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["method"], row["path"], row["status"], row["outcome"]) == (
        "GET",
        "/v1/no-such-endpoint",
        404,
        "upstream_error",
    )


async def test_non_streamed_response_carries_its_cost(gateway: Gateway):
    response = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
    # gpt-4o-mini: 7 input × 150 + 12 output × 600 nano-USD
    assert response.headers["x-gateway-cost-usd"] == "0.00000825"
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert row["cost_nanousd"] == 8250 and row["price_unknown"] == 0
    _, stream_headers = await raw_stream(gateway.client(), **CHAT)
    assert "x-gateway-cost-usd" not in stream_headers


async def test_unknown_model_is_priced_at_zero_and_flagged(gateway: Gateway):
    response = await gateway.client().chat.completions.with_raw_response.create(
        model="mystery-model", messages=CHAT["messages"]
    )
    assert response.headers["x-gateway-cost-usd"] == "0.00"
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["cost_nanousd"], row["price_unknown"], row["input_tokens"]) == (0, 1, 7)

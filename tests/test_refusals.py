"""Bad keys, bad bodies, refused models and a failing upstream: each gets the SPEC's error in
OpenAI's shape, and each still leaves exactly one ledger row."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import openai
import pytest

from gateway.metering import tokens
from tests.conftest import EXPIRED_KEY, PRODUCT_KEY, RESEARCH_KEY, UPSTREAM_KEY, Gateway, sha

WHISPER_ONLY = f"""
  product:
    models: [whisper-1]
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
AUTH = {"Authorization": f"Bearer {RESEARCH_KEY}"}


async def post(gateway: Gateway, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.base_url + path, **kwargs) as response,
    ):
        return response.status, dict(response.headers), await response.json()


def assert_error(body: dict, code: str, type_: str = "invalid_request_error") -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == type_
    assert body["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer mgw-not-a-key"}, {"Authorization": f"Basic {RESEARCH_KEY}"}],
)
async def test_missing_or_unknown_key_is_401_and_recorded(gateway: Gateway, headers: dict):
    status, response_headers, body = await post(
        gateway, "/chat/completions", json=CHAT, headers=headers
    )
    assert status == 401
    assert_error(body, "invalid_api_key")
    row = await gateway.row(response_headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["team"], row["key_id"]) == (
        401,
        "rejected",
        None,
        None,
    )


async def test_sdk_sees_authentication_error(gateway: Gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client("mgw-wrong").chat.completions.create(**CHAT)
    assert caught.value.code == "invalid_api_key"
    assert "mgw-wrong" not in caught.value.message


async def test_expired_key_is_401_key_expired_with_team_recorded(gateway: Gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client(EXPIRED_KEY).chat.completions.create(**CHAT)
    assert caught.value.code == "key_expired"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["team"], row["key_id"], row["outcome"]) == ("research", "research-old", "rejected")


async def test_model_outside_allow_list_is_403(gateway: Gateway):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client(PRODUCT_KEY).chat.completions.create(
            model="gpt-4o", messages=CHAT["messages"]
        )
    assert caught.value.code == "model_not_allowed"
    assert caught.value.param == "model"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["model"], row["team"]) == (403, "gpt-4o", "product")


async def test_endpoint_outside_allow_list_is_403(gateway: Gateway):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client(PRODUCT_KEY).responses.create(model="gpt-4o-mini", input="hi")
    assert caught.value.code == "endpoint_not_allowed"


@pytest.mark.parametrize(
    "body", [b'{"model": "gpt-4o-mini", "messages": [', b"[1, 2]", b"\xff\xfe not json"]
)
async def test_malformed_json_is_400_and_recorded(gateway: Gateway, body: bytes):
    status, headers, answer = await post(
        gateway,
        "/chat/completions",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert status == 400
    assert_error(answer, "invalid_json")
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["outcome"], row["team"], row["request_bytes"]) == (
        "rejected",
        "research",
        len(body),
    )


async def test_declared_body_over_limit_is_413_without_reading_it(make_gateway, fake):
    gateway = await make_gateway(max_request_body="1000")
    host, port = gateway.server.host, gateway.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {RESEARCH_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
        + b"{" * 100
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    request_id = [
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-gateway-request-id")
    ][0]
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["error_code"]) == (
        413,
        "rejected",
        "request_too_large",
    )
    assert not [r for r in fake.state.received if r.path == "/v1/chat/completions"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/chat/completions", "application/json"), ("/files", "application/octet-stream")],
)
async def test_chunked_body_over_limit_is_413(make_gateway, path: str, content_type: str):
    """Read whole (JSON) or streamed through (anything else): past the limit, 413."""
    gateway = await make_gateway(max_request_body="1KB")

    async def body():
        for _ in range(10):
            yield b"x" * 500

    status, headers, answer = await post(
        gateway, path, data=body(), headers={**AUTH, "Content-Type": content_type}
    )
    assert status == 413
    assert_error(answer, "request_too_large")
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"]) == (413, "rejected")
    assert row["request_bytes"] > 1000


async def test_unreachable_upstream_is_502_and_recorded(make_gateway):
    closed = socket.socket()  # bound but never listening: connections to it are refused
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    gateway = await make_gateway(upstream_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(**CHAT)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert UPSTREAM_KEY not in caught.value.message
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (
        502,
        "upstream_error",
        "upstream_unavailable",
    )
    closed.close()


async def test_unresolvable_upstream_host_is_502(make_gateway):
    gateway = await make_gateway(upstream_url="http://no-such-host.invalid/v1")
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(**CHAT)
    assert caught.value.status_code == 502


async def test_slow_upstream_is_504(make_gateway):
    gateway = await make_gateway(timeout_s=0.3)
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "latency_ms=2000"}
        )
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["outcome"], row["error_code"]) == ("upstream_error", "upstream_timeout")


async def test_upstream_dying_before_answer_is_502(gateway: Gateway):
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "close_before_response"}
        )
    assert caught.value.status_code == 502


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/files%2Fx/content"])
async def test_odd_paths_are_refused(gateway: Gateway, path: str, fake):
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RESEARCH_KEY}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ", 2)[1] in (b"400", b"404")
    assert not [r for r in fake.state.received if "admin" in r.path or "%2F" in r.path]


async def test_missing_usage_is_estimated_with_the_offline_tokenizer(gateway: Gateway):
    response = await gateway.client().chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"x-fake-fault": "no_usage"}
    )
    reply = response.parse().choices[0].message.content
    row = await gateway.row(response.headers["x-gateway-request-id"])
    expected_prompt = tokens.estimate_prompt_tokens("/v1/chat/completions", CHAT)
    assert row["tokens_estimated"] == 1
    assert row["input_tokens"] == expected_prompt == 3 + 1 + 4 + 3
    assert row["output_tokens"] == tokens.count_text("gpt-4o-mini", reply)


async def test_stream_without_usage_is_estimated_from_delivered_text(gateway: Gateway):
    stream = await gateway.client().chat.completions.create(
        **CHAT, stream=True, extra_headers={"x-fake-fault": "no_usage"}
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    rows = await gateway.rows()
    row = rows[-1]
    assert row["tokens_estimated"] == 1
    assert row["output_tokens"] == tokens.count_text("gpt-4o-mini", text)
    assert row["outcome"] == "ok"


async def test_upstream_reset_mid_stream_reaches_client_and_is_billed_as_estimated(
    gateway: Gateway,
):
    received = []
    with pytest.raises(openai.APIError):
        stream = await gateway.client().chat.completions.create(
            **CHAT,
            stream=True,
            extra_headers={"x-fake-fault": "reset_after_chunks=5", "x-fake-reply-words": "50"},
        )
        async for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    row = (await gateway.rows())[-1]
    assert (row["status"], row["outcome"], row["error_code"]) == (
        200,
        "upstream_error",
        "upstream_stream_broken",
    )
    assert row["tokens_estimated"] == 1
    assert row["output_tokens"] == tokens.count_text("gpt-4o-mini", "".join(received))
    assert row["cost_nanousd"] > 0


async def test_client_disconnect_mid_stream_is_recorded(gateway: Gateway, fake):
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            gateway.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={**AUTH, "x-fake-fault": "chunk_delay_ms=50", "x-fake-reply-words": "200"},
        )
        await response.content.readline()
        response.close()
    for _ in range(100):
        rows = await gateway.rows()
        if rows:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 1
    assert (rows[0]["outcome"], rows[0]["status"], rows[0]["tokens_estimated"]) == (
        "client_disconnect",
        200,
        1,
    )


async def test_multipart_model_outside_allow_list_is_403(make_gateway, fake):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client(PRODUCT_KEY).audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("a.mp3", b"\x00" * 2_000_000)
        )
    assert caught.value.code == "model_not_allowed"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["model"], row["outcome"]) == (403, "gpt-4o-transcribe", "rejected")
    uploads = [r for r in fake.state.received if r.path == "/v1/audio/transcriptions"]
    # refused mid-upload: the gateway stopped reading and never completed the upstream request
    assert all(row["request_bytes"] < upload.body_size for upload in uploads)


async def test_multipart_model_sent_after_the_file_is_still_refused_before_upstream_completes(
    make_gateway, fake
):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    form = aiohttp.FormData()
    form.add_field("file", b"\x01" * 300_000, filename="a.mp3")
    form.add_field("model", "gpt-4o-transcribe")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/audio/transcriptions",
            data=form,
            headers={"Authorization": f"Bearer {PRODUCT_KEY}"},
        ) as response,
    ):
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "model_not_allowed"


async def test_a_refused_body_never_sends_its_last_piece():
    from gateway.pipeline.reading import last_piece_after as _last_piece_after

    async def pieces():
        for piece in (b"a", b"b", b"c"):
            yield piece

    def refuse() -> None:
        raise PermissionError

    sent = []
    with pytest.raises(PermissionError):
        async for piece in _last_piece_after(pieces(), refuse):
            sent.append(piece)
    assert sent == [b"a", b"b"]
    assert [p async for p in _last_piece_after(pieces(), lambda: None)] == [b"a", b"b", b"c"]

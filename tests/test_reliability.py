"""Reliability and security (issue 9): faults of the upstream, of clients, of the process
and of its disk, and the promises about keys. Each fault ends in an exact answer to the
client and an exact ledger row; docs/reliability.md maps every fault to its test.

Faults the fake upstream cannot produce (a body cut mid-way, malformed JSON, a partial SSE
event, a close-delimited body) come from `ScriptedUpstream`, a bare TCP server that answers
with fixed bytes. Client-side faults that depend on how `serve` runs aiohttp use `served`,
the gateway app on `serve`'s own runner, rather than aiohttp's test server.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway import server
from gateway.access import keys
from gateway.access.auth import Authenticator
from gateway.app import HANDLER, build_app
from gateway.config.loader import load_config
from gateway.front.server import GatewayServer
from gateway.metering import tokens
from tests import processes
from tests.conftest import (
    DEFAULT_TEAMS,
    PRICING,
    PRODUCT_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Fake,
    Gateway,
    GatewayFactory,
    sha,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
AUTH = {"Authorization": f"Bearer {RESEARCH_KEY}"}
PROMPT_TOKENS = tokens.estimate_prompt_tokens("/v1/chat/completions", CHAT)
INPUT_NANOUSD, OUTPUT_NANOUSD = 150, 600  # gpt-4o-mini in conftest's price table


# ---------------------------------------------------------------- helpers


class ScriptedUpstream:
    """A bare TCP upstream: reads one request per connection, answers with `answer`, then
    closes cleanly (FIN) — for answers the fake upstream cannot give."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        body = await reader.readexactly(int(length.group(1)) if length else 0)
        self.requests.append(head + body)
        writer.write(self.answer)
        await writer.drain()
        writer.close()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


@pytest.fixture
async def served(tmp_path: Path, fake: Fake) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """The gateway app served as `serve` serves it (`GatewayServer`) on 127.0.0.1."""
    runners: list[GatewayServer] = []
    started: list[Gateway] = []

    async def start(teams: str = DEFAULT_TEAMS) -> Gateway:
        name = f"served-{len(runners)}"
        ledger_path = tmp_path / f"{name}.sqlite3"
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(
            textwrap.dedent(
                f"""\
                upstream:
                  base_url: {fake.base_url}
                  api_key_env: TEST_UPSTREAM_KEY
                  forward_headers: ["x-fake-*"]
                  connect_timeout_s: 2
                  timeout_s: 5
                storage: {{sqlite_path: {ledger_path}, flush_interval_ms: 20}}
                """
            )
            + "pricing:"
            + PRICING
            + "teams:"
            + teams
        )
        config = load_config(config_path)
        app = build_app(config)
        runner = GatewayServer(app, app[HANDLER].handle, server.KEEPALIVE_TIMEOUT_S)
        await runner.setup()
        runners.append(runner)
        await runner.listen("127.0.0.1", 0)
        started.append(Gateway(server=runner, app=app, config=config, ledger_path=ledger_path))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for gateway in started:
        for client in gateway.clients:
            await client.close()
    for runner in runners:
        await runner.close()


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(gateway: Gateway, data: bytes, wait_s: float = 5) -> RawAnswer:
    """Send bytes as they are (the request should say `Connection: close`) and read the
    whole answer."""
    site = gateway.server
    reader, writer = await asyncio.open_connection(site.host, site.port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return RawAnswer(int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body)


def head_of(method: str, target: str, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


AUTH_LINE = f"Authorization: Bearer {RESEARCH_KEY}"


async def read_until_cut(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body as far as it came, and whether it was cut short."""
    received = bytearray()
    try:
        async for piece in response.content.iter_any():
            received += piece
    except aiohttp.ClientPayloadError:
        return bytes(received), True
    return bytes(received), False


async def rows_when(gateway: Gateway, count: int) -> list[dict[str, Any]]:
    """The ledger once it holds `count` rows (a handler cancelled by a departing client
    may record a moment after the socket closed)."""
    for _ in range(250):
        rows = await gateway.rows()
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.02)
    return await gateway.rows()


def api_calls(fake: Fake) -> list[Any]:
    return [r for r in fake.state.received if r.path.startswith("/v1/")]


# ---------------------------------------------------------------- upstream faults


async def test_connect_timeout_is_504_upstream_timeout(make_gateway: GatewayFactory):
    # A listening socket whose accept queue is full: the kernel drops further SYNs, so a
    # connect neither succeeds nor fails until the gateway's connect_timeout_s (2) ends it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        gateway = await make_gateway(
            upstream_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        )
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert (caught.value.status_code, caught.value.code) == (504, "upstream_timeout")
    assert caught.value.type == "upstream_error"
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"], row["cost_nanousd"]) == (
        504, "upstream_error", "upstream_timeout", 0,
    )  # fmt: skip


async def test_read_timeout_mid_stream_cuts_the_client_and_estimates_tokens(
    make_gateway: GatewayFactory,
):
    gateway = await make_gateway(timeout_s=0.5)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            # the first event at once, the next one 3 s later: past timeout_s
            headers={**AUTH, "x-fake-fault": "chunk_delay_ms=3000"},
        ) as response,
    ):
        assert response.status == 200
        received, cut = await read_until_cut(response)
        request_id = response.headers["x-gateway-request-id"]
    assert cut, "a stream the upstream stopped feeding must not look complete"
    assert received.count(b"data: ") == 1 and received.endswith(b"\n\n")
    assert b'"content":""' in received  # the role-only first chunk
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["error_code"]) == (
        200, "upstream_error", "upstream_stream_broken",
    )  # fmt: skip
    assert (row["tokens_estimated"], row["input_tokens"], row["output_tokens"]) == (
        1, PROMPT_TOKENS, 0,
    )  # fmt: skip
    assert row["response_bytes"] == len(received)
    assert row["cost_nanousd"] == PROMPT_TOKENS * INPUT_NANOUSD


async def test_reset_mid_body_of_a_json_answer_is_502_with_the_prompt_estimated(
    make_gateway: GatewayFactory,
):
    cut_answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hello there"'
    )
    async with ScriptedUpstream(cut_answer) as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_unavailable")
    assert caught.value.body["message"] == "The upstream API broke off its answer."
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (
        502, "upstream_error", "upstream_unavailable",
    )  # fmt: skip
    # the upstream took the prompt, so its tokens are estimated; a 502 is never billed
    assert (row["tokens_estimated"], row["input_tokens"], row["output_tokens"]) == (
        1, PROMPT_TOKENS, 0,
    )  # fmt: skip
    assert (row["response_bytes"], row["cost_nanousd"]) == (0, 0)


async def test_reset_mid_body_of_a_binary_answer_cuts_the_client(gateway: Gateway):
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.base_url + "/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": "a b c"},
            headers={**AUTH, "x-fake-fault": "reset_after_chunks=2", "x-fake-body-bytes": "400000"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Length"] == "400000"
        received, cut = await read_until_cut(response)
        request_id = response.headers["x-gateway-request-id"]
    assert cut and 0 < len(received) < 400_000
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["error_code"], row["model"]) == (
        200, "upstream_error", "upstream_stream_broken", "tts-1",
    )  # fmt: skip
    assert row["response_bytes"] == len(received)


async def test_malformed_json_answer_passes_unchanged_with_tokens_estimated(
    make_gateway: GatewayFactory,
):
    broken = b'{"id": broken '
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n"
    async with ScriptedUpstream(answer + broken) as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        async with (
            aiohttp.ClientSession() as http,
            http.post(gateway.base_url + "/chat/completions", json=CHAT, headers=AUTH) as response,
        ):
            body, request_id = await response.read(), response.headers["x-gateway-request-id"]
            assert response.status == 200
    assert body == broken  # the upstream's own answer, as it came
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["response_bytes"]) == (200, "ok", 14)
    assert (row["tokens_estimated"], row["input_tokens"], row["output_tokens"]) == (
        1, PROMPT_TOKENS, 0,
    )  # fmt: skip
    assert row["cost_nanousd"] == PROMPT_TOKENS * INPUT_NANOUSD


async def test_malformed_sse_event_is_relayed_as_is_and_usage_still_read(
    gateway: Gateway, fake: Fake
):
    fault = {"x-fake-fault": "malformed_sse"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={**AUTH, **fault},
        ) as via:
            via_body, request_id = await via.read(), via.headers["x-gateway-request-id"]
        async with http.post(
            fake.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}", **fault},
        ) as direct:
            direct_body = await direct.read()
    assert b'data: {"id": broken\n\n' in via_body
    assert via_body == direct_body
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["tokens_estimated"]) == (200, "ok", 0)
    assert (row["input_tokens"], row["output_tokens"]) == (7, 12)  # the upstream's usage


async def test_partial_sse_event_at_a_reset_reaches_the_client_and_is_estimated(
    make_gateway: GatewayFactory,
):
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
    half = b'data: {"choices":[{"index":0,"del'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(event, half)
    )  # and the connection closes without the last chunk
    async with ScriptedUpstream(answer) as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                gateway.base_url + "/chat/completions",
                json={**CHAT, "stream": True},
                headers=AUTH,
            ) as response,
        ):
            received, cut = await read_until_cut(response)
            request_id = response.headers["x-gateway-request-id"]
        # the gateway asked for usage upstream for this stream
        assert b'"stream_options":{"include_usage":true}' in upstream.requests[0]
    assert cut and received == event + half
    row = await gateway.row(request_id)
    assert (row["status"], row["outcome"], row["error_code"]) == (
        200, "upstream_error", "upstream_stream_broken",
    )  # fmt: skip
    assert (row["tokens_estimated"], row["input_tokens"], row["output_tokens"]) == (
        1, PROMPT_TOKENS, 1,
    )  # fmt: skip
    assert row["response_bytes"] == len(received)


async def test_close_delimited_answer_is_complete_not_broken(make_gateway: GatewayFactory):
    # HTTP/1.1 allows a body with neither Content-Length nor chunks: it ends at the close.
    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    async with ScriptedUpstream(answer + body) as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        response = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
    assert response.http_response.content == body
    row = await gateway.row(response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"], row["tokens_estimated"]) == (
        200, "ok", None, 0,
    )  # fmt: skip
    assert (row["input_tokens"], row["output_tokens"], row["response_bytes"]) == (3, 4, len(body))


async def test_answer_that_is_not_http_is_502(make_gateway: GatewayFactory):
    async with ScriptedUpstream(b"SSH-2.0-OpenSSH_9.6\r\n") as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_unavailable")
    row = await gateway.row(caught.value.response.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (
        502, "upstream_error", "upstream_unavailable",
    )  # fmt: skip


# ---------------------------------------------------------------- client faults


@pytest.mark.parametrize("kind", ["json", "multipart"])
async def test_client_leaving_mid_upload_is_client_disconnect(served, fake: Fake, kind: str):
    gateway = await served()
    if kind == "json":
        head = head_of(
            "POST", "/v1/chat/completions", AUTH_LINE,
            "Content-Type: application/json", "Content-Length: 100000",
        )  # fmt: skip
        sent = b'{"model":"gpt-4o-mini","messages":[' + b" " * 5000
    else:
        head = head_of(
            "POST", "/v1/files", AUTH_LINE,
            "Content-Type: multipart/form-data; boundary=XX", "Content-Length: 1000000",
        )  # fmt: skip
        sent = (
            b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            + b"x"
            * 200_000
        )
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(head + sent)
    await writer.drain()
    await asyncio.sleep(0.3)  # the gateway has read what was sent
    writer.transport.abort()
    rows = await rows_when(gateway, 1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["outcome"], row["error_code"], row["team"]) == (
        499, "client_disconnect", None, "research",
    )  # fmt: skip
    assert row["request_bytes"] == len(sent)
    assert gateway.app[HANDLER].in_flight == 0
    assert not [r for r in api_calls(fake) if r.path == "/v1/chat/completions"]
    assert fake.state.files == {}  # no upload was completed upstream


async def test_client_leaving_the_queue_consumes_nothing_under_serves_runner(served, fake):
    teams = f"""
  research:
    on_limit: queue
    queue: {{max_wait_s: 5, max_depth: 5}}
    limits: {{max_concurrent: 1, requests_per_day: 10}}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""
    gateway = await served(teams)
    holder = asyncio.create_task(
        gateway.client().chat.completions.create(
            **CHAT, extra_headers={"x-fake-fault": "latency_ms=600"}
        )
    )
    await asyncio.sleep(0.15)
    waiter = asyncio.create_task(gateway.client().chat.completions.create(**CHAT))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await holder
    rows = await rows_when(gateway, 2)
    assert sorted(r["outcome"] for r in rows) == ["client_disconnect", "ok"]
    assert len([r for r in api_calls(fake) if r.path == "/v1/chat/completions"]) == 1
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/gateway/me")), headers=AUTH) as answer,
    ):
        assert (await answer.json())["limits"]["requests_per_day"]["used"] == 1


async def test_slowloris_headers_are_cut_by_the_keepalive_timeout(
    served, fake: Fake, monkeypatch: pytest.MonkeyPatch
):
    assert 0 < server.KEEPALIVE_TIMEOUT_S <= 120  # what `serve` ships with
    monkeypatch.setattr(server, "KEEPALIVE_TIMEOUT_S", 1.0)
    gateway = await served()
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(f"GET /v1/models HTTP/1.1\r\n{AUTH_LINE}\r\nX-Slow: ".encode())
    deadline = time.monotonic() + 8
    ending = None
    sent = 0
    while ending is None and time.monotonic() < deadline:
        try:
            writer.write(b"a")  # one more byte of one header every 50 ms, never ending
            await writer.drain()
            sent += 1
            ending = await asyncio.wait_for(reader.read(1), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            ending = b""
    writer.close()
    assert ending == b"", "a client that never finishes its headers kept its connection"
    assert sent > 5  # it was still sending when cut, silently
    assert gateway.app[HANDLER].in_flight == 0
    assert await gateway.rows() == [] and api_calls(fake) == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        head_of("GET", "/v1/models", AUTH_LINE, "X-Big: " + "a" * 20_000),
        head_of("GET", "/v1/models", AUTH_LINE, *(f"X-H{i}: a" for i in range(200))),
        head_of("GET", "/v1/models?" + "a" * 20_000, AUTH_LINE),
    ],
    ids=["one-20kB-header", "200-headers", "20kB-url"],
)
async def test_huge_headers_are_refused_by_the_parser(
    gateway: Gateway, fake: Fake, request_bytes: bytes
):
    answer = await raw_request(gateway, request_bytes)
    assert answer.status == 400
    assert api_calls(fake) == [] and await gateway.rows() == []


def _labelled(key: str, content_type: str | None, data: bytes) -> bytes:
    headers = [f"Authorization: Bearer {key}", f"Content-Length: {len(data)}"]
    if content_type:
        headers.append(f"Content-Type: {content_type}")
    return head_of("POST", "/v1/chat/completions", *headers) + data


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", None, "application/octet-stream"],
)
async def test_a_json_endpoint_reads_its_body_as_json_whatever_its_label(
    gateway: Gateway, fake: Fake, content_type: str | None
):
    data = orjson.dumps(CHAT)
    answer = await raw_request(gateway, _labelled(RESEARCH_KEY, content_type, data))
    assert answer.status == 200
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["model"], row["request_bytes"]) == (
        200, "ok", "gpt-4o-mini", len(data),
    )  # fmt: skip
    assert row["input_tokens"] > 0 and row["tokens_estimated"] == 0  # the upstream's usage
    [sent] = api_calls(fake)
    assert orjson.loads(sent.body) == CHAT


async def test_a_model_hidden_in_a_mislabelled_body_is_still_refused(gateway: Gateway, fake: Fake):
    data = orjson.dumps({**CHAT, "model": "gpt-4o"})  # outside the product team's allow-list
    answer = await raw_request(gateway, _labelled(PRODUCT_KEY, "text/plain", data))
    assert answer.status == 403
    assert orjson.loads(answer.body)["error"]["code"] == "model_not_allowed"
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["status"], row["team"], row["model"]) == (403, "product", "gpt-4o")
    assert api_calls(fake) == []


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("application/x-www-form-urlencoded", b"model=gpt-4o-mini"),
     ("multipart/form-data; boundary=XX", b'--XX\r\nContent-Disposition: form-data; name="model"'
      b"\r\n\r\ngpt-4o-mini\r\n--XX--\r\n")],
)  # fmt: skip
async def test_a_json_endpoints_body_that_is_not_json_is_400_invalid_json(
    gateway: Gateway, fake: Fake, content_type: str, data: bytes
):
    answer = await raw_request(gateway, _labelled(RESEARCH_KEY, content_type, data))
    assert answer.status == 400
    assert orjson.loads(answer.body)["error"]["code"] == "invalid_json"
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (400, "rejected", "invalid_json")
    assert api_calls(fake) == []


async def test_non_utf8_bytes_in_bodies_and_headers(gateway: Gateway, fake: Fake):
    body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xe9"}]}'.encode("latin-1")
    answer = await raw_request(
        gateway,
        head_of(
            "POST", "/v1/chat/completions", AUTH_LINE,
            "Content-Type: application/json", f"Content-Length: {len(body)}",
        ) + body,
    )  # fmt: skip
    assert answer.status == 400
    assert b'"code":"invalid_json"' in answer.body
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["outcome"], row["request_bytes"]) == ("rejected", len(body))
    assert api_calls(fake) == []
    # Header values pass through byte for byte, UTF-8 or not (they used to fail the call).
    raw_values = ["\u65e5\u672c".encode(), b"caf\xe9 \xff"]
    for value in raw_values:
        request = head_of("GET", "/v1/models", AUTH_LINE).replace(
            b"Connection: close", b"X-Fake-Note: " + value + b"\r\nConnection: close"
        )
        assert (await raw_request(gateway, request)).status == 200
    seen = [r.headers["x-fake-note"] for r in api_calls(fake)]
    assert [s.encode("utf-8", "surrogateescape") for s in seen] == raw_values


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%252e%252e/admin",  # double-encoded dot-dot
        "/v1/files%252Fx/content",  # double-encoded slash
        "/v1/%255c..%255cadmin",  # double-encoded backslash
        "/v1/..\\admin",  # backslash
        "/v1/%5c..%5cadmin",  # encoded backslash
        "/v1/models%00.json",  # NUL
        "/%761/models",  # an encoded `v1` that would be forwarded as another path
        "http://upstream.example/v1/models",  # absolute form
    ],
)
async def test_odd_paths_are_404_and_never_forwarded(gateway: Gateway, fake: Fake, target: str):
    answer = await raw_request(gateway, head_of("GET", target, AUTH_LINE))
    assert answer.status == 404
    assert b'"code":"unknown_url"' in answer.body
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["status"], row["outcome"], row["error_code"]) == (404, "rejected", "unknown_url")
    assert api_calls(fake) == []


async def test_unknown_methods(gateway: Gateway, fake: Fake):
    # A method HTTP does not define: refused by the parser, never seen by the handler.
    brew = await raw_request(gateway, head_of("BREW", "/v1/models", AUTH_LINE))
    assert brew.status == 400 and api_calls(fake) == [] and await gateway.rows() == []
    # A method HTTP defines but OpenAI does not use: authenticated, forwarded, recorded.
    anonymous = await raw_request(gateway, head_of("PROPFIND", "/v1/models"))
    assert anonymous.status == 401 and api_calls(fake) == []
    answer = await raw_request(gateway, head_of("PROPFIND", "/v1/models", AUTH_LINE))
    assert answer.status == 404  # the upstream's answer
    assert [(r.method, r.headers["authorization"]) for r in api_calls(fake)] == [
        ("PROPFIND", f"Bearer {UPSTREAM_KEY}")
    ]
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["method"], row["status"], row["outcome"]) == ("PROPFIND", 404, "upstream_error")


_JSON_POST = ("POST", "/v1/chat/completions", AUTH_LINE, "Content-Type: application/json")
_SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (["Content-Length: 4", "Transfer-Encoding: chunked"], b"0\r\n\r\n" + _SMUGGLED),
        (["Transfer-Encoding: chunked", "Content-Length: 40"], b"0\r\n\r\n" + _SMUGGLED),
        (["Content-Length: 2", "Content-Length: 2"], b"{}"),
        (["Content-Length: 2", "Content-Length: 44"], b"{}" + _SMUGGLED),
        (["Content-Length: 2, 2"], b"{}"),
        (["Transfer-Encoding : chunked", "Content-Length: 2"], b"{}"),
        (["Transfer-Encoding: xchunked", "Content-Length: 2"], b"{}"),
        (["Transfer-Encoding: chunked, identity"], b"2\r\n{}\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"-2\r\n{}\r\n0\r\n\r\n"),
    ],
    ids=[
        "CL-then-TE", "TE-then-CL", "duplicate-CL", "conflicting-CL", "CL-list",
        "TE-with-space", "TE-xchunked", "TE-chunked-not-last", "negative-chunk",
    ],
)  # fmt: skip
async def test_request_smuggling_is_400_and_never_reaches_the_upstream(
    gateway: Gateway, fake: Fake, framing: list[str], body: bytes
):
    answer = await raw_request(gateway, head_of(*_JSON_POST, *framing) + body)
    assert answer.status == 400
    await asyncio.sleep(0.1)  # room for a smuggled second request, were it parsed
    assert api_calls(fake) == [] and await gateway.rows() == []


async def test_a_chunked_body_is_reframed_with_its_length_upstream(gateway: Gateway, fake: Fake):
    body = orjson.dumps(CHAT)
    answer = await raw_request(
        gateway,
        head_of(*_JSON_POST, "Transfer-Encoding: chunked") + chunked(body[:10], body[10:])
        + b"0\r\n\r\n",
    )  # fmt: skip
    assert answer.status == 200
    [seen] = api_calls(fake)
    assert seen.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in seen.headers and seen.body == body


# ---------------------------------------------------------------- crash safety


def test_kill_9_under_load_keeps_every_call_finished_a_flush_interval_before(tmp_path: Path):
    stack = processes.Stack(
        tmp_path, processes.TEAMS.replace("requests_per_day: 20", "requests_per_day: 100000")
    )
    flush_s, margin_s = 0.050, 0.5  # Stack's flush_interval_ms, and room for a slow commit
    finished: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        client = stack.client()
        while not stop.is_set():
            try:
                answer = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}]
                )
            except openai.APIError:
                return  # the gateway died under this call
            finished.append((time.monotonic(), answer.headers["x-gateway-request-id"]))

    try:
        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        stack.gateway.kill()  # SIGKILL: no drain, no final flush
        stack.gateway.wait(timeout=10)
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
        durable = {rid for at, rid in finished if at < killed_at - flush_s - margin_s}
        rows = stack.rows()
        assert len(durable) >= 20, "too little load to mean anything"
        assert durable - {r["request_id"] for r in rows} == set()
        assert {r["outcome"] for r in rows} == {"ok"}
        # The day's quota after a restart is rebuilt from exactly these rows.
        stack.restart_gateway()
        me = urllib.request.Request(
            f"http://127.0.0.1:{stack.port}/gateway/me",
            headers={"Authorization": f"Bearer {processes.KEY}"},
        )
        with urllib.request.urlopen(me, timeout=5) as answer:
            limit = json.load(answer)["limits"]["requests_per_day"]
        assert (limit["limit"], limit["used"]) == (100_000, len(rows))
    finally:
        stop.set()
        stack.stop()


async def readyz(gateway: Gateway) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/readyz"))) as answer,
    ):
        return answer.status, await answer.json()


async def wait_readyz(
    gateway: Gateway, status: int, within_s: float, pending: bool = False
) -> dict:
    """Poll /readyz until it answers `status` (and, with `pending`, shows rows waiting:
    a write under way has taken them off the pending list for its duration)."""
    deadline = time.monotonic() + within_s
    while True:
        got, body = await readyz(gateway)
        if got == status and (body["ledger_pending_rows"] > 0 or not pending):
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {got}: {body}"
        await asyncio.sleep(0.02)


async def chat_ids(gateway: Gateway, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        answer = await gateway.client().chat.completions.with_raw_response.create(**CHAT)
        assert answer.http_response.status_code == 200
        ids.append(answer.headers["x-gateway-request-id"])
    return ids


async def test_locked_ledger_keeps_calls_flowing_and_loses_no_row(gateway: Gateway):
    assert (await readyz(gateway))[0] == 200
    blocker = sqlite3.connect(gateway.ledger_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        ids = await chat_ids(gateway, 5)
        # The write waits out busy_timeout (5 s), fails, and keeps its rows for the next try.
        body = await wait_readyz(gateway, 503, within_s=8)
        assert body["ready"] is False
        ids += await chat_ids(gateway, 5)  # still served while unready
        assert not [r for r in blocker.execute("SELECT request_id FROM requests")]
    finally:
        blocker.rollback()
        blocker.close()
    body = await wait_readyz(gateway, 200, within_s=8)
    rows = await gateway.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {(r["status"], r["outcome"]) for r in rows} == {(200, "ok")}


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root, and a kernel that lets this sandbox mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_keeps_rows_in_memory_until_space_returns(
    make_gateway: GatewayFactory, tiny_disk: Path
):
    gateway = await make_gateway(ledger_path=tiny_disk / "ledger.sqlite3")
    ids = await chat_ids(gateway, 2)
    await wait_readyz(gateway, 200, within_s=2)
    filler = tiny_disk / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    try:
        ids += await chat_ids(gateway, 40)  # rows that no longer fit
        body = await wait_readyz(gateway, 503, within_s=5, pending=True)
        assert body["ready"] is False
        ids += await chat_ids(gateway, 3)
    finally:
        filler.unlink()
    await wait_readyz(gateway, 200, within_s=5)
    rows = await gateway.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


# ---------------------------------------------------------------- security


def _reachable(root: object) -> Iterator[object]:
    """Every object reachable from `root` through attributes, slots and containers."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, str | bytes | int | float | bool | type(None)):
            continue
        if isinstance(item, dict) or hasattr(item, "items") and hasattr(item, "keys"):
            for key, value in list(item.items()):  # type: ignore[union-attr]
                stack += [key, value]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += list(item)
        if is_dataclass(item):
            stack += [getattr(item, f.name) for f in fields(item)]
        stack += list(getattr(item, "__dict__", {}).values())
        for slot in getattr(type(item), "__slots__", ()):
            if hasattr(item, slot):
                stack.append(getattr(item, slot))


def test_keys_are_held_only_as_digests_and_compared_in_constant_time(
    gateway_config_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = load_config(gateway_config_path)
    authenticator = Authenticator(config)
    compared: list[tuple[bytes, bytes]] = []
    real_compare = keys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    today = time.gmtime()
    caller = authenticator.authenticate(f"Bearer {RESEARCH_KEY}", datetime.date(*today[:3]))
    assert (caller.team.name, caller.key.id) == ("research", "research-dev")
    digest = keys.hash_key(RESEARCH_KEY)
    assert compared == [(digest, digest)]
    held = list(_reachable(authenticator)) + list(_reachable(config))
    for secret in (RESEARCH_KEY, PRODUCT_KEY):
        assert not [o for o in held if isinstance(o, str) and secret in o]
        assert not [o for o in held if isinstance(o, bytes) and secret.encode() in o]
    assert all(len(d) == 32 for d in authenticator._ring._by_hash)  # sha256 digests only


@pytest.fixture
def gateway_config_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "storage: {sqlite_path: " + str(tmp_path / "l.sqlite3") + "}\nteams:" + DEFAULT_TEAMS
    )
    return path


async def test_upstream_sees_only_its_key_and_no_client_org_or_project_on_every_endpoint(
    gateway: Gateway, fake: Fake
):
    client = gateway.client(organization="org-client-choice", project="proj_client_choice")
    await client.chat.completions.create(**CHAT)
    async for _ in await client.chat.completions.create(**CHAT, stream=True):
        pass
    await client.completions.create(model="gpt-4o-mini", prompt="a b")
    await client.embeddings.create(model="text-embedding-3-small", input="a b")
    await client.responses.create(model="gpt-4o-mini", input="hi")
    await client.models.list()
    uploaded = await client.files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch")
    await client.files.content(uploaded.id)
    await client.files.delete(uploaded.id)
    await client.audio.transcriptions.create(model="whisper-1", file=("a.mp3", b"\0" * 1000))
    await client.audio.speech.create(model="tts-1", voice="alloy", input="a b")
    received = api_calls(fake)
    assert len(received) == 11
    assert {r.headers["authorization"] for r in received} == {f"Bearer {UPSTREAM_KEY}"}
    for seen in received:
        assert "openai-organization" not in seen.headers
        assert "openai-project" not in seen.headers
        assert RESEARCH_KEY not in str(seen.headers) and RESEARCH_KEY.encode() not in seen.body
    assert {r.method for r in received} == {"GET", "POST", "DELETE"}
    assert (
        len([r for r in received if "multipart/form-data" in r.headers.get("content-type", "")])
        == 2
    )


async def test_a_key_never_sees_another_teams_data(gateway: Gateway):
    for _ in range(3):
        await gateway.client(RESEARCH_KEY).chat.completions.create(**CHAT)
    await gateway.client(PRODUCT_KEY).chat.completions.create(**CHAT)
    day = int(time.time()) // 86_400 * 86_400
    async with aiohttp.ClientSession() as http:

        async def get(path: str, **params: Any) -> tuple[int, dict]:
            url = str(gateway.server.make_url(path))
            headers = {"Authorization": f"Bearer {PRODUCT_KEY}"}
            async with http.get(url, params=params, headers=headers) as answer:
                return answer.status, await answer.json()

        status, me = await get("/gateway/me")
        assert (status, me["team"], me["key_id"]) == (200, "product", "product-web")
        prying = [
            {}, {"keys": "research-dev"}, {"api_key_ids": "research-dev"},
            {"teams": "research"}, {"project_ids": "research"}, {"group_by": "model"},
        ]  # fmt: skip
        for params in prying:
            status, usage = await get("/gateway/me/usage", start_time=day, **params)
            assert (status, usage["key_id"]) == (200, "product-web"), params
            assert sum(bucket["requests"] for bucket in usage["data"]) == 1, params
        for group in ("key", "team"):  # a key holder groups by model only
            status, usage = await get("/gateway/me/usage", start_time=day, group_by=group)
            assert (status, usage["error"]["param"]) == (400, "group_by")


def test_upstream_key_never_reaches_clients_logs_errors_or_the_ledger(tmp_path: Path):
    stack = processes.Stack(
        tmp_path, processes.TEAMS.replace("requests_per_day: 20", "requests_per_day: 1000")
    )
    seen: list[bytes] = []
    statuses: list[int] = []
    auth = {"Authorization": f"Bearer {processes.KEY}"}
    json_type = {"Content-Type": "application/json"}
    chat = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x y"}]})
    stream = chat[:-1] + b',"stream":true}'
    form = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        b'{"a":1}\n\r\n--B--\r\n'
    )
    calls = [
        ("POST", "/v1/chat/completions", {**auth, **json_type}, chat),
        ("POST", "/v1/chat/completions", {**auth, **json_type}, stream),
        ("POST", "/v1/files", {**auth, "Content-Type": "multipart/form-data; boundary=B"}, form),
        ("GET", "/v1/models", auth, None),
        ("POST", "/v1/chat/completions", {"Authorization": "Bearer mgw-wrong", **json_type}, chat),
        ("POST", "/v1/chat/completions", {**auth, **json_type}, b"{not json"),
        ("POST", "/v1/chat/completions", {**auth, "Content-Type": "text/plain"}, b"model=x"),
        ("POST", "/v1/chat/completions", {**auth, **json_type, "x-fake-fault": "status=500"}, chat),
        ("POST", "/v1/chat/completions",
         {**auth, **json_type, "x-fake-fault": "status=429; retry_after=3"}, chat),
        ("POST", "/v1/chat/completions",
         {**auth, **json_type, "x-fake-fault": "close_before_response"}, chat),
        ("POST", "/v1/chat/completions",
         {**auth, **json_type, "x-fake-fault": "reset_after_chunks=3"}, stream),
        ("GET", "/v1/no-such-endpoint", auth, None),
        ("GET", "/v1/%2e%2e/admin", auth, None),
        ("GET", "/gateway/me", auth, None),
        ("GET", "/metrics", {}, None),
        ("GET", "/readyz", {}, None),
    ]  # fmt: skip
    try:
        for method, path, headers, body in calls:
            connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
            try:
                connection.request(method, path, body=body, headers=headers)
                answer = connection.getresponse()
                try:
                    data = answer.read()
                except http.client.IncompleteRead as cut:
                    data = cut.partial
                statuses.append(answer.status)
                seen.append(str(answer.getheaders()).encode() + data)
            finally:
                connection.close()
        stack.gateway.send_signal(signal.SIGTERM)
        assert stack.gateway.wait(timeout=15) == 0
    finally:
        stack.stop()
    assert statuses == [200, 200, 200, 200, 401, 400, 400, 500, 429, 502, 200, 404, 404, 200,
                        200, 200]  # fmt: skip
    ledger_files = [p.read_bytes() for p in tmp_path.glob("ledger.sqlite3*")]
    log = stack.log.read_bytes()
    assert {r["outcome"] for r in stack.rows()} == {"ok", "rejected", "upstream_error"}
    for haystack in [*seen, log, *ledger_files]:
        assert processes.UPSTREAM_KEY.encode() not in haystack
    for haystack in [log, *ledger_files]:
        assert processes.KEY.encode() not in haystack and b"mgw-wrong" not in haystack


def _spaced_stream(line_end: bytes) -> bytes:
    """What an OpenAI-compatible upstream written in Python sends for a stream whose client
    asked for usage: `json.dumps` defaults (`, ` and `: `), in events ended by `line_end`."""
    chunks = [
        {"id": "c1", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": None}
        ], "usage": None}
        for word in ("Hello", " there")
    ]  # fmt: skip
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    chunks.append({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage})
    body = b"".join(b"data: " + json.dumps(c).encode() + line_end * 2 for c in chunks)
    return body + b"data: [DONE]" + line_end * 2


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_a_spaced_json_upstreams_usage_chunk_never_reaches_a_client_that_did_not_ask(
    make_gateway: GatewayFactory, line_end: bytes
):
    body = _spaced_stream(line_end)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    async with ScriptedUpstream(answer) as upstream:
        gateway = await make_gateway(upstream_url=upstream.base_url)
        stream = await gateway.client().chat.completions.create(**CHAT, stream=True)
        words = [chunk.choices[0].delta.content async for chunk in stream]  # no IndexError
        assert words == ["Hello", " there"]
        [sent] = upstream.requests
        assert b'"stream_options":{"include_usage":true}' in sent  # the gateway asked for it
    [row] = await gateway.rows()
    assert (row["input_tokens"], row["output_tokens"], row["tokens_estimated"]) == (9, 2, 0)
    kept = [e for e in body.split(line_end * 2) if e and b'"choices": []' not in e]
    expected = b"".join(e.replace(b', "usage": null', b"") + line_end * 2 for e in kept)
    assert row["response_bytes"] == len(expected)  # what the client was sent


async def test_a_background_loop_whose_pass_turns_a_cancel_into_another_error_still_stops():
    # asyncpg answers a cancel inside a query with its own error; the loop logs it and
    # pauses: the pause must end the loop, or the close awaiting it waits forever.
    from gateway.loop import cancel_and_wait, pause

    passes = 0
    logged: list[Exception] = []
    in_pass = asyncio.Event()

    async def a_pass() -> None:
        nonlocal passes
        passes += 1
        in_pass.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("connection closed mid-query") from None

    async def loop() -> None:
        while True:
            try:
                await a_pass()
            except Exception as error:  # as the exporter's, sealer's and notifier's loops
                logged.append(error)
            await pause(0)

    task = asyncio.create_task(loop())
    await in_pass.wait()
    await asyncio.wait_for(cancel_and_wait(task), 2)
    assert task.cancelled() and passes == 1
    assert [str(error) for error in logged] == ["connection closed mid-query"]

"""The front door: which request heads the lean path serves, and the lean path on real
sockets — keep-alive, pipelining, bodies in pieces, answers before the body, and the hand-over
of a connection to aiohttp (in-process on asyncio, and in a `serve` process on uvloop)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import orjson
import pytest

from gateway.front.head import parse_head
from tests import processes
from tests.conftest import RESEARCH_KEY, Fake, Gateway

AUTH_LINE = f"Authorization: Bearer {RESEARCH_KEY}"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]}
CHAT_BODY = orjson.dumps(CHAT)


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chat_request(*extra: str, body: bytes = CHAT_BODY) -> bytes:
    return (
        head(
            "POST /v1/chat/completions HTTP/1.1",
            "Host: gateway",
            AUTH_LINE,
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *extra,
        )
        + body
    )


# ---------------------------------------------------------------- which heads are lean


def test_a_plain_proxied_call_is_read_on_the_lean_path() -> None:
    parsed = parse_head(head("POST /v1/chat/completions?x=1 HTTP/1.1", "Host: h",
                             "Content-Type:application/json", "Content-Length: 12",
                             "X-Empty:", "Connection: keep-alive"))  # fmt: skip
    assert parsed is not None
    assert (parsed.method, parsed.target, parsed.content_length, parsed.keep_alive) == (
        "POST", "/v1/chat/completions?x=1", 12, True,
    )  # fmt: skip
    assert list(parsed.headers.items()) == [
        ("Host", "h"), ("Content-Type", "application/json"), ("Content-Length", "12"),
        ("X-Empty", ""), ("Connection", "keep-alive"),
    ]  # fmt: skip
    closing = parse_head(head("GET /v1/models HTTP/1.1", "Connection: Close"))
    assert closing is not None and not closing.keep_alive and closing.content_length == 0


@pytest.mark.parametrize(
    "lines",
    [
        ("POST /v1/chat/completions HTTP/1.1", "Transfer-Encoding: chunked"),
        ("POST /v1/chat/completions HTTP/1.1", "Content-Encoding: gzip"),
        ("POST /v1/files HTTP/1.1", "Expect: 100-continue"),
        ("GET /v1/realtime HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"),
        ("GET /v1/models HTTP/1.0",),
        ("GET /v1/models/gpt%2D4o HTTP/1.1",),
        ("GET /v1/a/../models HTTP/1.1",),
        ("GET /v1//models HTTP/1.1",),
        ("GET /v1/organization/usage/completions HTTP/1.1",),
        ("GET /gateway/me HTTP/1.1",),
        ("GET /portal/ HTTP/1.1",),
        ("GET http://h/v1/models HTTP/1.1",),
        ("POST /v1/chat/completions HTTP/1.1", "Content-Length: 2", "Content-Length: 2"),
        ("POST /v1/chat/completions HTTP/1.1", "Content-Length: 2, 2"),
        ("POST /v1/chat/completions HTTP/1.1", "Content-Length: -1"),
        ("POST /v1/chat/completions HTTP/1.1", "Content-Length : 2"),
        ("GET /v1/models HTTP/1.1", "X-Folded: a", " b"),
        ("get /v1/models HTTP/1.1",),
        ("BREW /v1/models HTTP/1.1",),
        ("GET /v1/models HTTP/1.1", "X-Nul: a\x00b"),
        ("GET /v1/models HTTP/1.1", "X-Utf8: é"),
        ("GET /v1/models HTTP/1.1", "X Space: a"),
        ("GET /v1/models  HTTP/1.1",),
    ],
)
def test_anything_unusual_is_left_to_aiohttp(lines: tuple[str, ...]) -> None:
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    assert parse_head(raw) is None


def test_bare_line_feeds_are_left_to_aiohttp() -> None:
    assert parse_head(b"GET /v1/models HTTP/1.1\nHost: h\r\n\r\n") is None
    assert parse_head(b"GET /v1/models HTTP/1.1\r\nHost: h\n\r\n") is None
    assert parse_head(b"GET /v1/models HTTP/1.1\r\nHost: h\rX: y\r\n\r\n") is None


# ---------------------------------------------------------------- on real sockets


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length or chunked answer from a keep-alive connection."""
    status_line = await reader.readuntil(b"\r\n")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked"
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    return int(status_line.split()[1]), headers, body


async def connect(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(gateway.server.host, gateway.server.port)


async def test_pipelined_calls_on_one_connection_are_answered_in_order(
    gateway: Gateway, fake: Fake
) -> None:
    reader, writer = await connect(gateway)
    writer.write(chat_request() + chat_request() + head("GET /v1/models HTTP/1.1", AUTH_LINE))
    answers = [await asyncio.wait_for(read_answer(reader), 5) for _ in range(3)]
    writer.close()
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert orjson.loads(answers[2][2])["object"] == "list"
    ids = [headers["x-gateway-request-id"] for _, headers, _ in answers]
    rows = [await gateway.row(request_id) for request_id in ids]
    assert [(r["path"], r["status"], r["outcome"]) for r in rows] == [
        ("/v1/chat/completions", 200, "ok"), ("/v1/chat/completions", 200, "ok"),
        ("/v1/models", 200, "ok"),
    ]  # fmt: skip
    assert [r["request_bytes"] for r in rows] == [len(CHAT_BODY), len(CHAT_BODY), 0]
    assert [r["response_bytes"] for r in rows] == [len(body) for _, _, body in answers]
    sent = [seen.body for seen in fake.state.received if seen.path == "/v1/chat/completions"]
    assert sent == [CHAT_BODY, CHAT_BODY]


async def test_a_body_sent_a_byte_at_a_time_goes_up_whole(gateway: Gateway, fake: Fake) -> None:
    reader, writer = await connect(gateway)
    request = chat_request()
    for index in range(len(request)):
        writer.write(request[index : index + 1])
        await writer.drain()
    status, headers, body = await asyncio.wait_for(read_answer(reader), 5)
    writer.close()
    assert status == 200
    [seen] = [s for s in fake.state.received if s.path == "/v1/chat/completions"]
    assert seen.body == CHAT_BODY
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["request_bytes"], row["response_bytes"]) == (len(CHAT_BODY), len(body))


async def test_an_answer_before_the_body_drops_the_rest_and_keeps_the_connection(
    gateway: Gateway, fake: Fake
) -> None:
    reader, writer = await connect(gateway)
    body = b'{"model":"gpt-4o-mini","messages":[]}' + b" " * 5000
    refused = chat_request(body=body).replace(AUTH_LINE.encode(), b"Authorization: Bearer nope")
    cut = refused.index(b"\r\n\r\n") + 4 + 100
    writer.write(refused[:cut])  # the head and 100 bytes: refused at once (401)
    status, _, answer = await asyncio.wait_for(read_answer(reader), 5)
    assert status == 401 and orjson.loads(answer)["error"]["code"] == "invalid_api_key"
    writer.write(refused[cut:] + chat_request())  # the rest is dropped; the next call is served
    status, headers, _ = await asyncio.wait_for(read_answer(reader), 5)
    writer.close()
    assert status == 200
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["status"], row["request_bytes"]) == (200, len(CHAT_BODY))
    assert [s.body for s in fake.state.received if s.path == "/v1/chat/completions"] == [CHAT_BODY]


async def test_connection_close_is_honoured(gateway: Gateway) -> None:
    reader, writer = await connect(gateway)
    writer.write(chat_request("Connection: close"))
    status, headers, _ = await asyncio.wait_for(read_answer(reader), 5)
    assert status == 200 and headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    writer.close()


async def test_the_gateways_own_pages_hand_the_connection_to_aiohttp(
    gateway: Gateway, fake: Fake
) -> None:
    reader, writer = await connect(gateway)
    writer.write(chat_request())
    first = await asyncio.wait_for(read_answer(reader), 5)
    writer.write(head("GET /gateway/me HTTP/1.1", "Host: gateway", AUTH_LINE))
    me = await asyncio.wait_for(read_answer(reader), 5)
    writer.write(chat_request())  # the same connection, now on aiohttp's protocol
    last = await asyncio.wait_for(read_answer(reader), 5)
    writer.close()
    assert [first[0], me[0], last[0]] == [200, 200, 200]
    assert orjson.loads(me[2])["team"] == "research"
    assert me[1]["x-content-type-options"] == "nosniff"
    assert "x-content-type-options" not in first[1]  # proxied answers are the upstream's
    rows = await gateway.rows()
    assert [(r["path"], r["status"]) for r in rows] == [
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 200),
    ]  # fmt: skip


async def test_a_client_leaving_mid_answer_is_recorded_as_such(gateway: Gateway) -> None:
    reader, writer = await connect(gateway)
    writer.write(chat_request("x-fake-fault: latency_ms=500"))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    for _ in range(200):
        if (rows := await gateway.rows()) and rows[0]["outcome"]:
            break
        await asyncio.sleep(0.02)
    [row] = rows
    assert (row["status"], row["outcome"]) == (499, "client_disconnect")


def test_serve_on_uvloop_hands_a_connection_over_and_keeps_it(tmp_path: Path) -> None:
    stack = processes.Stack(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            key = f"Authorization: Bearer {processes.KEY}"
            for target in ("/v1/models", "/healthz", "/v1/models", "/metrics"):
                sock.sendall(head(f"GET {target} HTTP/1.1", "Host: gateway", key))
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += sock.recv(65536)
                head_bytes, _, body = answer.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head_bytes.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                while len(body) < length:
                    body += sock.recv(65536)
                assert head_bytes.startswith(b"HTTP/1.1 200"), (target, head_bytes)
    finally:
        stack.stop()  # SIGTERM: the ledger is flushed
    rows = stack.rows()
    assert [(r["path"], r["status"]) for r in rows] == [("/v1/models", 200)] * 2

"""Walls between teams: what the upstream receives is exactly what the gateway checked, one
well-formed request per call, with the team's own credentials and nothing of the client's
that could carry a credential."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from tests.conftest import (
    PRODUCT_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Fake,
    Gateway,
    GatewayFactory,
    sha,
)
from tests.raw_upstream import RawUpstream
from tests.test_reliability import api_calls

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
OTHER_KEY = "mgw-test-other-team-secret"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    gateway: Gateway,
    method: str,
    path: str,
    key: str = RESEARCH_KEY,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
        method,
        str(gateway.server.make_url(path)),
        data=body,
        headers={**bearer(key), **(headers or {})},
        skip_auto_headers=["Content-Type"],
    ) as answer:
        return answer.status, CIMultiDict(answer.headers), await answer.read()


def error_code(body: bytes) -> str | None:
    return orjson.loads(body)["error"]["code"]


# ---------------------------------------------------------------- framing


async def test_a_compressed_body_cannot_smuggle_a_request_onto_another_teams_call(
    make_gateway: GatewayFactory, raw_upstream: RawUpstream
):
    gateway = await make_gateway(upstream_url=raw_upstream.base_url)
    smuggled = b"x" * 40 + b"DELETE /v1/files/file-X HTTP/1.1\r\nX-Ignore: "
    compressed = gzip.compress(smuggled)
    assert len(compressed) < len(smuggled)  # what made the old framing cut it short
    status, _, _ = await call(
        gateway,
        "GET",
        "/v1/models",
        body=compressed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    answer = await gateway.client().chat.completions.create(**CHAT)
    assert answer.id == "chatcmpl-raw"
    seen = [(r.method, r.target) for r in raw_upstream.requests]
    assert seen == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    assert raw_upstream.malformed == []
    first, second = raw_upstream.requests
    assert first.connection == second.connection  # the keep-alive connection was reused
    assert first.body == smuggled  # the decoded body, whole, as the first request's own
    assert "content-encoding" not in first.header_names()
    assert first.header("Transfer-Encoding") == "chunked"
    assert first.header("Content-Length") is None
    assert orjson.loads(second.body)["model"] == "gpt-4o-mini"
    assert second.header("Content-Length") == str(len(second.body))
    rows = await gateway.rows()
    assert [(r["method"], r["path"], r["status"]) for r in rows] == [
        ("GET", "/v1/models", 200),
        ("POST", "/v1/chat/completions", 200),
    ]
    assert rows[0]["request_bytes"] == len(smuggled)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_json_body_is_checked_and_forwarded_decoded_and_relabelled(
    gateway: Gateway, fake: Fake, encoding: str
):
    plain = orjson.dumps(CHAT)
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    status, headers, body = await call(
        gateway,
        "POST",
        "/v1/chat/completions",
        body=packed,
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
    )
    assert status == 200, body
    (received,) = api_calls(fake)
    assert received.body == plain
    assert received.headers["content-length"] == str(len(plain))
    assert "content-encoding" not in received.headers
    row = await gateway.row(headers["x-gateway-request-id"])
    assert (row["model"], row["input_tokens"] > 0, row["outcome"]) == ("gpt-4o-mini", True, "ok")


@pytest.mark.parametrize(
    "labels",
    [["compress"], ["x-gzip"], ["gzip, gzip"], ["gzip", "gzip"], ["identity, gzip"]],
    ids=["compress", "x-gzip", "gzip-twice-in-one", "two-headers", "identity-then-gzip"],
)
async def test_a_request_encoding_the_gateway_cannot_relay_exactly_is_415(
    gateway: Gateway, fake: Fake, labels: list[str]
):
    head = [
        "POST /v1/files HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {RESEARCH_KEY}",
        "Content-Type: application/octet-stream",
        *(f"Content-Encoding: {label}" for label in labels),
        "Content-Length: 5",
        "Connection: close",
    ]
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b"hello")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 415 ")
    assert b'"code":"unsupported_content_encoding"' in answer
    assert api_calls(fake) == []
    (row,) = await gateway.rows()
    assert (row["status"], row["outcome"], row["error_code"]) == (
        415,
        "rejected",
        "unsupported_content_encoding",
    )


# ---------------------------------------------------------------- what goes upstream


async def test_client_headers_reach_the_upstream_only_by_the_allow_list(
    gateway: Gateway, fake: Fake
):
    sent = {
        "api-key": "sk-client-azure-style",
        "x-api-key": "sk-client-anthropic-style",
        "X_Api_Key": "sk-underscore",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=secret",
        "OpenAI-Organization": "org-client-choice",
        "OpenAI-Project": "proj_client_choice",
        "X-Forwarded-For": "10.0.0.1",
        "Transfer_Encoding": "chunked",
        "X-Custom-Thing": "no",
        "OpenAI-Beta": "assistants=v2",
        "Idempotency-Key": "idem-1",
        "X-Stainless-Lang": "python",
        "User-Agent": "walls-test/1",
        "Accept-Language": "en",
    }
    status, _, _ = await call(
        gateway,
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps(CHAT),
        headers={**sent, "Content-Type": "application/json"},
    )
    assert status == 200
    (received,) = api_calls(fake)
    forwarded = set(received.headers)
    for dropped in (
        "api-key", "x-api-key", "x_api_key", "proxy-authorization", "cookie",
        "openai-organization", "openai-project", "x-forwarded-for", "transfer_encoding",
        "x-custom-thing",
    ):  # fmt: skip
        assert dropped not in forwarded
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert received.headers["openai-beta"] == "assistants=v2"
    assert received.headers["idempotency-key"] == "idem-1"
    assert received.headers["x-stainless-lang"] == "python"
    assert received.headers["user-agent"] == "walls-test/1"
    assert received.headers["accept-language"] == "en"


async def test_a_team_with_its_own_upstream_credentials_sends_them_and_no_one_elses(
    make_gateway: GatewayFactory, fake: Fake, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TEAM_OWN_UPSTREAM_KEY", "sk-team-own-key-0123456789")
    gateway = await make_gateway(
        teams=f"""
  research:
    upstream: {{api_key_env: TEAM_OWN_UPSTREAM_KEY, organization: org-research,
                project: proj_research}}
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
  product:
    upstream: {{project: proj_product}}
    keys: [{{id: product-web, sha256: {sha(PRODUCT_KEY)}}}]
  other:
    keys: [{{id: other-dev, sha256: {sha(OTHER_KEY)}}}]
"""
    )
    for key in (RESEARCH_KEY, PRODUCT_KEY, OTHER_KEY):
        status, _, _ = await call(
            gateway, "GET", "/v1/models", key=key, headers={"OpenAI-Project": "proj_client"}
        )
        # The fake checks the key: only the gateway's own passes; the team's own is refused.
        assert status == (502 if key == RESEARCH_KEY else 200)
    research, product, other = api_calls(fake)
    assert research.headers["authorization"] == "Bearer sk-team-own-key-0123456789"
    assert (research.headers["openai-organization"], research.headers["openai-project"]) == (
        "org-research",
        "proj_research",
    )
    assert product.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert product.headers["openai-project"] == "proj_product"
    assert "openai-organization" not in product.headers
    assert other.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "openai-project" not in other.headers


async def test_the_upstream_refusing_the_gateways_key_is_a_502_for_the_operator(
    make_gateway: GatewayFactory, fake: Fake, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-wrong-upstream-key-abcdefgh")
    gateway = await make_gateway()
    status, headers, body = await call(
        gateway, "POST", "/v1/chat/completions", body=orjson.dumps(CHAT),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 502
    error = orjson.loads(body)["error"]
    assert (error["code"], error["type"]) == ("upstream_auth_failed", "upstream_error")
    assert "operator" in error["message"]
    assert b"abcdefgh" not in body and b"sk-" not in body  # no part of the key
    assert not any(name.lower() == "set-cookie" for name in headers)
    row = await gateway.row(headers["X-Gateway-Request-Id"])
    assert (row["status"], row["outcome"], row["error_code"], row["cost_nanousd"]) == (
        502,
        "upstream_error",
        "upstream_auth_failed",
        0,
    )


async def test_upstream_cookies_never_reach_a_client(
    make_gateway: GatewayFactory, raw_upstream: RawUpstream
):
    raw_upstream.extra_headers = [("Set-Cookie", "__cf_bm=shared-session; path=/")]
    gateway = await make_gateway(upstream_url=raw_upstream.base_url)
    status, headers, _ = await call(gateway, "GET", "/v1/models")
    assert status == 200
    assert not any(name.lower() == "set-cookie" for name in headers)


# ---------------------------------------------------------------- paths and methods


async def test_a_trailing_slash_is_the_same_path_checked_metered_and_forwarded(
    gateway: Gateway, fake: Fake
):
    status, headers, body = await call(
        gateway, "POST", "/v1/chat/completions/?x=1", body=orjson.dumps(CHAT),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, body
    (received,) = api_calls(fake)
    assert (received.path, received.query) == ("/v1/chat/completions", "x=1")
    row = await gateway.row(headers["X-Gateway-Request-Id"])
    assert (row["path"], row["model"]) == ("/v1/chat/completions", "gpt-4o-mini")
    assert row["input_tokens"] > 0 and row["cost_nanousd"] > 0
    # The product team may call /v1/chat/completions only: the slash changes nothing.
    status, _, body = await call(gateway, "GET", "/v1/models/", key=PRODUCT_KEY)
    assert (status, error_code(body)) == (403, "endpoint_not_allowed")


@pytest.mark.parametrize("path", ["/v1//models", "/v1/files//content", "/v1/", "/v1//"])
async def test_empty_path_segments_are_404_and_never_forwarded(
    gateway: Gateway, fake: Fake, path: str
):
    status, _, body = await call(gateway, "GET", path)
    assert (status, error_code(body)) == (404, "unknown_url")
    assert api_calls(fake) == []


async def test_allow_lists_match_the_method_as_well_as_the_path(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(
        teams=f"""
  research:
    endpoints: ["GET /v1/models", /v1/chat/completions]
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
"""
    )
    assert (await call(gateway, "GET", "/v1/models"))[0] == 200
    assert (await call(gateway, "GET", "/v1/models/gpt-4o-mini"))[0] == 200
    status, _, body = await call(gateway, "DELETE", "/v1/models/ft:gpt-4o-mini:org::abc")
    assert (status, error_code(body)) == (403, "endpoint_not_allowed")
    assert b"DELETE /v1/models/ft:gpt-4o-mini:org::abc" in body
    status, _, _ = await call(
        gateway, "POST", "/v1/chat/completions", body=orjson.dumps(CHAT),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200
    assert [r.method for r in api_calls(fake)] == ["GET", "GET", "POST"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/organization/projects",
        "/v1/organization/admin_api_keys",
        "/v1/organization/users/user-1",
        "/v1/organization/usage/embeddings",
        "/v1/organization",
    ],
)
async def test_the_upstreams_admin_surface_is_closed_to_team_keys(
    gateway: Gateway, fake: Fake, path: str
):
    # The research team has no `endpoints` list: everything else is open to it.
    for method in ("GET", "POST", "DELETE"):
        body = b"{}" if method == "POST" else None
        status, _, body = await call(gateway, method, path, body=body)
        assert (status, error_code(body)) == (404, "unknown_url")
    assert api_calls(fake) == []
    rows = await gateway.rows()
    assert {(r["status"], r["outcome"], r["team"]) for r in rows} == {(404, "rejected", "research")}


# ---------------------------------------------------------------- JSON bodies


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": null, "messages": []}',
        b'{"model": 4, "messages": []}',
        b'{"model": ["gpt-4o-mini"], "messages": []}',
        b'{"model": {"name": "gpt-4o-mini"}, "messages": []}',
        b'{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o"}',
        b'{"model": "gpt-4o-mini", "stream": false, "messages": [], "stream": true}',
    ],
    ids=["null", "number", "list", "object", "duplicate-model", "duplicate-stream"],
)
async def test_an_ambiguous_or_non_string_model_is_400_and_never_forwarded(
    gateway: Gateway, fake: Fake, body: bytes
):
    status, headers, answer = await call(
        gateway, "POST", "/v1/chat/completions", key=PRODUCT_KEY, body=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert (status, error_code(answer)) == (400, "invalid_request")
    assert api_calls(fake) == []
    row = await gateway.row(headers["X-Gateway-Request-Id"])
    assert (row["status"], row["outcome"], row["team"]) == (400, "rejected", "product")


async def test_a_deeply_nested_streamed_request_is_forwarded_not_a_500(
    gateway: Gateway, fake: Fake
):
    nested = b"[" * 300 + b"]" * 300
    for options in (b"", b',"stream_options":{"include_obfuscation":false}'):
        body = (
            b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]'
            + options
            + b',"metadata_nested":'
            + nested
            + b"}"
        )
        status, _, answer = await call(
            gateway, "POST", "/v1/chat/completions", body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 200, answer
        assert answer.rstrip().endswith(b"data: [DONE]")
        assert b'"usage":{' not in answer  # the usage the gateway asked for stays with it
    sent = [orjson.loads(r.body) for r in api_calls(fake)]
    assert [s["stream_options"]["include_usage"] for s in sent] == [True, True]
    assert sent[1]["stream_options"]["include_obfuscation"] is False


async def test_token_reservations_count_every_choice_and_float_caps(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(
        teams=f"""
  research:
    limits: {{tokens_per_minute: 1000}}
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
"""
    )

    async def chat(**extra: object) -> tuple[int, bytes]:
        status, _, body = await call(
            gateway, "POST", "/v1/chat/completions", body=orjson.dumps({**CHAT, **extra}),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        return status, body

    status, body = await chat(max_tokens=300, n=4)  # 1,200 output tokens at most
    assert (status, orjson.loads(body)["error"]["type"]) == (429, "tokens")
    status, body = await chat(max_tokens=999.5)  # a float cap was not counted at all
    assert (status, orjson.loads(body)["error"]["type"]) == (429, "tokens")
    status, _ = await chat(max_tokens=300, n=1)
    assert status == 200
    assert len(api_calls(fake)) == 1


# ---------------------------------------------------------------- stalled bodies


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
async def test_a_stalled_body_is_408_frees_its_slot_and_is_recorded(
    make_gateway: GatewayFactory, fake: Fake, content_type: str
):
    gateway = await make_gateway(
        body_timeout_s=0.4,
        teams=f"""
  research:
    limits: {{max_concurrent: 1}}
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
""",
    )
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {RESEARCH_KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    started = asyncio.get_running_loop().time()
    writer.write(head + b'{"partial":')
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    waited = asyncio.get_running_loop().time() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    assert 0.4 <= waited < 1.5
    (row,) = await gateway.rows()
    assert (row["status"], row["outcome"], row["error_code"], row["request_bytes"]) == (
        408,
        "rejected",
        "request_timeout",
        11,
    )
    # The one concurrency slot is free again: the next call goes through.
    status, _, _ = await call(gateway, "GET", "/v1/models")
    assert status == 200
    assert [(r.method, r.path) for r in api_calls(fake)][-1] == ("GET", "/v1/models")


# ---------------------------------------------------------------- objects of a shared key

TWO_TEAMS = f"""
  research:
    keys: [{{id: research-dev, sha256: {sha(RESEARCH_KEY)}}}]
  other:
    keys: [{{id: other-dev, sha256: {sha(OTHER_KEY)}}}]
"""


async def test_another_teams_file_is_404_and_never_forwarded(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=TWO_TEAMS)
    research, other = gateway.client(RESEARCH_KEY), gateway.client(OTHER_KEY)
    made = await research.files.create(file=("a.jsonl", b'{"x": 1}\n'), purpose="batch")
    assert (await research.files.retrieve(made.id)).id == made.id
    assert await (await research.files.content(made.id)).aread() == b'{"x": 1}\n'
    forwarded = len(api_calls(fake))
    for attempt in (
        other.files.retrieve(made.id),
        other.files.content(made.id),
        other.files.delete(made.id),
        other.batches.create(
            input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            await attempt
        assert caught.value.code == "not_found"
        assert caught.value.message == f"Error code: 404 - No such File object: {made.id}"
    assert len(api_calls(fake)) == forwarded  # none of the four reached the upstream
    rows = [r for r in await gateway.rows() if r["team"] == "other"]
    assert [(r["status"], r["outcome"], r["error_code"]) for r in rows] == [
        (404, "rejected", "not_found")
    ] * 4
    # The owner still has it, and may delete it; after that it is gone for the owner too.
    assert (await research.files.delete(made.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await research.files.retrieve(made.id)


async def test_lists_show_each_team_only_its_own_objects_page_by_page(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=TWO_TEAMS)
    research, other = gateway.client(RESEARCH_KEY), gateway.client(OTHER_KEY)
    mine, theirs = [], []
    for index in range(7):
        owner, kept = (research, mine) if index % 3 else (other, theirs)
        made = await owner.files.create(file=(f"{index}.txt", b"x"), purpose="assistants")
        kept.append(made.id)
    listed = await research.files.list(limit=2)
    seen = [f.id for f in listed.data]
    async for page in listed.iter_pages():
        if page is not listed:
            seen += [f.id for f in page.data]
    assert sorted(seen) == sorted(mine) and len(seen) == len(mine)
    assert sorted(f.id for f in (await other.files.list()).data) == sorted(theirs)


async def test_a_stored_response_is_its_teams_also_when_streamed(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=TWO_TEAMS)
    research, other = gateway.client(RESEARCH_KEY), gateway.client(OTHER_KEY)
    made = await research.responses.create(model="gpt-4o-mini", input="hi")
    async with await research.responses.create(
        model="gpt-4o-mini", input="hi", stream=True
    ) as events:
        streamed_id = None
        async for event in events:
            if event.type == "response.created":
                streamed_id = event.response.id
    assert streamed_id is not None
    # Right after the stream, its creator chains on it; the other team cannot.
    follow = await research.responses.create(
        model="gpt-4o-mini", input="more", previous_response_id=streamed_id
    )
    assert follow.id
    for response_id in (made.id, streamed_id):
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.create(
                model="gpt-4o-mini", input="x", previous_response_id=response_id
            )


async def test_a_chat_call_cannot_read_another_teams_file_even_with_an_escaped_key(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=TWO_TEAMS)
    made = await gateway.client(RESEARCH_KEY).files.create(
        file=("a.pdf", b"%PDF-1.4"), purpose="user_data"
    )
    forwarded = len(api_calls(fake))
    for key_text in ('"file_id"', '"file\\u005fid"'):
        body = (
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ['
            '{"type": "text", "text": "summarize"}, '
            f'{{"type": "file", "file": {{{key_text}: "{made.id}"}}}}]}}]}}'
        ).encode()
        assert orjson.loads(body)["messages"][0]["content"][1]["file"] == {"file_id": made.id}
        status, _, answer = await call(
            gateway, "POST", "/v1/chat/completions", key=OTHER_KEY, body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert (status, error_code(answer)) == (404, "not_found")
    assert len(api_calls(fake)) == forwarded

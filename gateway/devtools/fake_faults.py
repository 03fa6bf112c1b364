"""What the fake upstream does to every `/v1` request before its endpoint answers: records it
(`FakeState.received`), checks the key, and applies the faults of `FakeState.faults` and the
request's `x-fake-fault` header (latency, a connection cut before the answer, an error status,
an organization's rate limit); the headers OpenAI adds to every answer; and the `/_fake/*`
endpoints that set the faults and show what was received.

The stream faults (`chunk_delay_ms`, `reset_after_chunks`, `malformed_sse`), `no_usage` and
`gzip` are applied where the answer is written (`gateway.devtools.fake_http`,
`gateway.devtools.fake_chat`).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.devtools.fake_http import (
    CONTEXT,
    FAKE_STATE,
    MAX_KEPT_BODY,
    RUNTIME,
    ApiError,
    FakeState,
    Received,
    RequestContext,
    Runtime,
    abort,
    error_response,
    json_response,
)

FAULT_NAMES = (
    "latency_ms",
    "status",
    "retry_after",
    "chunk_delay_ms",
    "reset_after_chunks",
    "malformed_sse",
    "no_usage",
    "close_before_response",
    "gzip",
    "org_requests",
    "org_window_s",
)
_COMMON_HEADERS = (
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-limit-tokens", "10000000"),
    ("x-ratelimit-remaining-tokens", "9999000"),
    ("x-ratelimit-reset-tokens", "0s"),
)
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def _parse_faults(header: str) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in header.split(";"):
        key, _, value = item.partition("=")
        if key := key.strip():
            faults[key] = value.strip()
    return faults


def _request_faults(request: web.Request, state: FakeState) -> dict[str, str]:
    header = request.headers.get("x-fake-fault")
    if header is None:
        return dict(state.faults) if state.faults else {}
    return {**state.faults, **_parse_faults(header)}


async def _record(request: web.Request, state: FakeState) -> Received:
    length = request.content_length
    body = b""
    if request.body_exists and length is not None and length <= MAX_KEPT_BODY:
        body = await request.read()
    headers = {name.lower(): value for name, value in request.headers.items()}
    received = Received(
        request.method, request.path, request.query_string, headers, length or 0, body
    )
    state.record(received)
    return received


def _settle_body_size(request: web.Request, received: Received) -> None:
    if request.content_length is None and request.body_exists:
        received.body_size = request.content.total_bytes


def _check_auth(request: web.Request, expected: str | None) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, _NO_KEY, code="invalid_api_key")
    if expected is not None and token != expected:
        shown = f"{token[:3]}***{token[-4:]}" if len(token) > 8 else "***"
        message = f"Incorrect API key provided: {shown}."
        raise ApiError(401, message, code="invalid_api_key")


def _raise_status_fault(ctx: RequestContext) -> None:
    status = ctx.fault_int("status")
    if status is None or status < 400:
        return
    if status == 429:
        retry_after = str(ctx.fault_int("retry_after") or 1)
        headers = {"retry-after": retry_after, "x-ratelimit-remaining-requests": "0"}
        message = "Rate limit reached for requests. Please try again later."
        raise ApiError(429, message, kind="requests", code="rate_limit_exceeded", headers=headers)
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        raise ApiError(status, message, kind="server_error")
    raise ApiError(status, f"Fake upstream fault: status {status}.")


async def _preflight(request: web.Request, ctx: RequestContext, runtime: Runtime) -> bool:
    """Record the request and apply request-level faults; False if the connection was cut."""
    ctx.received = await _record(request, runtime.state)
    latency = ctx.fault_int("latency_ms")
    if latency:
        await asyncio.sleep(latency / 1000)
    if "close_before_response" in ctx.faults:
        abort(request)
        return False
    # The organization (admin) endpoints take the admin key, checked by their handlers.
    if not request.path.startswith("/v1/organization/"):
        _check_auth(request, runtime.api_key)
        _org_rate_limit(request, ctx, runtime)
    _raise_status_fault(ctx)
    return True


_ORG_HEADERS = web.RequestKey("org_headers", dict)


def _org_rate_limit(request: web.Request, ctx: RequestContext, runtime: Runtime) -> None:
    """Fault `org_requests=N; org_window_s=S`: the whole key may make N calls per fixed window
    of S seconds, as an organization-wide limit; beyond it, OpenAI's 429."""
    limit = ctx.fault_int("org_requests")
    if limit is None:
        return
    window = float(ctx.faults.get("org_window_s", "60"))
    now = time.monotonic()
    if now >= runtime.org_window_start + window:
        runtime.org_window_start, runtime.org_used = now, 0
    reset = runtime.org_window_start + window - now
    reset_text = f"{max(1, round(reset * 1000))}ms"
    if runtime.org_used >= limit:
        runtime.state.org_rejections += 1
        headers = {
            "retry-after": str(max(1, math.ceil(reset))),
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": reset_text,
        }
        message = "Rate limit reached for requests (organization). Please try again later."
        raise ApiError(429, message, kind="requests", code="rate_limit_exceeded", headers=headers)
    runtime.org_used += 1
    request[_ORG_HEADERS] = {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(limit - runtime.org_used),
        "x-ratelimit-reset-requests": reset_text,
    }


@web.middleware
async def fake_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    is_api = request.path.startswith("/v1/")
    faults = _request_faults(request, runtime.state) if is_api else {}
    ctx = RequestContext(0 if runtime.state.deterministic else next(runtime.counter), faults)
    request[CONTEXT] = ctx
    try:
        if is_api and not await _preflight(request, ctx, runtime):
            return web.Response(status=502)  # never reaches the client: transport is gone
        return await handler(request)
    except ApiError as error:
        return error_response(request, error)
    finally:
        if ctx.received is not None:
            _settle_body_size(request, ctx.received)


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    ctx = request.get(CONTEXT)
    n = ctx.n if ctx is not None else next(request.app[RUNTIME].counter)
    headers = response.headers
    headers["x-request-id"] = f"req_fake_{n}"
    for name, value in request.get(_ORG_HEADERS, {}).items():
        headers[name] = value
    for name, value in _COMMON_HEADERS:
        if name not in headers:
            headers[name] = value


def _normalize_faults(data: dict[str, Any]) -> dict[str, str]:
    return {
        str(key): "" if value is True else str(value)
        for key, value in data.items()
        if value is not None and value is not False
    }


async def set_faults(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "Expected a JSON object of faults.")
    faults = request.app[FAKE_STATE].faults
    faults.clear()
    faults.update(_normalize_faults(data))
    return json_response(request, faults)


async def clear_faults(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].faults.clear()
    return web.Response(status=204)


async def list_received(request: web.Request) -> web.Response:
    items = [
        {"method": r.method, "path": r.path, "headers": r.headers, "body_size": r.body_size}
        for r in request.app[FAKE_STATE].received
    ]
    return json_response(request, items)


async def clear_received(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].received.clear()
    return web.Response(status=204)

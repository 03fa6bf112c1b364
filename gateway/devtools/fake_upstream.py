"""An OpenAI-compatible fake upstream for tests, demos and benchmarks.

Token counts are deterministic: the tokens of a text are its whitespace-separated
words.  Behaviour can be bent per request with the ``x-fake-*`` headers or globally
through ``FakeState.faults`` (see ``FAULT_NAMES``). Files, uploads, batches, vector stores,
stored responses, fine-tuning jobs, containers and conversations live in
``FakeState.objects`` (``gateway.devtools.fake_objects``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import itertools
import math
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler

from gateway.devtools.fake_objects import COLLECTIONS, Call, FakeObjects, ObjectError, message_items
from gateway.devtools.fake_usage import UsageTotals, new_totals, record_usage, usage_handlers
from gateway.loop import new_event_loop
from gateway.pricing.table import PriceTable

__all__ = [
    "FAKE_STATE",
    "FAULT_NAMES",
    "WORDS",
    "FakeState",
    "Received",
    "build_fake_app",
    "run_fake_upstream",
]

WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
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
MAX_RECEIVED = 10_000
MAX_KEPT_BODY = 1 << 20
MAX_JSON_BODY = 256 << 20
BLOCK_SIZE = 1 << 16
DEFAULT_REPLY_WORDS = 12
DEFAULT_EMBEDDING_DIMS = 8
TOKENS_PER_MESSAGE = 3

_SSE_TYPE = "text/event-stream; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
_MALFORMED_EVENT = b'data: {"id": broken\n\n'
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_COMMON_HEADERS = (
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-limit-tokens", "10000000"),
    ("x-ratelimit-remaining-tokens", "9999000"),
    ("x-ratelimit-reset-tokens", "0s"),
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)

_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small", "whisper-1", "tts-1")
_MODEL_BODIES = {
    model: orjson.dumps(
        {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
    )
    for model in _MODEL_IDS
}
_MODEL_LIST_BODY = b'{"object":"list","data":[' + b",".join(_MODEL_BODIES.values()) + b"]}"


FIXED_TIME = 1_700_000_000


@dataclass
class Received:
    """One request the fake handled."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body_size: int
    body: bytes


@dataclass
class FakeState:
    received: list[Received] = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    # Same ids and timestamps for every call, so two calls' bodies can be compared byte for byte.
    deterministic: bool = False
    usage: UsageTotals = field(default_factory=new_totals)  # what the Usage API reports
    prices: PriceTable | None = None  # what the Costs API charges
    org_rejections: int = 0  # 429s sent by the `org_requests` fault
    objects: FakeObjects = field(default_factory=FakeObjects)

    def __post_init__(self) -> None:
        self.objects.contents = self.files  # one content store for every file

    def record(self, item: Received) -> None:
        self.received.append(item)
        if len(self.received) > MAX_RECEIVED:
            del self.received[0]


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}


@dataclass
class _Runtime:
    state: FakeState
    api_key: str | None
    counter: Iterator[int]
    org_window_start: float = 0.0
    org_used: int = 0


@dataclass(slots=True)
class _Ctx:
    n: int
    faults: dict[str, str]
    received: Received | None = None

    @property
    def with_usage(self) -> bool:
        return "no_usage" not in self.faults

    def fault_int(self, name: str) -> int | None:
        value = self.faults.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise _ApiError(400, f"Invalid x-fake-fault value {name}={value!r}.") from None


@dataclass(frozen=True, slots=True)
class _Tokens:
    prompt: int
    reply: int
    cached: int
    reasoning: int

    @property
    def completion(self) -> int:
        return self.reply + self.reasoning


@dataclass
class _Form:
    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False
    filename: str | None = None
    size: int = 0
    content: bytes = b""


FAKE_STATE = web.AppKey("FAKE_STATE", FakeState)
_RUNTIME = web.AppKey("fake_runtime", _Runtime)
_CTX = web.RequestKey("fake_ctx", _Ctx)


@lru_cache(maxsize=256)
def _reply_words(n: int) -> tuple[str, ...]:
    return tuple(WORDS[i % len(WORDS)] for i in range(n))


@lru_cache(maxsize=256)
def _reply_text(n: int) -> str:
    return " ".join(_reply_words(n))


@lru_cache(maxsize=256)
def _deltas(n: int, group: int) -> tuple[str, ...]:
    words = _reply_words(n)
    return tuple(
        (" " if start else "") + " ".join(words[start : start + group])
        for start in range(0, n, group)
    )


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _content_words(content: Any) -> int:
    if isinstance(content, list):
        return sum(
            _words(part.get("text"))
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES
        )
    return _words(content)


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        raise _ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    return sum(
        _content_words(message.get("content")) + TOKENS_PER_MESSAGE
        for message in messages
        if isinstance(message, dict)
    )


def _responses_input_tokens(items: Any) -> int:
    if isinstance(items, list):
        return sum(_content_words(item.get("content")) for item in items if isinstance(item, dict))
    return _words(items)


def _token_items(value: Any, param: str) -> list[str | list[int]]:
    """Split a prompt/input into items: a flat int list is one item, a list of lists many."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [value]
        if all(isinstance(item, str | list) for item in value):
            return value
    raise _ApiError(400, f"Invalid type for '{param}'.", param=param)


def _item_tokens(item: str | list[int]) -> int:
    return _words(item) if isinstance(item, str) else len(item)


def _header_int(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return max(int(value), 0)
    except ValueError:
        raise _ApiError(400, f"Invalid {name} header: {value!r}.") from None


def _reply_length(request: web.Request, limit: Any) -> int:
    forced = _header_int(request, "x-fake-reply-words")
    if forced is not None:
        return forced
    if isinstance(limit, int) and not isinstance(limit, bool):
        return max(min(limit, DEFAULT_REPLY_WORDS), 0)
    return DEFAULT_REPLY_WORDS


def _tokens(request: web.Request, prompt: int, reply: int) -> _Tokens:
    cached = min(_header_int(request, "x-fake-cached-tokens") or 0, prompt)
    reasoning = _header_int(request, "x-fake-reasoning-tokens") or 0
    return _Tokens(prompt, reply, cached, reasoning)


def _handled(request: web.Request, body: dict[str, Any], tokens: _Tokens) -> None:
    state = request.app[FAKE_STATE]
    record_usage(state.usage, body.get("model"), tokens.prompt, tokens.cached, tokens.completion)


def _chunk_words(request: web.Request) -> int:
    return max(_header_int(request, "x-fake-chunk-words") or 1, 1)


def _chat_usage(tokens: _Tokens) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
        "prompt_tokens_details": {"cached_tokens": tokens.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": tokens.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _legacy_usage(tokens: _Tokens) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
    }


def _responses_usage(tokens: _Tokens) -> dict[str, Any]:
    return {
        "input_tokens": tokens.prompt,
        "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.completion,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.completion,
    }


@lru_cache(maxsize=4096)
def _embedding_values(index: int, tokens: int, dims: int) -> tuple[float, ...]:
    """value[j] = ((31*index + 7*tokens + 13*j) % 256 - 128) / 128, exact in float32."""
    return tuple(((31 * index + 7 * tokens + 13 * j) % 256 - 128) / 128 for j in range(dims))


@lru_cache(maxsize=4096)
def _embedding_base64(index: int, tokens: int, dims: int) -> str:
    packed = struct.pack(f"<{dims}f", *_embedding_values(index, tokens, dims))
    return base64.b64encode(packed).decode("ascii")


@lru_cache(maxsize=128)
def _pseudo_random(seed: bytes, length: int) -> bytes:
    digest = hashlib.sha256(seed).digest()
    out = bytearray()
    while len(out) < length:
        out += digest
        digest = hashlib.sha256(digest).digest()
    return bytes(out[:length])


def _blob_chunks(block: bytes, size: int) -> Iterator[memoryview]:
    if size <= 0:
        return
    view = memoryview(block)
    full, rest = divmod(size, len(block))
    for _ in range(full):
        yield view
    if rest:
        yield view[:rest]


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _named_sse(kind: str, sequence: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _wants_gzip(request: web.Request, ctx: _Ctx) -> bool:
    return "gzip" in ctx.faults and "gzip" in request.headers.get("Accept-Encoding", "").lower()


def _json_bytes_response(
    request: web.Request,
    body: bytes,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    response_headers = {"Content-Type": "application/json"}
    if headers:
        response_headers.update(headers)
    ctx = request.get(_CTX)
    if ctx is not None and _wants_gzip(request, ctx):
        body = gzip.compress(body, compresslevel=5, mtime=0)
        response_headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, status=status, headers=response_headers)


def _json_response(request: web.Request, payload: Any, *, status: int = 200) -> web.Response:
    return _json_bytes_response(request, orjson.dumps(payload), status=status)


def _error_response(request: web.Request, error: _ApiError) -> web.Response:
    body = orjson.dumps(error.body())
    return _json_bytes_response(request, body, status=error.status, headers=error.headers)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _stream(
    request: web.Request,
    chunks: Iterable[bytes | memoryview],
    content_type: str,
    length: int | None = None,
) -> web.StreamResponse:
    """Write each chunk separately, honouring chunk_delay_ms and reset_after_chunks."""
    ctx = request[_CTX]
    delay = (ctx.fault_int("chunk_delay_ms") or 0) / 1000
    reset_after = ctx.fault_int("reset_after_chunks")
    response = web.StreamResponse(headers={"Content-Type": content_type})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    try:
        for index, chunk in enumerate(chunks):
            if index == reset_after:
                _abort(request)
                return response
            if delay and index:
                await asyncio.sleep(delay)
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        pass
    return response


def _data_events(
    head: dict[str, Any],
    choice_lists: Iterable[list[dict[str, Any]]],
    usage: dict[str, Any] | None,
    malformed: bool,
) -> list[bytes]:
    """Events of a `data:`-only stream with OpenAI's exact include_usage semantics."""
    tail: dict[str, Any] = {"usage": None} if usage is not None else {}
    events = [_sse({**head, "choices": choices, **tail}) for choices in choice_lists]
    if malformed:
        events.insert(len(events) // 2, _MALFORMED_EVENT)
    if usage is not None:
        events.append(_sse({**head, "choices": [], "usage": usage}))
    events.append(_DONE)
    return events


def _stream_usage(body: dict[str, Any], ctx: _Ctx) -> bool:
    options = body.get("stream_options")
    return ctx.with_usage and isinstance(options, dict) and options.get("include_usage") is True


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    received = request[_CTX].received
    if received is not None and not received.body and len(raw) <= MAX_KEPT_BODY:
        received.body = raw
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _ApiError(400, _BAD_JSON) from None
    if not isinstance(data, dict):
        raise _ApiError(400, _BAD_JSON)
    return data


def _replay_stream(request: web.Request, body: bytes) -> StreamReader:
    # The body was already consumed for recording; feed it to a fresh reader.
    # A limit above the body size keeps the reader from pausing the real transport.
    stream = StreamReader(request.protocol, len(body) + 1, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    return stream


async def _multipart_reader(request: web.Request) -> MultipartReader:
    if not request.content_type.startswith("multipart/"):
        raise _ApiError(400, "Expected a multipart/form-data request body.")
    received = request[_CTX].received
    if received is not None and received.body:
        return MultipartReader(request.headers, _replay_stream(request, received.body))
    return await request.multipart()


async def _read_file_part(part: BodyPartReader, form: _Form, keep: bool) -> None:
    form.has_file = True
    form.filename = part.filename
    chunks: list[bytes] = []
    while chunk := await part.read_chunk(BLOCK_SIZE):
        form.size += len(chunk)
        if keep:
            chunks.append(chunk)
    form.content = b"".join(chunks)


async def _read_form(request: web.Request, keep_file: bool, file_field: str = "file") -> _Form:
    reader = await _multipart_reader(request)
    form = _Form()
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == file_field:
                await _read_file_part(part, form, keep_file)
            else:
                form.fields[part.name or ""] = await part.text()
    except ValueError as exc:
        raise _ApiError(400, f"Could not parse multipart form: {exc}") from None
    if not form.has_file:
        raise _ApiError(400, f"Missing required parameter: '{file_field}'.", param=file_field)
    return form


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
        raise _ApiError(401, _NO_KEY, code="invalid_api_key")
    if expected is not None and token != expected:
        shown = f"{token[:3]}***{token[-4:]}" if len(token) > 8 else "***"
        message = f"Incorrect API key provided: {shown}."
        raise _ApiError(401, message, code="invalid_api_key")


def _raise_status_fault(ctx: _Ctx) -> None:
    status = ctx.fault_int("status")
    if status is None or status < 400:
        return
    if status == 429:
        retry_after = str(ctx.fault_int("retry_after") or 1)
        headers = {"retry-after": retry_after, "x-ratelimit-remaining-requests": "0"}
        message = "Rate limit reached for requests. Please try again later."
        raise _ApiError(429, message, kind="requests", code="rate_limit_exceeded", headers=headers)
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        raise _ApiError(status, message, kind="server_error")
    raise _ApiError(status, f"Fake upstream fault: status {status}.")


async def _preflight(request: web.Request, ctx: _Ctx, runtime: _Runtime) -> bool:
    """Record the request and apply request-level faults; False if the connection was cut."""
    ctx.received = await _record(request, runtime.state)
    latency = ctx.fault_int("latency_ms")
    if latency:
        await asyncio.sleep(latency / 1000)
    if "close_before_response" in ctx.faults:
        _abort(request)
        return False
    # The organization (admin) endpoints take the admin key, checked by their handlers.
    if not request.path.startswith("/v1/organization/"):
        _check_auth(request, runtime.api_key)
        _org_rate_limit(request, ctx, runtime)
    _raise_status_fault(ctx)
    return True


_ORG_HEADERS = web.RequestKey("org_headers", dict)


def _org_rate_limit(request: web.Request, ctx: _Ctx, runtime: _Runtime) -> None:
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
        raise _ApiError(429, message, kind="requests", code="rate_limit_exceeded", headers=headers)
    runtime.org_used += 1
    request[_ORG_HEADERS] = {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(limit - runtime.org_used),
        "x-ratelimit-reset-requests": reset_text,
    }


@web.middleware
async def _fake_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    runtime = request.app[_RUNTIME]
    is_api = request.path.startswith("/v1/")
    faults = _request_faults(request, runtime.state) if is_api else {}
    ctx = _Ctx(0 if runtime.state.deterministic else next(runtime.counter), faults)
    request[_CTX] = ctx
    try:
        if is_api and not await _preflight(request, ctx, runtime):
            return web.Response(status=502)  # never reaches the client: transport is gone
        return await handler(request)
    except _ApiError as error:
        return _error_response(request, error)
    finally:
        if ctx.received is not None:
            _settle_body_size(request, ctx.received)


async def _add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    ctx = request.get(_CTX)
    n = ctx.n if ctx is not None else next(request.app[_RUNTIME].counter)
    headers = response.headers
    headers["x-request-id"] = f"req_fake_{n}"
    for name, value in request.get(_ORG_HEADERS, {}).items():
        headers[name] = value
    for name, value in _COMMON_HEADERS:
        if name not in headers:
            headers[name] = value


def _now(request: web.Request) -> int:
    return FIXED_TIME if request.app[_RUNTIME].state.deterministic else int(time.time())


def _chat_message_choice(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}


def _chat_chunk_choice(delta: dict[str, Any], finish: str | None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


def _chat_choice_lists(deltas: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
    yield _chat_chunk_choice({"role": "assistant", "content": "", "refusal": None}, None)
    for delta in deltas:
        yield _chat_chunk_choice({"content": delta}, None)
    yield _chat_chunk_choice({}, "stop")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request[_CTX]
    body = await _read_json(request)
    prompt = _chat_prompt_tokens(body.get("messages"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    tokens = _tokens(request, prompt, _reply_length(request, limit))
    _handled(request, body, tokens)
    head = {
        "id": f"chatcmpl-fake{ctx.n}",
        "object": "chat.completion",
        "created": _now(request),
        "model": body.get("model"),
    }
    if body.get("stream") is True:
        return await _chat_stream(request, ctx, body, head, tokens)
    result: dict[str, Any] = {**head, "choices": [_chat_message_choice(_reply_text(tokens.reply))]}
    if ctx.with_usage:
        result["usage"] = _chat_usage(tokens)
    result["service_tier"] = "default"
    result["system_fingerprint"] = "fp_fake"
    return _json_response(request, result)


async def _chat_stream(
    request: web.Request,
    ctx: _Ctx,
    body: dict[str, Any],
    head: dict[str, Any],
    tokens: _Tokens,
) -> web.StreamResponse:
    head = {
        **head,
        "object": "chat.completion.chunk",
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    usage = _chat_usage(tokens) if _stream_usage(body, ctx) else None
    choices = _chat_choice_lists(_deltas(tokens.reply, _chunk_words(request)))
    events = _data_events(head, choices, usage, "malformed_sse" in ctx.faults)
    return await _stream(request, events, _SSE_TYPE)


def _text_choice(text: str, finish: str | None) -> list[dict[str, Any]]:
    return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]


async def _completions(request: web.Request) -> web.StreamResponse:
    ctx = request[_CTX]
    body = await _read_json(request)
    prompt = sum(_item_tokens(item) for item in _token_items(body.get("prompt"), "prompt"))
    tokens = _tokens(request, prompt, _reply_length(request, body.get("max_tokens")))
    _handled(request, body, tokens)
    head = {
        "id": f"cmpl-fake{ctx.n}",
        "object": "text_completion",
        "created": _now(request),
        "model": body.get("model"),
    }
    if body.get("stream") is True:
        usage = _legacy_usage(tokens) if _stream_usage(body, ctx) else None
        deltas = _deltas(tokens.reply, _chunk_words(request))
        choices = [*(_text_choice(delta, None) for delta in deltas), _text_choice("", "stop")]
        events = _data_events(head, choices, usage, "malformed_sse" in ctx.faults)
        return await _stream(request, events, _SSE_TYPE)
    result: dict[str, Any] = {**head, "choices": _text_choice(_reply_text(tokens.reply), "stop")}
    if ctx.with_usage:
        result["usage"] = _legacy_usage(tokens)
    return _json_response(request, result)


@dataclass(frozen=True, slots=True)
class _ResponseInfo:
    n: int
    id: str
    created: int
    body: dict[str, Any]
    tokens: _Tokens
    with_usage: bool

    @property
    def item_id(self) -> str:
        return f"msg_fake{self.n}"


def _output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(info: _ResponseInfo, done: bool) -> dict[str, Any]:
    content = [_output_text_part(_reply_text(info.tokens.reply))] if done else []
    return {
        "type": "message",
        "id": info.item_id,
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": content,
    }


def _response_object(info: _ResponseInfo, done: bool) -> dict[str, Any]:
    instructions = info.body.get("instructions")
    result: dict[str, Any] = {
        "id": info.id,
        "object": "response",
        "created_at": info.created,
        "status": "completed" if done else "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": info.body.get("max_output_tokens"),
        "model": info.body.get("model"),
        "output": [_message_item(info, True)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": info.body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": info.body.get("store") is not False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
    }
    if info.with_usage:
        result["usage"] = _responses_usage(info.tokens) if done else None
    result["user"] = None
    result["metadata"] = {}
    return result


def _response_event_fields(info: _ResponseInfo, group: int) -> Iterator[tuple[str, dict[str, Any]]]:
    pending = _response_object(info, False)
    text = _reply_text(info.tokens.reply)
    where = {"item_id": info.item_id, "output_index": 0, "content_index": 0}
    yield "response.created", {"response": pending}
    yield "response.in_progress", {"response": pending}
    yield "response.output_item.added", {"output_index": 0, "item": _message_item(info, False)}
    yield "response.content_part.added", {**where, "part": _output_text_part("")}
    for delta in _deltas(info.tokens.reply, group):
        yield "response.output_text.delta", {**where, "delta": delta, "logprobs": []}
    yield "response.output_text.done", {**where, "text": text, "logprobs": []}
    yield "response.content_part.done", {**where, "part": _output_text_part(text)}
    yield "response.output_item.done", {"output_index": 0, "item": _message_item(info, True)}
    yield "response.completed", {"response": _response_object(info, True)}


async def _responses(request: web.Request) -> web.StreamResponse:
    ctx = request[_CTX]
    body = await _read_json(request)
    reply = _reply_length(request, body.get("max_output_tokens"))
    tokens = _tokens(request, _responses_input_tokens(body.get("input")), reply)
    objects = request.app[FAKE_STATE].objects
    _check_context(objects, body)
    _handled(request, body, tokens)
    response_id = objects.new_id("response")
    info = _ResponseInfo(ctx.n, response_id, _now(request), body, tokens, ctx.with_usage)
    objects.store_response(_response_object(info, True), message_items(objects, body.get("input")))
    if body.get("stream") is not True:
        return _json_response(request, _response_object(info, True))
    fields = _response_event_fields(info, _chunk_words(request))
    events = [_named_sse(kind, seq, data) for seq, (kind, data) in enumerate(fields)]
    return await _stream(request, events, _SSE_TYPE)


def _check_context(objects: FakeObjects, body: dict[str, Any]) -> None:
    """A previous response or conversation named must exist, as OpenAI checks."""
    previous = body.get("previous_response_id")
    if previous is not None and previous not in objects.store["response"]:
        message = f"Previous response with id '{previous}' not found."
        code = "previous_response_not_found"
        raise _ApiError(400, message, param="previous_response_id", code=code)
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and conversation not in objects.store["conversation"]:
        message = f"Conversation with id '{conversation}' not found."
        raise _ApiError(404, message, param="conversation")


def _embedding_dims(value: Any) -> int:
    if value is None:
        return DEFAULT_EMBEDDING_DIMS
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65536:
        return value
    raise _ApiError(400, "'dimensions' must be a positive integer.", param="dimensions")


def _embedding_entry(index: int, tokens: int, dims: int, as_base64: bool) -> dict[str, Any]:
    if as_base64:
        vector: Any = _embedding_base64(index, tokens, dims)
    else:
        vector = _embedding_values(index, tokens, dims)
    return {"object": "embedding", "index": index, "embedding": vector}


async def _embeddings(request: web.Request) -> web.Response:
    ctx = request[_CTX]
    body = await _read_json(request)
    counts = [_item_tokens(item) for item in _token_items(body.get("input"), "input")]
    dims = _embedding_dims(body.get("dimensions"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, "Invalid 'encoding_format'.", param="encoding_format")
    data = [
        _embedding_entry(index, tokens, dims, encoding == "base64")
        for index, tokens in enumerate(counts)
    ]
    result: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
    if ctx.with_usage:
        prompt = sum(counts)
        result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return _json_response(request, result)


async def _list_models(request: web.Request) -> web.Response:
    return _json_bytes_response(request, _MODEL_LIST_BODY)


async def _get_model(request: web.Request) -> web.Response:
    model = request.match_info["model_id"]
    body = _MODEL_BODIES.get(model)
    if body is None:
        message = f"The model '{model}' does not exist or you do not have access to it."
        raise _ApiError(404, message, code="model_not_found", param="model")
    return _json_bytes_response(request, body)


async def _upload_file(request: web.Request) -> web.Response:
    form = await _read_form(request, keep_file=True)
    purpose = form.fields.get("purpose")
    if not purpose:
        raise _ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
    objects = request.app[FAKE_STATE].objects
    file = objects.add_file(form.content, form.filename or "upload", purpose, _now(request))
    return _json_response(request, file)


async def _file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    content = request.app[FAKE_STATE].files.get(file_id)
    if content is None:
        raise _ApiError(404, f"No such File object: {file_id}", param="id")
    return web.Response(body=content, content_type="application/octet-stream")


async def _transcribe(request: web.Request) -> web.Response:
    ctx = request[_CTX]
    form = await _read_form(request, keep_file=False)
    words = _reply_length(request, None)
    text = _reply_text(words)
    if form.fields.get("response_format") in ("text", "srt", "vtt"):
        return web.Response(text=text, content_type="text/plain")
    result: dict[str, Any] = {"text": text}
    if ctx.with_usage:
        audio = form.size // 1000
        result["usage"] = {
            "type": "tokens",
            "input_tokens": audio,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
            "output_tokens": words,
            "total_tokens": audio + words,
        }
    return _json_response(request, result)


async def _speech(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    text = body.get("input")
    if not isinstance(text, str):
        raise _ApiError(400, "Missing required parameter: 'input'.", param="input")
    size = _header_int(request, "x-fake-body-bytes")
    if size is None:
        size = 1000 * _words(text)
    block = _pseudo_random(text.encode(), min(size, BLOCK_SIZE))
    return await _stream(request, _blob_chunks(block, size), "audio/mpeg", size)


async def _download(request: web.Request) -> web.StreamResponse:
    try:
        size = int(request.query.get("bytes", "0"))
    except ValueError:
        size = -1
    if size < 0:
        raise _ApiError(400, "'bytes' must be a non-negative integer.", param="bytes")
    block = _pseudo_random(b"fake-download", BLOCK_SIZE)
    return await _stream(request, _blob_chunks(block, size), "application/octet-stream", size)


async def _objects(request: web.Request) -> web.Response:
    """Files (but their upload and content), uploads, batches, vector stores, stored responses,
    fine-tuning jobs, containers, conversations: `gateway.devtools.fake_objects`."""
    call = Call(request.method, request.path.split("/")[2:], dict(request.query), {}, _now(request))
    if request.method == "POST" and request.body_exists:
        if request.content_type.startswith("multipart/"):
            call.data = (await _read_form(request, keep_file=True, file_field="data")).content
        else:
            call.body = await _read_json(request)
    try:
        payload = request.app[FAKE_STATE].objects.handle(call)
    except ObjectError as error:
        raise _ApiError(error.status, error.message, param=error.param, code=error.code) from None
    except LookupError:
        return await _unknown(request)
    return _json_response(request, payload)


async def _unknown(request: web.Request) -> web.Response:
    message = f"Invalid URL ({request.method} {request.path})"
    raise _ApiError(404, message, code="unknown_url")


def _normalize_faults(data: dict[str, Any]) -> dict[str, str]:
    return {
        str(key): "" if value is True else str(value)
        for key, value in data.items()
        if value is not None and value is not False
    }


async def _set_faults(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise _ApiError(400, "Expected a JSON object of faults.")
    faults = request.app[FAKE_STATE].faults
    faults.clear()
    faults.update(_normalize_faults(data))
    return _json_response(request, faults)


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].faults.clear()
    return web.Response(status=204)


async def _list_received(request: web.Request) -> web.Response:
    items = [
        {"method": r.method, "path": r.path, "headers": r.headers, "body_size": r.body_size}
        for r in request.app[FAKE_STATE].received
    ]
    return _json_response(request, items)


async def _clear_received(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].received.clear()
    return web.Response(status=204)


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", _chat_completions)
    router.add_post("/v1/completions", _completions)
    router.add_post("/v1/responses", _responses)
    router.add_post("/v1/embeddings", _embeddings)
    router.add_get("/v1/models", _list_models)
    router.add_get("/v1/models/{model_id}", _get_model)
    router.add_post("/v1/files", _upload_file)
    router.add_get("/v1/files/{file_id}/content", _file_content)
    router.add_post("/v1/audio/transcriptions", _transcribe)
    router.add_post("/v1/audio/speech", _speech)
    router.add_get("/v1/fake/download", _download)
    router.add_get("/v1/organization/usage/completions", _org_usage)
    router.add_get("/v1/organization/costs", _org_costs)
    for collection in COLLECTIONS:
        router.add_route("*", f"/v1/{collection}", _objects)
        router.add_route("*", f"/v1/{collection}/{{rest:.*}}", _objects)
    router.add_route("*", "/v1/{tail:.*}", _unknown)
    router.add_post("/_fake/faults", _set_faults)
    router.add_delete("/_fake/faults", _clear_faults)
    router.add_get("/_fake/received", _list_received)
    router.add_delete("/_fake/received", _clear_received)


async def _org_usage(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    return await usage_handlers(state.usage, state.prices)[0](request)


async def _org_costs(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    return await usage_handlers(state.usage, state.prices)[1](request)


def build_fake_app(state: FakeState | None = None) -> web.Application:
    """Build the fake upstream; FAKE_UPSTREAM_KEY (if set now) becomes the only valid key."""
    state = FakeState() if state is None else state
    app = web.Application(middlewares=[_fake_middleware], client_max_size=MAX_JSON_BODY)
    app[FAKE_STATE] = state
    api_key = os.environ.get("FAKE_UPSTREAM_KEY") or None
    app[_RUNTIME] = _Runtime(state, api_key, itertools.count(1))
    app.on_response_prepare.append(_add_common_headers)
    _add_routes(app.router)
    return app


def run_fake_upstream(host: str = "127.0.0.1", port: int = 9797) -> None:
    """Serve the fake upstream until interrupted."""
    loop = new_event_loop()
    web.run_app(build_fake_app(), host=host, port=port, access_log=None, loop=loop, backlog=1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9797)
    args = parser.parse_args(argv)
    run_fake_upstream(args.host, args.port)


if __name__ == "__main__":
    main()

"""The fake upstream's plumbing, shared by its endpoints: its state (`FakeState`: what it
received, its faults, files and objects), a request's context (its number, its faults), OpenAI's
error shape (`ApiError`), request bodies read (JSON, multipart forms) and answers written (JSON,
gzipped when the `gzip` fault asks for it; streamed chunk by chunk under the stream faults).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.streams import StreamReader

from gateway.devtools.fake_object_store import FakeObjects
from gateway.devtools.fake_usage import UsageTotals, new_totals
from gateway.pricing.table import PriceTable

MAX_RECEIVED = 10_000
MAX_KEPT_BODY = 1 << 20
MAX_JSON_BODY = 256 << 20
BLOCK_SIZE = 1 << 16
FIXED_TIME = 1_700_000_000

_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)


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
    """What a fake upstream holds: what it received, its faults, files, usage and objects."""

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


class ApiError(Exception):
    """An answer in OpenAI's error shape, raised by an endpoint and written by the middleware."""

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
class Runtime:
    """The app's own: its state, the one valid key (if any), the request counter, the
    `org_requests` fault's window."""

    state: FakeState
    api_key: str | None
    counter: Iterator[int]
    org_window_start: float = 0.0
    org_used: int = 0


@dataclass(slots=True)
class RequestContext:
    """One request's: its number (ids and `x-request-id`), its faults, what was recorded."""

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
            raise ApiError(400, f"Invalid x-fake-fault value {name}={value!r}.") from None


@dataclass
class Form:
    """A multipart form read: its text fields, and its file part's name, size and content."""

    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False
    filename: str | None = None
    size: int = 0
    content: bytes = b""


FAKE_STATE = web.AppKey("FAKE_STATE", FakeState)
RUNTIME = web.AppKey("fake_runtime", Runtime)
CONTEXT = web.RequestKey("fake_ctx", RequestContext)


def header_int(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return max(int(value), 0)
    except ValueError:
        raise ApiError(400, f"Invalid {name} header: {value!r}.") from None


def answer_time(request: web.Request) -> int:
    return FIXED_TIME if request.app[RUNTIME].state.deterministic else int(time.time())


def _wants_gzip(request: web.Request, ctx: RequestContext) -> bool:
    return "gzip" in ctx.faults and "gzip" in request.headers.get("Accept-Encoding", "").lower()


def json_bytes_response(
    request: web.Request,
    body: bytes,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    response_headers = {"Content-Type": "application/json"}
    if headers:
        response_headers.update(headers)
    ctx = request.get(CONTEXT)
    if ctx is not None and _wants_gzip(request, ctx):
        body = gzip.compress(body, compresslevel=5, mtime=0)
        response_headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, status=status, headers=response_headers)


def json_response(request: web.Request, payload: Any, *, status: int = 200) -> web.Response:
    return json_bytes_response(request, orjson.dumps(payload), status=status)


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = orjson.dumps(error.body())
    return json_bytes_response(request, body, status=error.status, headers=error.headers)


def abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def stream_chunks(
    request: web.Request,
    chunks: Iterable[bytes | memoryview],
    content_type: str,
    length: int | None = None,
) -> web.StreamResponse:
    """Write each chunk separately, honouring chunk_delay_ms and reset_after_chunks."""
    ctx = request[CONTEXT]
    delay = (ctx.fault_int("chunk_delay_ms") or 0) / 1000
    reset_after = ctx.fault_int("reset_after_chunks")
    response = web.StreamResponse(headers={"Content-Type": content_type})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    try:
        for index, chunk in enumerate(chunks):
            if index == reset_after:
                abort(request)
                return response
            if delay and index:
                await asyncio.sleep(delay)
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        pass
    return response


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    received = request[CONTEXT].received
    if received is not None and not received.body and len(raw) <= MAX_KEPT_BODY:
        received.body = raw
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, _BAD_JSON) from None
    if not isinstance(data, dict):
        raise ApiError(400, _BAD_JSON)
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
        raise ApiError(400, "Expected a multipart/form-data request body.")
    received = request[CONTEXT].received
    if received is not None and received.body:
        return MultipartReader(request.headers, _replay_stream(request, received.body))
    return await request.multipart()


async def _read_file_part(part: BodyPartReader, form: Form, keep: bool) -> None:
    form.has_file = True
    form.filename = part.filename
    chunks: list[bytes] = []
    while chunk := await part.read_chunk(BLOCK_SIZE):
        form.size += len(chunk)
        if keep:
            chunks.append(chunk)
    form.content = b"".join(chunks)


async def read_form(request: web.Request, keep_file: bool, file_field: str = "file") -> Form:
    reader = await _multipart_reader(request)
    form = Form()
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == file_field:
                await _read_file_part(part, form, keep_file)
            else:
                form.fields[part.name or ""] = await part.text()
    except ValueError as exc:
        raise ApiError(400, f"Could not parse multipart form: {exc}") from None
    if not form.has_file:
        raise ApiError(400, f"Missing required parameter: '{file_field}'.", param=file_field)
    return form

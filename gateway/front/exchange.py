"""One request on the lean path, as the pipeline reads it, and the writer its answer goes
out through.

`LeanRequest` offers the slice of aiohttp's `web.Request` the pipeline uses (method, paths,
query, headers, body stream, lengths, content type, transport), and the three things
aiohttp's `web.StreamResponse.prepare` asks of a request (`_payload_writer`, `_prepare_hook`,
`version` / `keep_alive`): the pipeline's responses are aiohttp's own classes on both paths,
so their headers and framing are decided in one place.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.helpers import parse_content_type
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import _serialize_headers as serialize_head  # C where built
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from gateway.front.head import RequestHead

if TYPE_CHECKING:
    from gateway.front.protocol import FrontProtocol

# A body buffered past this pauses reading from the client until the pipeline catches up.
BODY_HIGH_WATER = 256 * 1024


@functools.lru_cache(maxsize=256)
def _mimetype(raw: str) -> str:
    # aiohttp's own parser (the email package's), so both paths read a label alike; it is
    # slow, and clients send the same few labels.
    return parse_content_type(raw)[0]


class RequestBody:
    """The request body as it arrives: what `aiohttp.StreamReader` offers the pipeline
    (`readany`, `total_bytes`, `is_eof`, `set_exception`), with reading paused while a
    large body waits to be read."""

    __slots__ = (
        "_protocol", "_remaining", "_chunks", "_buffered", "total_bytes", "_eof", "_waiter",
        "_exception",
    )  # fmt: skip

    def __init__(self, protocol: FrontProtocol, length: int) -> None:
        self._protocol = protocol
        self._remaining = length
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.total_bytes = 0
        self._eof = length == 0
        self._waiter: asyncio.Future[None] | None = None
        self._exception: BaseException | None = None

    @property
    def remaining(self) -> int:
        return self._remaining

    def feed(self, data: bytes) -> None:
        """Bytes of this body (never more than it has left)."""
        self._chunks.append(data)
        self._buffered += len(data)
        self.total_bytes += len(data)
        self._remaining -= len(data)
        if not self._remaining:
            self._eof = True
        self._wake()
        if self._buffered > BODY_HIGH_WATER:
            self._protocol.pause_body()

    def is_eof(self) -> bool:
        """Every byte of the body has arrived (some may still be unread)."""
        return self._eof

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    async def readany(self) -> bytes:
        while True:
            if self._exception is not None:
                raise self._exception
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self._protocol.resume_body()
                return data
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class LeanRequest:
    """A proxied call's request on the lean path (see the module's docstring)."""

    version = HttpVersion11

    def __init__(self, head: RequestHead, protocol: FrontProtocol, app: web.Application) -> None:
        self.method = head.method
        self.raw_path = head.target
        self.path = head.target.partition("?")[0]
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(head.headers)
        self.content = RequestBody(protocol, head.content_length)
        self.keep_alive = head.keep_alive
        self.transport: asyncio.Transport | None = protocol.transport
        self.task: asyncio.Task[Any] | None = None
        self._has_length = "Content-Length" in self.headers
        self._length = head.content_length
        self.app = app
        self._payload_writer = ResponseWriter(protocol)

    @property
    def content_length(self) -> int | None:
        return self._length if self._has_length else None

    @property
    def body_exists(self) -> bool:
        return self._length > 0

    @property
    def content_type(self) -> str:
        raw = self.headers.get("Content-Type")
        return "application/octet-stream" if raw is None else _mimetype(raw)

    @property
    def query(self) -> MultiDictProxy[str]:
        return URL(self.raw_path).query

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        signal = self.app.on_response_prepare
        if signal:
            await signal.send(self, response)


class ResponseWriter:
    """What aiohttp's response classes write through (the part of its `StreamWriter` they
    use): the head held until the first body bytes or `send_headers`, so a small answer goes
    out in one write; Content-Length or chunked framing; waits while the client's socket is
    full."""

    __slots__ = ("_protocol", "length", "chunked", "output_size", "buffer_size", "_head", "ended")

    def __init__(self, protocol: FrontProtocol) -> None:
        self._protocol = protocol
        self.length: int | None = None
        self.chunked = False
        self.output_size = 0
        self.buffer_size = 0
        self._head: bytes | None = None
        self.ended = False

    def enable_chunking(self) -> None:
        self.chunked = True

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise NotImplementedError("the gateway never compresses an answer")

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        self._head = serialize_head(status_line, headers)

    def send_headers(self) -> None:
        if self._head is not None:
            self._send(b"")

    async def write(self, chunk: bytes | bytearray | memoryview, **_: Any) -> None:
        data = self._framed(chunk)
        if data:
            self._send(data)
            await self._protocol.drained()

    async def write_eof(self, chunk: bytes = b"") -> None:
        if self.ended:
            return
        data = self._framed(chunk) if chunk else b""
        if self.chunked:
            data += b"0\r\n\r\n"
        if data or self._head is not None:
            self._send(data)
        self.ended = True
        await self._protocol.drained()

    async def drain(self) -> None:
        await self._protocol.drained()

    def _framed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        data = bytes(chunk)
        if self.length is not None:  # never past the length the head announced
            if len(data) > self.length:
                data = data[: self.length]
            self.length -= len(data)
        if self.chunked and data:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def _send(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(data)
        self.output_size += len(data)

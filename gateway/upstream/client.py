"""A lean HTTP/1.1 client for the one upstream the gateway talks to.

aiohttp's client does far more per request than a proxy needs (cookie jars, redirects,
tracing, URL handling), and on one core that cost halves throughput. This client keeps a
pool of keep-alive connections to one origin, writes a request as one buffer, and parses
answers with llhttp (httptools), handing body chunks over as they arrive, with flow control.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_HIGH_WATER = 256 << 10
_LOW_WATER = 64 << 10
_IDLE_TIMEOUT_S = 15.0  # reuse only connections idle for less than this


class UpstreamError(Exception):
    """The upstream could not be reached or broke off before answering."""


class UpstreamBroken(UpstreamError):
    """The upstream broke off while sending the body."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = time.monotonic()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reset()

    def _reset(self) -> None:
        self.headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.failed: BaseException | None = None
        self.received_any = False
        self.framed = True
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._head_only = False

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed HTTP from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if (
            not self.complete
            and exc is None
            and self.failed is None
            and self.headers_done.done()
            and not self.framed
        ):
            # A body with neither a length nor chunks ends where the connection does
            # (RFC 9112 6.3); only a clean close ends it, a reset is still a break.
            self.on_message_complete()
        if not self.complete:
            self._fail(
                (UpstreamBroken if self.headers_done.done() else UpstreamError)(
                    "the upstream closed the connection"
                )
            )

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ---- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.framed = any(
            name.lower() in (b"content-length", b"transfer-encoding")
            for name, _ in self.raw_headers
        )
        if not self.headers_done.done():
            self.headers_done.set_result(None)
        if self._head_only:
            self.on_message_complete()
            if any(
                name.lower() == b"transfer-encoding"
                or (name.lower() == b"content-length" and value.strip() != b"0")
                for name, value in self.raw_headers
            ):
                # llhttp is not told that a HEAD answer has no body: it would read the next
                # answer on this connection as this one's body. The connection is not reused.
                self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked here: once the callback returns, llhttp has reset for the next message.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # ---- used by the client
    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()  # retrieved: the caller may be gone
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def usable(self) -> bool:
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and time.monotonic() - self.idle_since < _IDLE_TIMEOUT_S
        )

    async def send(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool):
        self._reset()
        assert self.transport is not None
        if head.startswith(b"HEAD "):
            self._head_only = True
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
            return
        self.transport.write(head)
        async for piece in body:
            if self.transport is None:
                raise UpstreamError("the upstream closed the connection during the upload")
            if piece:
                self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await self._can_write.wait()
        if chunked and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")

    async def next_chunk(self, read_timeout: float) -> bytes:
        """What has arrived since the last call (joined), b"" at the end of the body."""
        while True:
            if self.chunks:
                chunks = self.chunks
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if self._paused and self.buffered < _LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.failed is not None:
                raise self.failed
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(read_timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class UpstreamResponse:
    """An answer whose body is read as it arrives; `release()` returns the connection."""

    def __init__(
        self, pool: ConnectionPool, connection: _Connection, read_timeout: float, sent_at: float
    ) -> None:
        self.sent_at = sent_at  # perf_counter when the request began to go up
        self.ended_at: float | None = None  # ... and when its answer's body had all come
        self._pool = pool
        self._connection = connection
        self._read_timeout = read_timeout
        parser = connection.parser
        self.status: int = parser.get_status_code()
        self.reason = ""
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in connection.raw_headers
        )
        self.headers = CIMultiDictProxy(headers)
        self._done = False

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def readany(self) -> bytes:
        chunk = await self._connection.next_chunk(self._read_timeout)
        if not chunk:
            self.ended_at = time.perf_counter()
        return chunk

    @property
    def waited_s(self) -> float:
        """The time spent on this exchange with the upstream, request to last byte (to now,
        for a body not read to its end)."""
        return (self.ended_at or time.perf_counter()) - self.sent_at

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Drop the connection (the body was not read to its end)."""
        if not self._done:
            self._done = True
            self._connection.close()

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.complete and connection.keep_alive and connection.failed is None:
            self._pool.put_back(connection)
        else:
            connection.close()


class ConnectionPool:
    """Keep-alive connections to one origin (`scheme://host:port`)."""

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self._ssl = ssl.create_default_context() if self.tls else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: collections.deque[_Connection] = collections.deque()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                _Connection,
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self.tls else None,
            ),
            self.connect_timeout,
        )
        return connection

    def _reuse(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def request(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        """Send one request; a pooled connection the upstream had already closed is replaced
        once, only when no byte of an answer came back."""
        sent_at = time.perf_counter()
        connection = self._reuse()
        reused = connection is not None
        for attempt in range(2):
            if connection is None:
                connection = await self._connect()
            try:
                await connection.send(head, body, chunked)
                await self._headers(connection)
            except UpstreamError:
                connection.close()
                retry = reused and attempt == 0 and not connection.received_any
                if not retry or not isinstance(body, bytes | None):
                    raise
                connection, reused = None, False
                continue
            except BaseException:
                connection.close()
                raise
            return UpstreamResponse(self, connection, self.read_timeout, sent_at)
        raise AssertionError("unreachable")

    async def _headers(self, connection: _Connection) -> None:
        timer = asyncio.get_running_loop().call_later(
            self.read_timeout, _expire, connection.headers_done
        )
        try:
            await connection.headers_done
        finally:
            timer.cancel()

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def request_head(
    method: str, target: str, host: str, headers: CIMultiDict[str], streamed_body: bool
) -> tuple[bytes, bool]:
    """The request line and headers as bytes, and whether the body goes chunked (a streamed
    body of unknown length)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    chunked = streamed_body and "Content-Length" not in headers
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("\r\n")
    # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: this gives
    # back exactly those bytes (latin-1 could not encode them, and failed the call).
    return "\r\n".join(lines).encode("utf-8", "surrogateescape"), chunked

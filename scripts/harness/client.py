"""The load generator's HTTP/1.1 clients, to a target on 127.0.0.1.

`RawConnection` is a minimal keep-alive client on raw asyncio protocols (uvloop);
`AiohttpConnection` does the same exchange through aiohttp's client, to compare. A `Request`
is prepared once and sent many times; an `Exchange` is what came back, with its times.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import aiohttp

from harness.runtime import BenchError

CONNECT_TIMEOUT_S = 5.0
MAX_HEAD = 64 << 10
MAX_KEPT_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Request:
    """One request, prepared once and sent many times."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw: bytes  # the whole HTTP/1.1 request, for the raw client
    count_events: bool = False


def build_request(
    target: Target,
    method: str,
    api_path: str,
    headers: dict[str, str],
    body: bytes = b"",
    count_events: bool = False,
) -> Request:
    all_headers = {"Authorization": f"Bearer {target.key}", **headers}
    if body:
        all_headers["Content-Type"] = "application/json"
    path = target.prefix + api_path
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    head += [f"{name}: {value}" for name, value in all_headers.items()]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    return Request(method, path, all_headers, body, raw, count_events)


@dataclass(slots=True)
class Exchange:
    """What came back for one request, with the times (perf_counter) that matter."""

    sent_at: float
    status: int = 0
    body_bytes: int = 0
    first_byte_at: float | None = None
    events: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None
    done_at: float = 0.0
    body: bytearray | None = None
    _last_newline: bool = False

    def feed(self, data: bytes | bytearray, start: int, end: int, now: float, events: bool) -> None:
        if end <= start:
            return
        if self.first_byte_at is None:
            self.first_byte_at = now
        self.body_bytes += end - start
        if events:
            # An SSE event ends with a blank line; a "\n\n" may straddle two reads.
            found = data.count(b"\n\n", start, end)
            if self._last_newline and data[start] == 10:
                found += 1
            self._last_newline = data[end - 1] == 10
            if found:
                self.events += found
                if self.first_event_at is None:
                    self.first_event_at = now
                self.last_event_at = now
        if self.body is not None and len(self.body) < MAX_KEPT_BODY:
            self.body += data[start:end]

    @property
    def latency(self) -> float:
        return self.done_at - self.sent_at

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.sent_at

    @property
    def mean_gap(self) -> float | None:
        if self.events < 2 or self.first_event_at is None or self.last_event_at is None:
            return None
        return (self.last_event_at - self.first_event_at) / (self.events - 1)


class Connection(Protocol):
    @property
    def usable(self) -> bool: ...

    def exchange(self, request: Request, keep_body: bool = False) -> Awaitable[Exchange]: ...

    def close(self) -> None: ...


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _IDLE = range(8)


class RawConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection: one request at a time, minimal parsing.

    Parses the status line, Content-Length, chunked transfer coding and Connection: close;
    that is all the fake upstream and the gateway use.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Exchange] | None = None
        self._ex: Exchange | None = None
        self._state = _IDLE
        self._remaining = 0
        self._events = False
        self._close_after = False
        self._open = False

    @property
    def usable(self) -> bool:
        return self._open and self._waiter is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._waiter is not None and not self._waiter.done():
            if self._state == _UNTIL_CLOSE:
                self._finish(time.perf_counter())
            else:
                self._waiter.set_exception(ConnectionError("connection closed mid-response"))
        self._waiter = None

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._open = False

    def exchange(self, request: Request, keep_body: bool = False) -> asyncio.Future[Exchange]:
        if not self.usable or self._transport is None:
            raise ConnectionError("connection not usable")
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._ex = Exchange(sent_at=time.perf_counter(), body=bytearray() if keep_body else None)
        self._events = request.count_events
        self._state = _HEAD
        self._close_after = False
        self._buf.clear()
        self._transport.write(request.raw)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        ex = self._ex
        if self._waiter is None or ex is None:
            return
        if self._state == _LENGTH and not self._buf:
            # Fast path for big bodies: count straight from the read, no copy.
            taken = min(len(data), self._remaining)
            ex.feed(data, 0, taken, now, self._events)
            self._remaining -= taken
            if taken < len(data):
                self._buf += memoryview(data)[taken:]
        else:
            self._buf += data
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(ConnectionError(f"bad response: {exc}"))
            self._waiter = None
            self.close()

    def _parse(self, now: float) -> None:
        buf, ex = self._buf, self._ex
        assert ex is not None
        for _ in range(1 << 20):  # each pass consumes input or ends the response
            if self._waiter is None:
                return
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("response head too large")
                    return
                self._on_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == _LENGTH:
                if self._remaining == 0:
                    self._finish(now)
                    return
                if not buf:
                    return
                taken = min(len(buf), self._remaining)
                ex.feed(buf, 0, taken, now, self._events)
                del buf[:taken]
                self._remaining -= taken
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                taken = min(len(buf), self._remaining)
                ex.feed(buf, 0, taken, now, self._events)
                del buf[:taken]
                self._remaining -= taken
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish(now)
                    return
            elif state == _UNTIL_CLOSE:
                ex.feed(buf, 0, len(buf), now, self._events)
                buf.clear()
                return
            else:
                return

    def _on_head(self, head: bytes) -> None:
        assert self._ex is not None
        lines = head.decode("latin-1").split("\r\n")
        self._ex.status = status = int(lines[0].split(" ", 2)[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                self._close_after = "close" in value.lower()
        if status in (204, 304) or 100 <= status < 200:
            self._state, self._remaining = _LENGTH, 0
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._remaining = _LENGTH, length
        else:
            self._state, self._close_after = _UNTIL_CLOSE, True

    def _finish(self, now: float) -> None:
        ex, waiter = self._ex, self._waiter
        self._state, self._waiter = _IDLE, None
        if ex is None or waiter is None or waiter.done():
            return
        ex.done_at = now
        if self._close_after:
            self.close()
        waiter.set_result(ex)


class AiohttpConnection:
    """The same exchange through aiohttp's client (one pooled session per run)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base

    @property
    def usable(self) -> bool:
        return not self._session.closed

    async def exchange(self, request: Request, keep_body: bool = False) -> Exchange:
        ex = Exchange(sent_at=time.perf_counter(), body=bytearray() if keep_body else None)
        async with self._session.request(
            request.method,
            self._base + request.path,
            headers=request.headers,
            data=request.body or None,
        ) as response:
            ex.status = response.status
            for _ in range(1 << 30):
                chunk = await response.content.readany()
                if not chunk:
                    break
                ex.feed(chunk, 0, len(chunk), time.perf_counter(), request.count_events)
        ex.done_at = time.perf_counter()
        return ex

    def close(self) -> None:
        pass


@dataclass
class Target:
    name: str
    base_url: str
    key: str
    host: str = ""
    port: int = 0
    prefix: str = ""
    sent: int = 0  # requests written to this target, all phases

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise BenchError(f"target {self.name}: only http://127.0.0.1:PORT/... URLs")
        if not _is_loopback(parts.hostname):
            raise BenchError(f"target {self.name}: {parts.hostname} is not a loopback address")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientFactory:
    """Opens connections of the chosen kind to one target."""

    def __init__(self, kind: str, target: Target, concurrency: int) -> None:
        self.kind = kind
        self.target = target
        self._session: aiohttp.ClientSession | None = None
        if kind == "aiohttp":
            connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )

    async def connect(self) -> Connection:
        if self._session is not None:
            return AiohttpConnection(self._session, f"http://{self.target.host}:{self.target.port}")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, protocol = await loop.create_connection(
                RawConnection, self.target.host, self.target.port
            )
        return protocol

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

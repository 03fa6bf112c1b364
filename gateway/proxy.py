"""Forwarding: the upstream connection pool, header rewriting, and the byte relay.

Nothing here knows about tokens or prices. The relay hands each chunk to an optional
`transform` (to edit the bytes the client gets) and `observe` (to keep a copy for metering),
and reports what moved.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import UpstreamConfig
from gateway.errors import (
    REQUEST_TOO_LARGE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    GatewayError,
)
from gateway.upstream import (
    ConnectionPool,
    UpstreamError,
    UpstreamResponse,
    request_head,
)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers never forwarded: hop-by-hop ones, those the gateway sets itself, and the
# client's choice of OpenAI organization/project (the operator's upstream key decides those).
_DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "expect",
    "openai-organization",
    "openai-project",
}
_DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length"}
# Encodings the gateway can read a copy of to find usage; others are not offered upstream.
_READABLE_ENCODINGS = ("gzip", "deflate", "identity")
SMALL_BODY = 256 << 10


class UpstreamClient:
    """Pooled keep-alive connections to the configured upstream, with the real key attached."""

    def __init__(self, config: UpstreamConfig, api_key: str) -> None:
        self.base = config.base_url.rstrip("/")
        self._authorization = f"Bearer {api_key}"
        self._pool = ConnectionPool(self.base, config.connect_timeout_s, config.timeout_s)

    async def start(self) -> None:
        """Nothing to open ahead: connections are made on first use and then kept."""

    async def close(self) -> None:
        await self._pool.close()

    def upstream_headers(
        self, client_headers: CIMultiDictProxy[str], body_length: int | None, metered: bool
    ) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection_tokens = _connection_tokens(client_headers.get("Connection"))
        for name, value in client_headers.items():
            lowered = name.lower()
            if lowered in _DROPPED_REQUEST_HEADERS or lowered in connection_tokens:
                continue
            if lowered == "accept-encoding" and metered:
                value = _readable_encodings(value)
            headers.add(name, value)
        headers["Authorization"] = self._authorization
        if body_length is not None:
            headers["Content-Length"] = str(body_length)
        return headers

    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send the request; map failures before a response to the SPEC's 502/504."""
        pool = self._pool
        head, chunked = request_head(
            method,
            pool.base_path + path_and_query,
            pool.host_header,
            headers,
            streamed_body=body is not None and not isinstance(body, bytes),
        )
        try:
            return await pool.request(head, body, chunked)
        except TimeoutError as exc:
            raise GatewayError(
                UPSTREAM_TIMEOUT, "The upstream API did not answer in time."
            ) from exc
        except (UpstreamError, OSError) as exc:
            raise GatewayError(
                UPSTREAM_UNAVAILABLE, f"The upstream API could not be reached ({_reason(exc)})."
            ) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "name resolution failed"
    if isinstance(exc, UpstreamError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def _readable_encodings(accept_encoding: str) -> str:
    offered = [
        part.strip()
        for part in accept_encoding.split(",")
        if part.split(";")[0].strip().lower() in _READABLE_ENCODINGS
    ]
    return ", ".join(offered) or "identity"


def client_response_headers(upstream: UpstreamResponse) -> CIMultiDict[str]:
    connection_tokens = _connection_tokens(upstream.headers.get("Connection"))
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lowered = name.lower()
        if lowered not in _DROPPED_RESPONSE_HEADERS and lowered not in connection_tokens:
            headers.add(name, value)
    return headers


async def stream_request_body(
    content: aiohttp.StreamReader,
    limit: int,
    counter: list[int],
    observe: Callable[[bytes], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the client's body as it arrives, counting it into counter[0]."""
    while chunk := await content.readany():
        counter[0] += len(chunk)
        if counter[0] > limit:
            raise _too_large(limit)
        if observe is not None:
            observe(chunk)
        yield chunk


async def read_small_body(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read a whole body that must be inspected (JSON); 413 past `limit`."""
    buffer = bytearray()
    while chunk := await content.readany():
        buffer += chunk
        if len(buffer) > limit:
            raise _too_large(limit)
    return bytes(buffer)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        REQUEST_TOO_LARGE, f"The request body is larger than the limit of {limit} bytes."
    )


class StopRelay(Exception):
    """Raised by a transform to end the relay cleanly: `final` is sent, then the body ends."""

    def __init__(self, final: bytes) -> None:
        super().__init__("relay stopped by a transform")
        self.final = final


@dataclass(slots=True)
class RelayResult:
    response_bytes: int = 0
    ttfb_s: float | None = None
    upstream_broke: bool = False
    client_gone: bool = False
    stopped: bool = False  # a transform ended the body early
    delivered: bool = False  # every byte of the answer was handed to the client


async def relay(
    upstream: UpstreamResponse,
    client: web.StreamResponse,
    request: web.Request,
    started: float,
    result: RelayResult,
    transform: Callable[[bytes], bytes] | None,
    flush_transform: Callable[[], bytes] | None,
    observe: Callable[[bytes], None] | None,
) -> None:
    """Copy the upstream body to the client as it arrives, chunk by chunk.

    Progress is kept in `result` as it happens, so a cancelled relay still tells what moved.
    """
    try:
        while True:
            try:
                chunk = await upstream.readany()
            except (TimeoutError, UpstreamError, OSError):
                result.upstream_broke = True
                chunk = b""
            if not chunk:
                if flush_transform is not None:
                    await _send(client, flush_transform(), result, started)
                break
            if observe is not None:
                observe(chunk)
            await _send(client, transform(chunk) if transform else chunk, result, started)
    except StopRelay as stop:
        result.stopped = True
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await _send(client, stop.final, result, started)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        result.client_gone = True
    if result.client_gone or result.upstream_broke or result.stopped:
        upstream.close()
    if result.upstream_broke and not result.client_gone and request.transport is not None:
        # Pass the break on: a clean end would tell the client a cut stream was complete.
        request.transport.close()


async def _send(client: web.StreamResponse, data: bytes, result: RelayResult, started: float):
    if not data:
        return
    if result.ttfb_s is None:
        result.ttfb_s = time.perf_counter() - started
    await client.write(data)
    result.response_bytes += len(data)

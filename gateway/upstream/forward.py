"""Forwarding: the upstream connection pool, header rewriting, and the byte relay.

Nothing here knows about tokens or prices. The relay hands each chunk to an optional
`transform` (to edit the bytes the client gets) and `observe` (to keep a copy for metering),
and reports what moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.loader import GatewayConfig
from gateway.errors import (
    INVALID_REQUEST,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    GatewayError,
)
from gateway.pipeline.intake import BodyStalled, BodyWatch, too_large
from gateway.upstream.client import (
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
# Client headers that reach the upstream: OpenAI's request headers and content negotiation.
# Everything else stays here: credentials in any spelling (`api-key`, `x-api-key`, cookies,
# underscore variants a server might fold into `Authorization`), hop-by-hop headers, and the
# client's choice of OpenAI organization/project (the team's upstream credentials decide).
_FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-language",
        "content-disposition",
        "user-agent",
        "idempotency-key",
        "openai-beta",
        "x-client-request-id",
    }
)
_FORWARDED_REQUEST_PREFIXES = ("x-stainless-",)
_DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length", "set-cookie", "set-cookie2"}
# Encodings the gateway can read a copy of to find usage; others are not offered upstream.
_READABLE_ENCODINGS = ("gzip", "deflate", "identity")
SMALL_BODY = 256 << 10
log = logging.getLogger("gateway.proxy")

Credentials = tuple[tuple[str, str], ...]


class HeaderPolicy:
    """Which client headers go upstream: the fixed allow-list plus `upstream.forward_headers`
    (exact names, or prefixes ending in `*`)."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self._names = _FORWARDED_REQUEST_HEADERS | {n for n in extra if not n.endswith("*")}
        self._prefixes = _FORWARDED_REQUEST_PREFIXES + tuple(
            n[:-1] for n in extra if n.endswith("*")
        )

    def forwards(self, lowered_name: str) -> bool:
        return lowered_name in self._names or lowered_name.startswith(self._prefixes)


def team_credentials(config: GatewayConfig) -> tuple[Credentials, dict[str, Credentials]]:
    """The upstream headers of the gateway's own key, and of each team that has its own
    `upstream` (its key, OpenAI organization and project)."""
    default_key = _env_key(config.upstream.api_key_env)
    default: Credentials = (("Authorization", f"Bearer {default_key}"),)
    per_team: dict[str, Credentials] = {}
    for team in config.teams.values():
        own = team.upstream
        if own.api_key_env is None and own.organization is None and own.project is None:
            continue
        key = _env_key(own.api_key_env) if own.api_key_env else default_key
        headers = [("Authorization", f"Bearer {key}")]
        if own.organization:
            headers.append(("OpenAI-Organization", own.organization))
        if own.project:
            headers.append(("OpenAI-Project", own.project))
        per_team[team.name] = tuple(headers)
    return default, per_team


def _env_key(name: str) -> str:
    key = os.environ.get(name, "")
    if not key:
        log.warning("%s is not set: calls will reach the upstream without a valid key", name)
    return key


class UpstreamClient:
    """Pooled keep-alive connections to the configured upstream, with the real key attached."""

    def __init__(self, config: GatewayConfig) -> None:
        upstream = config.upstream
        self.base = upstream.base_url.rstrip("/")
        self._pool = ConnectionPool(self.base, upstream.connect_timeout_s, upstream.timeout_s)
        self.use_credentials(config)

    def use_credentials(self, config: GatewayConfig) -> None:
        """Read the upstream keys from the environment (at start and at each reload)."""
        self._default_credentials, self._team_credentials = team_credentials(config)
        self._headers = HeaderPolicy(config.upstream.forward_headers)

    async def start(self) -> None:
        """Nothing to open ahead: connections are made on first use and then kept."""

    async def close(self) -> None:
        await self._pool.close()

    def upstream_headers(
        self,
        client_headers: CIMultiDictProxy[str],
        body_length: int | None,
        metered: bool,
        team: str,
    ) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection_tokens = _connection_tokens(client_headers.get("Connection"))
        forwards = self._headers.forwards
        for name, value in client_headers.items():
            lowered = name.lower()
            if not forwards(lowered) or lowered in connection_tokens:
                continue
            if lowered == "accept-encoding" and metered:
                value = _readable_encodings(value)
            headers.add(name, value)
        headers.extend(self._team_credentials.get(team, self._default_credentials))
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


# What reading an answer's body can raise once its head has arrived.
READ_FAILURES = (UpstreamError, TimeoutError, OSError)


async def read_answer(upstream: UpstreamResponse) -> bytes:
    """An answer's whole body; a break while reading it is the SPEC's 502."""
    try:
        return await upstream.read()
    except READ_FAILURES as exc:
        raise GatewayError(UPSTREAM_UNAVAILABLE, "The upstream API broke off its answer.") from exc


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
    observe: Callable[[bytes], None] | None,
    watch: BodyWatch | None,
    declared_length: int | None,
) -> AsyncIterator[bytes]:
    """Yield the client's body as it arrives, counting it into counter[0]. Never more than
    `declared_length` bytes (the length the upstream was told): a byte past it would start
    another request on the upstream connection."""
    bound = limit if declared_length is None else min(limit, declared_length)
    watch_reading = watch is not None
    try:
        while True:
            if watch_reading:
                watch.reading = True  # type: ignore[union-attr]
            chunk = await content.readany()
            if watch_reading:
                watch.reading = False  # type: ignore[union-attr]
            if not chunk:
                break
            counter[0] += len(chunk)
            if counter[0] > bound:
                if counter[0] > limit:
                    raise too_large(limit)
                raise GatewayError(
                    INVALID_REQUEST, "The request body is longer than its Content-Length."
                )
            if observe is not None:
                observe(chunk)
            yield chunk
    except BodyStalled:
        assert watch is not None
        raise watch.error() from None
    if declared_length is not None and counter[0] != declared_length:
        raise GatewayError(INVALID_REQUEST, "The request body is shorter than its Content-Length.")


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
    """Send the answer's head, then copy the upstream body to the client as it arrives, chunk
    by chunk. A client gone before or during it is `client_gone`.

    Progress is kept in `result` as it happens, so a cancelled relay still tells what moved.
    """
    try:
        await client.prepare(request)
        while True:
            try:
                chunk = await upstream.readany()
            except READ_FAILURES:
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

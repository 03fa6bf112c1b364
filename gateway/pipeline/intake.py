"""Reading what a client sent: one canonical path, an identity-coded body, a body that keeps
arriving, and a JSON object whose keys the gateway and the upstream read alike.

Whatever the gateway checks (allow-lists, models, limits) must be exactly what the upstream
then acts on, so each ambiguity a client could exploit is resolved here or refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import (
    INVALID_JSON,
    INVALID_REQUEST,
    NOT_FOUND,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_CONTENT_ENCODING,
    GatewayError,
)

# `/v1/../x`, `/v1/a/./b`, their percent-encoded forms, encoded slashes, backslashes and
# NULs, and any of these encoded twice (`%252e`), for an upstream that would decode twice;
# and empty segments (`//`), which upstreams normalize differently.
_UNSAFE_PATH = re.compile(
    r"(^|/)(\.|%2e){1,2}(/|$)|%(25)*(2f|5c|00)|%(25)+2e|\\|//", re.IGNORECASE
)
# Characters left as they are when a decoded path is encoded again for the upstream.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# The request encodings aiohttp's parser decodes before the handler reads a byte.
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


def canonical_target(request: web.Request) -> tuple[str, str]:
    """(the path after `/v1`, as authorized and metered; the same path encoded for the
    upstream, with the client's query). One trailing slash is dropped: `/v1/models/` is
    `/v1/models`, checked and forwarded as such."""
    raw_path, separator, query = request.raw_path.partition("?")
    path = request.path
    # An absolute-form target (`GET http://h/v1/x`) or an encoded `/v1` would be forwarded
    # as another path than the one authorized.
    if not raw_path.startswith("/v1/") or _UNSAFE_PATH.search(raw_path):
        raise unknown_url(request.method, path)
    if path.endswith("/"):
        path = path[:-1]
    if len(path) <= 3:
        raise unknown_url(request.method, request.path)
    encoded = quote(path, safe=_PATH_SAFE) if "%" in raw_path or not raw_path.isascii() else path
    return path[3:], encoded[3:] + separator + query


def unknown_url(method: str, path: str) -> GatewayError:
    return GatewayError(NOT_FOUND, f"Unknown request URL: {method} {path}.")


def body_was_decoded(request: web.Request) -> bool:
    """Whether aiohttp decoded the body (gzip, deflate, br, zstd): it is then forwarded
    decoded, without the label and with its decoded length. Any other encoding would reach
    the upstream with a length and a label that do not describe the bytes: refused (415)."""
    labels = request.headers.getall("Content-Encoding", ())
    if not labels:
        return False
    if len(labels) == 1:
        label = labels[0].strip().lower()
        if label == "identity":
            return False
        if label in _DECODED_ENCODINGS:
            return True
    raise GatewayError(
        UNSUPPORTED_CONTENT_ENCODING,
        f"Unsupported request Content-Encoding: '{', '.join(labels)}'. Send the body "
        "uncompressed, or compressed with one of gzip, deflate.",
        param="Content-Encoding",
    )


class BodyStalled(Exception):
    """The client stopped sending its body (not a TimeoutError: that would read as the
    upstream's timeout)."""


class BodyWatch:
    """Ends a body read that has waited `timeout_s` without a byte: one timer per request,
    looked at a few times per timeout, instead of a timeout around every read."""

    def __init__(self, content: aiohttp.StreamReader, timeout_s: float) -> None:
        self._content = content
        self._timeout_s = timeout_s
        self._step_s = max(timeout_s / 4, 0.05)
        self._seen = content.total_bytes
        self._progress_at = time.monotonic()
        self.reading = False  # only a read that waits on the client can stall
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            self._step_s, self._look
        )

    def _look(self) -> None:
        now = time.monotonic()
        total = self._content.total_bytes
        if total != self._seen or not self.reading:
            self._seen, self._progress_at = total, now
        elif now - self._progress_at >= self._timeout_s and not self._content.is_eof():
            self.stalled = True
            self._timer = None
            self._content.set_exception(BodyStalled())
            return
        self._timer = asyncio.get_running_loop().call_later(self._step_s, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def error(self) -> GatewayError:
        return GatewayError(
            REQUEST_TIMEOUT,
            f"The request body stopped arriving for {self._timeout_s:g}s.",
        )


async def read_whole_body(
    content: aiohttp.StreamReader, limit: int, watch: BodyWatch | None
) -> bytes:
    """Read a whole body that must be inspected (JSON); 413 past `limit`, 408 stalled."""
    buffer = bytearray()
    try:
        while chunk := await _read(content, watch):
            buffer += chunk
            if len(buffer) > limit:
                raise too_large(limit)
    except BodyStalled:
        assert watch is not None
        raise watch.error() from None
    return bytes(buffer)


async def _read(content: aiohttp.StreamReader, watch: BodyWatch | None) -> bytes:
    if watch is None:
        return await content.readany()
    watch.reading = True
    try:
        return await content.readany()
    finally:
        watch.reading = False


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        REQUEST_TOO_LARGE, f"The request body is larger than the limit of {limit} bytes."
    )


# ---------------------------------------------------------------- JSON bodies

# Top-level fields the gateway reads: were one given twice, the gateway and the upstream
# could each take another copy (a model checked, another one run).
_READ_FIELDS = {
    name: f'"{name}"'.encode()
    for name in (
        "model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
        "max_output_tokens", "store", "service_tier", "previous_response_id", "input_file_id",
        "training_file", "validation_file", "conversation",
    )
}  # fmt: skip
_READ_FIELD_NAMES = _READ_FIELDS.keys()


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not one, or names a field it reads twice."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            INVALID_JSON,
            "We could not parse the JSON body of your request. The body must be a JSON "
            f"object ({exc.msg} at byte {exc.pos}).",
        ) from None
    if not isinstance(parsed, dict):
        raise GatewayError(INVALID_JSON, "The JSON body of your request must be an object.")
    # A field given twice is in the parsed object (its last copy): only those present are
    # looked for again in the raw bytes, usually two or three short scans.
    for name in _READ_FIELD_NAMES & parsed.keys():
        if body.count(_READ_FIELDS[name]) > 1:
            _refuse_duplicate_keys(body)
            break
    return parsed


def _refuse_duplicate_keys(body: bytes) -> None:
    """The exact check, run only when a field name appears twice somewhere in the body."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise GatewayError(
                    INVALID_REQUEST,
                    f"The JSON body gives the key '{key[:100]}' more than once.",
                    param=key[:100],
                )
            seen[key] = value
        return seen

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return  # orjson accepted it; nothing more to learn here


def model_of(body: dict[str, Any]) -> str | None:
    """The body's `model`: a string, or absent; anything else is refused (400)."""
    if "model" not in body:
        return None
    model = body["model"]
    if not isinstance(model, str):
        raise GatewayError(
            INVALID_REQUEST,
            f"'model' must be a string, not {_json_type(model)}.",
            param="model",
        )
    return model


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object"

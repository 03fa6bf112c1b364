"""The fake upstream's endpoints whose answers are not generated text: `/v1/embeddings`
(deterministic vectors, as floats or base64), file upload and content (`/v1/files`), audio
transcription (multipart) and speech (a sized binary stream), and `/v1/fake/download` (a sized
binary stream for benchmarks).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from aiohttp import web

from gateway.devtools.fake_http import (
    BLOCK_SIZE,
    CONTEXT,
    FAKE_STATE,
    ApiError,
    answer_time,
    header_int,
    json_response,
    read_form,
    read_json,
    stream_chunks,
)
from gateway.devtools.fake_tokens import (
    count_words,
    item_tokens,
    reply_length,
    reply_text,
    token_items,
)

DEFAULT_EMBEDDING_DIMS = 8


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


def _embedding_dims(value: Any) -> int:
    if value is None:
        return DEFAULT_EMBEDDING_DIMS
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65536:
        return value
    raise ApiError(400, "'dimensions' must be a positive integer.", param="dimensions")


def _embedding_entry(index: int, tokens: int, dims: int, as_base64: bool) -> dict[str, Any]:
    if as_base64:
        vector: Any = _embedding_base64(index, tokens, dims)
    else:
        vector = _embedding_values(index, tokens, dims)
    return {"object": "embedding", "index": index, "embedding": vector}


async def embeddings(request: web.Request) -> web.Response:
    ctx = request[CONTEXT]
    body = await read_json(request)
    counts = [item_tokens(item) for item in token_items(body.get("input"), "input")]
    dims = _embedding_dims(body.get("dimensions"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "Invalid 'encoding_format'.", param="encoding_format")
    data = [
        _embedding_entry(index, tokens, dims, encoding == "base64")
        for index, tokens in enumerate(counts)
    ]
    result: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
    if ctx.with_usage:
        prompt = sum(counts)
        result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return json_response(request, result)


async def upload_file(request: web.Request) -> web.Response:
    form = await read_form(request, keep_file=True)
    purpose = form.fields.get("purpose")
    if not purpose:
        raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
    objects = request.app[FAKE_STATE].objects
    file = objects.add_file(form.content, form.filename or "upload", purpose, answer_time(request))
    return json_response(request, file)


async def file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    content = request.app[FAKE_STATE].files.get(file_id)
    if content is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id")
    return web.Response(body=content, content_type="application/octet-stream")


async def transcribe(request: web.Request) -> web.Response:
    ctx = request[CONTEXT]
    form = await read_form(request, keep_file=False)
    words = reply_length(request, None)
    text = reply_text(words)
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
    return json_response(request, result)


async def speech(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    text = body.get("input")
    if not isinstance(text, str):
        raise ApiError(400, "Missing required parameter: 'input'.", param="input")
    size = header_int(request, "x-fake-body-bytes")
    if size is None:
        size = 1000 * count_words(text)
    block = _pseudo_random(text.encode(), min(size, BLOCK_SIZE))
    return await stream_chunks(request, _blob_chunks(block, size), "audio/mpeg", size)


async def download(request: web.Request) -> web.StreamResponse:
    try:
        size = int(request.query.get("bytes", "0"))
    except ValueError:
        size = -1
    if size < 0:
        raise ApiError(400, "'bytes' must be a non-negative integer.", param="bytes")
    block = _pseudo_random(b"fake-download", BLOCK_SIZE)
    return await stream_chunks(request, _blob_chunks(block, size), "application/octet-stream", size)

"""What a call used: request facts, usage from JSON and SSE, and the offline estimate.

The relay never parses a response as it passes. It only keeps bounded copies (the start
of the body, and its last bytes, where OpenAI puts `usage`); usage is read from the tail
once the call is over, and text is tokenized only when no usage arrived.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import tokens
from gateway.errors import INVALID_REQUEST, GatewayError

# Paths (after /v1) whose responses carry OpenAI usage, and so whose tokens are metered.
METERED_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/audio/transcriptions",
        "/audio/translations",
    }
)
# Streams whose usage OpenAI sends only when `stream_options.include_usage` is set.
USAGE_OPT_IN_PATHS = frozenset({"/chat/completions", "/completions"})

HEAD_LIMIT = 1 << 20
TAIL_LIMIT = 64 << 10
_MAX_HELD_EVENT = 1 << 20


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_mapping(usage: Any) -> Usage | None:
    """OpenAI's usage object (chat/completions/embeddings or responses naming) → Usage."""
    if not isinstance(usage, dict):
        return None
    input_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
    output_tokens = usage.get("completion_tokens", usage.get("output_tokens"))
    if input_tokens is None and output_tokens is None:
        return None
    input_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    output_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    input_count = _count(input_tokens)
    output_count = _count(output_tokens)
    cached = _count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0
    reasoning = (
        _count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    )
    return Usage(input_count, min(cached, input_count), output_count, min(reasoning, output_count))


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()


def usage_in_tail(tail: bytes) -> Usage | None:
    """The last non-null `"usage": {...}` object in a body's final bytes.

    A raw `"usage":` can only be a key: inside a JSON string the quotes would be escaped.
    """
    position = len(tail)
    decoder = _DECODER
    while (position := tail.rfind(b'"usage"', 0, position)) != -1:
        match = _USAGE_OBJECT.match(tail, position)
        if match:
            text = tail[match.end() - 1 :].decode("utf-8", "replace")
            try:
                value, _ = decoder.raw_decode(text)
            except ValueError:
                continue
            usage = usage_from_mapping(value)
            if usage is not None:
                return usage
    return None


# ---------------------------------------------------------------- the request side


@dataclass(slots=True)
class RequestFacts:
    """What the gateway learnt from a request before forwarding it."""

    api_path: str  # the path after /v1, e.g. /chat/completions
    model: str | None = None
    stream: bool = False
    json_body: dict[str, Any] | None = None
    usage_injected: bool = False

    @property
    def metered(self) -> bool:
        return self.api_path in METERED_PATHS


def wants_usage_injection(facts: RequestFacts) -> bool:
    if not (facts.stream and facts.api_path in USAGE_OPT_IN_PATHS and facts.json_body):
        return False
    options = facts.json_body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def inject_include_usage(body: bytes, parsed: dict[str, Any]) -> bytes:
    """The body with `stream_options.include_usage` set, spliced in without re-encoding."""
    if "stream_options" not in parsed:
        end = body.rstrip().rfind(b"}")
        if end > 0:
            return body[:end] + b',"stream_options":{"include_usage":true}' + body[end:]
    options = parsed.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    edited = {**parsed, "stream_options": options}
    try:
        return orjson.dumps(edited)
    except orjson.JSONEncodeError:
        # orjson stops at 255 levels; the body parsed, so it is forwarded, re-encoded slower.
        try:
            return json.dumps(edited, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:
            raise GatewayError(
                INVALID_REQUEST, "The JSON body of your request is nested too deeply."
            ) from None


# ---------------------------------------------------------------- the response side


class UsageChunkStripper:
    """For streams where the gateway asked for usage and the client did not.

    OpenAI then adds `"usage":null` as the last key of every chunk and one usage-only chunk
    before `[DONE]`. Both are removed so the client sees what it would have seen directly.
    Only whole events are forwarded, so a chunk split across reads is never half-edited.
    """

    NULL_USAGE = b',"usage":null'

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        end = last_event_end(data)
        if end == -1:
            if len(data) > _MAX_HELD_EVENT:
                self._held = b""
                return data
            self._held = data
            return b""
        complete, self._held = data[:end], data[end:]
        if b'"usage":{' in complete:
            complete = _without_usage_event(complete)
        return complete.replace(self.NULL_USAGE, b"")

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held.replace(self.NULL_USAGE, b"")


def last_event_end(data: bytes) -> int:
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf != -1 else -1, crlf + 4 if crlf != -1 else -1)


def _without_usage_event(events: bytes) -> bytes:
    position = events.rfind(b'"usage":{')
    start = events.rfind(b"\n\n", 0, position)
    start = 0 if start == -1 else start + 2
    end = events.find(b"\n\n", position)
    end = len(events) if end == -1 else end + 2
    if b'"choices":[]' not in events[start:end]:
        return events
    return events[:start] + events[end:]


class BodyRecorder:
    """Bounded copies of a response body: its first HEAD_LIMIT bytes and its last bytes."""

    def __init__(self, content_encoding: str | None) -> None:
        self._head: list[bytes] = []
        self._head_size = 0
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self.total = 0
        self._inflate = _decompressor(content_encoding)

    def feed(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self._inflate = None
                return
        self.total += len(chunk)
        if self._head_size < HEAD_LIMIT:
            self._head.append(chunk)
            self._head_size += len(chunk)
        self._tail.append(chunk)
        self._tail_size += len(chunk)
        while self._tail_size - len(self._tail[0]) >= TAIL_LIMIT:
            self._tail_size -= len(self._tail.popleft())

    @property
    def complete(self) -> bool:
        """True when the head holds the whole body."""
        return self._head_size == self.total

    def head(self) -> bytes:
        return b"".join(self._head)

    def tail(self) -> bytes:
        return b"".join(self._tail)


def _decompressor(content_encoding: str | None) -> Any:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


# ---------------------------------------------------------------- the estimate


def estimate_usage(facts: RequestFacts, recorder: BodyRecorder | None, is_sse: bool) -> Usage:
    """Offline token counts for a call whose upstream reported no usage."""
    input_tokens = (
        tokens.estimate_prompt_tokens("/v1" + facts.api_path, facts.json_body)
        if facts.json_body
        else 0
    )
    output_tokens = 0
    if recorder is not None and recorder.total and facts.api_path != "/embeddings":
        head = recorder.head()
        text = text_of_sse(head) if is_sse else _text_of_json(head)
        output_tokens = tokens.count_text(facts.model, text)
        if not recorder.complete and len(head):
            # Only the head was kept: scale its count to the whole body.
            output_tokens = output_tokens * recorder.total // len(head)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, estimated=True)


def text_of_sse(raw: bytes) -> str:
    parts: list[str] = []
    for line in raw.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            parts.extend(event_texts(event))
    return "".join(parts)


def _text_of_json(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    return "".join(_body_texts(body)) if isinstance(body, dict) else ""


def event_texts(event: dict[str, Any]) -> list[str]:
    kind = event.get("type")
    if isinstance(kind, str):  # Responses API stream events
        delta = event.get("delta")
        return [delta] if kind.endswith(".delta") and isinstance(delta, str) else []
    texts = []
    for choice in _list(event.get("choices")):
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            texts.extend(_message_texts(delta))
        elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    return texts


def _body_texts(body: dict[str, Any]) -> list[str]:
    texts = []
    for choice in _list(body.get("choices")):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("message"), dict):
            texts.extend(_message_texts(choice["message"]))
        elif isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    for item in _list(body.get("output")):
        for part in _list(item.get("content") if isinstance(item, dict) else None):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    if isinstance(body.get("text"), str):  # transcriptions
        texts.append(body["text"])
    return texts


def _message_texts(message: dict[str, Any]) -> list[str]:
    texts = [message[k] for k in ("content", "refusal") if isinstance(message.get(k), str)]
    for call in _list(message.get("tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return texts


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

"""What a call used: request facts, usage from JSON and SSE, and the offline estimate.

The relay never parses a response as it passes. It only keeps bounded copies (the start
of the body, and its last bytes, where OpenAI puts `usage`); once the call is over, what it
used is read from them (`usage_of_recording`): a whole JSON answer parsed whole, a stream's
last event that states a usage, a body too big for the head from its tail. Text is
tokenized only when no usage arrived.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import INVALID_REQUEST, GatewayError
from gateway.metering import tokens

# Paths (after /v1) whose responses carry OpenAI usage, and so whose tokens are metered.
METERED_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/audio/transcriptions",
        "/audio/translations",
        "/images/generations",
        "/images/edits",
    }
)
# Streams whose usage OpenAI sends only when `stream_options.include_usage` is set.
USAGE_OPT_IN_PATHS = frozenset({"/chat/completions", "/completions"})

HEAD_LIMIT = 1 << 20
TAIL_LIMIT = 64 << 10
WHOLE_JSON_LIMIT = 64 << 10  # a whole JSON answer up to this size is parsed whole
_MAX_HELD_EVENT = 1 << 20


@dataclass(slots=True)
class Usage:
    """What a call used, in the units it is billed in, counted as the upstream reports them.

    The token kinds are subsets of the column they name, as OpenAI counts them:
    `cached_input_tokens`, `cache_write_tokens`, `audio_input_tokens`, `image_input_tokens`
    are part of `input_tokens`; `reasoning_tokens`, `audio_output_tokens`,
    `image_output_tokens`, `rejected_prediction_tokens` part of `output_tokens` (each capped
    at its parent). `service_tier` is the tier the answer says served the call (None where the
    endpoint reports none); `audio_seconds` is the duration a transcription is billed by.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    cache_write_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    rejected_prediction_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
    audio_seconds: float = 0.0
    service_tier: str | None = None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# Chat/completions, then Responses and images, then transcriptions and Realtime spellings.
_INPUT_DETAILS = ("prompt_tokens_details", "input_tokens_details", "input_token_details")
_OUTPUT_DETAILS = ("completion_tokens_details", "output_tokens_details", "output_token_details")


def _details(usage: dict[str, Any], names: tuple[str, str, str]) -> dict[str, Any] | None:
    first, second, third = names
    value = usage.get(first) or usage.get(second) or usage.get(third)
    return value if type(value) is dict else None


def usage_from_mapping(usage: Any) -> Usage | None:
    """An OpenAI usage object, in any endpoint's naming, → Usage (its own fields only).

    - chat/completions: `prompt_tokens`, `completion_tokens`, `prompt_tokens_details`
      {cached, cache_write, audio, image}, `completion_tokens_details` {reasoning, audio,
      rejected_prediction};
    - Responses: `input_tokens`, `output_tokens`, `input_tokens_details` {cached,
      cache_write}, `output_tokens_details` {reasoning};
    - embeddings: `prompt_tokens` alone;
    - images: `input_tokens_details` {text, image} and no output details, or output details
      {text, image}: with no output details every output token is an image token;
    - transcriptions: `type: "tokens"` with `input_token_details` {text, audio}, or
      `type: "duration"` with `seconds`; Realtime: `input_token_details` /
      `output_token_details` {text, audio, image, cached}.
    """
    if type(usage) is not dict:
        return None
    if "type" in usage and usage["type"] == "duration":  # a transcription billed by seconds
        seconds = _seconds(usage.get("seconds"))
        return None if seconds is None else Usage(audio_seconds=seconds)
    input_tokens = usage.get("prompt_tokens")
    if input_tokens is None:
        input_tokens = usage.get("input_tokens")
    output_tokens = usage.get("completion_tokens")
    if output_tokens is None:
        output_tokens = usage.get("output_tokens")
    if input_tokens is None and output_tokens is None:
        return None
    inputs = input_tokens if type(input_tokens) is int and input_tokens > 0 else 0
    outputs = output_tokens if type(output_tokens) is int and output_tokens > 0 else 0
    # Chat's spelling, then Responses' and images', then transcriptions' and Realtime's.
    ins = (
        usage.get("prompt_tokens_details")
        or usage.get("input_tokens_details")
        or usage.get("input_token_details")
    )
    outs = (
        usage.get("completion_tokens_details")
        or usage.get("output_tokens_details")
        or usage.get("output_token_details")
    )
    cached, cache_write, audio_in, image_in = _subsets(ins, _INPUT_PARTS, inputs)
    reasoning, audio_out, image_out, rejected = _subsets(outs, _OUTPUT_PARTS, outputs)
    if not outs and type(ins) is dict and _is_images_usage(usage, ins):
        image_out = outputs  # an images usage without output details: all of it is image
    return Usage(
        inputs,
        cached,
        outputs,
        reasoning,
        False,
        cache_write,
        audio_in,
        audio_out,
        image_in,
        image_out,
        rejected,
    )


# Where each detail goes in the lists `_subsets` returns.
_INPUT_PARTS = {"cached_tokens": 0, "cache_write_tokens": 1, "audio_tokens": 2, "image_tokens": 3}
_OUTPUT_PARTS = {
    "reasoning_tokens": 0,
    "audio_tokens": 1,
    "image_tokens": 2,
    "rejected_prediction_tokens": 3,
}


_NO_PARTS = (0, 0, 0, 0)


def _subsets(details: dict[str, Any] | None, parts: dict[str, int], parent: int) -> Sequence[int]:
    """The counts of a details object named in `parts`, each capped at its parent's count."""
    if type(details) is not dict or not any(details.values()):  # usually all zero
        return _NO_PARTS
    counts = [0, 0, 0, 0]
    for key, value in details.items():
        if type(value) is int and value > 0:  # not a bool, whose type is bool
            index = parts.get(key)
            if index is not None:
                counts[index] = value if value < parent else parent
    return counts


def _is_images_usage(usage: dict[str, Any], input_details: dict[str, Any]) -> bool:
    """The usage of `/images/*` (and their stream events): `input_tokens` naming, no `type`,
    `input_tokens_details` with `image_tokens`, output details (if any) with `image_tokens`."""
    if "image_tokens" not in input_details or "prompt_tokens" in usage or "type" in usage:
        return False
    outs = _details(usage, _OUTPUT_DETAILS)
    return outs is None or "image_tokens" in outs


def _says_all(usage: dict[str, Any]) -> bool:
    """True for the usage of an answer that states nothing billable beside it: embeddings
    (no output count), images, transcriptions (a `type`). Chat and Responses answers have a
    `service_tier`, and Responses ones tool calls, outside their usage."""
    if "type" in usage:
        return True
    if "completion_tokens" in usage:
        return False
    if "output_tokens" not in usage:
        return True
    ins = _details(usage, _INPUT_DETAILS)
    return ins is not None and _is_images_usage(usage, ins)


def usage_of_object(answer: Any) -> Usage | None:
    """A parsed answer or stream event → its Usage, with the facts stated beside `usage`.

    A Responses event (`response.completed`, `.incomplete`, `.failed`; Realtime's
    `response.done`) is read through its `response` object. `service_tier` is the object's
    own; `web_search_calls` / `file_search_calls` count its `output` items of those types,
    unless `tool_usage.web_search.num_requests` (the billable searches) says otherwise. A
    verbose transcription without `usage` is billed by its `duration`. None: no usage stated.
    """
    if type(answer) is not dict:
        return None
    if "response" in answer:
        kind, response = answer.get("type"), answer["response"]
        if type(kind) is str and kind.startswith("response.") and type(response) is dict:
            answer = response
    usage = usage_from_mapping(answer.get("usage"))
    if usage is None:
        seconds = _seconds(answer.get("duration"))
        if seconds is None or type(answer.get("text")) is not str:
            return None
        usage = Usage(audio_seconds=seconds)  # whisper-1 verbose_json before `usage` existed
    tier = answer.get("service_tier")
    if type(tier) is str:
        usage.service_tier = tier
    output = answer.get("output")
    if type(output) is list:
        web = files = 0
        for item in output:
            if type(item) is dict:
                item_type = item.get("type")
                if item_type == "web_search_call":
                    web += 1
                elif item_type == "file_search_call":
                    files += 1
        usage.web_search_calls, usage.file_search_calls = web, files
    if "tool_usage" in answer:
        billed = _billed_web_searches(answer["tool_usage"])
        if billed is not None:
            usage.web_search_calls = billed
    return usage


def _billed_web_searches(tool_usage: Any) -> int | None:
    web_search = tool_usage.get("web_search") if isinstance(tool_usage, dict) else None
    requests = web_search.get("num_requests") if isinstance(web_search, dict) else None
    if isinstance(requests, int) and not isinstance(requests, bool) and requests >= 0:
        return requests
    return None


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()
# Raw keys: inside a JSON string their quotes would be escaped, so these match only keys.
_SERVICE_TIER = re.compile(rb'"service_tier"\s*:\s*(?:"([^"\\]*)"|null)')
_SEARCH_CALL = re.compile(rb'"type"\s*:\s*"(web|file)_search_call"')
_TOOL_USAGE = re.compile(rb'"tool_usage"\s*:\s*\{')


def usage_in_tail(tail: bytes) -> Usage | None:
    """The last non-null `"usage": {...}` object in a body's final bytes (its own fields only).

    A raw `"usage":` can only be a key: inside a JSON string the quotes would be escaped.
    """
    found = _last_usage(tail)
    return found[0] if found is not None else None


def _last_usage(data: bytes, end: int | None = None) -> tuple[Usage, int, dict[str, Any]] | None:
    """The last usage object whose key lies before `end`: as Usage, where its key starts, and
    as parsed."""
    position = len(data) if end is None else end
    decoder = _DECODER
    while (position := data.rfind(b'"usage"', 0, position)) != -1:
        match = _USAGE_OBJECT.match(data, position)
        if match:
            text = data[match.end() - 1 :].decode("utf-8", "replace")
            try:
                value, _ = decoder.raw_decode(text)
            except ValueError:
                continue
            usage = usage_from_mapping(value)
            if usage is not None:
                return usage, position, value
    return None


def _with_visible_facts(usage: Usage, region: bytes) -> Usage:
    """The answer-level facts as far as `region` (part of one answer object) shows them."""
    tier = None
    position = len(region)
    while (position := region.rfind(b'"service_tier"', 0, position)) != -1:
        match = _SERVICE_TIER.match(region, position)
        if match:
            tier = match.group(1)
            break
    usage.service_tier = tier.decode("utf-8", "replace") if tier is not None else None
    web = files = 0
    if b'_search_call"' in region:
        for match in _SEARCH_CALL.finditer(region):
            if match.group(1) == b"web":
                web += 1
            else:
                files += 1
    usage.web_search_calls, usage.file_search_calls = web, files
    position = region.rfind(b'"tool_usage"')
    match = _TOOL_USAGE.match(region, position) if position != -1 else None
    if match is not None:
        try:
            value, _ = _DECODER.raw_decode(region[match.end() - 1 :].decode("utf-8", "replace"))
        except ValueError:
            value = None
        billed = _billed_web_searches(value)
        if billed is not None:
            usage.web_search_calls = billed
    return usage


def usage_of_answer(head: bytes, tail: bytes, complete: bool, is_sse: bool) -> Usage | None:
    """Everything billable an answer states, from a BodyRecorder's head and tail.

    `complete`: the head holds the whole body (BodyRecorder.complete). A whole JSON answer
    up to 64 kB is parsed whole. Over it, embeddings', images' and transcriptions' usage is
    read from the tail (their answers state nothing else), a chat answer's too when its tail
    also shows its `service_tier`; a Responses answer is parsed whole, for its search
    calls. A body cut by the head is read from its tail: its search calls as far as the
    tail shows them. A stream is read from its last event that states a usage: a chat
    chunk, an images or transcription event, or the `response.completed` / `.incomplete` /
    `.failed` event's response object, read again from the head when that event starts
    before the tail and the head holds the whole stream. None: the answer states no usage.
    """
    return _usage_of_answer(lambda: head, tail, len(head) if complete else None, is_sse)


def usage_of_recording(recorder: BodyRecorder, is_sse: bool) -> Usage | None:
    """`usage_of_answer` of a recorder's copies, joining its head only when it is needed."""
    total = recorder.total if recorder.complete else None
    return _usage_of_answer(recorder.head, recorder.tail(), total, is_sse)


def _usage_of_answer(
    head: Callable[[], bytes], tail: bytes, total: int | None, is_sse: bool
) -> Usage | None:
    """`total`: the body's size when the head holds all of it, else None."""
    if is_sse:
        rereadable = total is not None and len(tail) < total
        usage, cut = _usage_of_events(tail, not rereadable)
        if cut and rereadable:
            usage, _ = _usage_of_events(head(), True)
        return usage
    if total is not None and total <= WHOLE_JSON_LIMIT:
        return _usage_of_json(tail if len(tail) >= total else head())
    # A big body (embeddings' vectors, images' base64): its tail is read first, as parsing
    # it whole costs ~3 µs per kB of numbers, and even a scan of it ~0.25 µs per kB.
    found = _last_usage(tail)
    if found is None:
        return _usage_of_json(head()) if total is not None else None
    usage, _, mapping = found
    if _says_all(mapping):
        return usage
    _with_visible_facts(usage, tail)
    if total is not None and (usage.service_tier is None or "completion_tokens" not in mapping):
        # A whole Responses answer: its search calls may lie before the tail.
        whole = _usage_of_json(head())
        if whole is not None:
            return whole
    return usage


def _usage_of_json(body: bytes) -> Usage | None:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    usage = usage_of_object(answer)
    if usage is not None:
        return usage
    found = _last_usage(body)  # a body that is not an OpenAI answer object, or not JSON
    if found is None:
        return None
    usage, _, mapping = found
    return usage if _says_all(mapping) else _with_visible_facts(usage, body)


def _usage_of_events(data: bytes, read_cut: bool) -> tuple[Usage | None, bool]:
    """The usage of the last SSE event in `data` that states one, and whether that event was
    cut (it starts before `data`, or is not JSON). A cut event is read (its usage object and
    what its visible part says) only with `read_cut`; else the answer is (None, True)."""
    position = len(data)
    while (position := data.rfind(b'"usage"', 0, position)) != -1:
        if not _USAGE_OBJECT.match(data, position):
            continue
        line_start = start = data.rfind(b"\n", 0, position) + 1
        if start < 2 or data[start - 2] != 10:  # not after "\n\n": a CRLF stream, or a cut
            start = _event_start(data, position)
        line_end = data.find(b"\n", position)
        if line_end == -1:
            line_end = len(data)
        if (
            start == line_start
            and data.startswith(b"data: {", start)
            and not data.startswith(b"data:", line_end + 1)
        ):
            text = data[start + 6 : line_end]  # the usual event: one data line (a CR is JSON)
        else:
            text = _event_data(data, start, _event_end(data, position))
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            usage = usage_of_object(payload)
            if usage is not None:
                return usage, False
            position = start  # this event states no usage of its own: look before it
            continue
        if not read_cut:
            return None, True
        end = _event_end(data, position)
        found = _last_usage(data[:end], position + len(b'"usage"'))
        if found is not None and found[1] == position:
            return _with_visible_facts(found[0], data[start:end]), True
    return None, False


def _event_start(data: bytes, position: int) -> int:
    """Where the SSE event holding `position` starts: after the blank line before it (or at
    0). Walks back a line at a time, as a one-byte rfind is a memrchr."""
    i = position
    while (i := data.rfind(b"\n", 0, i)) > 0:
        before = data[i - 1]
        if before == 10 or (before == 13 and i >= 3 and data[i - 3 : i - 1] == b"\r\n"):
            return i + 1
    return 0


def _event_end(data: bytes, position: int) -> int:
    """Where the SSE event holding `position` ends: after its blank line (or at the end)."""
    i = position
    while (i := data.find(b"\n", i)) != -1:
        i += 1
        after = data[i : i + 1]
        if after == b"\n":
            return i + 1
        if after == b"\r" and data[i - 2 : i - 1] == b"\r" and data[i + 1 : i + 2] == b"\n":
            return i + 2
    return len(data)


def _event_data(data: bytes, start: int, end: int) -> bytes:
    """The `data:` lines of the SSE event at data[start:end], joined as the SSE spec joins
    them (one leading space dropped, lines joined by LF)."""
    lines = []
    while start < end:
        line_end = data.find(b"\n", start, end)
        if line_end == -1:
            line_end = end
        next_line = line_end + 1
        if line_end > start and data[line_end - 1] == 13:
            line_end -= 1
        if data.startswith(b"data:", start, line_end):
            value = start + 5
            if data.startswith(b" ", value, line_end):
                value += 1
            lines.append(data[value:line_end])
        start = next_line
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def input_characters(json_body: Any) -> int:
    """The billed unit of character-priced speech (`/audio/speech`, tts-1 / tts-1-hd): the
    Unicode code points of the request's `input`; 0 when `input` is not a string."""
    if isinstance(json_body, dict):
        text = json_body.get("input")
        if isinstance(text, str):
            return len(text)
    return 0


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


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


def split_events(data: bytes) -> list[bytes]:
    """SSE events, each with the blank line that ended it (LF or CRLF), as sent."""
    events, start = [], 0
    for end in _EVENT_END.finditer(data):
        events.append(data[start : end.end()])
        start = end.end()
    if start < len(data):
        events.append(data[start:])
    return events


def _without_usage_event(events: bytes) -> bytes:
    """Without the usage-only chunk (`"choices":[]`): the last event that has a usage."""
    parts = split_events(events)
    for index in range(len(parts) - 1, -1, -1):
        if b'"usage":{' in parts[index]:
            if b'"choices":[]' not in parts[index]:
                return events
            return b"".join(parts[:index] + parts[index + 1 :])
    return events


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

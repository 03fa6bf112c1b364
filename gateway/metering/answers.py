"""The usage an answer states, read once the call is over from a BodyRecorder's copies.

The relay never parses a response as it passes. It only keeps bounded copies (the start
of the body, and its last bytes, where OpenAI puts `usage`); once the call is over, what it
used is read from them (`usage_of_recording`): a whole JSON answer parsed whole, a stream's
last event that states a usage, a body too big for the head from its tail. Text is
tokenized only when no usage arrived (`gateway.metering.estimate`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway.metering.recorder import BodyRecorder
from gateway.metering.sse import event_data, event_end, event_start
from gateway.metering.usage import (
    Usage,
    billed_web_searches,
    says_all,
    usage_from_mapping,
    usage_of_object,
)

WHOLE_JSON_LIMIT = 64 << 10  # a whole JSON answer up to this size is parsed whole
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
        billed = billed_web_searches(value)
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
    if says_all(mapping):
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
    return usage if says_all(mapping) else _with_visible_facts(usage, body)


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
            start = event_start(data, position)
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
            text = event_data(data, start, event_end(data, position))
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
        end = event_end(data, position)
        found = _last_usage(data[:end], position + len(b'"usage"'))
        if found is not None and found[1] == position:
            return _with_visible_facts(found[0], data[start:end]), True
    return None, False

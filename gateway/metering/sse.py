"""Server-sent events as OpenAI streams them: where events end and start, their `data:`
lines, and `UsageChunkStripper`, which hides from a client the usage it did not ask for.

The relay forwards bytes as they come; these work on those bytes, never parsing an event
that does not need it. What a stream's last usage event says is `gateway.metering.answers`.
"""

from __future__ import annotations

import re

import orjson

_MAX_HELD_EVENT = 1 << 20
# A line ends with CRLF, LF or a CR alone (the SSE standard's three); an event ends with an empty
# line, so with two line ends in a row. A CR alone at the very end of what has arrived may be
# the first half of a CRLF: `last_event_end` does not count on it.
_LINE_END = rb"(?:\r\n|\r(?!\n)|\n)"
_EVENT_END = re.compile(_LINE_END + _LINE_END)
_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")


def last_event_end(data: bytes) -> int:
    """Where the last whole event of `data` ends (after its blank line); -1: none ends."""
    if data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n"):
        return len(data)  # a read that ends with an event, as most do
    # Every blank line holds one of these pairs, and starts at most a byte before it.
    tail = max(data.rfind(b"\n\n"), data.rfind(b"\r\r"), data.rfind(b"\n\r"))
    if tail == -1:
        return -1
    end = _last_end_from(data, max(0, tail - 1))
    return end if end != -1 or tail <= 1 else _last_end_from(data, 0)


def _last_end_from(data: bytes, start: int) -> int:
    end = -1
    for found in _EVENT_END.finditer(data, start):
        if found.end() == len(data) and data.endswith(b"\r"):
            break  # perhaps half of a CRLF: the event may end a byte later
        end = found.end()
    return end


def split_events(data: bytes) -> list[bytes]:
    """SSE events, each with the blank line that ended it (whatever its line ends), as sent."""
    events, start = [], 0
    for end in _EVENT_END.finditer(data):
        events.append(data[start : end.end()])
        start = end.end()
    if start < len(data):
        events.append(data[start:])
    return events


def event_start(data: bytes, position: int) -> int:
    """Where the SSE event holding `position` starts: after the blank line before it (or at
    0)."""
    start = 0
    for found in _EVENT_END.finditer(data, 0, position):
        start = found.end()
    return start


def event_end(data: bytes, position: int) -> int:
    """Where the SSE event holding `position` ends: after its blank line (or at the end)."""
    found = _EVENT_END.search(data, position)
    return found.end() if found else len(data)


def event_data(data: bytes, start: int, end: int) -> bytes:
    """The `data:` lines of the SSE event at data[start:end], joined as the SSE spec joins
    them (one leading space dropped, lines joined by LF)."""
    lines = []
    for line in _LINE_SPLIT.split(data[start:end]):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


class UsageChunkStripper:
    """For streams where the gateway asked for usage and the client did not.

    The upstream then adds `"usage": null` to every chunk and sends one usage-only chunk
    (`"choices": []`) before `[DONE]`. Both are removed so the client sees what it would have
    seen directly. Only whole events are forwarded (whatever their line ends), so a chunk split
    across reads is never half-edited, and each is decided on its own: OpenAI's compact
    `,"usage":null` by a byte search, anything else by parsing the events that name a usage.
    Nothing else is ever changed: an edit is kept only if the event's JSON, parsed again, is
    the original without its `usage`.
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
                return _without_null_usage(data)
            self._held = data
            return b""
        complete, self._held = data[:end], data[end:]
        return _stripped(complete)

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return _stripped(held) if held else b""


def _stripped(events: bytes) -> bytes:
    if b'"usage"' not in events:
        return events
    nulls = events.count(UsageChunkStripper.NULL_USAGE)
    if nulls == events.count(b'"usage"') and b'"choices":[]' not in events:
        # OpenAI's chunks, compact: each usage is a `,"usage":null` member, none the usage-only
        # chunk; no event needs looking at on its own.
        return events.replace(UsageChunkStripper.NULL_USAGE, b"") if nulls else events
    kept = []
    for event in _events_of(events):
        cleaned = _cleaned(event)
        if cleaned is not None:
            kept.append(cleaned)
    return b"".join(kept)


def _events_of(data: bytes) -> list[bytes]:
    """`split_events`, with LF-only data (OpenAI's) split by `bytes.split`, in C."""
    if b"\r" in data:
        return split_events(data)
    parts = data.split(b"\n\n")
    events = [part + b"\n\n" for part in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return events


_NULL_MEMBER = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')


def _cleaned(event: bytes) -> bytes | None:
    """The event without its `"usage": null`, or None for the usage-only chunk."""
    if b'"usage"' not in event:
        return event
    if event.count(b'"usage"') == 1 and b'"usage":null' in event and b'"choices":[]' not in event:
        return _without_null_usage(event)  # OpenAI's compact chunk: no parse needed
    data = event_data(event, 0, len(event))
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return event
    if not isinstance(chunk, dict) or "usage" not in chunk:
        return event
    usage = chunk["usage"]
    if isinstance(usage, dict) and chunk.get("choices") == []:
        return None
    if usage is not None:
        return event
    expected = {key: value for key, value in chunk.items() if key != "usage"}
    for member in reversed(list(_NULL_MEMBER.finditer(event))):
        edited = event[: member.start()] + event[member.end() :]
        try:
            if orjson.loads(event_data(edited, 0, len(edited))) == expected:
                return edited
        except orjson.JSONDecodeError:
            continue
    return event


def _without_null_usage(data: bytes) -> bytes:
    return data.replace(UsageChunkStripper.NULL_USAGE, b"")

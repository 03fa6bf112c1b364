"""Server-sent events as OpenAI streams them: where events end and start, their `data:`
lines, and `UsageChunkStripper`, which hides from a client the usage it did not ask for.

The relay forwards bytes as they come; these work on those bytes, never parsing an event
that does not need it. What a stream's last usage event says is `gateway.metering.answers`.
"""

from __future__ import annotations

import re

_MAX_HELD_EVENT = 1 << 20
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


def last_event_end(data: bytes) -> int:
    """Where the last whole event of `data` ends (after its blank line); -1: none ends."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf != -1 else -1, crlf + 4 if crlf != -1 else -1)


def split_events(data: bytes) -> list[bytes]:
    """SSE events, each with the blank line that ended it (LF or CRLF), as sent."""
    events, start = [], 0
    for end in _EVENT_END.finditer(data):
        events.append(data[start : end.end()])
        start = end.end()
    if start < len(data):
        events.append(data[start:])
    return events


def event_start(data: bytes, position: int) -> int:
    """Where the SSE event holding `position` starts: after the blank line before it (or at
    0). Walks back a line at a time, as a one-byte rfind is a memrchr."""
    i = position
    while (i := data.rfind(b"\n", 0, i)) > 0:
        before = data[i - 1]
        if before == 10 or (before == 13 and i >= 3 and data[i - 3 : i - 1] == b"\r\n"):
            return i + 1
    return 0


def event_end(data: bytes, position: int) -> int:
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


def event_data(data: bytes, start: int, end: int) -> bytes:
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


def _without_usage_event(events: bytes) -> bytes:
    """Without the usage-only chunk (`"choices":[]`): the last event that has a usage."""
    parts = split_events(events)
    for index in range(len(parts) - 1, -1, -1):
        if b'"usage":{' in parts[index]:
            if b'"choices":[]' not in parts[index]:
                return events
            return b"".join(parts[:index] + parts[index + 1 :])
    return events

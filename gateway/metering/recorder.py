"""`BodyRecorder`: the bounded copies of a response body the relay keeps as it passes.

The start of the body (up to HEAD_LIMIT) and its last bytes (at least TAIL_LIMIT, where
OpenAI puts `usage`), decoded from gzip or deflate, so that once the call is over what it
used can be read from them (`gateway.metering.answers`) without holding the whole body.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import Any

HEAD_LIMIT = 1 << 20
TAIL_LIMIT = 64 << 10


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

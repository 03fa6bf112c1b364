"""Structured logs: one JSON object per line, with a line per call.

Only fields the gateway chose go into a line: never a key, a secret, or prompt/completion text.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, BinaryIO

import orjson

CALL_FIELDS = (
    "request_id", "team", "key_id", "method", "path", "model", "stream", "status", "outcome",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "tokens_estimated", "cost_nanousd", "latency_ms", "ttfb_ms", "queued_ms", "error_code",
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call = getattr(record, "call", None)
        if call is not None:
            line.update(call)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str = "info", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class CallLog:
    """The per-call log lines, in the same JSON shape as every other line, but built with
    one orjson call and written in batches from a thread: `logging` per call would cost a
    fifth of the gateway's throughput."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self.enabled = logging.getLogger("gateway.calls").isEnabledFor(logging.INFO)

    def add(self, record: object) -> None:
        now = time.time()
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "level": "info",
            "logger": "gateway.calls",
            "msg": "call",
        }
        for name in CALL_FIELDS:
            line[name] = getattr(record, name)
        self._lines.append(orjson.dumps(line) + b"\n")

    async def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        await asyncio.to_thread(self._write, b"".join(lines))

    def _write(self, data: bytes) -> None:
        stream = self._stream or sys.stderr.buffer
        stream.write(data)
        stream.flush()

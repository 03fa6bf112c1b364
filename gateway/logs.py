"""Structured logs: one JSON object per line, with a line per call.

Only fields the gateway chose go into a line: never a key, a secret, or prompt/completion text.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

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


def call_fields(record: object) -> dict[str, Any]:
    return {name: getattr(record, name) for name in CALL_FIELDS}

"""Structured logs: one JSON object per line, with a line per call.

Only fields the gateway chose go into a line: never a key, a secret, or prompt/completion text.
Text that did not come from the gateway (an exception's message, a library's log line) is
redacted on its way out: header values of credentials, bearer tokens and key-shaped tokens
become `[redacted]`, and aiohttp's report of a malformed request (which quotes the raw bytes
of the offending line: an `Authorization` header with a NUL in it, a request target with a
key in its query) is replaced by one short line without them.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import re
import sys
import time
from typing import Any, BinaryIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

CALL_FIELDS = (
    "request_id", "team", "key_id", "method", "path", "model", "stream", "status", "outcome",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "tokens_estimated", "cost_nanousd", "latency_ms", "ttfb_ms", "queued_ms", "error_code",
)  # fmt: skip


_call_values = operator.attrgetter(*CALL_FIELDS)

REDACTED = "[redacted]"
# A name starts after a non-word character or after a repr's escape (`...\r\nAuthorization`).
_START = r"(?:(?<![A-Za-z0-9_-])|(?<=\\[rnt]))"
# A credential header's value, as a header line, a repr'd (name, value) pair or a query
# parameter: from the separator to the end of the line or of the quoted string.
_SECRET_HEADER = re.compile(
    _START + r"(?i:(proxy-authorization|authorization|x-api-key|api[-_]key|openai-api-key"
    r"|set-cookie|cookie))"
    r"""(\\?['"]?\s*[:=,]\s*(?:b?\\?['"])?)"""
    r"""(?:[^\r\n'"\\]|\\(?![rn\\]))+"""  # a repr's escapes (\x00) are part of the value
)
_SCHEME_TOKEN = re.compile(_START + r"""(?i:(bearer|basic))(\s+)(?:[^\s'",;\\]|\\(?![rn\\]))+""")
# OpenAI's keys (sk-..., sk-proj-...) and the gateway's own (mgw-...), also right after an
# escape (`\x00mgw-...`).
_KEY_TOKEN = re.compile(r"(?:(?<![A-Za-z])|(?<=\\[rnt]))(sk|mgw)-[A-Za-z0-9_-]{6,}")


def redact(text: str) -> str:
    """`text` with every credential-looking value replaced by `[redacted]`."""
    if not text:
        return text
    text = _SECRET_HEADER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _SCHEME_TOKEN.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return _KEY_TOKEN.sub(lambda m: m.group(1) + "-" + REDACTED, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        call = getattr(record, "call", None)
        if call is not None:
            line.update(call)
        if record.exc_info:
            line["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class RedactingFormatter(logging.Formatter):
    """The plain-text lines, redacted like the JSON ones."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Where a parser's message starts quoting what it read: `: b'...'`, `: bytearray(b'...')`.
_REASON_END = re.compile(r"""\s*:?\s*(?:bytearray\(|memoryview\(|b?['"\\])""")


class BadRequestFilter(logging.Filter):
    """aiohttp's "Error handling request" for a request its parser refused (answered 400)
    becomes one warning line naming the reason, without the traceback or the raw line the
    parser quotes (which may be a header holding a key)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        remote = args[0] if args else None
        record.msg = "bad request refused with %d (%s) from %s"
        record.args = (exc.code, bad_request_reason(exc), remote)
        record.exc_info = record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def bad_request_reason(exc: HttpProcessingError) -> str:
    """The parser's description of what is wrong, without the bytes it quotes."""
    first = str(exc.message or "").strip().split("\n", 1)[0]
    cut = _REASON_END.search(first)
    if cut:
        first = first[: cut.start()]
    reason = first.strip().rstrip(":").strip()[:100]
    return redact(reason) or type(exc).__name__


_BAD_REQUESTS = BadRequestFilter()


def install_bad_request_filter() -> None:
    """Idempotent: aiohttp's server logger reports refused requests in short."""
    server_logger = logging.getLogger("aiohttp.server")
    if _BAD_REQUESTS not in server_logger.filters:
        server_logger.addFilter(_BAD_REQUESTS)


def setup_logging(level: str = "info", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    install_bad_request_filter()


class CallLog:
    """The per-call log lines, in the same JSON shape as every other line, but built with
    one orjson call and written in batches from a thread: `logging` per call would cost a
    fifth of the gateway's throughput."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self.enabled = logging.getLogger("gateway.calls").isEnabledFor(logging.INFO)
        self._second = -1
        self._second_text = ""

    def add(self, record: object) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time are formatted once a second
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = {
            "ts": f"{self._second_text}.{int(now * 1000) % 1000:03d}Z",
            "level": "info",
            "logger": "gateway.calls",
            "msg": "call",
        }
        line.update(zip(CALL_FIELDS, _call_values(record), strict=True))
        self._lines.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))

    async def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        await asyncio.to_thread(self._write, b"".join(lines))

    def _write(self, data: bytes) -> None:
        stream = self._stream or sys.stderr.buffer
        stream.write(data)
        stream.flush()

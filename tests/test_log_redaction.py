"""No secret in any log line, whatever a client sends: a real `metering-gateway serve` process
is sent malformed requests carrying the gateway key (and the upstream's) over raw sockets;
aiohttp's parser refuses them with 400, and the line the gateway logs for each names the
reason, never the bytes it quoted."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import orjson

from gateway.logs import JsonFormatter, RedactingFormatter, redact
from tests import processes

KEY = processes.KEY.encode()
UPSTREAM_KEY = processes.UPSTREAM_KEY.encode()
AUTH = b"Authorization: Bearer " + KEY


def request(
    *headers: bytes,
    body: bytes = b"",
    target: bytes = b"/v1/chat/completions",
    method: bytes = b"POST",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    head = [method + b" " + target + b" " + version, b"Host: gateway", *headers]
    return b"\r\n".join([*head, b"Connection: close", b"", b""]) + body


# (name, request bytes, the reason logged; None: aiohttp logs such requests at debug only)
MALFORMED = [
    ("nul-in-the-key", request(AUTH + b"\x00x"), "Invalid header value char"),
    ("bare-cr-after-the-key", request(AUTH + b"\rx"), "Missing expected LF after header value"),
    ("space-before-the-colon", request(b"Authorization : Bearer " + KEY), "Invalid header token"),
    ("over-long-authorization", request(AUTH + b"a" * 9000),
     "Got more than 8190 bytes when reading"),
    ("space-in-a-header-name", request(AUTH, b"X Bad: 1"), "Invalid header token"),
    ("nul-in-a-value", request(AUTH, b"X-Note: a\x00b"), "Invalid header value char"),
    ("over-long-header", request(AUTH, b"X-Big: " + b"a" * 20_000),
     "Got more than 8190 bytes when reading"),
    ("invalid-content-length", request(AUTH, b"Content-Length: abc"),
     "Invalid character in Content-Length"),
    ("chunk-size-is-the-key", request(AUTH, b"Transfer-Encoding: chunked",
                                      body=KEY + b"\r\n{}\r\n0\r\n\r\n"),
     "Invalid character in chunk size"),
    ("bad-chunk-framing", request(AUTH, b"Transfer-Encoding: chunked", body=b"2\r\n{}xx0\r\n\r\n"),
     "Expected LF after chunk data"),
    ("key-in-a-garbage-request-line", request(AUTH, target=b"/v1/models?api_key=" + KEY,
                                               version=b"HTTP/9.x"), "Bad status line"),
    ("key-in-an-over-long-target", request(AUTH, target=b"/v1/models?k=" + KEY + b"a" * 9000),
     "Got more than 8190 bytes when reading"),
    ("upstream-key-in-api-key", request(AUTH, b"api-key: " + UPSTREAM_KEY + b"\x00"),
     "Invalid header value char"),
    ("cookie-with-the-key", request(b"Cookie: session=" + KEY + b"\x00"),
     "Invalid header value char"),
    ("garbage-method", request(AUTH, method=b"GE\x01T"), None),
]  # fmt: skip


def status_of(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    return int(answer.split(b" ", 2)[1])


def test_malformed_requests_are_400_and_no_log_line_holds_a_key(tmp_path: Path):
    stack = processes.Stack(tmp_path)
    try:
        statuses = [status_of(stack.port, data) for _, data, _ in MALFORMED]
    finally:
        stack.stop()
    assert statuses == [400] * len(MALFORMED)
    log = stack.log.read_bytes()
    assert KEY not in log and UPSTREAM_KEY not in log
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith(b"{")]
    refused = [line for line in lines if line["logger"] == "aiohttp.server"]
    assert [(line["level"], line["msg"]) for line in refused] == [
        ("warning", f"bad request refused with 400 ({reason}) from 127.0.0.1")
        for _, _, reason in MALFORMED
        if reason is not None
    ]
    assert all("error" not in line for line in lines)  # no tracebacks quoting the request


def test_redaction_replaces_credential_values_and_key_shaped_tokens():
    cases = {
        "b'Authorization: Bearer mgw-abc\\x00x'": "b'Authorization: [redacted]'",
        "b'X: 1\\r\\nAuthorization: Bearer k\\r\\nX-Next: 2'": (
            "b'X: 1\\r\\nAuthorization: [redacted]\\r\\nX-Next: 2'"
        ),
        "b'X-Note: \\x00mgw-abcdefgh'": "b'X-Note: \\x00mgw-[redacted]'",
        "b'X: 1\\r\\napi-key: k\\r\\nX: \\r\\nsk-abcdefgh'": (
            "b'X: 1\\r\\napi-key: [redacted]\\r\\nX: \\r\\nsk-[redacted]'"
        ),
        "task-abcdefgh disk-abcdefgh": "task-abcdefgh disk-abcdefgh",
        "('Authorization', 'Bearer abc')": "('Authorization', '[redacted]')",
        "{'x-api-key': 'abc', 'a': 1}": "{'x-api-key': '[redacted]', 'a': 1}",
        "GET /v1/models?api_key=abc HTTP/1.1": "GET /v1/models?api_key=[redacted]",
        "Cookie: session=abc; other=def": "Cookie: [redacted]",
        "proxy-authorization: Basic dXNlcjpwYXNz": "proxy-authorization: [redacted]",
        "sent Bearer abc.def to it": "sent Bearer [redacted] to it",
        "key sk-proj-abcdef123456 and mgw-0123456789": "key sk-[redacted] and mgw-[redacted]",
        "OPENAI_API_KEY is not set": "OPENAI_API_KEY is not set",
        "team research, key research-dev, model gpt-4o-mini": (
            "team research, key research-dev, model gpt-4o-mini"
        ),
    }
    assert {text: redact(text) for text in cases} == cases


def test_json_and_text_lines_redact_the_message_its_arguments_and_the_traceback():
    try:
        raise ValueError("upstream said: Authorization: Bearer sk-upstream-secret-123")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "gateway.test", logging.ERROR, __file__, 1, "client sent %s", ("mgw-client-secret",),
        exc_info,
    )  # fmt: skip
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "client sent mgw-[redacted]"
    assert line["error"].endswith("ValueError: upstream said: Authorization: [redacted]")
    text = RedactingFormatter("%(levelname)s %(message)s").format(record)
    assert text.startswith("ERROR client sent mgw-[redacted]\n")
    assert text.endswith("ValueError: upstream said: Authorization: [redacted]")
    assert "secret" not in text

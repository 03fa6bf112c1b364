"""A request head, read for the lean path only when nothing about it is unusual.

The lean path serves the common proxied call: HTTP/1.1, an origin-form `/v1/` target without
percent-escapes, a body framed by one Content-Length (or none), plain ASCII header lines.
Anything else (chunked or compressed bodies, `Expect`, upgrades, HTTP/1.0, escapes, odd
bytes, the gateway's own pages and APIs) is left to aiohttp, byte for byte, so its parsing,
decoding and error answers stay the one behaviour for all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import CIMultiDict

from gateway.web.security import is_gateway_answer

MAX_HEAD = 8190  # aiohttp's line and field limits: a longer head goes to aiohttp, which refuses it
MAX_HEADERS = 100

_REQUEST_LINE = re.compile(rb"([A-Z]{3,7}) (/v1/[!$&'()*+,\-./0-9:;=?@A-Z_a-z~]*) HTTP/1\.1")
# A header line as RFC 9110 writes it: a token, a colon, visible ASCII with inner spaces.
_HEADER = re.compile(
    r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[!-~](?:[ \t!-~]*[!-~])?)?)[ \t]*\r\n",
    re.MULTILINE,
)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Headers whose presence means the body or the connection is not plain: aiohttp's.
_NOT_LEAN = (
    "Transfer-Encoding", "Content-Encoding", "Expect", "Upgrade", "TE", "Trailer",
    "HTTP2-Settings",
)  # fmt: skip


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    headers: CIMultiDict[str]
    content_length: int  # 0: no body
    keep_alive: bool


def parse_head(head: bytes) -> RequestHead | None:
    """The head (up to and including its blank line's first CRLF pair) for the lean path, or
    None when aiohttp must read it."""
    line_end = head.find(b"\r\n")
    line = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if line is None:
        return None
    try:
        block = head[line_end + 2 : -2].decode("ascii")
    except UnicodeDecodeError:
        return None
    pairs = _HEADER.findall(block)
    lines = block.count("\n")
    # Every line one header: none skipped for a byte out of place, no bare CR or LF.
    if len(pairs) != lines or block.count("\r") != lines or lines > MAX_HEADERS:
        return None
    method = line.group(1).decode()
    target = line.group(2).decode()
    path = target.partition("?")[0]
    # Dot segments and empty ones are aiohttp's to normalize (and the intake's to refuse).
    if method not in _METHODS or "/." in path or "//" in path or is_gateway_answer(path):
        return None
    headers = CIMultiDict(pairs)
    for name in _NOT_LEAN:
        if name in headers:
            return None
    content_length = 0
    lengths = headers.getall("Content-Length", ())
    if lengths:
        value = lengths[0]
        if len(lengths) > 1 or not value.isdigit() or len(value) > 18:
            return None
        content_length = int(value)
    keep_alive = True
    connection = headers.get("Connection")
    if connection is not None:
        tokens = {token.strip().lower() for token in connection.split(",")}
        if "upgrade" in tokens:
            return None
        keep_alive = "close" not in tokens
    return RequestHead(method, target, headers, content_length, keep_alive)

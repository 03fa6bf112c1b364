"""An upstream that reads HTTP/1.1 exactly as a strict server does and nothing more: it never
decodes a body, frames each request by its own Content-Length or chunked encoding, and keeps
every connection alive, so whatever bytes follow one request's body are parsed as the next
request on that connection. It proves what the gateway's framing lets through."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import orjson

CHAT_ANSWER = {
    "id": "chatcmpl-raw",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


@dataclass
class RawRequest:
    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class RawUpstream:
    """Answers every request with a chat completion (or `extra_headers` added), recording it."""

    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200
    # Canned answers (content type, body), served in order before the default chat answer.
    answers: list[tuple[str, bytes]] = field(default_factory=list)
    requests: list[RawRequest] = field(default_factory=list)
    malformed: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _connections: int = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            while True:
                request = await _read_request(reader, number)
                if request is None:
                    break
                if isinstance(request, bytes):
                    self.malformed.append(request)
                    break
                self.requests.append(request)
                content_type = "application/json"
                if self.answers:
                    content_type, body = self.answers.pop(0)
                else:
                    seen = f"{request.method} {request.target}"
                    body = orjson.dumps({**CHAT_ANSWER, "seen": seen})
                head = [f"HTTP/1.1 {self.status} OK", f"Content-Type: {content_type}"]
                head += [f"{k}: {v}" for k, v in self.extra_headers]
                head.append(f"Content-Length: {len(body)}")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader, connection: int) -> RawRequest | bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return head
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return head
        headers.append((name, value.strip()))
    names = {k.lower(): v for k, v in headers}
    if "chunked" in names.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        data = bytes(body)
    else:
        data = await reader.readexactly(int(names.get("content-length", "0")))
    return RawRequest(connection, parts[0], parts[1], headers, data)

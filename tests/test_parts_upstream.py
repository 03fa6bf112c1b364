"""`ConnectionPool` (`gateway/upstream/client.py`) against a scripted HTTP/1.1 origin on
127.0.0.1: a connection is reused after a complete answer, never after the origin closed it,
said `Connection: close`, or its body was left unread; chunked and close-delimited bodies come
through byte for byte; and a pooled connection found dead is replaced once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from gateway.upstream.client import ConnectionPool, UpstreamError, request_head


@dataclass
class Reply:
    """What the origin writes for one request: each piece written (and drained) on its own;
    then it closes the connection if `close`."""

    pieces: tuple[bytes, ...]
    close: bool = False


HANG_UP = Reply((), close=True)  # close without answering


def fixed(body: bytes, *headers: str) -> Reply:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers]
    return Reply((("\r\n".join(head) + "\r\n\r\n").encode() + body,))


@dataclass
class Seen:
    connection: int  # 1 for the first connection the origin accepted
    head: bytes
    body: bytes  # as it came on the wire (chunked framing kept)


@dataclass
class Origin:
    """Answers the n-th request (over all connections, from 0) with `script(n, seen)`."""

    script: Callable[[int, Seen], Reply]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                seen = Seen(number, head, await _read_body(reader, head))
                self.seen.append(seen)
                reply = self.script(len(self.seen) - 1, seen)
                for piece in reply.pieces:
                    writer.write(piece)
                    await writer.drain()
                if reply.close:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    def on(self, connection: int) -> list[bytes]:
        """The request lines the origin read on a connection."""
        return [s.head.split(b"\r\n", 1)[0] for s in self.seen if s.connection == connection]


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            raw += await reader.readexactly(size + 2)
            if size == 0:
                return bytes(raw)
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":", 1)[1]))
    return b""


@contextlib.asynccontextmanager
async def running(
    script: Callable[[int, Seen], Reply],
) -> AsyncIterator[tuple[Origin, ConnectionPool]]:
    origin = Origin(script)
    origin.server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
    pool = ConnectionPool(origin.base_url, connect_timeout=3.0, read_timeout=3.0)
    try:
        async with asyncio.timeout(20):
            yield origin, pool
    finally:
        await pool.close()
        origin.server.close()
        for writer in origin._writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(origin.server.wait_closed(), 5)


def get(pool: ConnectionPool, target: str, method: str = "GET") -> bytes:
    head, chunked = request_head(method, target, pool.host_header, CIMultiDict(), False)
    assert not chunked
    return head


async def fetch(pool: ConnectionPool, target: str, method: str = "GET") -> tuple[int, bytes]:
    """One request, its body read to the end, its connection released."""
    response = await pool.request(get(pool, target, method), None, False)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def until_closed_by_peer(pool: ConnectionPool) -> None:
    """Waits, at most about 5 s, until the pool's idle connections have seen the origin's close
    (the protocol drops its transport in `connection_lost`)."""
    for _ in range(5000):
        if all(connection.transport is None for connection in pool._idle):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the pool never saw the origin close its connection")


# ---------------------------------------------------------------- reuse


async def test_sequential_requests_share_one_connection():
    def script(n: int, seen: Seen) -> Reply:
        return fixed(b"answer %d" % n, "Content-Type: text/plain")

    async with running(script) as (origin, pool):
        answers = [await fetch(pool, f"/v1/r{n}") for n in range(5)]
        assert answers == [(200, b"answer %d" % n) for n in range(5)]
        assert origin.connections == 1
        assert origin.on(1) == [b"GET /v1/r%d HTTP/1.1" % n for n in range(5)]


async def test_the_request_goes_out_exactly_as_request_head_wrote_it():
    async with running(lambda n, seen: fixed(b"{}")) as (origin, pool):
        headers = CIMultiDict({"Authorization": "Bearer sk-x", "Content-Length": "2"})
        head, chunked = request_head(
            "POST", "/v1/chat/completions", pool.host_header, headers, False
        )
        response = await pool.request(head, b"{}", chunked)
        assert await response.read() == b"{}"
        response.release()
        port = origin.base_url.rsplit(":", 1)[1]
        assert origin.seen[0].head == (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n"
            b"Authorization: Bearer sk-x\r\nContent-Length: 2\r\n\r\n" % port.encode()
        )
        assert origin.seen[0].body == b"{}"


async def test_a_streamed_upload_goes_chunked_and_the_connection_is_reused():
    async def upload() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b""
        yield b"world"

    async with running(lambda n, seen: fixed(b"ok")) as (origin, pool):
        head, chunked = request_head("POST", "/v1/files", pool.host_header, CIMultiDict(), True)
        assert chunked and b"Transfer-Encoding: chunked\r\n" in head
        response = await pool.request(head, upload(), chunked)
        assert await response.read() == b"ok"
        response.release()
        assert origin.seen[0].body == b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
        assert await fetch(pool, "/v1/after") == (200, b"ok")
        assert origin.connections == 1


@pytest.mark.parametrize("framing", [b"Content-Length: 1234", b"Transfer-Encoding: chunked"])
async def test_a_head_answer_framing_a_body_it_does_not_send_leaves_the_next_answer_whole(
    framing: bytes,
):
    # A HEAD answer carries the framing headers a GET's would, and no body (RFC 9110 9.3.2).
    def script(n: int, seen: Seen) -> Reply:
        if seen.head.startswith(b"HEAD "):
            return Reply((b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % framing,))
        return fixed(b"after")

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/files/file-1", "HEAD") == (200, b"")
        assert await fetch(pool, "/v1/files/file-1") == (200, b"after")
        assert len(origin.seen) == 2


async def test_a_head_answer_without_a_body_keeps_its_connection():
    def script(n: int, seen: Seen) -> Reply:
        if seen.head.startswith(b"HEAD "):
            return Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",))
        return fixed(b"after")

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/files/file-1", "HEAD") == (200, b"")
        assert await fetch(pool, "/v1/files/file-1") == (200, b"after")
        assert origin.connections == 1


# ---------------------------------------------------------------- connections not reused


async def test_a_connection_the_origin_closed_after_answering_is_not_reused():
    def script(n: int, seen: Seen) -> Reply:
        reply = fixed(b"answer %d" % n)
        return Reply(reply.pieces, close=n == 0)  # keep-alive framing, then a hang-up

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/first") == (200, b"answer 0")
        await until_closed_by_peer(pool)
        assert await fetch(pool, "/v1/second") == (200, b"answer 1")
        assert origin.connections == 2
        assert (origin.on(1), origin.on(2)) == (
            [b"GET /v1/first HTTP/1.1"],
            [b"GET /v1/second HTTP/1.1"],
        )


async def test_a_pooled_connection_that_hangs_up_unanswered_is_replaced_once():
    def script(n: int, seen: Seen) -> Reply:
        return HANG_UP if n == 1 else fixed(b"answer %d" % n)

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/first") == (200, b"answer 0")
        assert await fetch(pool, "/v1/second") == (200, b"answer 2")  # sent again, answered
        assert origin.connections == 2
        assert origin.on(1) == [b"GET /v1/first HTTP/1.1", b"GET /v1/second HTTP/1.1"]
        assert origin.on(2) == [b"GET /v1/second HTTP/1.1"]


async def test_a_new_connection_that_hangs_up_unanswered_is_an_error_not_a_retry():
    async with running(lambda n, seen: HANG_UP) as (origin, pool):
        with pytest.raises(UpstreamError):
            await pool.request(get(pool, "/v1/x"), None, False)
        assert (origin.connections, len(origin.seen)) == (1, 1)


async def test_a_connection_close_answer_is_not_reused():
    def script(n: int, seen: Seen) -> Reply:
        return fixed(b"answer %d" % n, "Connection: close") if n == 0 else fixed(b"answer 1")

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/first") == (200, b"answer 0")
        assert await fetch(pool, "/v1/second") == (200, b"answer 1")
        assert origin.connections == 2
        assert origin.on(1) == [b"GET /v1/first HTTP/1.1"]


async def test_a_body_delimited_by_the_close_is_read_to_the_close():
    def script(n: int, seen: Seen) -> Reply:
        if n == 0:
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            return Reply((head, b"data: 1\n\n", b"data: 2\n\n"), close=True)
        return fixed(b"next")

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/stream") == (200, b"data: 1\n\ndata: 2\n\n")
        assert await fetch(pool, "/v1/next") == (200, b"next")
        assert origin.connections == 2


async def test_a_response_released_before_its_body_ended_is_not_reused():
    def script(n: int, seen: Seen) -> Reply:
        if n == 0:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            return Reply((head, b"5\r\nfirst\r\n"))  # and never the rest
        return fixed(b"answer %d" % n)

    async with running(script) as (origin, pool):
        response = await pool.request(get(pool, "/v1/slow"), None, False)
        assert await response.readany() == b"first"
        response.release()
        assert await fetch(pool, "/v1/next") == (200, b"answer 1")
        assert origin.connections == 2


async def test_an_error_status_with_a_complete_body_keeps_its_connection():
    def script(n: int, seen: Seen) -> Reply:
        body = b'{"error":{"code":"rate_limit_exceeded"}}'
        if n == 0:
            head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n" % len(body)
            return Reply((head + body,))
        return fixed(b"ok")

    async with running(script) as (origin, pool):
        status, body = await fetch(pool, "/v1/x")
        assert (status, body) == (429, b'{"error":{"code":"rate_limit_exceeded"}}')
        assert await fetch(pool, "/v1/y") == (200, b"ok")
        assert origin.connections == 1


# ---------------------------------------------------------------- chunked bodies


async def test_a_chunked_body_comes_through_byte_for_byte_and_keeps_the_connection():
    events = [b"data: %d\n\n" % i for i in range(20)]

    def script(n: int, seen: Seen) -> Reply:
        if n == 0:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            chunks = tuple(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
            return Reply((head, *chunks, b"0\r\n\r\n"))
        return fixed(b"after")

    async with running(script) as (origin, pool):
        response = await pool.request(get(pool, "/v1/stream"), None, False)
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.content_length is None
        assert await response.read() == b"".join(events)
        response.release()
        assert await fetch(pool, "/v1/after") == (200, b"after")
        assert origin.connections == 1


async def test_chunk_framing_split_across_writes_with_extensions_and_trailers_is_removed():
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"4;name=value\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
        b"0\r\nX-Checksum: abc\r\n\r\n"
    )

    def script(n: int, seen: Seen) -> Reply:
        if n == 0:
            return Reply(tuple(wire[i : i + 3] for i in range(0, len(wire), 3)))
        return fixed(b"after")

    async with running(script) as (origin, pool):
        assert await fetch(pool, "/v1/wiki") == (200, b"Wikipedia in\r\n\r\nchunks.")
        assert await fetch(pool, "/v1/after") == (200, b"after")
        assert origin.connections == 1


async def test_a_large_chunked_body_is_read_whole_through_flow_control():
    block = bytes(range(256)) * 1024  # 256 KiB a chunk, 16 of them: 4 MiB

    def script(n: int, seen: Seen) -> Reply:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (len(block), block)
        return Reply((head, *([chunk] * 16), b"0\r\n\r\n"))

    async with running(script) as (origin, pool):
        status, body = await fetch(pool, "/v1/big")
        assert (status, len(body)) == (200, 16 * len(block))
        assert body == block * 16
        assert (await fetch(pool, "/v1/big"))[1] == block * 16
        assert origin.connections == 1


# ---------------------------------------------------------------- the pool's size


async def test_concurrent_requests_open_one_connection_each_and_all_are_kept():
    # The pool has no bound: every request without an idle connection opens one, and every
    # connection released after a complete answer is kept; the last one kept is used first.
    async with running(lambda n, seen: fixed(b"answer")) as (origin, pool):
        requests = (pool.request(get(pool, "/v1/x"), None, False) for _ in range(4))
        responses = await asyncio.gather(*requests)
        assert origin.connections == 4
        for response in responses:
            assert await response.read() == b"answer"
            response.release()
        assert len(pool._idle) == 4
        for _ in range(6):
            assert await fetch(pool, "/v1/again") == (200, b"answer")
        assert origin.connections == 4
        assert sorted(len(origin.on(c)) for c in range(1, 5)) == [1, 1, 1, 7]
        assert len(pool._idle) == 4

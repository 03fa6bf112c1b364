"""One client connection on the lean path.

Each request head is read here; a proxied call's (`gateway.front.head`) goes to the pipeline
as a `LeanRequest`, one at a time, keep-alive and pipelining included. The first head that is
not for the lean path hands the connection, with every byte not yet read, to aiohttp's own
protocol for the rest of its life.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web

from gateway.front.exchange import BODY_HIGH_WATER, LeanRequest, RequestBody
from gateway.front.head import MAX_HEAD, parse_head

if TYPE_CHECKING:
    from gateway.front.server import GatewayServer

log = logging.getLogger("gateway.front")

Handler = Callable[[LeanRequest], Awaitable[web.StreamResponse]]
# The unread rest of a body whose answer went out already is read and dropped, up to this;
# a longer one closes the connection instead (as aiohttp's lingering read does).
DISCARD_MAX = 1024 * 1024


class FrontProtocol(asyncio.Protocol):
    def __init__(self, server: GatewayServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = b""  # bytes after the current request's body, not yet parsed
        self._body: RequestBody | None = None  # the current request's body, still arriving
        self._discard = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            take = body.remaining
            if len(data) <= take:
                body.feed(data)
                if body.remaining == 0:
                    self._body = None
                return
            body.feed(data[:take])
            self._body, data = None, data[take:]
        elif self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
            if not data:
                return
        self._buffer = self._buffer + data if self._buffer else data
        if self._task is None:
            self._next()
        elif len(self._buffer) > BODY_HIGH_WATER:
            self._pause_reading()  # a client pipelining far ahead waits for its answers

    def eof_received(self) -> None:
        # As on aiohttp's path: a client that shuts its sending side has left (the transport
        # closes, and a call under way is recorded as client_disconnect).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._server.connections.discard(self)
        self._cancel_idle_timer()
        if self._body is not None:
            self._body.set_exception(ConnectionResetError("Connection lost"))
            self._body = None
        if self._task is not None:
            self._task.cancel()  # the pipeline records the call as client_disconnect
        self._wake_writer(ConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer(None)

    # ------------------------------------------------------------ what the exchange calls

    async def drained(self) -> None:
        if not self._writing_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("Connection lost")
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def pause_body(self) -> None:
        self._pause_reading()

    def resume_body(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def close_if_idle(self) -> None:
        if self._task is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ requests

    def _next(self) -> None:
        """Start the next request in the buffer, if its head is whole."""
        buffer = self._buffer
        if not buffer:
            return
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        head = parse_head(buffer[: end + 4])
        if head is None or self._server.closing:
            self._hand_over()
            return
        self._cancel_idle_timer()
        request = LeanRequest(head, self, self._server.app)
        rest = buffer[end + 4 :]
        length = head.content_length
        if length:
            if len(rest) >= length:
                request.content.feed(rest[:length])
                rest = rest[length:]
            else:
                if rest:
                    request.content.feed(rest)
                self._body = request.content
                rest = b""
        self._buffer = rest
        self._task = request.task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: LeanRequest) -> None:
        keep_alive = False
        try:
            response = await self._server.handler(request)
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
            keep_alive = bool(response.keep_alive) and request.keep_alive
        except asyncio.CancelledError:
            return  # the client left (connection_lost): nothing more to send
        except ConnectionError:
            pass
        except Exception:
            log.exception("could not answer %s %s", request.method, request.path)
        finally:
            self._task = None
        transport = self.transport
        if transport is None:
            return
        if not keep_alive or self._server.closing:
            transport.close()
            return
        if self._body is not None:
            # Answered before its body had all arrived: the rest is dropped as it comes.
            remaining = self._body.remaining
            self._body = None
            if remaining > DISCARD_MAX:
                transport.close()
                return
            self._discard = remaining
        self._arm_idle_timer()
        if self._reading_paused:
            self.resume_body()
        self._next()

    def _hand_over(self) -> None:
        """aiohttp's protocol takes the connection from here, with the unread bytes."""
        transport = self.transport
        assert transport is not None and self._task is None
        self._cancel_idle_timer()
        self._server.connections.discard(self)
        data, self._buffer = self._buffer, b""
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        handler = self._server.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        self.transport = None
        if data:
            handler.data_received(data)

    # ------------------------------------------------------------ helpers

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _arm_idle_timer(self) -> None:
        # No whole head this long after the connection opened or its last answer: closed
        # (idle keep-alive connections and slowloris clients alike).
        self._cancel_idle_timer()
        timeout = self._server.keepalive_timeout_s
        if timeout > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle_out)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_out(self) -> None:
        self._idle_timer = None
        if self._task is None and self.transport is not None:
            self.transport.close()

    def _wake_writer(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

"""The gateway's listening socket: every connection starts on the lean protocol, which hands
it to aiohttp's when a request is not a plain proxied call.

`GatewayServer` owns the aiohttp runner (the application's resources start and stop with it)
and the connections of both kinds: `serve` and the tests start the gateway the same way.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from gateway.front.protocol import FrontProtocol, Handler
from gateway.logs import install_bad_request_filter

SHUTDOWN_TIMEOUT_S = 1.0  # for calls still under way when the server closes


def make_runner(app: web.Application, keepalive_timeout_s: float) -> web.AppRunner:
    # aiohttp's report of a request its parser refused quotes the raw line (a header with a
    # key in it, say): it is logged in short instead, whatever logging is set up.
    install_bad_request_filter()
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=keepalive_timeout_s,
        # The handler counts on being cancelled when its client leaves: a queued call then
        # leaves the queue, and a cut upload is recorded as client_disconnect.
        handler_cancellation=True,
    )


class GatewayServer:
    def __init__(self, app: web.Application, handler: Handler, keepalive_timeout_s: float) -> None:
        self.app = app
        self.handler = handler
        self.keepalive_timeout_s = keepalive_timeout_s
        self.runner = make_runner(app, keepalive_timeout_s)
        self.connections: set[FrontProtocol] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    async def setup(self) -> None:
        """Start the application's resources (the ledger, limits, upstream pool)."""
        try:
            await self.runner.setup()
        except BaseException:
            await self.runner.cleanup()  # closes whatever had started, the ledger flushed
            raise

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontProtocol(self),
            host,
            port,
            backlog=1024,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        sock: socket.socket = self._server.sockets[0]
        self.host, self.port = host, sock.getsockname()[1]

    def aiohttp_protocol(self) -> RequestHandler:
        server = self.runner.server
        assert server is not None
        return server()

    def make_url(self, path: str) -> URL:
        """`path` (with its query, if any) on this server."""
        return URL.build(scheme="http", host=self.host, port=self.port).join(URL(path))

    def stop_accepting(self) -> None:
        """Open connections carry on; idle ones close after their answer from now on."""
        if self._server is not None:
            self._server.close()
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()

    async def close(self) -> None:
        """Stop listening, close every connection (a call still under way is recorded as
        its client's leaving), then stop the application's resources, the ledger flushed."""
        self.stop_accepting()
        calls = [task for connection in self.connections if (task := connection.task)]
        for connection in list(self.connections):
            connection.abort()
        if calls:
            await asyncio.wait(calls, timeout=SHUTDOWN_TIMEOUT_S)
        await self.runner.cleanup()  # aiohttp's connections, then the resources
        if self._server is not None:
            await self._server.wait_closed()

"""A lean Redis client for the shared limiter: one pipelined connection per process.

Every call's admission runs a script in Redis, so the client's own cost is on the hot path.
redis-py's asyncio client spent more CPU per call than the rest of the gateway (packing each
argument in Python, a pool checkout per command). This one writes commands as they come on a
single connection, coalesced into one write per event-loop turn, and matches replies to
callers in order (Redis answers in order); hiredis packs and parses in C. A reply later than
`timeout_s` means Redis is not answering: the connection is dropped, every caller waiting on
it gets `RedisUnavailable`, and the next command connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hiredis

# What a command is made of; hiredis packs each as Redis's bulk string.
Argument = str | int | float | bytes


class RedisUnavailable(ConnectionError):
    """Redis could not be reached, or did not answer in time."""


class RedisReplyError(Exception):
    """Redis answered with an error (a script error, a wrong type, NOSCRIPT, ...)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
        path = parts.path.strip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )


class _Connection(asyncio.Protocol):
    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[object], float]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def send(self, command: bytes) -> asyncio.Future[object]:
        if self.lost:
            raise RedisUnavailable("the connection to Redis was lost")
        reply = self._loop.create_future()
        if not self._outgoing:
            self._loop.call_soon(self._write)
        self._outgoing.append(command)
        self._waiting.append((reply, time.monotonic()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_s, self._check_overdue)
        return reply

    def _write(self) -> None:
        if self._transport is not None and not self.lost:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future, _ = self._waiting.popleft()
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def _check_overdue(self) -> None:
        """Replies come in order: if the oldest is overdue, Redis is not answering."""
        self._watchdog = None
        if not self._waiting:
            return
        waited = time.monotonic() - self._waiting[0][1]
        if waited >= self._timeout_s:
            self._fail(RedisUnavailable(f"Redis did not answer within {self._timeout_s:g}s"))
            if self._transport is not None:
                self._transport.abort()
            return
        self._watchdog = self._loop.call_later(self._timeout_s - waited, self._check_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisUnavailable(f"the connection to Redis was lost ({exc or 'closed'})"))

    def _fail(self, error: RedisUnavailable) -> None:
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def awaited(self) -> list[asyncio.Future[object]]:
        return [future for future, _ in self._waiting]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Script:
    """A Lua script run by its SHA1, loaded again when Redis has forgotten it (a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


Execute = Callable[..., Awaitable[object]]


class RedisClient:
    """`on_connect` runs on each new connection before any other command may use it: the
    place to load scripts and restore state a restarted Redis has lost."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        on_connect: Callable[[Execute], Awaitable[None]] | None = None,
    ) -> None:
        self.address = RedisAddress.parse(url)
        self.timeout_s = timeout_s
        self.on_connect = on_connect
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._attempts = 0
        self._last_failure: Exception | None = None

    async def execute(self, *arguments: Argument) -> object:
        """One command; its reply."""
        connection = self._connection
        if connection is None or connection.lost:
            connection = await self._connect()
        return await connection.send(hiredis.pack_command(arguments))

    def send(self, *arguments: Argument) -> asyncio.Future[object] | None:
        """Write one command without waiting for its reply, if connected (for replies that
        only matter when they fail); None when there is no connection to write on."""
        connection = self._connection
        if connection is None or connection.lost:
            return None
        return connection.send(hiredis.pack_command(arguments))

    async def run(self, script: Script, keys: list[str], arguments: list[Argument]) -> object:
        try:
            return await self.execute(b"EVALSHA", script.sha, len(keys), *keys, *arguments)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute(b"SCRIPT", b"LOAD", script.source)
        return await self.execute(b"EVALSHA", script.sha, len(keys), *keys, *arguments)

    async def _connect(self) -> _Connection:
        attempts_before = self._attempts
        async with self._connecting:
            if self._connection is not None and not self._connection.lost:
                return self._connection
            if self._attempts != attempts_before and self._last_failure is not None:
                # The attempt this caller waited for has just failed: no second try in a row.
                raise self._last_failure
            self._attempts += 1
            try:
                self._connection = await self._open()
            except Exception as exc:
                self._last_failure = exc
                raise
            return self._connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self.timeout_s),
                    address.host,
                    address.port,
                    ssl=ssl.create_default_context() if address.tls else None,
                ),
                self.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(
                f"cannot connect to Redis at {address.host}:{address.port}: "
                f"{exc or type(exc).__name__}"
            ) from None

        async def execute(*arguments: Argument) -> object:
            return await connection.send(hiredis.pack_command(arguments))

        try:
            if address.password is not None:
                login = [address.username] if address.username else []
                await execute(b"AUTH", *login, address.password)
            if address.db:
                await execute(b"SELECT", address.db)
            if self.on_connect is not None:
                await self.on_connect(execute)
        except BaseException:
            connection.close()
            raise
        return connection

    async def close(self, wait_s: float) -> None:
        """Close once the replies still awaited have come (at most `wait_s`)."""
        connection = self._connection
        if connection is None:
            return
        awaited = connection.awaited()
        if awaited:
            await asyncio.wait(awaited, timeout=wait_s)
        with contextlib.suppress(Exception):
            connection.close()
        self._connection = None

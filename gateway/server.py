"""Running the gateway as a process: listen, reload on SIGHUP or a changed file, drain on
SIGTERM/SIGINT (unready first, in-flight calls and streams finish, the ledger is flushed)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import logging
import os
import re
import signal
from pathlib import Path

from gateway.access.store import StoredKey
from gateway.app import HANDLER, LEDGER, READY, RUNTIME, SESSIONS, build_app
from gateway.config.loader import ConfigError, GatewayConfig, load_config
from gateway.front.server import GatewayServer

log = logging.getLogger("gateway.server")
WATCH_INTERVAL_S = 2.0
UNREADY_WINDOW_S = 1.0
# A connection that has not sent a whole request head this long after it opened or after its
# last answer is closed (aiohttp's own default is an hour): this bounds slowloris clients as
# well as idle keep-alive connections.
KEEPALIVE_TIMEOUT_S = 75.0


class ListenError(Exception):
    """The address cannot be listened on: one line for the operator, not a traceback."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        reason = os.strerror(error.errno) if error.errno else str(error)
        if error.errno == errno.EADDRINUSE:
            advice = "another process (another gateway?) listens there: stop it, or choose "
            advice += "another port with --port or listen.port"
        elif error.errno == errno.EACCES:
            advice = "ports below 1024 need privileges: choose another with --port or listen.port"
        else:
            advice = "check --host / listen.host and --port / listen.port"
        super().__init__(f"cannot listen on {host}:{port}: {reason.lower()}; {advice}")


class GatewayProcess:
    def __init__(
        self,
        config_path: Path,
        config: GatewayConfig,
        host: str,
        port: int,
        reuse_port: bool = False,
    ) -> None:
        self.config_path = config_path
        self.reuse_port = reuse_port
        self.config = config
        self.host, self.port = host, port
        self.app = build_app(config)
        self._file_digest = _digest(config_path)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        server = GatewayServer(self.app, self.app[HANDLER].handle, KEEPALIVE_TIMEOUT_S)
        await server.setup()
        # Long-lived start-up objects leave the collector's view: full collections then
        # stay short instead of stalling calls for 10-15 ms.
        gc.collect()
        gc.freeze()
        try:
            await server.listen(self.host, self.port, reuse_port=self.reuse_port)
        except OSError as error:
            await server.close()
            raise ListenError(self.host, self.port, error) from error
        log.info("listening on http://%s:%d/v1", self.host, self.port)
        print(f"metering-gateway listening on http://{self.host}:{self.port}/v1", flush=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        watcher = asyncio.create_task(self._watch_file(), name="config-watch")
        await self._stop.wait()
        watcher.cancel()
        await self._drain(server)
        await server.close()
        log.info("stopped; ledger flushed")

    async def _drain(self, server: GatewayServer) -> None:
        self.app[READY].clear()
        # Unready first, still serving, so a load balancer stops sending before we stop listening.
        await asyncio.sleep(min(UNREADY_WINDOW_S, self.config.shutdown_grace_s))
        server.stop_accepting()  # open connections carry on
        handler, sessions = self.app[HANDLER], self.app[SESSIONS]
        grace = self.config.shutdown_grace_s
        log.info(
            "draining %d call(s) and %d WebSocket session(s), up to %gs",
            handler.in_flight, len(sessions.open), grace,
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            # A session closes once its responses are done, each with its row.
            await asyncio.wait_for(asyncio.gather(handler.idle.wait(), sessions.drain()), grace)
        if handler.in_flight or sessions.open:
            log.warning(
                "%d call(s) and %d session(s) still open after the grace period",
                handler.in_flight, len(sessions.open),
            )  # fmt: skip
            await sessions.close()
        await self.app[LEDGER].flush()

    async def reload(self) -> bool:
        """Apply the config file again; an invalid file is refused and the old config stays."""
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as error:
            for problem in error.problems:
                log.error("config not reloaded: %s", problem)
            return False
        self._file_digest = _digest(self.config_path)
        runtime = self.app[RUNTIME]
        if clashes := api_key_clashes(config, runtime.api_keys, self.config_path):
            for clash in clashes:
                log.error("config not reloaded: %s", clash)
            return False
        await runtime.apply(config)
        if _restart_only(config) != _restart_only(self.config):
            log.warning(
                "changes to the listen address, storage, limits.backend or limits.redis_url "
                "apply at the next restart"
            )
        self.config = config
        log.info("config reloaded from %s (%d teams)", self.config_path, len(config.teams))
        return True

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            digest = await asyncio.to_thread(_digest, self.config_path)
            if digest is not None and digest != self._file_digest:
                self._file_digest = digest
                await self.reload()


def api_key_clashes(config: GatewayConfig, api_keys: list[StoredKey], path: Path) -> list[str]:
    """`file:line: ...` for each config key whose id a key issued over the API holds."""
    taken = {row.id for row in api_keys}
    clashes = []
    lines = _lines(path)
    for team in config.teams.values():
        for key in team.keys:
            if key.id in taken:
                pattern = re.compile(rf"\bid:\s*['\"]?{re.escape(key.id)}['\"]?\s*(#.*)?$")
                line = next((n for n, text in enumerate(lines, 1) if pattern.search(text)), 1)
                clashes.append(
                    f"{path}:{line}: key id '{key.id}' is held by a key issued over the admin "
                    "API (revoked ones keep theirs): choose another id"
                )
    return clashes


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _restart_only(config: GatewayConfig) -> tuple[object, ...]:
    """The settings a reload cannot apply: the socket, the ledger's store, the limits' store."""
    limits = config.limits_backend
    return config.listen.host, config.listen.port, config.storage, limits.backend, limits.redis_url


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def serve(
    config_path: Path, config: GatewayConfig, host: str, port: int, reuse_port: bool = False
) -> None:
    await GatewayProcess(config_path, config, host, port, reuse_port).run()

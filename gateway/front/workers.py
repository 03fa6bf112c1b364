"""`serve --workers N`: N gateway processes on one port (SO_REUSEPORT; the kernel spreads
new connections across them), under a parent that starts them, passes SIGTERM, SIGINT and
SIGHUP on, and restarts one that dies.

Each worker is a whole gateway: its own event loop, upstream pool and ledger writer. What
they must share, they share through the stores already built for replicas: the ledger's
database (SQLite's WAL file, or Postgres) and, for limits to stay exact across workers, Redis
(`limits.backend: redis`). Limits held in one process's memory would each allow the whole
limit, so N workers with limits on the memory backend are refused at start.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from gateway.config.loader import GatewayConfig

log = logging.getLogger("gateway.workers")

# A worker that exits this soon after it started failed to start (a port in use, say): the
# others are stopped instead of restarting it in a loop.
START_FAILURE_S = 5.0
WORKERS_ENV = "GATEWAY_WORKERS"  # set in each worker: how many share its port
RESTART_PAUSE_S = 1.0
POLL_S = 0.2


def in_a_group_without_shared_limits(config: GatewayConfig) -> bool:
    """This process is one of `--workers N` and its limits are in its own memory."""
    return (
        int(os.environ.get(WORKERS_ENV, "1") or 1) > 1 and config.limits_backend.backend != "redis"
    )


def limits_needing_a_shared_store(config: GatewayConfig) -> list[str]:
    """The teams and keys with limits that N processes could only keep exact through Redis."""
    if config.limits_backend.backend == "redis":
        return []
    limited = []
    for team in config.teams.values():
        if team.limits.configured():
            limited.append(f"team {team.name}")
        limited.extend(f"key {key.id}" for key in team.keys if key.limits.configured())
    return limited


class Supervisor:
    def __init__(self, command: list[str], workers: int) -> None:
        self.command = command
        self.workers = workers
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGHUP, self._pass_on)
        for slot in range(self.workers):
            self._start(slot)
        while self.children:
            time.sleep(POLL_S)
            for slot, (child, started) in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self.children[slot]
                if self.stopping:
                    continue
                if time.monotonic() - started < START_FAILURE_S:
                    log.error("worker %d exited %d at start: stopping the others", slot, code)
                    self.failed = True
                    self._stop(signal.SIGTERM, None)
                    continue
                log.error("worker %d exited %d: starting another", slot, code)
                time.sleep(RESTART_PAUSE_S)
                if not self.stopping:
                    self._start(slot)
        return 1 if self.failed else 0

    def _start(self, slot: int) -> None:
        env = {**os.environ, WORKERS_ENV: str(self.workers)}
        child = subprocess.Popen([*self.command, "--worker-slot", str(slot)], env=env)
        self.children[slot] = (child, time.monotonic())

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for child, _ in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)


def worker_command(config_path: Path, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
        "--host", host, "--port", str(port),
    ]  # fmt: skip

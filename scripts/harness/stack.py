"""The processes measured: the fake upstream (one, or several sharing the port), the gateway
with a throw-away config and ledger in a temp dir, and any services beside them (Redis,
PostgreSQL), each pinned to its CPU and its CPU time accounted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from harness import REPO
from harness.machine import (
    cpu_seconds,
    descendants,
    free_port,
    machine_busy_seconds,
    pin,
    stop_process,
    wait_for_port,
)
from harness.runtime import BenchError, tail

UPSTREAM_KEY = "sk-bench-upstream-" + secrets.token_hex(8)
GATEWAY_SECRET = "mgw-bench-" + secrets.token_urlsafe(24)
LIMITED_SECRET = "mgw-bench-limited-" + secrets.token_urlsafe(24)

GATEWAY_CPU, UPSTREAM_CPU, LOADGEN_CPU = 0, 1, 1

_FAKE_REUSEPORT = """\
import sys
from aiohttp import web
from gateway.devtools.fake_upstream import build_fake_app
try:
    import uvloop
    loop = uvloop.new_event_loop()
except ImportError:
    import asyncio
    loop = asyncio.new_event_loop()
web.run_app(build_fake_app(), host=sys.argv[1], port=int(sys.argv[2]), access_log=None,
            reuse_port=True, loop=loop, print=None)
"""


class Service(Protocol):
    """A server started beside the stack (`tests.services.Server`): its process may change."""

    @property
    def process(self) -> subprocess.Popen[bytes]: ...


class Stack:
    """The fake upstream process(es) and the gateway process, in a temp dir; the services added
    to `services` (by name) are pinned with the fake upstream and their CPU time (all their
    processes') accounted like the others'."""

    def __init__(
        self,
        workdir: Path,
        upstream_procs: int,
        pinning: bool,
        extra_config: str = "",
        pricing: str = "pricing: {models: {gpt-4o-mini: "
        "{input: 0.15, cached_input: 0.075, output: 0.60}}}",
    ) -> None:
        self.workdir = workdir
        self.pricing = pricing
        self.extra_config = extra_config
        self.upstream_procs = upstream_procs
        self.pinning = pinning
        self.upstream_port = free_port()
        self.gateway_port = free_port()
        self.ledger = workdir / "ledger.sqlite3"
        self.config = workdir / "gateway.yaml"
        self.upstreams: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_exit: int | None = None
        self.services: dict[str, Service] = {}
        self.workers = 1  # `serve --workers`: above 1 the gateway's processes get every CPU
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(REPO), env.get("PYTHONPATH", "")) if part
        )
        env["FAKE_UPSTREAM_KEY"] = UPSTREAM_KEY
        env["BENCH_UPSTREAM_KEY"] = UPSTREAM_KEY
        self.env = env

    def _spawn(self, args: list[str], log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / log_name
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return process, log

    def start(self) -> None:
        host, port = "127.0.0.1", str(self.upstream_port)
        if self.upstream_procs == 1:
            process, log = self._spawn(
                ["-m", "gateway", "fake-upstream", "--host", host, "--port", port], "upstream.log"
            )
            self.upstreams.append(process)
            wait_for_port(self.upstream_port, process, log)
        else:
            logs = []
            for index in range(self.upstream_procs):
                process, log = self._spawn(
                    ["-c", _FAKE_REUSEPORT, host, port], f"upstream-{index}.log"
                )
                self.upstreams.append(process)
                logs.append(log)
            for process, log in zip(self.upstreams, logs, strict=True):
                wait_for_port(self.upstream_port, process, log)
            time.sleep(1.0)  # every process binds on its own; give the last one time to listen
            for process, log in zip(self.upstreams, logs, strict=True):
                if process.poll() is not None:
                    raise BenchError(f"fake upstream exited: {tail(log)}")
        self.config.write_text(
            gateway_config(
                self.gateway_port, self.upstream_port, self.ledger, self.pricing, "x-fake-*"
            )
            + self.extra_config
        )
        self.start_gateway("gateway.log")

    def start_gateway(self, log_name: str) -> None:
        """Start `serve` on the config as it stands, logging to `log_name`."""
        self.gateway_exit = None
        command = ["-m", "gateway", "serve", "--config", str(self.config)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self.gateway, log = self._spawn(command, log_name)
        wait_for_port(self.gateway_port, self.gateway, log)
        if self.workers > 1:
            time.sleep(1.0)  # every worker binds on its own; give the last one time to listen
        self.repin()

    def gateway_pids(self) -> list[int]:
        """The gateway's process, and its workers under `--workers`."""
        if self.gateway is None or self.gateway.poll() is not None:
            return []
        return descendants(self.gateway.pid) if self.workers > 1 else [self.gateway.pid]

    def service_pids(self, name: str) -> list[int]:
        server = self.services.get(name)
        if server is None or server.process.poll() is not None:
            return []
        return descendants(server.process.pid)

    def repin(self) -> None:
        """(Re)apply the CPU pinning; cheap, and catches threads started since."""
        if not self.pinning:
            return
        for process in self.upstreams:
            pin(process.pid, UPSTREAM_CPU)
        for pid in self.gateway_pids():
            pin(pid, GATEWAY_CPU if self.workers == 1 else set(range(os.cpu_count() or 1)))
        for name in self.services:
            for pid in self.service_pids(name):
                pin(pid, UPSTREAM_CPU)

    def check_alive(self) -> None:
        for process in self.upstreams:
            if process.poll() is not None:
                raise BenchError(f"fake upstream died ({process.returncode})")
        if self.gateway is not None and self.gateway.poll() is not None:
            raise BenchError(
                f"gateway died ({self.gateway.returncode}): {tail(self.workdir / 'gateway.log')}"
            )

    def cpu(self) -> dict[str, float]:
        times = os.times()
        usage = {
            "loadgen": times.user + times.system,
            "upstream": sum(cpu_seconds(process.pid) for process in self.upstreams),
        }
        if self.gateway is not None:
            usage["gateway"] = sum(cpu_seconds(pid) for pid in self.gateway_pids())
        for name in self.services:
            usage[name] = sum(cpu_seconds(pid) for pid in self.service_pids(name))
        usage["machine"], usage["steal"] = machine_busy_seconds()
        return usage

    def stop_gateway(self) -> int | None:
        if self.gateway is not None and self.gateway_exit is None:
            self.gateway_exit = stop_process(self.gateway)
        return self.gateway_exit

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_gateway()
        for process in self.upstreams:
            with contextlib.suppress(Exception):
                stop_process(process, 10)


def count_rows(path: Path) -> tuple[int, dict[str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        total = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        by_outcome = dict(
            db.execute("SELECT outcome || ' ' || status, COUNT(*) FROM requests GROUP BY 1")
        )
    return int(total), {str(k): int(v) for k, v in by_outcome.items()}


def gateway_config(
    gateway_port: int, upstream_port: int, ledger: Path, pricing: str, forward_header: str
) -> str:
    """The benchmarks' gateway config: an unlimited team and one with every limit kind set
    too high to refuse (the `limited` team), both with one key."""
    return (
        f"listen: {{host: 127.0.0.1, port: {gateway_port}}}\n"
        f'upstream: {{base_url: "http://127.0.0.1:{upstream_port}/v1", '
        f'api_key_env: BENCH_UPSTREAM_KEY, forward_headers: ["{forward_header}"]}}\n'
        f"storage: {{sqlite_path: {json.dumps(str(ledger))}, flush_interval_ms: 100}}\n"
        f"{pricing}\n"
        "teams:\n"
        "  bench:\n"
        "    keys:\n"
        "      - id: bench-key\n"
        f"        sha256: {hashlib.sha256(GATEWAY_SECRET.encode()).hexdigest()}\n"
        "  limited:\n"
        "    limits: {requests_per_minute: 100000000, tokens_per_minute: 10000000000,\n"
        "             requests_per_day: 1000000000, tokens_per_day: 100000000000,\n"
        "             bytes_per_day: 1000GB, spend_per_day_usd: 1000000,\n"
        "             max_concurrent: 100000}\n"
        "    keys:\n"
        "      - id: limited-key\n"
        f"        sha256: {hashlib.sha256(LIMITED_SECRET.encode()).hexdigest()}\n"
        "        limits: {requests_per_minute: 100000000}\n"
    )

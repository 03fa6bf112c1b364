"""Real gateway processes for tests: `fake-upstream` and `serve` started as a user would,
with their logs in files (a pipe nobody reads would block a busy process)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import openai


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


KEY = "mgw-process-test-key"
UPSTREAM_KEY = "sk-process-upstream"
TEAMS = f"""\
teams:
  research:
    limits: {{requests_per_day: 20}}
    keys:
      - id: research-dev
        sha256: {hashlib.sha256(KEY.encode()).hexdigest()}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def start_gateway_process(args: list[str], port: int, env: dict, log: Path) -> subprocess.Popen:
    """`python -m gateway <args>` with its output in `log`, once it listens on `port`."""
    with log.open("a") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env=env,
            stdout=output,
            stderr=output,
            text=True,
        )
    wait_for_port(port, process, log)
    return process


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Stack:
    def __init__(self, tmp_path: Path, teams: str = TEAMS, extra: str = "") -> None:
        self.tmp_path = tmp_path
        self.fake_port, self.port = free_port(), free_port()
        self.ledger = tmp_path / "ledger.sqlite3"
        self.config = tmp_path / "gateway.yaml"
        self.log = tmp_path / "gateway.log"
        self.write_config(teams, extra)
        env = {**os.environ, "PT_KEY": UPSTREAM_KEY, "FAKE_UPSTREAM_KEY": UPSTREAM_KEY}
        self.env = env
        self.fake = self._start(["fake-upstream", "--port", str(self.fake_port)], self.fake_port)
        self.gateway = self._start(["serve", "--config", str(self.config)], self.port)

    def write_config(self, teams: str, extra: str = "") -> None:
        self.config.write_text(
            textwrap.dedent(
                f"""\
                listen: {{host: 127.0.0.1, port: {self.port}}}
                upstream: {{base_url: "http://127.0.0.1:{self.fake_port}/v1", api_key_env: PT_KEY,
                            forward_headers: ["x-fake-*"]}}
                storage: {{sqlite_path: {self.ledger}, flush_interval_ms: 50}}
                pricing: {{models: {{gpt-4o-mini: {{input: 0.15, output: 0.60}}}}}}
                """
            )
            + extra
            + teams
        )

    def restart_gateway(self) -> None:
        self.gateway = self._start(["serve", "--config", str(self.config)], self.port)

    def _start(self, args: list[str], port: int) -> subprocess.Popen:
        log = self.log if args[0] == "serve" else self.tmp_path / "fake.log"
        return start_gateway_process(args, port, self.env, log)

    def log_text(self) -> str:
        return self.log.read_text()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0
        )

    def stop(self) -> None:
        for process in (self.gateway, self.fake):
            stop_process(process)

    def rows(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.ledger) as db:
            db.row_factory = sqlite3.Row
            return list(db.execute("SELECT * FROM requests ORDER BY started_at"))


@contextlib.contextmanager
def sqlite_rows(path: Path) -> Iterator[list[sqlite3.Row]]:
    """Every ledger row of the SQLite file at `path`."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        yield list(db.execute("SELECT * FROM requests ORDER BY started_at"))


@contextlib.contextmanager
def listening_socket() -> Iterator[int]:
    """A port on 127.0.0.1 held by a plain listening socket (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]

"""The installed commands as a user runs them: `fake-upstream`, `serve`, `report`, as real
processes on 127.0.0.1, with the openai SDK as the client."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

KEY = "mgw-process-test-key"
UPSTREAM_KEY = "sk-process-upstream"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited early: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.fake_port, self.port = free_port(), free_port()
        self.ledger = tmp_path / "ledger.sqlite3"
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(
            textwrap.dedent(
                f"""\
                listen: {{host: 127.0.0.1, port: {self.port}}}
                upstream: {{base_url: "http://127.0.0.1:{self.fake_port}/v1", api_key_env: PT_KEY}}
                storage: {{sqlite_path: {self.ledger}, flush_interval_ms: 50}}
                pricing: {{models: {{gpt-4o-mini: {{input: 0.15, output: 0.60}}}}}}
                teams:
                  research:
                    limits: {{requests_per_day: 20}}
                    keys:
                      - id: research-dev
                        sha256: {hashlib.sha256(KEY.encode()).hexdigest()}
                """
            )
        )
        env = {**os.environ, "PT_KEY": UPSTREAM_KEY, "FAKE_UPSTREAM_KEY": UPSTREAM_KEY}
        self.env = env
        self.fake = self._start(["fake-upstream", "--port", str(self.fake_port)], self.fake_port)
        self.gateway = self._start(["serve", "--config", str(self.config)], self.port)

    def restart_gateway(self) -> None:
        self.gateway = self._start(["serve", "--config", str(self.config)], self.port)

    def _start(self, args: list[str], port: int) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_port(port, process)
        return process

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0
        )

    def stop(self) -> None:
        for process in (self.gateway, self.fake):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()

    def rows(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.ledger) as db:
            db.row_factory = sqlite3.Row
            return list(db.execute("SELECT * FROM requests ORDER BY started_at"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    yield running
    running.stop()


def test_serve_meters_sdk_calls_and_sigterm_flushes_the_ledger(stack: Stack):
    client = stack.client()
    for _ in range(5):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}]
        )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert sum(1 for chunk in stream if chunk.choices) == 14
    stack.gateway.send_signal(signal.SIGTERM)
    assert stack.gateway.wait(timeout=15) == 0
    rows = stack.rows()
    assert len(rows) == 6
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [(6, 12)] * 5 + [(4, 12)]
    assert sum(r["cost_nanousd"] for r in rows) == 5 * (6 * 150 + 12 * 600) + 4 * 150 + 12 * 600
    stderr = stack.gateway.stderr.read() if stack.gateway.stderr else ""
    assert UPSTREAM_KEY not in stderr and KEY not in stderr


def test_50_mb_stream_passes_with_flat_memory(stack: Stack):
    size = 50 * 10**6
    before = rss_kib(stack.gateway.pid)
    received = 0
    digest = hashlib.sha256()
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{stack.port}/v1/fake/download?bytes={size}",
            headers={"Authorization": f"Bearer {KEY}"},
        ),
        timeout=60,
    ) as response:
        assert response.status == 200
        while chunk := response.read(1 << 16):
            received += len(chunk)
            digest.update(chunk)
    peak = rss_kib(stack.gateway.pid, "VmHWM")
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{stack.fake_port}/v1/fake/download?bytes={size}",
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        ),
        timeout=60,
    ) as direct:
        direct_digest = hashlib.sha256()
        while chunk := direct.read(1 << 16):
            direct_digest.update(chunk)
    assert received == size
    assert digest.hexdigest() == direct_digest.hexdigest()
    assert peak - before < 30 * 1024, f"gateway RSS grew {(peak - before) // 1024} MiB"
    stack.gateway.send_signal(signal.SIGTERM)
    stack.gateway.wait(timeout=15)
    row = stack.rows()[-1]
    assert row["response_bytes"] == size and row["status"] == 200


def test_report_prints_the_ledger_by_team_key_and_model(stack: Stack):
    client = stack.client()
    for _ in range(3):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b"}]
        )
    stack.gateway.send_signal(signal.SIGTERM)
    stack.gateway.wait(timeout=15)
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "report",
            "--config",
            str(stack.config),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows = json.loads(report.stdout)
    assert rows == [
        {
            "team": "research",
            "key": "research-dev",
            "model": "gpt-4o-mini",
            "calls": 3,
            "errors": 0,
            "input_tokens": 15,
            "cached_input_tokens": 0,
            "output_tokens": 36,
            "reasoning_tokens": 0,
            "estimated_calls": 0,
            "request_bytes": rows[0]["request_bytes"],
            "response_bytes": rows[0]["response_bytes"],
            "cost_nanousd": 3 * (5 * 150 + 12 * 600),
            "cost_usd": "0.00002385",
        }
    ]
    table = subprocess.run(
        [sys.executable, "-m", "gateway", "report", "--config", str(stack.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert table[0].split()[:4] == ["team", "key", "model", "calls"]
    assert table[2].split()[:4] == ["research", "research-dev", "gpt-4o-mini", "3"]


def test_health_and_readiness(stack: Stack):
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/healthz") as health:
        assert json.load(health) == {"status": "ok"}
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/readyz") as ready:
        assert ready.status == 200 and json.load(ready)["ready"] is True


def test_kill_9_and_restart_keeps_the_days_request_quota(stack: Stack):
    client = stack.client()
    for _ in range(17):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    time.sleep(0.5)  # well past flush_interval_ms (50)
    stack.gateway.kill()
    stack.gateway.wait(timeout=10)
    stack.restart_gateway()
    client = stack.client()
    for _ in range(3):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.code == "insufficient_quota"
    assert "requests_per_day" in refused.value.message

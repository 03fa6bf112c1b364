"""The installed commands as a user runs them: `fake-upstream`, `serve`, `report`, as real
processes on 127.0.0.1, with the openai SDK as the client."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.processes import KEY, UPSTREAM_KEY, Stack, rss_kib


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
    logs = stack.log_text()
    assert UPSTREAM_KEY not in logs and KEY not in logs


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
            "shadow_refused": 0,
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


def test_serve_on_a_port_in_use_says_so_in_one_line(stack: Stack):
    # The stack's gateway holds its port; a second one on the same config cannot listen.
    second = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(stack.config)],
        env=stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert second.stderr == (
        f"metering-gateway: cannot listen on 127.0.0.1:{stack.port}: address already in use; "
        "another process (another gateway?) listens there: stop it, or choose another port "
        "with --port or listen.port\n"
    )
    assert stack.client().models.list().data  # the first one still serves

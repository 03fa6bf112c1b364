"""`serve --workers N`: processes sharing one port, one ledger, and (through Redis) limits
that stay exact across them; refused where limits could not be."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import processes
from tests.services import RedisServer

KEY = processes.KEY
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]}


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Iterator[int]:
    port = processes.free_port()
    env = {**os.environ, "FAKE_UPSTREAM_KEY": "sk-workers-upstream"}
    fake = processes.start_gateway_process(
        ["fake-upstream", "--port", str(port)], port, env, tmp_path / "fake.log"
    )
    yield port
    processes.stop_process(fake)


def write_config(tmp_path: Path, upstream_port: int, port: int, limits: str, extra: str) -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen: {{host: 127.0.0.1, port: {port}}}
            upstream: {{base_url: "http://127.0.0.1:{upstream_port}/v1", api_key_env: PT_KEY}}
            storage: {{sqlite_path: {tmp_path / "ledger.sqlite3"}, flush_interval_ms: 50}}
            pricing: {{models: {{gpt-4o-mini: {{input: 0.15, output: 0.60}}}}}}
            log_calls: false
            teams:
              research:
                limits: {limits}
                keys:
                  - id: research-dev
                    sha256: {hashlib.sha256(KEY.encode()).hexdigest()}
            """
        )
        + extra
    )
    return config


def serve_workers(tmp_path: Path, config: Path, port: int, workers: int) -> subprocess.Popen:
    """`serve --workers`, once every worker listens (the port answers after the first)."""
    env = {**os.environ, "PT_KEY": "sk-workers-upstream"}
    args = ["serve", "--config", str(config), "--workers", str(workers)]
    log = tmp_path / "gateway.log"
    gateway = processes.start_gateway_process(args, port, env, log)
    deadline = time.monotonic() + 30
    while log.read_text().count("metering-gateway listening on") < workers:
        assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return gateway


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]


def calls_on_new_connections(port: int, count: int) -> list[Answer]:
    answers = []
    for _ in range(count):  # a connection each: the kernel picks a worker per connection
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(CHAT),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            answers.append(Answer(response.status, headers))
        finally:
            connection.close()
    return answers


def stop(gateway: subprocess.Popen) -> int:
    gateway.send_signal(signal.SIGTERM)
    return gateway.wait(timeout=30)


def served_by(answers: list[Answer]) -> Counter[str]:
    # A request id starts with its process's random prefix (`req_` and 16 hex digits).
    return Counter(answer.headers["x-gateway-request-id"][:20] for answer in answers)


def test_two_workers_share_the_port_and_the_ledger(tmp_path: Path, fake_upstream: int) -> None:
    port = processes.free_port()
    config = write_config(tmp_path, fake_upstream, port, "{}", "")
    gateway = serve_workers(tmp_path, config, port, 2)
    try:
        answers = calls_on_new_connections(port, 60)
    finally:
        code = stop(gateway)
    assert code == 0
    assert [answer.status_code for answer in answers] == [200] * 60
    assert len(served_by(answers)) == 2, "both workers answered calls"
    with processes.sqlite_rows(tmp_path / "ledger.sqlite3") as rows:
        ids = sorted(row["request_id"] for row in rows)
    assert ids == sorted(answer.headers["x-gateway-request-id"] for answer in answers)


def test_limits_stay_exact_across_workers_through_redis(tmp_path: Path, fake_upstream: int) -> None:
    redis = RedisServer.start(tmp_path / "redis")
    try:
        port = processes.free_port()
        extra = f"limits: {{backend: redis, redis_url: '{redis.url}'}}\n"
        config = write_config(tmp_path, fake_upstream, port, "{requests_per_day: 25}", extra)
        gateway = serve_workers(tmp_path, config, port, 2)
        try:
            answers = calls_on_new_connections(port, 40)
        finally:
            code = stop(gateway)
    finally:
        redis.stop()
    assert code == 0
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: 25, 429: 15}
    assert len(served_by([a for a in answers if a.status_code == 200])) == 2
    with processes.sqlite_rows(tmp_path / "ledger.sqlite3") as rows:
        assert Counter(row["status"] for row in rows) == {200: 25, 429: 15}


def serve_two_to_the_end(config: Path) -> subprocess.CompletedProcess[str]:
    """`serve --workers 2` that is expected to stop by itself."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PT_KEY": "sk-x"},
    )


def test_workers_with_limits_in_memory_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, 9, processes.free_port(), "{requests_per_day: 25}", "")
    done = serve_two_to_the_end(config)
    assert done.returncode == 1
    assert "--workers 2 needs limits.backend: redis" in done.stderr
    assert "team research" in done.stderr


def test_a_worker_that_cannot_listen_stops_the_group(tmp_path: Path) -> None:
    with processes.listening_socket() as port:  # taken without SO_REUSEPORT
        config = write_config(tmp_path, 9, port, "{}", "")
        done = serve_two_to_the_end(config)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr

"""Running it like production: graceful drain, reload under load, structured logs without
secrets, and the offline demo — all against real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.processes import KEY, TEAMS, UPSTREAM_KEY, Stack, sha

SECOND_KEY = "mgw-process-second-key"
PROMPT = "a very private prompt about the merger"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    yield running
    running.stop()


def chat(client: openai.OpenAI, **extra) -> object:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], **extra
    )


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_sigterm_during_20_open_streams_completes_all_and_loses_no_row(stack: Stack):
    client = stack.client()
    started = threading.Barrier(21)
    texts: list[str] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            chunks = chat(
                client,
                stream=True,
                extra_headers={"x-fake-fault": "chunk_delay_ms=60", "x-fake-reply-words": "30"},
            )
            parts = []
            for index, chunk in enumerate(chunks):
                if index == 1:
                    started.wait(timeout=10)
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
            texts.append("".join(parts))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for thread in threads:
        thread.start()
    started.wait(timeout=10)
    stack.gateway.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert readyz(stack.port) == 503  # unready while the streams drain
    for thread in threads:
        thread.join(timeout=30)
    assert stack.gateway.wait(timeout=30) == 0
    assert errors == []
    assert len(texts) == 20 and all(len(text.split()) == 30 for text in texts)
    rows = stack.rows()
    assert len(rows) == 20
    assert {(r["outcome"], r["output_tokens"]) for r in rows} == {("ok", 30)}


def test_reload_under_load_changes_limits_with_zero_failed_calls(tmp_path: Path):
    stack = Stack(tmp_path, TEAMS.replace("requests_per_day: 20", "requests_per_day: 100000"))
    try:
        reload_under_load(stack)
    finally:
        stack.stop()


def reload_under_load(stack: Stack) -> None:
    client = stack.client()
    failures: list[BaseException] = []
    done = threading.Event()
    completed = [0]

    def traffic() -> None:
        while not done.is_set():
            try:
                chat(client)
                completed[0] += 1
            except BaseException as error:  # noqa: BLE001
                failures.append(error)

    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(0.5)
    second = f"""      - id: research-second
        sha256: {sha(SECOND_KEY)}
"""
    stack.write_config(TEAMS.replace("requests_per_day: 20", "requests_per_day: 200000") + second)
    stack.gateway.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = chat(openai.OpenAI(
                base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=SECOND_KEY, max_retries=0
            ))  # fmt: skip
            break
        except openai.AuthenticationError:
            time.sleep(0.1)
    time.sleep(0.5)
    done.set()
    worker.join(timeout=30)
    assert answer is not None, "the new key never started working"
    assert failures == [] and completed[0] > 0
    assert "config reloaded" in stack.log_text()
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.port}/gateway/me", headers={"Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer_me:
        limit = json.load(answer_me)["limits"]["requests_per_day"]
    # the new limit, and every call made before and after the reload still counted
    assert (limit["limit"], limit["used"]) == (200_000, completed[0] + 1)


def test_invalid_config_is_refused_and_the_old_one_stays(stack: Stack):
    client = stack.client()
    for _ in range(5):
        chat(client)
    stack.config.write_text(stack.config.read_text().replace("requests_per_day: 20", "oops: 1"))
    stack.gateway.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    for _ in range(15):  # the old limit of 20 a day still holds, and its count was kept
        chat(client)
    with pytest.raises(openai.RateLimitError):
        chat(client)
    log = stack.log_text()
    assert f"config not reloaded: {stack.config}:" in log
    assert "unknown key 'oops'" in log


def test_changed_file_is_picked_up_without_a_signal(stack: Stack):
    second = f"""      - id: research-second
        sha256: {sha(SECOND_KEY)}
"""
    stack.write_config(TEAMS + second)
    other = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=SECOND_KEY, max_retries=0
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chat(other)
            return
        except openai.AuthenticationError:
            time.sleep(0.2)
    pytest.fail("the changed config file was not applied within 10 s")


def test_logs_are_json_lines_with_a_line_per_call_and_no_secret(stack: Stack):
    client = stack.client()
    response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="mgw-wrong-secret",
            max_retries=0,
        ).models.list()  # fmt: skip
    stack.gateway.send_signal(signal.SIGTERM)
    stack.gateway.wait(timeout=15)
    text = stack.log_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["msg"] == "call"]
    assert len(calls) == 2
    ok = [c for c in calls if c["outcome"] == "ok"][0]
    assert ok["request_id"] == response.headers["x-gateway-request-id"]
    assert (ok["team"], ok["key_id"], ok["model"], ok["status"]) == (
        "research", "research-dev", "gpt-4o-mini", 200,
    )  # fmt: skip
    assert ok["input_tokens"] == 10 and ok["cost_nanousd"] == 10 * 150 + 12 * 600
    assert {"ts", "level", "logger", "latency_ms"} <= set(ok)
    for secret in (UPSTREAM_KEY, KEY, "mgw-wrong-secret", PROMPT, "lorem ipsum"):
        assert secret not in text


def test_demo_runs_offline_and_prints_the_report():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "429 rate_limit_exceeded" in out
    assert "stream:     14 chunks" in out
    assert "realtime:   1 response over WebSocket, 5 tokens in, 12 out" in out
    assert "batch:      completed, 2 calls, billed once" in out
    assert "stripe:     10 meter events for 10 billable calls, 252240 nano-USD" in out
    report = out.split("report (metering-gateway report):", 1)[1].splitlines()
    assert report[1].split()[:4] == ["team", "key", "model", "calls"]
    assert [line.split()[:4] for line in report[3:]] == [
        ["interns", "intern-laptop", "gpt-4o-mini", "3"],
        ["research", "research-dev", "-", "3"],  # the batch's upload, create and fetch
        ["research", "research-dev", "gpt-4o-mini", "3"],  # two calls and the batch's row
        ["research", "research-dev", "gpt-realtime", "1"],
        ["research", "research-dev", "text-embedding-3-small", "1"],
    ]
    # the "batch calls" column: the 12th value of a row
    assert [line.split()[11] for line in report[3:]] == ["0", "0", "1", "0", "0"]

#!/usr/bin/env python3
"""Soak the gateway with mixed traffic on this machine only (127.0.0.1), and watch its
resources. Run by hand, not in CI (docs/reliability.md):

    python scripts/soak.py [--minutes 30] [--concurrency 16] [--fault-rate 0.05]
                           [--sample-s 10]

It starts the bundled fake upstream and a gateway (`python -m gateway fake-upstream` /
`serve`) with a throw-away config and ledger in a temp dir, then keeps `--concurrency` client
loops busy with chat (plain and streamed), embeddings and small multipart uploads, of which
`--fault-rate` carry a fault: an upstream 500 or 429, an upstream that hangs up before
answering or mid-stream, a malformed SSE event, a missing usage, or a client that leaves
mid-stream. Every `--sample-s` seconds it prints the gateway's RSS, open fds
(/proc/<pid>/fd), calls in flight (`gateway_in_flight` from /metrics), the ledger's
pending rows (/readyz) and the calls done so far. At the end it stops the gateway with
SIGTERM and checks the ledger holds exactly one row per call sent.

Exit status: 0 when every call got its row and nothing unexpected happened, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
KEY = "mgw-soak-key"
UPSTREAM_KEY = "sk-soak-upstream"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a story"}]}
# (name, share of the faulty calls)
FAULTS = [
    ("upstream_500", 2),
    ("upstream_429", 2),
    ("upstream_hangs_up", 1),
    ("stream_reset", 2),
    ("malformed_sse", 1),
    ("no_usage", 1),
    ("client_leaves_mid_stream", 2),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def proc_status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Tally:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.fake_port, self.port = free_port(), free_port()
        self.ledger = workdir / "ledger.sqlite3"
        self.base = f"http://127.0.0.1:{self.port}"
        self.tally = Tally()
        self.random = random.Random(args.seed)
        self.processes: list[subprocess.Popen[bytes]] = []

    # ---------------------------------------------------------------- processes

    def start(self) -> subprocess.Popen[bytes]:
        config = self.workdir / "gateway.yaml"
        config.write_text(
            f"listen: {{host: 127.0.0.1, port: {self.port}}}\n"
            f'upstream: {{base_url: "http://127.0.0.1:{self.fake_port}/v1", '
            f'api_key_env: SOAK_UPSTREAM_KEY, timeout_s: 30, forward_headers: ["x-fake-*"]}}\n'
            f"storage: {{sqlite_path: {self.ledger}, flush_interval_ms: 100}}\n"
            "log_calls: false\n"
            "pricing: {models: {gpt-4o-mini: {input: 0.15, output: 0.6}, "
            "text-embedding-3-small: {input: 0.02}}}\n"
            "teams:\n  soak:\n    keys:\n      - id: soak-key\n"
            f"        sha256: {hashlib.sha256(KEY.encode()).hexdigest()}\n"
        )
        env = {**os.environ, "SOAK_UPSTREAM_KEY": UPSTREAM_KEY, "FAKE_UPSTREAM_KEY": UPSTREAM_KEY}
        for args, port, log in (
            (["fake-upstream", "--port", str(self.fake_port)], self.fake_port, "fake.log"),
            (["serve", "--config", str(config)], self.port, "gateway.log"),
        ):
            with (self.workdir / log).open("ab") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gateway", *args],
                    cwd=REPO,
                    env=env,
                    stdout=output,
                    stderr=output,
                )
            self.processes.append(process)
            wait_for_port(port, process)
        return self.processes[-1]

    def stop(self) -> int | None:
        codes = []
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            codes.append(process.returncode)
        return codes[0] if codes else None

    # ---------------------------------------------------------------- traffic

    def pick(self) -> tuple[str, str | None]:
        """(kind of call, fault or None)."""
        if self.random.random() < self.args.fault_rate:
            names, weights = zip(*FAULTS, strict=True)
            return "fault", self.random.choices(names, weights)[0]
        kind = self.random.choices(["chat", "stream", "embeddings", "upload"], [6, 2, 1, 1])[0]
        return kind, None

    async def call(self, http: aiohttp.ClientSession) -> None:
        kind, fault = self.pick()
        headers = {"Authorization": f"Bearer {KEY}"}
        url = self.base + "/v1/chat/completions"
        body: object = CHAT
        stream = kind == "stream"
        expected = {200}
        if kind == "embeddings":
            url, body = (
                self.base + "/v1/embeddings",
                {"model": "text-embedding-3-small", "input": "a b c"},
            )
        elif kind == "upload":
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", os.urandom(20_000), filename="soak.jsonl")
            url, body = self.base + "/v1/files", form
        elif fault is not None:
            stream = fault in ("stream_reset", "malformed_sse", "client_leaves_mid_stream")
            headers["x-fake-fault"] = {
                "upstream_500": "status=500",
                "upstream_429": "status=429; retry_after=1",
                "upstream_hangs_up": "close_before_response",
                "stream_reset": "reset_after_chunks=4",
                "malformed_sse": "malformed_sse",
                "no_usage": "no_usage",
                "client_leaves_mid_stream": "chunk_delay_ms=20",
            }[fault]
            expected = {
                "upstream_500": {500},
                "upstream_429": {429},
                "upstream_hangs_up": {502},
            }.get(fault, {200})
        if stream:
            body = {**CHAT, "stream": True}
        label = fault or kind
        self.tally.sent += 1
        try:
            send = (
                http.post(url, data=body, headers=headers)
                if isinstance(body, aiohttp.FormData)
                else http.post(url, json=body, headers=headers)
            )
            async with send as response:
                if response.status not in expected:
                    self.tally.unexpected.append(f"{label}: status {response.status}")
                if fault == "client_leaves_mid_stream":
                    await response.content.readline()
                    response.close()
                else:
                    await response.read()
            self.tally.outcomes[label] += 1
        except aiohttp.ClientPayloadError:
            if fault != "stream_reset":
                self.tally.unexpected.append(f"{label}: body cut")
            self.tally.outcomes[label] += 1
        except (aiohttp.ClientError, TimeoutError) as error:
            self.tally.unexpected.append(f"{label}: {error!r}")

    async def worker(self, http: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            await self.call(http)

    # ---------------------------------------------------------------- sampling

    async def sample(self, http: aiohttp.ClientSession, pid: int) -> dict[str, float]:
        async with http.get(self.base + "/metrics") as answer:
            metrics = await answer.text()
        async with http.get(self.base + "/readyz") as answer:
            ready = await answer.json()
        in_flight = re.search(r"^gateway_in_flight (\S+)$", metrics, re.MULTILINE)
        return {
            "rss_kib": proc_status(pid, "VmRSS"),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": proc_status(pid, "Threads"),
            "in_flight": float(in_flight.group(1)) if in_flight else -1,
            "pending_rows": ready.get("ledger_pending_rows", -1),
            "calls": self.tally.sent,
        }

    async def run(self) -> bool:
        gateway = self.start()
        pid = gateway.pid
        started = time.monotonic()
        until = started + self.args.minutes * 60
        samples: list[tuple[float, dict[str, float]]] = []
        connector = aiohttp.TCPConnector(limit=self.args.concurrency + 4)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            workers = [
                asyncio.create_task(self.worker(http, until)) for _ in range(self.args.concurrency)
            ]
            print(f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'in flight':>9} "
                  f"{'pending':>7} {'calls':>8}")  # fmt: skip
            while time.monotonic() < until:
                await asyncio.sleep(min(self.args.sample_s, max(until - time.monotonic(), 0)))
                at = time.monotonic() - started
                figures = await self.sample(http, pid)
                samples.append((at, figures))
                print(
                    f"{at:6.0f} {figures['rss_kib'] / 1024:8.1f} {figures['fds']:5.0f} "
                    f"{figures['threads']:7.0f} {figures['in_flight']:9.0f} "
                    f"{figures['pending_rows']:7.0f} {figures['calls']:8.0f}",
                    flush=True,
                )
            await asyncio.gather(*workers)
        code = self.stop()
        with sqlite3.connect(self.ledger) as db:
            rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
            outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM requests GROUP BY outcome"))
        return self.report(samples, rows, outcomes, code)

    def report(
        self, samples: list[tuple[float, dict[str, float]]], rows: int,
        outcomes: dict[str, int], code: int | None,
    ) -> bool:  # fmt: skip
        first, last = samples[0][1], samples[-1][1]
        print()
        print(f"calls sent {self.tally.sent}, ledger rows {rows}, gateway exit code {code}")
        print("calls by kind:", dict(sorted(self.tally.outcomes.items())))
        print("ledger outcomes:", dict(sorted(outcomes.items())))
        for name, scale, unit in (("rss_kib", 1024, "MiB"), ("fds", 1, ""), ("threads", 1, "")):
            peak = max(s[name] for _, s in samples)
            low, high = first[name] / scale, last[name] / scale
            print(f"{name}: first sample {low:.1f}{unit}, last {high:.1f}{unit}, "
                  f"max {peak / scale:.1f}{unit}")  # fmt: skip
        if self.tally.unexpected:
            print(f"{len(self.tally.unexpected)} unexpected results, e.g.:")
            for line in self.tally.unexpected[:10]:
                print("  ", line)
        return rows == self.tally.sent and code == 0 and not self.tally.unexpected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        soak = Soak(args, Path(workdir))
        try:
            ok = asyncio.run(soak.run())
        finally:
            soak.stop()
    print("soak:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark the gateway against the bundled fake upstream, on this machine only (127.0.0.1).

    python scripts/bench.py [--quick] [--duration S] [--target name=URL ...]
                            [--out docs/benchmarks.md]

What it does, in order:

1. starts the fake upstream (`python -m gateway fake-upstream`) and the gateway
   (`python -m gateway serve`) with a throw-away config and ledger in a temp dir; where CPU
   affinity is available the gateway is pinned to CPU 0, the fake upstream and this load
   generator to CPU 1 ("the gateway on one core");
2. for each target (`direct` = the fake upstream itself, `gateway`, and any `--target`),
   runs closed-loop fixed-duration loads of small non-streamed chat completions at
   concurrency 1, 10, 50 (and 200 unless --quick): req/s, p50, p99;
3. streams chat completions (`stream: true`, 64 words): TTFB p50 and mean inter-chunk delay
   at concurrency 1 and 10;
4. relays a 1 GB download (200 MB with --quick) through the gateway: VmRSS before, VmHWM
   after;
5. stops the gateway with SIGTERM and checks that its ledger holds exactly one row per request
   sent through it; then times the ledger writer alone (200,000 rows, in this process);
6. prints a comparison table and writes it as Markdown to --out, between the
   `<!-- bench:begin -->` / `<!-- bench:end -->` markers (anything outside them is kept).

The load generator is a minimal HTTP/1.1 keep-alive client on raw asyncio protocols (uvloop);
`--client aiohttp` swaps in aiohttp's client to compare. Every loop is bounded in count and in
time, and the whole run aborts after --max-runtime seconds (default 600).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import math
import os
import platform
import secrets
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-bench-upstream-" + secrets.token_hex(8)
GATEWAY_SECRET = "mgw-bench-" + secrets.token_urlsafe(24)
LIMITED_SECRET = "mgw-bench-limited-" + secrets.token_urlsafe(24)
LIMITED_TEAM_C = 50  # the limits-cost run: a team whose every limit is checked, never reached

GATEWAY_CPU, UPSTREAM_CPU, LOADGEN_CPU = 0, 1, 1

CONCURRENCY_FULL = (1, 10, 50, 200)
CONCURRENCY_QUICK = (1, 10, 50)
STREAM_CONCURRENCY = (1, 10)
REPLY_WORDS = 12
STREAM_REPLY_WORDS = 64
DOWNLOAD_FULL = 1_000_000_000
DOWNLOAD_QUICK = 200_000_000
LEDGER_ROWS = 200_000
LEDGER_APPEND_BATCH = 2_000
WARMUP_S = 0.5

MAX_REQUESTS_PER_WORKER = 2_000_000  # a count bound on top of the time bound
RUN_GRACE_S = 30.0  # how long in-flight requests may take to finish after a run's deadline
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
DOWNLOAD_TIMEOUT_S = 180.0
LEDGER_TIMEOUT_S = 120.0
MAX_HEAD = 64 << 10
MAX_KEPT_BODY = 1 << 20
RSS_SAMPLE_S = 0.05
NOISY_CPU_PCT = 20.0  # a run is redone/flagged when the rest of the machine used this much CPU
RETRY_WAIT_MAX_S = 30.0  # before a retry, wait up to this long for the machine to calm down
QUIET_WINDOW_S = 1.0

TARGETS_C_LATENCY = (1, 10)
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_THROUGHPUT_C = 50
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_ADDED_TTFB_MS = 1.0
TARGET_RSS_GROWTH_MB = 50.0
TARGET_LEDGER_ROWS_S = 20_000.0

BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"

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


class BenchError(Exception):
    """The benchmark cannot go on (a process died, a check failed, time ran out)."""


# ---------------------------------------------------------------- time budget


class Budget:
    """The whole run's time limit, checked between phases and enforced inside them."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.started = time.monotonic()

    def remaining(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)

    def check(self, phase: str) -> None:
        if self.remaining() <= 0:
            raise BenchError(f"total runtime limit of {self.limit_s:.0f} s reached before {phase}")

    def run(self, runner: asyncio.Runner, make: Callable[[], Awaitable[Any]], phase: str) -> Any:
        self.check(phase)
        remaining = self.remaining()

        async def bounded() -> Any:
            try:
                async with asyncio.timeout(remaining):
                    return await make()
            except TimeoutError:
                raise BenchError(f"total runtime limit reached during {phase}") from None

        return runner.run(bounded())


# ---------------------------------------------------------------- HTTP exchanges


@dataclass(frozen=True, slots=True)
class Request:
    """One request, prepared once and sent many times."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw: bytes  # the whole HTTP/1.1 request, for the raw client
    count_events: bool = False


def build_request(
    target: Target,
    method: str,
    api_path: str,
    headers: dict[str, str],
    body: bytes = b"",
    count_events: bool = False,
) -> Request:
    all_headers = {"Authorization": f"Bearer {target.key}", **headers}
    if body:
        all_headers["Content-Type"] = "application/json"
    path = target.prefix + api_path
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    head += [f"{name}: {value}" for name, value in all_headers.items()]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    return Request(method, path, all_headers, body, raw, count_events)


def chat_request(target: Target, stream: bool) -> Request:
    payload: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
    }
    if stream:
        payload["stream"] = True
    words = STREAM_REPLY_WORDS if stream else REPLY_WORDS
    return build_request(
        target,
        "POST",
        "/chat/completions",
        {"x-fake-reply-words": str(words)},
        json.dumps(payload, separators=(",", ":")).encode(),
        count_events=stream,
    )


def download_request(target: Target, size: int) -> Request:
    return build_request(target, "GET", f"/fake/download?bytes={size}", {})


@dataclass(slots=True)
class Exchange:
    """What came back for one request, with the times (perf_counter) that matter."""

    sent_at: float
    status: int = 0
    body_bytes: int = 0
    first_byte_at: float | None = None
    events: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None
    done_at: float = 0.0
    body: bytearray | None = None
    _last_newline: bool = False

    def feed(self, data: bytes | bytearray, start: int, end: int, now: float, events: bool) -> None:
        if end <= start:
            return
        if self.first_byte_at is None:
            self.first_byte_at = now
        self.body_bytes += end - start
        if events:
            # An SSE event ends with a blank line; a "\n\n" may straddle two reads.
            found = data.count(b"\n\n", start, end)
            if self._last_newline and data[start] == 10:
                found += 1
            self._last_newline = data[end - 1] == 10
            if found:
                self.events += found
                if self.first_event_at is None:
                    self.first_event_at = now
                self.last_event_at = now
        if self.body is not None and len(self.body) < MAX_KEPT_BODY:
            self.body += data[start:end]

    @property
    def latency(self) -> float:
        return self.done_at - self.sent_at

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.sent_at

    @property
    def mean_gap(self) -> float | None:
        if self.events < 2 or self.first_event_at is None or self.last_event_at is None:
            return None
        return (self.last_event_at - self.first_event_at) / (self.events - 1)


class Connection(Protocol):
    @property
    def usable(self) -> bool: ...

    def exchange(self, request: Request, keep_body: bool = False) -> Awaitable[Exchange]: ...

    def close(self) -> None: ...


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _IDLE = range(8)


class RawConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection: one request at a time, minimal parsing.

    Parses the status line, Content-Length, chunked transfer coding and Connection: close;
    that is all the fake upstream and the gateway use.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Exchange] | None = None
        self._ex: Exchange | None = None
        self._state = _IDLE
        self._remaining = 0
        self._events = False
        self._close_after = False
        self._open = False

    @property
    def usable(self) -> bool:
        return self._open and self._waiter is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._waiter is not None and not self._waiter.done():
            if self._state == _UNTIL_CLOSE:
                self._finish(time.perf_counter())
            else:
                self._waiter.set_exception(ConnectionError("connection closed mid-response"))
        self._waiter = None

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._open = False

    def exchange(self, request: Request, keep_body: bool = False) -> asyncio.Future[Exchange]:
        if not self.usable or self._transport is None:
            raise ConnectionError("connection not usable")
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._ex = Exchange(sent_at=time.perf_counter(), body=bytearray() if keep_body else None)
        self._events = request.count_events
        self._state = _HEAD
        self._close_after = False
        self._buf.clear()
        self._transport.write(request.raw)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        ex = self._ex
        if self._waiter is None or ex is None:
            return
        if self._state == _LENGTH and not self._buf:
            # Fast path for big bodies: count straight from the read, no copy.
            taken = min(len(data), self._remaining)
            ex.feed(data, 0, taken, now, self._events)
            self._remaining -= taken
            if taken < len(data):
                self._buf += memoryview(data)[taken:]
        else:
            self._buf += data
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(ConnectionError(f"bad response: {exc}"))
            self._waiter = None
            self.close()

    def _parse(self, now: float) -> None:
        buf, ex = self._buf, self._ex
        assert ex is not None
        for _ in range(1 << 20):  # each pass consumes input or ends the response
            if self._waiter is None:
                return
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("response head too large")
                    return
                self._on_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == _LENGTH:
                if self._remaining == 0:
                    self._finish(now)
                    return
                if not buf:
                    return
                taken = min(len(buf), self._remaining)
                ex.feed(buf, 0, taken, now, self._events)
                del buf[:taken]
                self._remaining -= taken
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                taken = min(len(buf), self._remaining)
                ex.feed(buf, 0, taken, now, self._events)
                del buf[:taken]
                self._remaining -= taken
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish(now)
                    return
            elif state == _UNTIL_CLOSE:
                ex.feed(buf, 0, len(buf), now, self._events)
                buf.clear()
                return
            else:
                return

    def _on_head(self, head: bytes) -> None:
        assert self._ex is not None
        lines = head.decode("latin-1").split("\r\n")
        self._ex.status = status = int(lines[0].split(" ", 2)[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                self._close_after = "close" in value.lower()
        if status in (204, 304) or 100 <= status < 200:
            self._state, self._remaining = _LENGTH, 0
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._remaining = _LENGTH, length
        else:
            self._state, self._close_after = _UNTIL_CLOSE, True

    def _finish(self, now: float) -> None:
        ex, waiter = self._ex, self._waiter
        self._state, self._waiter = _IDLE, None
        if ex is None or waiter is None or waiter.done():
            return
        ex.done_at = now
        if self._close_after:
            self.close()
        waiter.set_result(ex)


class AiohttpConnection:
    """The same exchange through aiohttp's client (one pooled session per run)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base

    @property
    def usable(self) -> bool:
        return not self._session.closed

    async def exchange(self, request: Request, keep_body: bool = False) -> Exchange:
        ex = Exchange(sent_at=time.perf_counter(), body=bytearray() if keep_body else None)
        async with self._session.request(
            request.method,
            self._base + request.path,
            headers=request.headers,
            data=request.body or None,
        ) as response:
            ex.status = response.status
            for _ in range(1 << 30):
                chunk = await response.content.readany()
                if not chunk:
                    break
                ex.feed(chunk, 0, len(chunk), time.perf_counter(), request.count_events)
        ex.done_at = time.perf_counter()
        return ex

    def close(self) -> None:
        pass


@dataclass
class Target:
    name: str
    base_url: str
    key: str
    host: str = ""
    port: int = 0
    prefix: str = ""
    sent: int = 0  # requests written to this target, all phases

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise BenchError(f"target {self.name}: only http://127.0.0.1:PORT/... URLs")
        if not _is_loopback(parts.hostname):
            raise BenchError(f"target {self.name}: {parts.hostname} is not a loopback address")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientFactory:
    """Opens connections of the chosen kind to one target."""

    def __init__(self, kind: str, target: Target, concurrency: int) -> None:
        self.kind = kind
        self.target = target
        self._session: aiohttp.ClientSession | None = None
        if kind == "aiohttp":
            connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )

    async def connect(self) -> Connection:
        if self._session is not None:
            return AiohttpConnection(self._session, f"http://{self.target.host}:{self.target.port}")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, protocol = await loop.create_connection(
                RawConnection, self.target.host, self.target.port
            )
        return protocol

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time all cores spent busy (user, system, interrupts), and stolen by the hypervisor."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_until_quiet(max_wait_s: float) -> float:
    """Between runs our processes idle: wait until the machine is too (bounded). Seconds waited."""
    started = time.monotonic()
    for _ in range(int(max_wait_s / QUIET_WINDOW_S) + 1):
        before = sum(machine_busy_seconds())
        time.sleep(QUIET_WINDOW_S)
        busy = sum(machine_busy_seconds()) - before
        if 100 * busy / QUIET_WINDOW_S <= NOISY_CPU_PCT / 2:
            break
        if time.monotonic() - started >= max_wait_s:
            break
    return time.monotonic() - started


def listen_drops() -> int:
    """The kernel's count of connections dropped at a full listen queue (all sockets)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenDrops", 0))
    return 0


def proc_status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {name}")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs ptrace rights on the process)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and {0, 1} <= os.sched_getaffinity(0)


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process to one CPU (like `taskset -a -p`)."""
    try:
        tids = [int(entry) for entry in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {cpu})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in range(int(START_TIMEOUT_S / 0.05) + 1):
        if process.poll() is not None:
            raise BenchError(f"process exited early ({process.returncode}): {tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    raise BenchError(f"nothing listening on 127.0.0.1:{port} after {START_TIMEOUT_S:.0f} s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, wait, then SIGKILL. Returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
    return process.returncode


class Stack:
    """The fake upstream process(es) and the gateway process, in a temp dir."""

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
            f"listen: {{host: 127.0.0.1, port: {self.gateway_port}}}\n"
            f'upstream: {{base_url: "http://127.0.0.1:{self.upstream_port}/v1", '
            'api_key_env: BENCH_UPSTREAM_KEY, forward_headers: ["x-fake-*"]}\n'
            f"storage: {{sqlite_path: {json.dumps(str(self.ledger))}, flush_interval_ms: 100}}\n"
            f"{self.pricing}\n"
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
            "        limits: {requests_per_minute: 100000000}\n" + self.extra_config
        )
        self.gateway, log = self._spawn(
            ["-m", "gateway", "serve", "--config", str(self.config)], "gateway.log"
        )
        wait_for_port(self.gateway_port, self.gateway, log)
        self.repin()

    def repin(self) -> None:
        """(Re)apply the CPU pinning; cheap, and catches threads started since."""
        if not self.pinning:
            return
        for process in self.upstreams:
            pin(process.pid, UPSTREAM_CPU)
        if self.gateway is not None and self.gateway.poll() is None:
            pin(self.gateway.pid, GATEWAY_CPU)

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
            usage["gateway"] = cpu_seconds(self.gateway.pid)
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


# ---------------------------------------------------------------- load runs


@dataclass
class RunResult:
    target: str
    scenario: str  # "chat" or "stream"
    concurrency: int
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    wall_s: float = 0.0
    timed_out: bool = False
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    first_error: str = ""
    listen_drops: int = 0

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def p(self, q: float, values: list[float] | None = None) -> float | None:
        return percentile(self.latencies if values is None else values, q)


def noise_pct(result: RunResult) -> float:
    """How much of a core went to work that was not the benchmark's during a run."""
    return result.cpu_pct.get("other", 0.0) + result.cpu_pct.get("steal", 0.0)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in the values' unit."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


async def run_load(
    stack: Stack,
    target: Target,
    request: Request,
    scenario: str,
    concurrency: int,
    duration_s: float,
    client: str,
    record: bool = True,
) -> RunResult:
    """Closed loop: `concurrency` connections, each sending its next request on the last reply."""
    result = RunResult(target.name, scenario, concurrency, duration_s)
    factory = ClientFactory(client, target, concurrency)
    connections: list[Connection] = []
    try:
        connections = list(await asyncio.gather(*(factory.connect() for _ in range(concurrency))))
        cpu_before = stack.cpu()
        drops_before = listen_drops()
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker(index: int) -> None:
            for _ in range(MAX_REQUESTS_PER_WORKER):
                if time.perf_counter() >= deadline:
                    return
                connection = connections[index]
                if not connection.usable:
                    connection = connections[index] = await factory.connect()
                target.sent += 1
                result.sent += 1
                try:
                    ex = await connection.exchange(request)
                except (ConnectionError, OSError, aiohttp.ClientError) as exc:
                    result.errors += 1
                    result.first_error = result.first_error or repr(exc)
                    connection.close()
                    continue
                if ex.status != 200:
                    result.errors += 1
                    result.first_error = result.first_error or f"HTTP {ex.status}"
                    continue
                result.ok += 1
                if not record:
                    continue
                result.latencies.append(ex.latency)
                if request.count_events:
                    if (ttfb := ex.ttfb) is not None:
                        result.ttfbs.append(ttfb)
                    if (gap := ex.mean_gap) is not None:
                        result.gaps.append(gap)
                    result.events.append(ex.events)

        try:
            async with asyncio.timeout(duration_s + RUN_GRACE_S):
                await asyncio.gather(*(worker(i) for i in range(concurrency)))
        except TimeoutError:
            result.timed_out = True
        result.wall_s = time.perf_counter() - start
        result.listen_drops = listen_drops() - drops_before
        cpu_after = stack.cpu()
        used = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
        machine, steal = used.pop("machine"), used.pop("steal")
        # Whatever else kept the cores busy (other processes, interrupts), and the hypervisor.
        used["other"] = max(machine - sum(used.values()), 0.0)
        used["steal"] = steal
        result.cpu_pct = {name: 100 * value / result.wall_s for name, value in used.items()}
    finally:
        for connection in connections:
            connection.close()
        await factory.aclose()
    return result


async def sanity_check(target: Target, client: str) -> None:
    """One call of each kind, checked, so a misconfigured target fails loudly."""
    factory = ClientFactory(client, target, 1)
    try:
        connection = await factory.connect()
        ex = await connection.exchange(chat_request(target, False), keep_body=True)
        target.sent += 1
        body = bytes(ex.body or b"")
        if ex.status != 200:
            raise BenchError(f"{target.name}: chat returned {ex.status}: {body[:300]!r}")
        content = json.loads(body)["choices"][0]["message"]["content"]
        if len(content.split()) != REPLY_WORDS:
            raise BenchError(f"{target.name}: unexpected reply {content!r}")
        if not connection.usable:
            connection = await factory.connect()
        ex = await connection.exchange(chat_request(target, True), keep_body=True)
        target.sent += 1
        body = bytes(ex.body or b"")
        if ex.status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
            raise BenchError(f"{target.name}: stream returned {ex.status}: {body[-300:]!r}")
        if ex.events < STREAM_REPLY_WORDS + 2:
            raise BenchError(f"{target.name}: only {ex.events} SSE events in a stream")
        connection.close()
    finally:
        await factory.aclose()


@dataclass
class DownloadResult:
    target: str
    size: int
    seconds: float = 0.0
    received: int = 0
    status: int = 0
    rss_before_kib: int | None = None
    hwm_after_kib: int | None = None
    sampled_peak_kib: int | None = None
    peak_reset: bool = False

    @property
    def mb_s(self) -> float:
        return self.received / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def growth_mb(self) -> float | None:
        if self.rss_before_kib is None:
            return None
        peak = self.hwm_after_kib if self.peak_reset else self.sampled_peak_kib
        if peak is None:
            return None
        return (peak - self.rss_before_kib) * 1024 / 1e6


async def run_download(
    target: Target, size: int, client: str, watch_pid: int | None
) -> DownloadResult:
    """One big download, read and discarded; with watch_pid, the process's RSS around it."""
    result = DownloadResult(target.name, size)
    factory = ClientFactory(client, target, 1)
    sampler: asyncio.Task[None] | None = None
    try:
        connection = await factory.connect()
        if watch_pid is not None:
            result.peak_reset = reset_peak_rss(watch_pid)
            result.rss_before_kib = proc_status_kib(watch_pid, "VmRSS")
            result.sampled_peak_kib = result.rss_before_kib

            async def sample() -> None:
                for _ in range(int(DOWNLOAD_TIMEOUT_S / RSS_SAMPLE_S) + 1):
                    rss = proc_status_kib(watch_pid, "VmRSS")
                    result.sampled_peak_kib = max(result.sampled_peak_kib or 0, rss)
                    await asyncio.sleep(RSS_SAMPLE_S)

            sampler = asyncio.create_task(sample())
        target.sent += 1
        async with asyncio.timeout(DOWNLOAD_TIMEOUT_S):
            ex = await connection.exchange(download_request(target, size))
        result.seconds = ex.latency
        result.received = ex.body_bytes
        result.status = ex.status
        connection.close()
        if watch_pid is not None:
            result.hwm_after_kib = proc_status_kib(watch_pid, "VmHWM")
            rss_now = proc_status_kib(watch_pid, "VmRSS")
            result.sampled_peak_kib = max(result.sampled_peak_kib or 0, rss_now)
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await factory.aclose()
    if result.status != 200 or result.received != size:
        raise BenchError(f"{target.name}: download got {result.received} of {size} bytes")
    return result


# ---------------------------------------------------------------- ledger


@dataclass
class LedgerResult:
    rows: int
    append_s: float = 0.0
    written_s: float = 0.0
    rows_written: int = 0
    rows_in_db: int = 0

    @property
    def rows_s(self) -> float:
        return self.rows_written / self.written_s if self.written_s > 0 else 0.0


async def ledger_alone(path: Path, rows: int) -> LedgerResult:
    """Append `rows` records to a fresh Ledger, batch by batch, and time until all are written."""
    from gateway.ledger.writer import CallRecord, Ledger

    result = LedgerResult(rows)
    ledger = Ledger(path, flush_interval_ms=100)
    await ledger.open()
    now = time.time()
    records = [
        CallRecord(
            request_id=f"req_bench{index:012d}",
            started_at=now + index * 1e-4,
            finished_at=now + index * 1e-4 + 0.002,
            team="bench",
            key_id="bench-key",
            method="POST",
            path="/v1/chat/completions",
            model=MODEL,
            status=200,
            request_bytes=120,
            response_bytes=480,
            input_tokens=10,
            output_tokens=REPLY_WORDS,
            cost_nanousd=8_700,
            latency_ms=1.5,
            ttfb_ms=1.2,
            upstream_request_id=f"req_fake_{index}",
            pricing_hash="0123456789abcdef",
        )
        for index in range(rows)
    ]
    try:
        start = time.perf_counter()
        for offset in range(0, rows, LEDGER_APPEND_BATCH):
            for record in records[offset : offset + LEDGER_APPEND_BATCH]:
                ledger.append(record)
            await asyncio.sleep(0)  # let the flusher run, as between requests
        result.append_s = time.perf_counter() - start
        for _ in range(int(LEDGER_TIMEOUT_S / 0.002) + 1):
            if ledger.rows_written >= rows or time.perf_counter() - start > LEDGER_TIMEOUT_S:
                break
            await asyncio.sleep(0.002)
        result.written_s = time.perf_counter() - start
        result.rows_written = ledger.rows_written
    finally:
        await ledger.close()
    return result


def count_rows(path: Path) -> tuple[int, dict[str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        total = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        by_outcome = dict(
            db.execute("SELECT outcome || ' ' || status, COUNT(*) FROM requests GROUP BY 1")
        )
    return int(total), {str(k): int(v) for k, v in by_outcome.items()}


# ---------------------------------------------------------------- report


@dataclass
class Bench:
    args: argparse.Namespace
    targets: list[Target]
    duration_s: float
    concurrency: tuple[int, ...]
    download_size: int
    pinning: bool
    started: dt.datetime
    runs: list[RunResult] = field(default_factory=list)
    downloads: list[DownloadResult] = field(default_factory=list)
    ledger: LedgerResult | None = None
    gateway_rows: int | None = None
    gateway_rows_by: dict[str, int] = field(default_factory=dict)
    gateway_sent: int = 0
    gateway_exit: int | None = None
    peak_reset: bool = False
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def run(self, target: str, scenario: str, concurrency: int) -> RunResult | None:
        for result in self.runs:
            if (result.target, result.scenario, result.concurrency) == (
                target,
                scenario,
                concurrency,
            ):
                return result
        return None

    def download(self, target: str) -> DownloadResult | None:
        return next((d for d in self.downloads if d.target == target), None)


@dataclass
class Row:
    scenario: str
    kind: str  # "rate" (higher is better) or "ms" (lower is better)
    values: dict[str, float | None]


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def comparison_rows(bench: Bench) -> list[Row]:
    rows: list[Row] = []
    names = [t.name for t in bench.targets]

    def collect(scenario: str, c: int, pick: Callable[[RunResult], float | None]) -> dict:
        values: dict[str, float | None] = {}
        for name in names:
            result = bench.run(name, scenario, c)
            values[name] = pick(result) if result is not None else None
        return values

    for c in bench.concurrency:
        rows.append(Row(f"chat c={c} req/s", "rate", collect("chat", c, lambda r: r.rps)))
        rows.append(Row(f"chat c={c} p50 ms", "ms", collect("chat", c, lambda r: ms(r.p(0.5)))))
        rows.append(Row(f"chat c={c} p99 ms", "ms", collect("chat", c, lambda r: ms(r.p(0.99)))))
    for c in STREAM_CONCURRENCY:
        rows.append(Row(f"stream c={c} streams/s", "rate", collect("stream", c, lambda r: r.rps)))
        rows.append(
            Row(
                f"stream c={c} TTFB p50 ms",
                "ms",
                collect("stream", c, lambda r: ms(r.p(0.5, r.ttfbs))),
            )
        )
        rows.append(
            Row(
                f"stream c={c} inter-chunk ms",
                "ms",
                collect("stream", c, lambda r: ms(mean(r.gaps))),
            )
        )
    size = f"{bench.download_size / 1e6:,.0f} MB"
    values: dict[str, float | None] = {}
    for name in names:
        download = bench.download(name)
        values[name] = download.mb_s if download is not None else None
    rows.append(Row(f"download {size} MB/s", "rate", values))
    return rows


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{value:.3f}"


def table_cells(bench: Bench) -> tuple[list[str], list[list[str]]]:
    extra = [t.name for t in bench.targets if t.name not in ("direct", "gateway")]
    headers = ["scenario", "direct", "gateway", "ratio gw/direct", "added ms"]
    for name in extra:
        headers += [name, f"ratio {name}/direct"]
    body: list[list[str]] = []
    for row in comparison_rows(bench):
        direct, gateway = row.values.get("direct"), row.values.get("gateway")
        ratio = gateway / direct if direct and gateway is not None else None
        added = gateway - direct if row.kind == "ms" and None not in (direct, gateway) else None
        cells = [
            row.scenario,
            fmt(direct, row.kind),
            fmt(gateway, row.kind),
            "–" if ratio is None else f"{ratio:.2f}",
            "–" if added is None else f"{added:+.3f}",
        ]
        for name in extra:
            value = row.values.get(name)
            cells.append(fmt(value, row.kind))
            cells.append(f"{value / direct:.2f}" if direct and value is not None else "–")
        body.append(cells)
    return headers, body


def detail_cells(bench: Bench) -> tuple[list[str], list[list[str]]]:
    headers = [
        "target",
        "scenario",
        "c",
        "ok",
        "errors",
        "wall s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU% loadgen",
        "CPU% upstream",
        "CPU% gateway",
        "CPU% other",
        "CPU% steal",
    ]
    body = []
    for r in bench.runs:
        body.append(
            [
                r.target,
                r.scenario,
                str(r.concurrency),
                str(r.ok),
                str(r.errors) + (" (timed out)" if r.timed_out else ""),
                f"{r.wall_s:.2f}",
                fmt(r.rps, "rate"),
                fmt(ms(r.p(0.5)), "ms"),
                fmt(ms(r.p(0.99)), "ms"),
                fmt(ms(max(r.latencies) if r.latencies else None), "ms"),
                f"{r.cpu_pct.get('loadgen', 0):.0f}",
                f"{r.cpu_pct.get('upstream', 0):.0f}",
                f"{r.cpu_pct.get('gateway', 0):.0f}",
                f"{r.cpu_pct.get('other', 0):.0f}",
                f"{r.cpu_pct.get('steal', 0):.0f}",
            ]
        )
    return headers, body


@dataclass
class Goal:
    text: str
    measured: str
    met: bool | None  # None: not measured


def goals(bench: Bench) -> list[Goal]:
    out: list[Goal] = []
    added: list[str] = []
    latency_ok: bool | None = True
    for c in TARGETS_C_LATENCY:
        direct, gateway = bench.run("direct", "chat", c), bench.run("gateway", "chat", c)
        if direct is None or gateway is None or not direct.latencies or not gateway.latencies:
            latency_ok = None
            continue
        d50, g50 = direct.p(0.5), gateway.p(0.5)
        d99, g99 = direct.p(0.99), gateway.p(0.99)
        assert None not in (d50, g50, d99, g99)
        a50, a99 = (g50 - d50) * 1000, (g99 - d99) * 1000  # type: ignore[operator]
        added.append(f"c={c}: p50 {a50:+.3f} ms, p99 {a99:+.3f} ms")
        if latency_ok is not None:
            latency_ok = latency_ok and a50 <= TARGET_ADDED_P50_MS and a99 <= TARGET_ADDED_P99_MS
    out.append(
        Goal(
            f"added p50 ≤ {TARGET_ADDED_P50_MS:g} ms and p99 ≤ {TARGET_ADDED_P99_MS:g} ms "
            "at concurrency 1–10",
            "; ".join(added) or "not measured",
            latency_ok,
        )
    )
    c = TARGET_THROUGHPUT_C
    direct, gateway = bench.run("direct", "chat", c), bench.run("gateway", "chat", c)
    if direct is not None and gateway is not None and direct.rps > 0:
        ratio = gateway.rps / direct.rps
        out.append(
            Goal(
                f"gateway throughput ≥ {TARGET_THROUGHPUT_RATIO:.0%} of direct at concurrency {c}",
                f"{gateway.rps:,.0f} vs {direct.rps:,.0f} req/s = {ratio:.0%}",
                ratio >= TARGET_THROUGHPUT_RATIO,
            )
        )
    else:
        out.append(Goal("gateway throughput ≥ 50% of direct at concurrency 50", "–", None))
    ttfb: list[str] = []
    ttfb_ok: bool | None = True
    for c in STREAM_CONCURRENCY:
        direct, gateway = bench.run("direct", "stream", c), bench.run("gateway", "stream", c)
        d = direct.p(0.5, direct.ttfbs) if direct else None
        g = gateway.p(0.5, gateway.ttfbs) if gateway else None
        if d is None or g is None:
            ttfb_ok = None
            continue
        extra = (g - d) * 1000
        ttfb.append(f"c={c}: {extra:+.3f} ms")
        if ttfb_ok is not None:
            ttfb_ok = ttfb_ok and extra <= TARGET_ADDED_TTFB_MS
    out.append(
        Goal(
            f"streaming TTFB (p50) added ≤ {TARGET_ADDED_TTFB_MS:g} ms",
            "; ".join(ttfb) or "not measured",
            ttfb_ok,
        )
    )
    download = bench.download("gateway")
    growth = download.growth_mb if download else None
    size = f"{bench.download_size / 1e6:,.0f} MB"
    out.append(
        Goal(
            f"RSS growth < {TARGET_RSS_GROWTH_MB:g} MB over the {size} stream",
            "–" if growth is None else f"{growth:.1f} MB",
            None if growth is None else growth < TARGET_RSS_GROWTH_MB,
        )
    )
    ledger = bench.ledger
    out.append(
        Goal(
            f"ledger ≥ {TARGET_LEDGER_ROWS_S:,.0f} rows/s (writer alone)",
            "–" if ledger is None else f"{ledger.rows_s:,.0f} rows/s",
            None if ledger is None else ledger.rows_s >= TARGET_LEDGER_ROWS_S,
        )
    )
    unlimited = bench.run("gateway", "chat", LIMITED_TEAM_C)
    with_limits = bench.run("gateway+limits", "chat", LIMITED_TEAM_C)
    if unlimited is not None and with_limits is not None and unlimited.rps:
        share = with_limits.rps / unlimited.rps
        # Not a target: what enforcing every limit kind costs a team that has them. Teams
        # without limits never touch the limiter, whatever other teams configure.
        out.append(
            Goal(
                f"(information) a team with every limit kind vs an unlimited team, "
                f"c={LIMITED_TEAM_C}",
                f"{with_limits.rps:,.0f} vs {unlimited.rps:,.0f} req/s = {share:.0%}",
                None,
            )
        )
    rows = bench.gateway_rows
    out.append(
        Goal(
            "ledger rows = requests sent through the gateway (after SIGTERM)",
            "–" if rows is None else f"{rows:,} rows for {bench.gateway_sent:,} requests",
            None if rows is None else rows == bench.gateway_sent,
        )
    )
    return out


def verdict(met: bool | None) -> str:
    return "info" if met is None else ("met" if met else "NOT MET")


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def md_table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    align = ["---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


_START_AFFINITY = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def machine_facts() -> list[tuple[str, str]]:
    import uvloop

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    affinity = _START_AFFINITY  # before this process pinned itself
    return [
        ("CPU", model),
        ("cores", f"{os.cpu_count()} ({len(affinity) or '?'} usable)"),
        ("kernel", platform.release()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("aiohttp", aiohttp.__version__),
        ("uvloop", uvloop.__version__),
        ("commit", git_commit()),
    ]


def git_commit() -> str:
    """HEAD and whether the tree has changes (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def setup_lines(bench: Bench) -> list[str]:
    pinning = (
        f"gateway pinned to CPU {GATEWAY_CPU}; fake upstream and load generator to CPU "
        f"{UPSTREAM_CPU}"
        if bench.pinning
        else "no CPU pinning"
    )
    return [
        f"{bench.duration_s:g} s per load run, closed loop (each connection sends its next "
        "request when the last reply is complete), after a "
        f"{WARMUP_S:g} s warm-up per target",
        f"load generator: {bench.args.client} client, {pinning}",
        f"a run during which other work took > {NOISY_CPU_PCT:.0f}% of a core is redone up to "
        f"{bench.args.retries} times and the least disturbed try kept",
        f"fake upstream: {bench.args.upstream_procs} process(es)"
        + (" with SO_REUSEPORT" if bench.args.upstream_procs > 1 else ""),
        "gateway config: one team, one key, no limits, ledger flushed every 100 ms, "
        + (
            "`log_calls: false`"
            if bench.args.no_call_log
            else "call log as configured by default (its output goes to a file)"
        ),
        f"chat: non-streamed, {REPLY_WORDS}-word reply; stream: `stream: true`, "
        f"{STREAM_REPLY_WORDS} words, one word per SSE event, sent by the fake as fast as it "
        "can (no pacing)",
        "latency: request written → last byte read; TTFB: request written → first body byte; "
        "inter-chunk: (last SSE event − first SSE event) / (events − 1), averaged over streams; "
        "percentiles are nearest-rank",
    ]


def render_markdown(bench: Bench) -> str:
    headers, body = table_cells(bench)
    detail_headers, detail_body = detail_cells(bench)
    out = [
        BEGIN_MARK,
        "## Latest run",
        "",
        f"Generated by `scripts/bench.py` on {bench.started:%Y-%m-%d %H:%M} UTC "
        f"in {bench.elapsed_s:.0f} s.",
        "",
        "Command:",
        "",
        "```sh",
        command_line(),
        "```",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in machine_facts()),
        "",
        *(f"- {line}" for line in setup_lines(bench)),
        "",
        "### Results",
        "",
        "Ratio is gateway / direct; added ms is gateway − direct.",
        "",
        md_table(headers, body),
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        *(f"| {g.text} | {g.measured} | {verdict(g.met)} |" for g in goals(bench)),
        "",
        "### Ledger",
        "",
    ]
    if bench.gateway_rows is not None:
        out.append(
            f"- gateway ledger after SIGTERM (exit code {bench.gateway_exit}): "
            f"{bench.gateway_rows:,} rows for {bench.gateway_sent:,} requests sent through "
            f"the gateway ({', '.join(f'{k}: {v:,}' for k, v in bench.gateway_rows_by.items())})"
        )
    if bench.ledger is not None:
        led = bench.ledger
        out.append(
            f"- writer alone: {led.rows:,} `CallRecord`s appended in {LEDGER_APPEND_BATCH:,}-row "
            f"batches in {led.append_s:.2f} s, all {led.rows_written:,} written after "
            f"{led.written_s:.2f} s = **{led.rows_s:,.0f} rows/s** "
            f"({led.rows_in_db:,} rows in the file)"
        )
    out += ["", "### Memory", ""]
    download = bench.download("gateway")
    if download is not None and download.rss_before_kib is not None:
        growth = download.growth_mb
        out.append(
            f"- gateway relaying {download.size / 1e6:,.0f} MB at {download.mb_s:,.0f} MB/s: "
            f"VmRSS before {download.rss_before_kib / 1024:.1f} MiB, "
            f"VmHWM after {(download.hwm_after_kib or 0) / 1024:.1f} MiB "
            f"(peak {'reset' if download.peak_reset else 'NOT reset'} before the download), "
            f"highest sampled VmRSS {(download.sampled_peak_kib or 0) / 1024:.1f} MiB; "
            f"growth {'–' if growth is None else f'{growth:.1f} MB'}"
        )
    out += [
        "",
        "### Every run",
        "",
        "CPU% is CPU time used during the run / wall time (100 = one core busy); "
        "*other* is the rest of the machine's busy time (other processes, interrupts) and "
        "*steal* the time the hypervisor gave to other guests: high values mean the run was "
        "disturbed.",
        "",
        md_table(detail_headers, detail_body, text_columns=2),
    ]
    if bench.notes:
        out += ["", "### Warnings", "", *(f"- {note}" for note in bench.notes)]
    out.append(END_MARK)
    return "\n".join(out) + "\n"


_DEFAULT_HEAD = """\
# Benchmarks

How fast the gateway relays, next to the same calls sent straight to the fake upstream.
Regenerate with `python scripts/bench.py` (1–2 minutes; `--quick` for a smoke run).
Everything between the `bench:begin` / `bench:end` markers is rewritten by the script;
notes outside them are kept.

"""


def write_markdown(path: Path, section: str) -> None:
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    if BEGIN_MARK in old and END_MARK in old:
        before = old[: old.index(BEGIN_MARK)]
        after = old[old.index(END_MARK) + len(END_MARK) :].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = _DEFAULT_HEAD + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def print_report(bench: Bench) -> None:
    headers, body = table_cells(bench)
    print()
    print(text_table(headers, body))
    print()
    for goal in goals(bench):
        print(f"[{verdict(goal.met):>12}] {goal.text}: {goal.measured}")
    if bench.ledger is not None:
        print(
            f"ledger writer alone: {bench.ledger.rows_s:,.0f} rows/s "
            f"({bench.ledger.rows_written:,} rows in {bench.ledger.written_s:.2f} s)"
        )
    download = bench.download("gateway")
    if download is not None and download.rss_before_kib is not None:
        print(
            f"gateway RSS: before {download.rss_before_kib / 1024:.1f} MiB, "
            f"VmHWM after {(download.hwm_after_kib or 0) / 1024:.1f} MiB, "
            f"sampled peak {(download.sampled_peak_kib or 0) / 1024:.1f} MiB"
        )
    for note in bench.notes:
        print(f"warning: {note}")


# ---------------------------------------------------------------- main


def parse_target(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError("expected name=URL, e.g. nginx=http://127.0.0.1:8080/v1")
    if name in ("direct", "gateway"):
        raise argparse.ArgumentTypeError(f"'{name}' is a built-in target")
    return name, url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the metering gateway against the fake upstream (127.0.0.1 only)."
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, no c=200, 200 MB stream")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 5, quick 2)")
    parser.add_argument(
        "--target",
        action="append",
        type=parse_target,
        default=[],
        metavar="NAME=URL",
        help="another OpenAI-compatible base URL on 127.0.0.1 to measure too (bearer: "
        "$BENCH_TARGET_KEY, default the fake upstream's key)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write --out")
    parser.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="load generator: raw asyncio protocol (default) or aiohttp's client",
    )
    parser.add_argument(
        "--upstream-procs",
        type=int,
        default=1,
        choices=(1, 2, 3, 4),
        help="fake upstream processes sharing the port with SO_REUSEPORT (default 1)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--pricing",
        choices=("table", "builtin"),
        default="table",
        help="price with a one-model YAML table (default) or the builtin price database",
    )
    parser.add_argument(
        "--no-call-log",
        action="store_true",
        help="run the gateway with `log_calls: false` (default: the config default, one JSON "
        "log line per call, written to a file in the temp dir)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        choices=range(0, 6),
        metavar="N",
        help="redo a load run up to N times when other work took more than "
        f"{NOISY_CPU_PCT:.0f}%% of a core during it; the least disturbed try is kept (default 2)",
    )
    parser.add_argument(
        "--max-runtime", type=float, default=600.0, help="abort after this many seconds"
    )
    parser.add_argument("--ledger-rows", type=int, default=LEDGER_ROWS)
    args = parser.parse_args(argv)
    if args.duration is not None and not 0.1 <= args.duration <= 120:
        parser.error("--duration must be between 0.1 and 120 seconds")
    if not 1 <= args.ledger_rows <= 5_000_000:
        parser.error("--ledger-rows must be between 1 and 5,000,000")
    if not 10 <= args.max_runtime <= 3600:
        parser.error("--max-runtime must be between 10 and 3600 seconds")
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(result: RunResult) -> str:
    text = (
        f"  {result.target:>8} {result.scenario:>6} c={result.concurrency:<3} "
        f"{result.rps:9,.0f}/s  p50 {fmt(ms(result.p(0.5)), 'ms')} ms  "
        f"p99 {fmt(ms(result.p(0.99)), 'ms')} ms"
    )
    if result.ttfbs:
        text += f"  ttfb p50 {fmt(ms(result.p(0.5, result.ttfbs)), 'ms')} ms"
    cpu = " ".join(f"{name} {pct:.0f}%" for name, pct in result.cpu_pct.items())
    text += f"  cpu: {cpu}"
    if result.errors:
        text += f"  errors {result.errors} ({result.first_error})"
    return text


def execute(bench: Bench, stack: Stack, runner: asyncio.Runner, budget: Budget) -> None:
    args = bench.args
    targets = bench.targets
    progress(f"starting fake upstream and gateway in {stack.workdir}")
    stack.start()
    if bench.pinning:
        pin(os.getpid(), LOADGEN_CPU)
    gateway = next(t for t in targets if t.name == "gateway")
    gateway.base_url = f"http://127.0.0.1:{stack.gateway_port}/v1"
    gateway.port = stack.gateway_port
    direct = next(t for t in targets if t.name == "direct")
    direct.port = stack.upstream_port

    for target in targets:
        budget.run(runner, lambda t=target: sanity_check(t, args.client), f"check {target.name}")
        for stream in (False, True):
            budget.run(
                runner,
                lambda t=target, s=stream: run_load(
                    stack, t, chat_request(t, s), "warmup", 10, WARMUP_S, args.client, False
                ),
                f"warm-up {target.name}",
            )

    def measure(target: Target, scenario: str, c: int) -> None:
        request = chat_request(target, scenario == "stream")
        result: RunResult | None = None
        for attempt in range(1 + args.retries):
            stack.repin()
            stack.check_alive()
            tried: RunResult = budget.run(
                runner,
                lambda: run_load(
                    stack, target, request, scenario, c, bench.duration_s, args.client
                ),
                f"{scenario} c={c} {target.name}",
            )
            progress(describe(tried))
            if result is None or noise_pct(tried) < noise_pct(result):
                result = tried
            if noise_pct(tried) <= NOISY_CPU_PCT or attempt == args.retries:
                break
            waited = wait_until_quiet(min(RETRY_WAIT_MAX_S, max(budget.remaining() - 60, 0)))
            progress(
                f"  disturbed by other work ({noise_pct(tried):.0f}% of a core); "
                f"waited {waited:.0f} s for a quieter machine, again"
            )
        assert result is not None
        bench.runs.append(result)
        if result.errors:
            bench.notes.append(
                f"{target.name} {scenario} c={c}: {result.errors} errors ({result.first_error})"
            )
        if result.timed_out:
            bench.notes.append(f"{target.name} {scenario} c={c}: in-flight requests timed out")
        if result.listen_drops:
            bench.notes.append(
                f"{target.name} {scenario} c={c}: {result.listen_drops} connections dropped at a "
                "full listen queue (each costs its request about 1 s of SYN-ACK retransmission)"
            )
        if noise_pct(result) > NOISY_CPU_PCT:
            bench.notes.append(
                f"{target.name} {scenario} c={c}: {noise_pct(result):.0f}% of a core went to "
                f"other work (other processes, interrupts, steal) in the best of "
                f"{1 + args.retries} tries"
            )

    progress("non-streamed chat completions")
    for c in bench.concurrency:
        for target in targets:
            measure(target, "chat", c)
    progress("streamed chat completions")
    for c in STREAM_CONCURRENCY:
        for target in targets:
            measure(target, "stream", c)

    progress("a team with every limit configured (none reached), against the unlimited one")
    limited = Target("gateway+limits", gateway.base_url, LIMITED_SECRET)
    limited.port = stack.gateway_port
    budget.run(
        runner,
        lambda: run_load(
            stack, limited, chat_request(limited, False), "warmup", 10, WARMUP_S, args.client, False
        ),
        "warm-up gateway+limits",
    )
    measure(limited, "chat", LIMITED_TEAM_C)

    progress(f"download of {bench.download_size / 1e6:,.0f} MB")
    for target in (direct, gateway):
        stack.repin()
        stack.check_alive()
        watch = stack.gateway.pid if target is gateway and stack.gateway else None
        download: DownloadResult = budget.run(
            runner,
            lambda t=target, w=watch: run_download(t, bench.download_size, args.client, w),
            f"download {target.name}",
        )
        bench.downloads.append(download)
        progress(f"  {target.name:>8} {download.mb_s:,.0f} MB/s")
        if watch is not None and not download.peak_reset:
            bench.notes.append(
                "could not reset the gateway's VmHWM before the download: growth is taken "
                "from the sampled VmRSS peak instead"
            )

    progress("stopping the gateway (SIGTERM) and counting its ledger rows")
    stack.check_alive()
    bench.gateway_exit = stack.stop_gateway()
    bench.gateway_sent = gateway.sent + limited.sent
    bench.gateway_rows, bench.gateway_rows_by = count_rows(stack.ledger)
    if bench.gateway_exit != 0:
        bench.notes.append(f"gateway exited with code {bench.gateway_exit} on SIGTERM")
    for process in stack.upstreams:
        stop_process(process, 10)

    progress(f"ledger writer alone: {args.ledger_rows:,} rows")
    if bench.pinning:
        pin(os.getpid(), GATEWAY_CPU)
    ledger_path = stack.workdir / "ledger-alone.sqlite3"
    ledger: LedgerResult = budget.run(
        runner, lambda: ledger_alone(ledger_path, args.ledger_rows), "ledger writer"
    )
    ledger.rows_in_db = count_rows(ledger_path)[0]
    bench.ledger = ledger


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.max_runtime)
    started = dt.datetime.now(dt.UTC)
    pinning = not args.no_pin and can_pin()
    try:
        targets = [
            Target("direct", "http://127.0.0.1:1/v1", UPSTREAM_KEY),
            Target("gateway", "http://127.0.0.1:1/v1", GATEWAY_SECRET),
        ]
        extra_key = os.environ.get("BENCH_TARGET_KEY") or UPSTREAM_KEY
        targets += [Target(name, url, extra_key) for name, url in args.target]
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    bench = Bench(
        args=args,
        targets=targets,
        duration_s=args.duration or (2.0 if args.quick else 5.0),
        concurrency=CONCURRENCY_QUICK if args.quick else CONCURRENCY_FULL,
        download_size=DOWNLOAD_QUICK if args.quick else DOWNLOAD_FULL,
        pinning=pinning,
        started=started,
    )
    if not pinning:
        bench.notes.append("processes were not pinned to CPUs")

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise BenchError("hard runtime limit reached")

    # A backstop in case a phase blocks outside the event loop's reach.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_runtime) + 60)
    failed: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        extra = "log_calls: false\n" if args.no_call_log else ""
        from gateway.loop import new_event_loop

        pricing = {"builtin": "pricing: {table: builtin}"}.get(args.pricing)
        stack = Stack(Path(tmp), args.upstream_procs, pinning, extra, *filter(None, [pricing]))
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                execute(bench, stack, runner, budget)
        except (BenchError, OSError, KeyboardInterrupt) as exc:
            failed = exc
            for log in sorted(Path(tmp).glob("*.log")):
                if text := tail(log):
                    progress(f"--- {log.name} (last lines)\n{text}")
        finally:
            stack.stop()
            signal.alarm(0)
    bench.elapsed_s = time.monotonic() - budget.started
    if failed is not None:
        print(f"bench: aborted: {failed!r}", file=sys.stderr)
        if bench.runs:
            print_report(bench)
        return 1
    print_report(bench)
    if not args.no_write:
        write_markdown(args.out, render_markdown(bench))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

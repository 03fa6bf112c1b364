"""The calls the benchmarks send, and closed-loop fixed-duration load runs of them.

A run opens `concurrency` connections, each sending its next request when the last reply is
complete, for a fixed time; it records latencies (and TTFB, inter-chunk gaps for streams) and
the CPU each process of the stack used. A run that other work on the machine disturbed is
redone, and the least disturbed try kept (`least_disturbed`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from harness.client import ClientFactory, Connection, Request, Target, build_request
from harness.machine import NOISY_CPU_PCT, listen_drops, wait_until_quiet
from harness.report import fmt, ms, percentile
from harness.runtime import BenchError, Budget, progress
from harness.stack import Stack

MODEL = "gpt-4o-mini"
REPLY_WORDS = 12
STREAM_REPLY_WORDS = 64
WARMUP_S = 0.5
WARMUP_C = 10
MAX_REQUESTS_PER_WORKER = 2_000_000  # a count bound on top of the time bound
RUN_GRACE_S = 30.0  # how long in-flight requests may take to finish after a run's deadline


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


@dataclass(frozen=True)
class Load:
    """One load run: `concurrency` connections sending `request` to `target` for `duration_s`
    through `client` ("raw" or "aiohttp"); without `record`, only counted (a warm-up)."""

    target: Target
    request: Request
    scenario: str  # "chat", "stream" or "warmup"
    concurrency: int
    duration_s: float
    client: str
    record: bool = True


async def run_load(stack: Stack, load: Load) -> RunResult:
    """Closed loop: `concurrency` connections, each sending its next request on the last reply."""
    target, request, concurrency, duration_s = (
        load.target,
        load.request,
        load.concurrency,
        load.duration_s,
    )
    result = RunResult(target.name, load.scenario, concurrency, duration_s)
    factory = ClientFactory(load.client, target, concurrency)
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
                if not load.record:
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


def warm_up(
    stack: Stack,
    runner: asyncio.Runner,
    budget: Budget,
    target: Target,
    client: str,
    stream: bool = False,
) -> None:
    """A short unrecorded run, so that the measured ones find connections and caches warm."""
    load = Load(target, chat_request(target, stream), "warmup", WARMUP_C, WARMUP_S, client, False)
    budget.run(runner, lambda: run_load(stack, load), f"warm-up {target.name}")


def prepare(
    stack: Stack,
    runner: asyncio.Runner,
    budget: Budget,
    target: Target,
    client: str,
    streams: tuple[bool, ...] = (False,),
) -> None:
    """The sanity check, then a warm-up for each kind of call in `streams`."""
    budget.run(runner, lambda: sanity_check(target, client), f"check {target.name}")
    for stream in streams:
        warm_up(stack, runner, budget, target, client, stream)


@dataclass(frozen=True)
class Retries:
    """How a disturbed run is redone: up to `times` more tries, each after waiting for a quieter
    machine (at most `wait_max_s`, and never into the budget's last `reserve_s`); `said` is the
    progress line after a disturbed try, with {pct} and {waited}."""

    times: int
    wait_max_s: float
    reserve_s: float
    said: str


def least_disturbed(
    stack: Stack, runner: asyncio.Runner, budget: Budget, load: Load, retries: Retries
) -> RunResult:
    """One load run, redone while other work took more than NOISY_CPU_PCT of a core during it
    (up to `retries.times` more tries); the least disturbed try is kept."""
    best: RunResult | None = None
    for attempt in range(1 + retries.times):
        stack.repin()
        stack.check_alive()
        tried: RunResult = budget.run(
            runner,
            lambda: run_load(stack, load),
            f"{load.scenario} c={load.concurrency} {load.target.name}",
        )
        progress(describe(tried))
        if best is None or noise_pct(tried) < noise_pct(best):
            best = tried
        if noise_pct(tried) <= NOISY_CPU_PCT or attempt == retries.times:
            break
        waited = wait_until_quiet(
            min(retries.wait_max_s, max(budget.remaining() - retries.reserve_s, 0))
        )
        progress(retries.said.format(pct=noise_pct(tried), waited=waited))
    assert best is not None
    return best


def describe(result: RunResult) -> str:
    """A run in one progress line."""
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

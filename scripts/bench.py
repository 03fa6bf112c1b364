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

The harness (processes, load generator, load runs, budget, tables) is `scripts/harness/`;
the result types, targets and report are `scripts/bench_report.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_report import (
    LEDGER_APPEND_BATCH,
    LIMITED_TEAM_C,
    STREAM_CONCURRENCY,
    Bench,
    DownloadResult,
    LedgerResult,
    print_report,
    render_markdown,
    write_markdown,
)
from harness import REPO
from harness.client import ClientFactory, Request, Target, build_request
from harness.load import (
    MODEL,
    REPLY_WORDS,
    Load,
    Retries,
    chat_request,
    least_disturbed,
    noise_pct,
    prepare,
    warm_up,
)
from harness.machine import (
    NOISY_CPU_PCT,
    can_pin,
    free_port,
    pin,
    proc_status_kib,
    reset_peak_rss,
    stop_process,
    wait_for_port,
)
from harness.runtime import BenchError, Budget, finish, progress, run_guarded
from harness.stack import (
    GATEWAY_CPU,
    GATEWAY_SECRET,
    LIMITED_SECRET,
    LOADGEN_CPU,
    UPSTREAM_KEY,
    Stack,
    count_rows,
)

CONCURRENCY_FULL = (1, 10, 50, 200)
CONCURRENCY_QUICK = (1, 10, 50)
DOWNLOAD_FULL = 1_000_000_000
DOWNLOAD_QUICK = 200_000_000
LEDGER_ROWS = 200_000

DOWNLOAD_TIMEOUT_S = 180.0
LEDGER_TIMEOUT_S = 120.0
RSS_SAMPLE_S = 0.05
RETRY_WAIT_MAX_S = 30.0  # before a retry, wait up to this long for the machine to calm down


# ---------------------------------------------------------------- download


def download_request(target: Target, size: int) -> Request:
    return build_request(target, "GET", f"/fake/download?bytes={size}", {})


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
    parser.add_argument(
        "--export",
        choices=("stripe", "openmeter", "lago", "webhook"),
        help="also measure the gateway with a billing export of this kind configured (to a "
        "local fake), alternated twice with the same gateway without one (c=50)",
    )
    args = parser.parse_args(argv)
    if args.duration is not None and not 0.1 <= args.duration <= 120:
        parser.error("--duration must be between 0.1 and 120 seconds")
    if not 1 <= args.ledger_rows <= 5_000_000:
        parser.error("--ledger-rows must be between 1 and 5,000,000")
    if not 10 <= args.max_runtime <= 3600:
        parser.error("--max-runtime must be between 10 and 3600 seconds")
    return args


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
        prepare(stack, runner, budget, target, args.client, streams=(False, True))

    retries = Retries(
        args.retries,
        RETRY_WAIT_MAX_S,
        60,
        "  disturbed by other work ({pct:.0f}% of a core); "
        "waited {waited:.0f} s for a quieter machine, again",
    )

    def measure(target: Target, scenario: str, c: int) -> None:
        request = chat_request(target, scenario == "stream")
        load = Load(target, request, scenario, c, bench.duration_s, args.client)
        result = least_disturbed(stack, runner, budget, load, retries)
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
    warm_up(stack, runner, budget, limited, args.client)
    measure(limited, "chat", LIMITED_TEAM_C)

    if args.export:
        limited.sent += with_and_without_export(bench, stack, runner, budget, measure)

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


EXPORT_ROUNDS = 2


@dataclass
class Spawned:
    process: subprocess.Popen[bytes]


def export_yaml(kind: str, port: int) -> str:
    url = f"http://127.0.0.1:{port}" + ("/webhook" if kind == "webhook" else "")
    return (
        f"export:\n  - kind: {kind}\n    url: {url}\n    api_key_env: BENCH_BILLING_KEY\n"
        "    event_name: llm_spend\n    value: cost_nanousd\n"
        "    customers: {bench: cus_bench, limited: cus_limited}\n    interval_s: 1\n"
    )


def with_and_without_export(
    bench: Bench, stack: Stack, runner: asyncio.Runner, budget: Budget, measure: Callable
) -> int:
    """The gateway restarted with an export (to `fake_billing` beside the upstream) and
    without, alternated; the requests sent. After each run with the export, the time its lag
    took to reach 0 is noted."""
    kind = bench.args.export
    progress(f"the gateway with a {kind} export configured, against none (alternated)")
    port = free_port()
    stack.env["FAKE_BILLING_KEY"] = stack.env["BENCH_BILLING_KEY"] = "sk_test_bench_billing"
    process, log = stack._spawn(
        ["-m", "gateway.devtools.fake_billing", "--port", str(port)], "billing.log"
    )
    wait_for_port(port, process, log)
    stack.services["billing"] = Spawned(process)
    plain = stack.config.read_text()
    sent = 0
    try:
        for round_ in range(1, EXPORT_ROUNDS + 1):
            for name, extra in (("no export", ""), (f"{kind} export", export_yaml(kind, port))):
                stack.stop_gateway()
                stack.config.write_text(plain + extra)
                stack.start_gateway(f"gateway-{kind}-{round_}-{len(extra)}.log")
                target = Target(f"gateway, {name} #{round_}", "http://127.0.0.1:1/v1",
                                GATEWAY_SECRET)  # fmt: skip
                target.port = stack.gateway_port
                warm_up(stack, runner, budget, target, bench.args.client)
                measure(target, "chat", LIMITED_TEAM_C)
                sent += target.sent
                if extra:
                    bench.notes.append(export_drained(stack.gateway_port, kind, round_))
    finally:
        stop_process(process, 10)
        del stack.services["billing"]
        stack.stop_gateway()
        stack.config.write_text(plain)
        stack.start_gateway("gateway-after-export.log")
    return sent


def export_drained(port: int, kind: str, round_: int, limit_s: float = 120.0) -> str:
    """How long after the load the export's lag took to reach 0 (read from /metrics)."""
    import re
    import urllib.request

    started = time.monotonic()
    lag = None
    while time.monotonic() - started < limit_s:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = re.search(rf'gateway_export_lag_rows{{export="{kind}"}} (\d+)', text)
        lag = int(found.group(1)) if found else None
        if lag == 0:
            return (f"{kind} export, round {round_}: every billable row acknowledged"
                    f" {time.monotonic() - started:.1f} s after the load ended")  # fmt: skip
        time.sleep(0.5)
    return f"{kind} export, round {round_}: {lag} row(s) still unacknowledged after {limit_s:.0f} s"


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

    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        extra = "log_calls: false\n" if args.no_call_log else ""
        pricing = {"builtin": "pricing: {table: builtin}"}.get(args.pricing)
        stack = Stack(Path(tmp), args.upstream_procs, pinning, extra, *filter(None, [pricing]))
        failed = run_guarded(
            lambda runner: execute(bench, stack, runner, budget),
            Path(tmp),
            args.max_runtime,
            cleanup=stack.stop,
        )
    bench.elapsed_s = time.monotonic() - budget.started
    return finish("bench", failed, bench, print_report, render_markdown, write_markdown)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""What the shared limits backend (Redis) and the PostgreSQL ledger cost per call, on this
machine only (127.0.0.1).

    python scripts/bench_shared_limits.py [--duration S] [--no-postgres] [--no-write]
                                          [--out docs/benchmarks.md]

One run, one fake upstream, one team with every limit kind configured and none reached
(the harness's "limited" team, as in `bench.py`), the same non-streamed chat call, against:

1. `direct`: the fake upstream itself;
2. `memory`: the gateway with `limits: {backend: memory}` (SQLite ledger);
3. `redis`: the gateway with `limits: {backend: redis, on_backend_error: fail_closed}`, a real
   `redis-server` started here (temp dir, `--save "" --appendonly no`);
4. `redis+pg`: as 3, with `storage: {backend: postgres}` on a real PostgreSQL started here
   the way the tests start it (`tests/services.py`); skipped with a note if it cannot start.

Each target gets a sanity call, a warm-up, then closed-loop runs at concurrency 1 (p50/p99:
the added ms per call against `memory` is the headline) and 50 (req/s). The gateway is
restarted with a fresh ledger for each variant and Redis is emptied, so each starts alike.
After each variant the gateway is stopped with SIGTERM and its ledger must hold one row per
request sent, none of them refused (no 429/503), and Redis must have run two scripts
(admission + settle) per call. Redis and PostgreSQL share CPU 1 with the fake upstream and
the load generator; the gateway keeps CPU 0. Load runs, pinning, CPU accounting and the
report tables come from the harness `scripts/bench.py` measures with (`scripts/harness/`).

The Markdown goes into --out between `<!-- shared-limits:begin -->` / `<!-- shared-limits:end
-->`; anything outside them is kept (the section is created before `## Notes` if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from harness import REPO
from harness.client import Target
from harness.load import (
    REPLY_WORDS,
    WARMUP_S,
    Load,
    Retries,
    RunResult,
    chat_request,
    least_disturbed,
    noise_pct,
    prepare,
)
from harness.machine import NOISY_CPU_PCT, can_pin, pin
from harness.report import (
    between_markers,
    command_block,
    fmt,
    git_commit,
    md_table,
    md_warnings,
    ms,
    print_table,
    print_warnings,
)
from harness.runtime import BenchError, Budget, finish, progress, run_guarded, tail
from harness.stack import (
    GATEWAY_CPU,
    LIMITED_SECRET,
    LOADGEN_CPU,
    UPSTREAM_CPU,
    UPSTREAM_KEY,
    Stack,
    count_rows,
)

from tests.services import PostgresServer, RedisServer

BEGIN_MARK = "<!-- shared-limits:begin -->"
END_MARK = "<!-- shared-limits:end -->"
HEADING = "## Shared limits backend (Redis) and Postgres ledger"

INTRO = (
    "Regenerate with `python scripts/bench_shared_limits.py` (about 1.5 minutes). Everything\n"
    "between the `shared-limits:begin` / `shared-limits:end` markers is rewritten by the script;\n"
    "the reading after them is written by hand."
)

CONCURRENCY = (1, 50)
DURATION_S = 4.0
PG_DSN_ENV = "BENCH_PG_DSN"
MEMORY_LIMITS = "limits: {backend: memory}\n"
METRICS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Variant:
    name: str
    limits: str  # the top-level `limits:` line
    postgres: bool = False


def variants(redis_url: str) -> list[Variant]:
    shared = (
        f'limits: {{backend: redis, redis_url: "{redis_url}", on_backend_error: fail_closed}}\n'
    )
    return [
        Variant("memory", MEMORY_LIMITS),
        Variant("redis", shared),
        Variant("redis+pg", shared, postgres=True),
    ]


@dataclass
class VariantResult:
    """What one gateway variant did, besides its load runs."""

    name: str
    sent: int = 0
    rows: int | None = None
    rows_by: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    evalsha_calls: int = 0
    evalsha_usec: float = 0.0
    backend_errors: float | None = None
    skipped: str = ""


@dataclass
class Report:
    args: argparse.Namespace
    started: dt.datetime
    pinning: bool
    runs: list[RunResult] = field(default_factory=list)
    variants: dict[str, VariantResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    redis_version: str = ""
    postgres_version: str = ""
    elapsed_s: float = 0.0

    def run(self, target: str, c: int) -> RunResult | None:
        return next(
            (r for r in self.runs if (r.target, r.concurrency) == (target, c)),
            None,
        )

    def targets(self) -> list[str]:
        names = ["direct", *(name for name, v in self.variants.items() if not v.skipped)]
        return [name for name in names if any(r.target == name for r in self.runs)]


# ---------------------------------------------------------------- processes


class SharedStack(Stack):
    """The harness's stack (fake upstream + gateway), with Redis and PostgreSQL as its services;
    the gateway can be restarted with another `limits:` / `storage:` configuration."""

    def __init__(self, workdir: Path, pinning: bool) -> None:
        super().__init__(workdir, 1, pinning, MEMORY_LIMITS)
        self.base_config = ""

    def start(self) -> None:
        super().start()
        self.base_config = self.config.read_text()

    def restart_gateway(self, variant: Variant) -> None:
        """Stop the gateway (SIGTERM) and start it again as `variant` with a fresh ledger."""
        if self.gateway is not None:
            self.stop_gateway()
        if variant.postgres:
            storage = (
                f"storage: {{backend: postgres, dsn_env: {PG_DSN_ENV}, flush_interval_ms: 100}}"
            )
        else:
            self.ledger = self.workdir / f"ledger-{variant.name}.sqlite3"
            storage = f'storage: {{sqlite_path: "{self.ledger}", flush_interval_ms: 100}}'
        text, replaced = re.subn(r"(?m)^storage: .*$", storage, self.base_config)
        if replaced != 1 or MEMORY_LIMITS not in text:
            raise BenchError("the harness's gateway config no longer has the expected lines")
        self.config.write_text(text.replace(MEMORY_LIMITS, variant.limits))
        self.start_gateway(f"gateway-{variant.name}.log")


def redis_evalsha(url: str) -> tuple[int, float]:
    """Redis's own count of EVALSHA calls and the microseconds it spent in them."""
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


def metric(port: int, name: str) -> float | None:
    """One unlabelled sample from the gateway's /metrics (None if absent)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def postgres_rows(server: PostgresServer) -> tuple[int, dict[str, int]]:
    lines = server.psql(
        "SELECT outcome || ' ' || status, COUNT(*) FROM requests GROUP BY 1 ORDER BY 1"
    ).splitlines()
    by = {line.rsplit("|", 1)[0]: int(line.rsplit("|", 1)[1]) for line in lines if line}
    return sum(by.values()), by


def log_problems(log: Path, limit: int = 5) -> list[str]:
    """The gateway log's warnings and errors (JSON or plain lines), first few."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    pattern = re.compile(
        r'"level": ?"(warning|error|critical)"|\b(WARNING|ERROR|CRITICAL)\b|^Traceback'
    )
    found = [line for line in lines if pattern.search(line)]
    return [line[:300] for line in found[:limit]]


# ---------------------------------------------------------------- runs


def measure(
    report: Report,
    stack: SharedStack,
    runner: asyncio.Runner,
    budget: Budget,
    target: Target,
    c: int,
) -> None:
    """One load run, redone (up to --retries) when other work disturbed it; the least
    disturbed try is kept."""
    retries = Retries(
        report.args.retries, 10.0, 30, "  disturbed ({pct:.0f}% of a core); waited {waited:.0f} s"
    )
    load = Load(target, chat_request(target, False), "chat", c, report.args.duration, "raw")
    best = least_disturbed(stack, runner, budget, load, retries)
    report.runs.append(best)
    if best.errors:
        report.notes.append(f"{target.name} c={c}: {best.errors} errors ({best.first_error})")
    if best.timed_out:
        report.notes.append(f"{target.name} c={c}: in-flight requests timed out")
    if noise_pct(best) > NOISY_CPU_PCT:
        report.notes.append(
            f"{target.name} c={c}: {noise_pct(best):.0f}% of a core went to other work "
            "in the least disturbed try"
        )


def run_variant(
    report: Report,
    stack: SharedStack,
    runner: asyncio.Runner,
    budget: Budget,
    variant: Variant,
    redis_server: RedisServer,
    postgres: PostgresServer | None,
) -> None:
    result = report.variants[variant.name] = VariantResult(variant.name)
    if variant.postgres and postgres is None:
        result.skipped = "PostgreSQL did not start"
        return
    progress(f"gateway, {variant.name}")
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    try:
        stack.restart_gateway(variant)
    except BenchError as exc:
        if not variant.postgres:
            raise
        log = stack.workdir / f"gateway-{variant.name}.log"
        result.skipped = f"`serve` did not start: {exc}; {tail(log, 5)}"
        report.notes.append(f"{variant.name}: {result.skipped}")
        progress(f"  skipped: {result.skipped}")
        return
    target = Target(variant.name, f"http://127.0.0.1:{stack.gateway_port}/v1", LIMITED_SECRET)
    calls_before, usec_before = redis_evalsha(redis_server.url)
    prepare(stack, runner, budget, target, "raw")
    for c in CONCURRENCY:
        measure(report, stack, runner, budget, target, c)
    if variant.limits != MEMORY_LIMITS:
        result.backend_errors = metric(stack.gateway_port, "gateway_limits_backend_errors_total")
    stack.check_alive()
    # Settling is off the response path: give the last settles a moment before stopping.
    time.sleep(0.2)
    result.exit_code = stack.stop_gateway()
    result.sent = target.sent
    if variant.postgres:
        assert postgres is not None
        result.rows, result.rows_by = postgres_rows(postgres)
    else:
        result.rows, result.rows_by = count_rows(stack.ledger)
    calls_after, usec_after = redis_evalsha(redis_server.url)
    result.evalsha_calls = calls_after - calls_before
    result.evalsha_usec = usec_after - usec_before
    progress(
        f"  ledger {result.rows:,} rows for {result.sent:,} sent {result.rows_by}; "
        f"EVALSHA {result.evalsha_calls:,}; exit {result.exit_code}"
    )
    check_variant(report, variant, result)
    for line in log_problems(stack.workdir / f"gateway-{variant.name}.log"):
        report.notes.append(f"{variant.name}: gateway log: `{line}`")


def check_variant(report: Report, variant: Variant, result: VariantResult) -> None:
    if result.exit_code != 0:
        report.notes.append(f"{variant.name}: gateway exited with {result.exit_code} on SIGTERM")
    if result.rows != result.sent:
        report.notes.append(f"{variant.name}: {result.rows} ledger rows for {result.sent} sent")
    refused = {k: v for k, v in result.rows_by.items() if not k.endswith(" 200")}
    if refused:
        report.notes.append(f"{variant.name}: calls not answered 200: {refused}")
    # Two scripts per call (admission, settle); lease renewals add one every 10 s at most.
    expected = 2 * result.sent if variant.limits != MEMORY_LIMITS else 0
    if not expected <= result.evalsha_calls <= expected + (5 if expected else 0):
        report.notes.append(
            f"{variant.name}: {result.evalsha_calls} EVALSHA in Redis, expected {expected} "
            "(admission + settle per call)"
        )
    if result.backend_errors:
        report.notes.append(f"{variant.name}: {result.backend_errors:.0f} limits backend errors")


def execute(
    report: Report, stack: SharedStack, runner: asyncio.Runner, budget: Budget, tmp: Path
) -> None:
    progress("starting redis-server")
    redis_server = RedisServer.start(tmp / "redis")
    stack.services["redis"] = redis_server
    with redis.Redis.from_url(redis_server.url) as client:
        report.redis_version = str(client.info("server").get("redis_version", "?"))
    postgres: PostgresServer | None = None
    if not report.args.no_postgres:
        progress("starting PostgreSQL")
        try:
            postgres = PostgresServer.start()
        except Exception as exc:  # a missing package, initdb failing: report, go on
            report.notes.append(f"PostgreSQL did not start: {exc!r}")
        else:
            stack.services["postgres"] = postgres
            stack.env[PG_DSN_ENV] = postgres.dsn
            report.postgres_version = postgres.psql("SHOW server_version").split()[0]
    try:
        progress(f"starting fake upstream and gateway in {stack.workdir}")
        stack.start()
        if report.pinning:
            pin(os.getpid(), LOADGEN_CPU)
        direct = Target("direct", f"http://127.0.0.1:{stack.upstream_port}/v1", UPSTREAM_KEY)
        prepare(stack, runner, budget, direct, "raw")
        progress("direct")
        for c in CONCURRENCY:
            measure(report, stack, runner, budget, direct, c)
        for variant in variants(redis_server.url):
            if variant.postgres and report.args.no_postgres:
                continue
            run_variant(report, stack, runner, budget, variant, redis_server, postgres)
    finally:
        stack.stop()
        for server in (postgres, redis_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


# ---------------------------------------------------------------- report


def per_call_us(result: RunResult | None, name: str) -> float | None:
    """CPU time of one process (group) per answered call, in µs."""
    if result is None or result.target == "direct" or not result.ok or name not in result.cpu_pct:
        return None
    return result.cpu_pct[name] / 100 * result.wall_s / result.ok * 1e6


def cpu_pct(result: RunResult, name: str) -> float | None:
    """A service's CPU% in a gateway run (direct runs leave the gateway and services idle)."""
    return None if result.target == "direct" else result.cpu_pct.get(name)


def table(report: Report) -> tuple[list[str], list[list[str]]]:
    names = report.targets()
    variants_run = [n for n in names if n != "direct"]
    added = [n for n in variants_run if n != "memory" and "memory" in variants_run]
    headers = [
        "scenario",
        *names,
        *(f"{n} − memory" for n in added),
    ]
    body: list[list[str]] = []

    def row(c: int, label: str, kind: str, pick: Any, diff: bool = True) -> None:
        values = {}
        for name in names:
            result = report.run(name, c)
            values[name] = pick(result) if result is not None else None
        cells = [label, *(fmt(values[n], kind) for n in names)]
        for name in added:
            a, b = values.get(name), values.get("memory")
            if not diff or a is None or b is None:
                cells.append("–")
            elif kind == "ms":
                cells.append(f"{a - b:+.3f}")
            else:
                cells.append(f"{a - b:+,.0f} ({(a / b - 1) * 100:+.0f}%)" if b else "–")
        body.append(cells)

    for c in CONCURRENCY:
        row(c, f"c={c} req/s", "rate", lambda r: r.rps)
        row(c, f"c={c} p50 ms", "ms", lambda r: ms(r.p(0.5)))
        row(c, f"c={c} p99 ms", "ms", lambda r: ms(r.p(0.99)))
        row(c, f"c={c} gateway CPU µs/call", "rate", lambda r: per_call_us(r, "gateway"))
        if "redis" in variants_run:
            row(c, f"c={c} Redis CPU %", "rate", lambda r: cpu_pct(r, "redis"), diff=False)
        if "redis+pg" in variants_run:
            row(c, f"c={c} PostgreSQL CPU %", "rate", lambda r: cpu_pct(r, "postgres"), False)
    evalsha = ["Redis EVALSHA µs (Redis's own time, mean)"]
    for name in names:
        variant = report.variants.get(name)
        if variant is None or not variant.evalsha_calls:
            evalsha.append("–")
        else:
            evalsha.append(f"{variant.evalsha_usec / variant.evalsha_calls:.1f}")
    body.append(evalsha + ["–"] * len(added))
    return headers, body


def detail(report: Report) -> tuple[list[str], list[list[str]]]:
    cpu_names = ["loadgen", "upstream", "gateway", "redis", "postgres", "other", "steal"]
    headers = ["target", "c", "ok", "errors", "wall s", "req/s", "p50 ms", "p99 ms", "max ms"]
    headers += [f"CPU% {name}" for name in cpu_names]
    body = []
    for result in report.runs:
        body.append(
            [
                result.target,
                str(result.concurrency),
                str(result.ok),
                str(result.errors),
                f"{result.wall_s:.2f}",
                fmt(result.rps, "rate"),
                fmt(ms(result.p(0.5)), "ms"),
                fmt(ms(result.p(0.99)), "ms"),
                fmt(ms(result.p(1.0)), "ms"),
                *(
                    f"{result.cpu_pct[name]:.0f}" if name in result.cpu_pct else "–"
                    for name in cpu_names
                ),
            ]
        )
    return headers, body


def check_lines(report: Report) -> list[str]:
    lines = []
    for name, v in report.variants.items():
        if v.skipped:
            lines.append(f"- `{name}`: not measured ({v.skipped})")
            continue
        store = "PostgreSQL" if name == "redis+pg" else "SQLite"
        outcomes = ", ".join(f"{k}: {n:,}" for k, n in sorted(v.rows_by.items()))
        text = (
            f"- `{name}`: {v.rows or 0:,} {store} ledger rows for {v.sent:,} requests sent "
            f"({outcomes}; exit code {v.exit_code} on SIGTERM); "
            f"{v.evalsha_calls:,} EVALSHA in Redis"
        )
        if v.backend_errors is not None:
            text += f"; limits backend errors {v.backend_errors:.0f}"
        lines.append(text)
    return lines


def render(report: Report) -> str:
    headers, body = table(report)
    detail_headers, detail_body = detail(report)
    when = report.started.strftime("%Y-%m-%d %H:%M UTC")
    pinning = (
        f"gateway pinned to CPU {GATEWAY_CPU}; fake upstream, load generator, Redis and "
        f"PostgreSQL to CPU {UPSTREAM_CPU}"
        if report.pinning
        else "no CPU pinning"
    )
    versions = f"redis-server {report.redis_version}"
    if report.postgres_version:
        versions += f", PostgreSQL {report.postgres_version} (fsync off, as in the tests)"
    out = [
        BEGIN_MARK,
        f"Generated by `scripts/bench_shared_limits.py` on {when} in {report.elapsed_s:.0f} s, "
        f"commit {git_commit()}.",
        "",
        *command_block(),
        "",
        f"- the `limited` team of `scripts/bench.py` (every limit kind on the team, a "
        f"requests-per-minute limit on its key, none reached), non-streamed chat, "
        f"{REPLY_WORDS}-word reply",
        f"- {report.args.duration:g} s per closed-loop run after a sanity call and a "
        f"{WARMUP_S:g} s warm-up; the gateway is restarted for each variant with a fresh "
        "ledger, Redis is emptied",
        f"- raw load generator; {pinning}; {versions}",
        "- `memory` = `limits: {backend: memory}`, SQLite ledger; `redis` = `limits: {backend: "
        "redis, on_backend_error: fail_closed}`, SQLite ledger; `redis+pg` = `redis` with "
        "`storage: {backend: postgres}`",
        "- CPU µs/call = the process's CPU time in the run / calls answered; Redis EVALSHA µs "
        "is Redis's own `INFO commandstats` time per script run (two per call: admission and "
        "settle)",
        "",
        md_table(headers, body),
        "",
        "Ledger and Redis after each variant (gateway stopped with SIGTERM):",
        "",
        *check_lines(report),
        "",
        "Every run (CPU% = CPU time in the run / wall time; 100 = one core):",
        "",
        md_table(detail_headers, detail_body, text_columns=1),
        *md_warnings("Warnings:", report.notes),
        END_MARK,
    ]
    return "\n".join(out)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    parts = between_markers(text, BEGIN_MARK, END_MARK)
    if parts is not None:
        text = parts[0] + section + parts[1]
    else:
        block = f"{HEADING}\n\n{INTRO}\n\n{section}\n\n"
        if "\n## Notes" in text:
            at = text.index("\n## Notes") + 1
            text = text[:at] + block + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def print_report(report: Report) -> None:
    print_table(*table(report))
    for line in check_lines(report):
        print(line[2:])
    print_warnings(report.notes)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The cost of Redis-shared limits and the PostgreSQL ledger (127.0.0.1)."
    )
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds per run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write --out")
    parser.add_argument("--no-postgres", action="store_true", help="skip the redis+pg variant")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--retries", type=int, default=1, choices=range(0, 4), metavar="N",
        help="redo a disturbed run up to N times (default 1)",
    )  # fmt: skip
    parser.add_argument("--max-runtime", type=float, default=240.0, help="abort after (s)")
    args = parser.parse_args(argv)
    if not 0.5 <= args.duration <= 30:
        parser.error("--duration must be between 0.5 and 30 seconds")
    if not 30 <= args.max_runtime <= 900:
        parser.error("--max-runtime must be between 30 and 900 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.max_runtime)
    report = Report(args, dt.datetime.now(dt.UTC), not args.no_pin and can_pin())
    if not report.pinning:
        report.notes.append("processes were not pinned to CPUs")

    with tempfile.TemporaryDirectory(prefix="gateway-bench-shared-") as tmp:
        stack = SharedStack(Path(tmp), report.pinning)
        failed = run_guarded(
            lambda runner: execute(report, stack, runner, budget, Path(tmp)),
            Path(tmp),
            args.max_runtime,
            logs="**/*.log",
        )
    report.elapsed_s = time.monotonic() - budget.started
    return finish("bench_shared_limits", failed, report, print_report, render, write_markdown)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""The honest benchmark: the gateway next to nginx proxy_pass, in front of nginx serving real
OpenAI answers, loaded by wrk; on this machine only (127.0.0.1).

    python scripts/bench_nginx.py [--quick] [--duration S] [--write | --out PATH]
    python scripts/bench_nginx.py --profile /tmp/profile.txt [--profile-seconds 10]

What it does, in order:

1. finds Debian's nginx and wrk, installing them with apt-get (as root, or through sudo)
   where missing;
2. canned answers: nginx serves a recorded non-streamed chat completion and a recorded chat
   stream with usage (from /work/shared/replay) for `POST /v1/chat/completions`; a second
   nginx proxies to it (`proxy_pass`, the reference proxy) and the gateway (`python -m gateway
   serve`, ledger and call log on, SQLite ledger in a temp dir) forwards to it. The gateway is
   pinned to CPU 0, both nginx and wrk to CPU 1. For each of non-streamed and streamed, at
   c=1, 10, 50, wrk loads nginx directly, nginx proxy_pass, the gateway for an unlimited team
   and the gateway for a team with every limit kind on (none reached);
3. per-event streams: nginx cannot write an answer's events one by one, so this case keeps the
   project's fake upstream (`python -m gateway fake-upstream`, each event written on its own,
   a few ms apart), with the same four targets in front of it;
4. after each part, stops the gateway with SIGTERM and checks that its ledger holds exactly
   one row per request written to it (wrk's Lua counts them; wrk's "completed" leaves out the
   requests still in flight when it stops);
5. prints the ratios to nginx and the issue's targets; with --write (or --out PATH) writes
   them as Markdown between the `<!-- bench-nginx:begin -->` / `<!-- bench-nginx:end -->`
   markers of docs/benchmarks.md (a section "## Against nginx" before "## Notes"; anything
   outside the markers is kept).

`--profile PATH` instead runs py-spy on the gateway under the non-streamed c=50 load and prints
where its time goes. Every wait is bounded, and the run aborts after --max-runtime seconds.
The report is `scripts/bench_nginx_report.py`; nginx's configs are `scripts/nginx/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench_nginx_report import (
    CORES_C,
    CORES_PHASE,
    KIND_TITLES,
    TARGETS,
    LedgerCheck,
    NginxBench,
    Recording,
    Run,
    print_report,
    render_markdown,
    write_markdown,
)
from harness import REPO
from harness.client import ClientFactory, Exchange, Target, build_request
from harness.machine import NOISY_CPU_PCT, can_pin, free_port, pin, wait_until_quiet
from harness.nginx import NginxServer, ensure_binaries, nginx_version
from harness.profile import summarise_raw
from harness.report import fmt
from harness.runtime import BenchError, Budget, finish, progress, run_guarded
from harness.stack import (
    GATEWAY_SECRET,
    LIMITED_SECRET,
    LOADGEN_CPU,
    UPSTREAM_KEY,
    Stack,
    count_rows,
    gateway_config,
)
from harness.wrk import lua_script, run_wrk, wrk_version

from tests.services import RedisServer

CONCURRENCY = (1, 10, 50)
PROFILE_C = 50
REPLAY = Path(os.environ.get("BENCH_REPLAY_DIR", "/work/shared/replay"))
CHAT_RECORDING = "llm-chat-tool-gzip"  # gpt-4o-mini, non-streamed (a tool call), 1,096 bytes
STREAM_RECORDING = "llm-chat-stream-text-usage"  # gpt-4o-mini, 28 events, usage included
TEMPLATES = Path(__file__).resolve().parent / "nginx"
ANSWER_HEADER = "x-bench-answer"  # `sse`: nginx answers with the recorded stream
WARMUP_C = 10
RETRY_WAIT_MAX_S = 30.0
EVENTS_PROMPT = "Say hello to the benchmark, briefly."
CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Call:
    """One kind of request: its body and extra headers, and how to check an answer to it."""

    kind: str
    body: bytes
    headers: dict[str, str]
    check: Callable[[Exchange], str | None]  # what is wrong with the answer, if anything


@dataclass
class Part:
    """The processes of one part of the run and what was written to its gateway."""

    name: str
    stack: Stack
    servers: list[NginxServer]
    targets: dict[str, Target]
    completed: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    redis: RedisServer | None = None


# ---------------------------------------------------------------- answers


def load_recording(folder: Path, name: str) -> Recording:
    data = json.loads((folder / f"{name}.json").read_text())
    response = data["response"]
    body = response["body_text"].encode()
    if hashlib.sha256(body).hexdigest() != response.get("body_sha256"):
        raise BenchError(f"{name}: the recorded body does not match its sha256")
    if response["status"] != 200 or data["path"] != "/v1/chat/completions":
        raise BenchError(f"{name}: not a 200 answer of /v1/chat/completions")
    source = data["source"]
    return Recording(
        name=name,
        note=data.get("note", ""),
        source=f"{source['repo']}@{source['commit'][:7]}",
        request_body=data["request"]["body_text"].encode(),
        response_body=body,
        content_type=response["headers"]["content-type"],
        request_id=response["headers"].get("x-request-id", "req_bench"),
        usage=data["expected"]["usage"],
        events=body.count(b"\n\n")
        if response["headers"]["content-type"].startswith("text/event-stream")
        else 0,
    )


def json_check(recording: Recording) -> Callable[[Exchange], str | None]:
    want = json.loads(recording.response_body)

    def check(ex: Exchange) -> str | None:
        body = bytes(ex.body or b"")
        if ex.status != 200:
            return f"HTTP {ex.status}: {body[:300]!r}"
        if json.loads(body) != want:
            return f"not the recorded answer: {body[:300]!r}"
        return None

    return check


def stream_check(events: int, exact: bool) -> Callable[[Exchange], str | None]:
    def check(ex: Exchange) -> str | None:
        body = bytes(ex.body or b"")
        if ex.status != 200:
            return f"HTTP {ex.status}: {body[:300]!r}"
        if not body.rstrip().endswith(b"data: [DONE]") or b'"usage":{' not in body:
            return f"no usage chunk or no [DONE]: {body[-300:]!r}"
        if (ex.events != events) if exact else (ex.events < events):
            return f"{ex.events} SSE events, expected {'' if exact else 'at least '}{events}"
        return None

    return check


# ---------------------------------------------------------------- processes


class CannedStack(Stack):
    """The gateway in front of nginx: `Stack`'s teams, keys and limits, its upstream nginx on
    `upstream_port` (nginx itself is a service of the stack, started beside it)."""

    def __init__(
        self, workdir: Path, pinning: bool, upstream_port: int, extra_config: str = ""
    ) -> None:
        super().__init__(workdir, 1, pinning, extra_config)
        self.upstream_port = upstream_port

    def start(self) -> None:
        self.config.write_text(
            gateway_config(
                self.gateway_port, self.upstream_port, self.ledger, self.pricing, ANSWER_HEADER
            )
            + self.extra_config
        )
        self.start_gateway("gateway.log")


def targets_for(upstream_port: int, proxy_port: int, gateway_port: int) -> dict[str, Target]:
    gateway = f"http://127.0.0.1:{gateway_port}/v1"
    return {
        "direct": Target("direct", f"http://127.0.0.1:{upstream_port}/v1", UPSTREAM_KEY),
        "proxy_pass": Target("proxy_pass", f"http://127.0.0.1:{proxy_port}/v1", UPSTREAM_KEY),
        "gateway": Target("gateway", gateway, GATEWAY_SECRET),
        "limited": Target("limited", gateway, LIMITED_SECRET),
    }


def proxy_server(binary: str, folder: Path, upstream_port: int) -> NginxServer:
    template = TEMPLATES / "proxy.conf.template"
    return NginxServer(binary, template, folder, free_port(), {"UPSTREAM_PORT": str(upstream_port)})


# ---------------------------------------------------------------- runs


class Runner:
    """What each part does with its stack: check each target's answers, warm up, measure."""

    def __init__(self, bench: NginxBench, budget: Budget, loop: asyncio.Runner, wrk: str) -> None:
        self.bench = bench
        self.budget = budget
        self.loop = loop
        self.wrk = wrk

    def script(self, part: Part, target: Target, call: Call) -> Path:
        folder = part.stack.workdir / "wrk"
        folder.mkdir(exist_ok=True)
        body = folder / f"{call.kind}.body"
        body.write_bytes(call.body)
        headers = {
            "Authorization": f"Bearer {target.key}",
            "Content-Type": "application/json",
            **call.headers,
        }
        path = folder / f"{target.name}-{call.kind}.lua"
        path.write_text(lua_script(body, headers))
        return path

    def check(self, part: Part, target: Target, call: Call) -> None:
        async def exchange() -> Exchange:
            factory = ClientFactory("raw", target, 1)
            try:
                connection = await factory.connect()
                request = build_request(
                    target, "POST", "/chat/completions", call.headers, call.body, True
                )
                target.sent += 1
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    ex = await connection.exchange(request, keep_body=True)
                connection.close()
                return ex
            finally:
                await factory.aclose()

        ex = self.budget.run(self.loop, exchange, f"check {target.name} {call.kind}")
        if problem := call.check(ex):
            raise BenchError(f"{part.name}: {target.name} {call.kind}: {problem}")
        part.completed[target.name] = part.completed.get(target.name, 0) + 1

    def wrk_run(self, part: Part, target: Target, call: Call, c: int, seconds: int) -> Run:
        stack = part.stack
        stack.repin()
        stack.check_alive()
        for server in part.servers:
            server.check_alive()
        self.budget.check(f"{call.kind} c={c} {target.name}")
        before, started = stack.cpu(), time.perf_counter()
        result = run_wrk(
            self.wrk,
            target.base_url + "/chat/completions",
            self.script(part, target, call),
            c,
            seconds,
        )
        wall, after = time.perf_counter() - started, stack.cpu()
        target.sent += result.sent
        part.completed[target.name] = part.completed.get(target.name, 0) + result.completed
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        shares = {
            "wrk": result.cpu_s,
            "upstream": used.get("upstream", 0.0) + used.get("nginx", 0.0) + used.get("redis", 0.0),
            "proxy": used.get("proxy", 0.0),
            "gateway": used.get("gateway", 0.0),
        }
        accounted = sum(shares.values()) + used.get("loadgen", 0.0)
        shares["other"] = max(used["machine"] - accounted, 0.0)
        shares["steal"] = used["steal"]
        cpu = {name: 100 * value / wall for name, value in shares.items()}
        return Run(target.name, call.kind, c, result, cpu, phase=part.phase, workers=stack.workers)

    def measure(self, part: Part, target: Target, call: Call, c: int) -> Run:
        """A run, redone while other work took more than NOISY_CPU_PCT of a core (least
        disturbed try kept); every try's requests count for the ledger."""
        best: Run | None = None
        tries = 1 + self.bench.args.retries
        for attempt in range(tries):
            run = self.wrk_run(part, target, call, c, self.bench.duration_s)
            progress(describe(run))
            if best is None or run.noise_pct < best.noise_pct:
                best = run
            if run.noise_pct <= NOISY_CPU_PCT or attempt == tries - 1:
                break
            waited = wait_until_quiet(min(RETRY_WAIT_MAX_S, max(self.budget.remaining() - 60, 0)))
            progress(f"  disturbed ({run.noise_pct:.0f}% of a core); waited {waited:.0f} s, again")
        assert best is not None
        best.tries = attempt + 1
        notes = self.bench.notes
        label = f"{target.name} {KIND_TITLES[call.kind]} c={c}"
        if best.wrk.non_2xx or best.wrk.errors:
            notes.append(
                f"{label}: {best.wrk.non_2xx} non-2xx answers, socket errors "
                f"{best.wrk.socket_errors or 0}"
            )
        if best.noise_pct > NOISY_CPU_PCT:
            notes.append(f"{label}: {best.noise_pct:.0f}% of a core went to other work")
        if best.cpu_pct.get("steal", 0.0) > NOISY_CPU_PCT:
            notes.append(f"{label}: the hypervisor withheld {best.cpu_pct['steal']:.0f}% of a core")
        return best

    def prepare(self, part: Part, calls: list[Call]) -> None:
        for call in calls:
            for name in TARGETS:
                self.check(part, part.targets[name], call)
        for call in calls:
            for name in TARGETS:
                self.wrk_run(part, part.targets[name], call, WARMUP_C, self.bench.args.warmup)

    def measure_all(self, part: Part, calls: list[Call]) -> None:
        for call in calls:
            for c in self.bench.concurrency:
                for name in TARGETS:
                    self.bench.runs.append(self.measure(part, part.targets[name], call, c))

    def settle(self, part: Part) -> LedgerCheck:
        """Stop the gateway (SIGTERM) and compare its ledger with what was written to it."""
        stack = part.stack
        stack.check_alive()
        check = LedgerCheck(part.name)
        check.exit_code = stack.stop_gateway()
        for name in ("gateway", "limited"):
            check.sent += part.targets[name].sent
            check.completed += part.completed.get(name, 0)
        check.rows, check.by_outcome = count_rows(stack.ledger)
        with contextlib.closing(sqlite3.connect(f"file:{stack.ledger}?mode=ro", uri=True)) as db:
            check.usage = list(
                db.execute(
                    "SELECT stream, input_tokens, cached_input_tokens, output_tokens, COUNT(*) "
                    "FROM requests WHERE outcome = 'ok' GROUP BY 1, 2, 3, 4 ORDER BY 1"
                )
            )
            unpriced = db.execute("SELECT COUNT(*) FROM requests WHERE price_unknown").fetchone()
        if unpriced[0]:
            self.bench.notes.append(f"{part.name}: {unpriced[0]:,} ledger rows unpriced")
        in_flight = check.sent - check.completed
        not_ok = sum(n for outcome, n in check.by_outcome.items() if outcome != "ok 200")
        if not_ok > in_flight:
            self.bench.notes.append(
                f"{part.name}: {not_ok} ledger rows are not `ok 200`, more than the {in_flight} "
                "requests in flight when wrk stopped"
            )
        if not check.exact:
            self.bench.notes.append(
                f"{part.name}: {check.rows} ledger rows for {check.sent} requests written "
                f"(exit code {check.exit_code})"
            )
        self.bench.ledgers.append(check)
        return check


def describe(run: Run) -> str:
    cpu = " ".join(f"{name} {pct:.0f}%" for name, pct in run.cpu_pct.items())
    text = (
        f"  {run.target:>10} {run.kind:>6} c={run.concurrency:<3} {run.rps:9,.0f}/s  "
        f"p50 {fmt(run.p_ms('p50'), 'ms')} ms  p99 {fmt(run.p_ms('p99'), 'ms')} ms  cpu: {cpu}"
    )
    if run.wrk.non_2xx or run.wrk.errors:
        text += f"  non-2xx {run.wrk.non_2xx} errors {run.wrk.socket_errors}"
    return text


# ---------------------------------------------------------------- the two parts


def canned_upstream(bench: NginxBench, nginx: str, folder: Path) -> NginxServer:
    """nginx answering with the recorded answers (not started)."""
    assert bench.chat is not None and bench.stream is not None
    upstream = NginxServer(
        nginx,
        TEMPLATES / "upstream.conf.template",
        folder / "nginx-upstream",
        free_port(),
        {"CHAT_REQUEST_ID": bench.chat.request_id, "STREAM_REQUEST_ID": bench.stream.request_id},
    )
    canned = upstream.prefix / "canned"
    canned.mkdir(parents=True)
    (canned / "chat.json").write_bytes(bench.chat.response_body)
    (canned / "chat.sse").write_bytes(bench.stream.response_body)
    return upstream


def canned_part(runner: Runner, nginx: str, workdir: Path, parts: list[Part]) -> Part:
    bench = runner.bench
    folder = workdir / "canned"
    folder.mkdir()
    upstream = canned_upstream(bench, nginx, folder)
    stack = CannedStack(folder, bench.pinning, upstream.port)
    proxy = proxy_server(nginx, folder / "nginx-proxy", upstream.port)
    part = Part("canned answers (nginx upstream)", stack, [upstream, proxy], {})
    parts.append(part)
    progress(f"starting nginx upstream, nginx proxy_pass and the gateway in {folder}")
    upstream.start()
    proxy.start()
    stack.services.update(nginx=upstream, proxy=proxy)
    stack.start()
    part.targets = targets_for(upstream.port, proxy.port, stack.gateway_port)
    return part


def canned_calls(bench: NginxBench) -> list[Call]:
    assert bench.chat is not None and bench.stream is not None
    return [
        Call("chat", bench.chat.request_body, {}, json_check(bench.chat)),
        Call(
            "stream",
            bench.stream.request_body,
            {ANSWER_HEADER: "sse"},
            stream_check(bench.stream.events, exact=True),
        ),
    ]


def events_part(runner: Runner, nginx: str, workdir: Path, parts: list[Part]) -> Part:
    bench = runner.bench
    folder = workdir / "events"
    folder.mkdir()
    stack = Stack(folder, 1, bench.pinning)
    proxy = proxy_server(nginx, folder / "nginx-proxy", stack.upstream_port)
    part = Part("per-event streams (fake upstream)", stack, [proxy], {})
    parts.append(part)
    progress(f"starting the fake upstream, nginx proxy_pass and the gateway in {folder}")
    stack.start()
    proxy.start()
    stack.services["proxy"] = proxy
    stack.repin()
    part.targets = targets_for(stack.upstream_port, proxy.port, stack.gateway_port)
    return part


def events_call(bench: NginxBench) -> Call:
    args = bench.args
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": EVENTS_PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {
        "x-fake-reply-words": str(args.event_words),
        "x-fake-fault": f"chunk_delay_ms={args.event_delay_ms}",
    }
    check = stream_check(args.event_words + 2, exact=False)
    return Call("events", json.dumps(body, separators=(",", ":")).encode(), headers, check)


def cores_part(runner: Runner, nginx: str, workdir: Path, parts: list[Part]) -> Part:
    """nginx upstream and the gateway with its limits in Redis, for `--workers 1` and `2`."""
    bench = runner.bench
    folder = workdir / "cores"
    folder.mkdir()
    upstream = canned_upstream(bench, nginx, folder)
    redis = RedisServer.start(folder / "redis")
    extra = f'limits: {{backend: redis, redis_url: "{redis.url}", on_backend_error: fail_closed}}\n'
    stack = CannedStack(folder, bench.pinning, upstream.port, extra)
    part = Part("several cores (nginx upstream, limits in Redis)", stack, [upstream], {})
    part.phase = CORES_PHASE
    parts.append(part)
    progress(f"starting nginx upstream and Redis in {folder}")
    upstream.start()
    stack.services.update(nginx=upstream, redis=redis)
    part.redis = redis
    part.targets = targets_for(upstream.port, 0, stack.gateway_port)
    return part


def measure_cores(runner: Runner, part: Part, calls: list[Call]) -> None:
    stack = part.stack
    for workers in (1, 2):
        stack.workers = workers
        stack.start()
        progress(f"the gateway with --workers {workers}")
        for call in calls:
            for name in ("gateway", "limited"):
                runner.check(part, part.targets[name], call)
                runner.wrk_run(part, part.targets[name], call, WARMUP_C, runner.bench.args.warmup)
        for call in calls:
            for name in ("gateway", "limited"):
                runner.bench.runs.append(runner.measure(part, part.targets[name], call, CORES_C))
        runner.settle(part)


def stop_part(part: Part) -> None:
    with contextlib.suppress(Exception):
        part.stack.stop()
    if part.redis is not None:
        with contextlib.suppress(Exception):
            part.redis.stop()
    for server in part.servers:
        with contextlib.suppress(Exception):
            server.stop()


def execute(
    bench: NginxBench, runner: Runner, nginx: str, workdir: Path, parts: list[Part]
) -> None:
    args = bench.args
    if bench.pinning:
        pin(os.getpid(), LOADGEN_CPU)  # wrk and nginx inherit it
    part = canned_part(runner, nginx, workdir, parts)
    calls = canned_calls(bench)
    runner.prepare(part, calls)
    if args.profile is not None:
        profile(runner, part, calls[0])
    else:
        runner.measure_all(part, calls)
    runner.settle(part)
    stop_part(part)
    if args.profile is not None:
        return
    if not args.no_cores:
        part = cores_part(runner, nginx, workdir, parts)
        measure_cores(runner, part, calls)
        stop_part(part)
    if args.no_events:
        return
    part = events_part(runner, nginx, workdir, parts)
    calls = [events_call(bench)]
    runner.prepare(part, calls)
    runner.measure_all(part, calls)
    runner.settle(part)
    stop_part(part)


def profile(runner: Runner, part: Part, call: Call) -> None:
    """py-spy on the gateway during a c=50 non-streamed load, written to --profile."""
    args = runner.bench.args
    gateway = part.stack.gateway
    assert gateway is not None
    seconds = args.profile_seconds
    beside = Path(sys.executable).parent / "py-spy"  # in the venv, if installed there
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None:
        raise BenchError("py-spy not found: pip install py-spy")
    command = [
        py_spy,
        "record",
        "-r",
        str(args.profile_rate),
        "--nonblocking",
        "-d",
        str(seconds),
        "-o",
        str(args.profile),
        "--format",
        "raw",
        "--pid",
        str(gateway.pid),
    ]
    progress(f"py-spy on the gateway (pid {gateway.pid}) for {seconds} s at c={PROFILE_C}")
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # attach before the load starts
        target = part.targets[args.profile_target]
        run = runner.wrk_run(part, target, call, PROFILE_C, seconds + 2)
        progress(describe(run))
        output, _ = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait(10)
    if spy.returncode != 0:
        raise BenchError(f"py-spy exited {spy.returncode}: {output.decode(errors='replace')}")
    runner.bench.runs.append(run)
    print(summarise_raw(args.profile.read_text()))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The gateway next to nginx proxy_pass, loaded by wrk (127.0.0.1 only)."
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, one retry")
    parser.add_argument("--duration", type=int, help="seconds per run (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target")
    parser.add_argument("--retries", type=int, choices=range(0, 6), metavar="N")
    writing = parser.add_mutually_exclusive_group()
    writing.add_argument(
        "--write", action="store_true", help="write the report into docs/benchmarks.md"
    )
    writing.add_argument("--out", type=Path, help="write the report into this Markdown file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--no-events", action="store_true", help="skip the per-event streams")
    parser.add_argument(
        "--no-cores", action="store_true", help="skip --workers 1 against --workers 2"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=CONCURRENCY,
        help="connection counts, comma-separated (default 1,10,50)",
    )
    parser.add_argument("--replay", type=Path, default=REPLAY, help="the recordings' folder")
    parser.add_argument("--chat-recording", default=CHAT_RECORDING)
    parser.add_argument("--stream-recording", default=STREAM_RECORDING)
    parser.add_argument("--event-words", type=int, default=32, help="per-event stream length")
    parser.add_argument("--event-delay-ms", type=int, default=5, help="gap between events")
    parser.add_argument("--profile", type=Path, help="py-spy the gateway instead; raw output")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument(
        "--profile-target", choices=("gateway", "limited"), default="gateway",
        help="the unlimited team's key, or the one with every limit kind",
    )  # fmt: skip
    parser.add_argument("--profile-rate", type=int, default=1000)
    parser.add_argument("--max-runtime", type=float, default=900.0, help="abort after this")
    parser.add_argument(
        "--workdir", type=Path, help="an empty folder to run in, kept (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.write:
        args.out = REPO / "docs" / "benchmarks.md"
    args.no_write = args.out is None or args.profile is not None
    if args.retries is None:
        args.retries = 1 if args.quick else 2
    if args.duration is not None and not 1 <= args.duration <= 120:
        parser.error("--duration must be between 1 and 120 seconds")
    if not 1 <= args.warmup <= 10 or not 1 <= args.profile_seconds <= 120:
        parser.error("--warmup must be 1–10 s and --profile-seconds 1–120 s")
    if not 1 <= args.event_words <= 1000 or not 0 <= args.event_delay_ms <= 100:
        parser.error("--event-words must be 1–1000 and --event-delay-ms 0–100")
    if not all(1 <= c <= 1000 for c in args.concurrency):
        parser.error("--concurrency takes counts between 1 and 1000")
    if not 10 <= args.max_runtime <= 3600:
        parser.error("--max-runtime must be between 10 and 3600 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.max_runtime)
    bench = NginxBench(
        args=args,
        started=dt.datetime.now(dt.UTC),
        duration_s=args.duration or (2 if args.quick else 5),
        concurrency=args.concurrency,
        pinning=not args.no_pin and can_pin(),
    )
    try:
        binaries = ensure_binaries({"nginx": "nginx", "wrk": "wrk"}, not args.no_install)
        bench.versions = {
            "nginx": nginx_version(binaries["nginx"]),
            "wrk": wrk_version(binaries["wrk"]),
        }
        bench.chat = load_recording(args.replay, args.chat_recording)
        bench.stream = load_recording(args.replay, args.stream_recording)
    except (BenchError, OSError, KeyError, ValueError) as exc:
        print(f"bench_nginx: {exc}")
        return 2
    if bench.stream.events == 0 or bench.chat.events != 0:
        print("bench_nginx: the chat recording must be JSON and the stream one SSE")
        return 2
    if not bench.pinning:
        bench.notes.append("processes were not pinned to CPUs")
    parts: list[Part] = []

    def cleanup() -> None:
        for part in parts:
            stop_part(part)

    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            tmp = str(args.workdir.resolve())
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-nginx-"))
        failed = run_guarded(
            lambda loop: execute(
                bench,
                Runner(bench, budget, loop, binaries["wrk"]),
                binaries["nginx"],
                Path(tmp),
                parts,
            ),
            Path(tmp),
            args.max_runtime,
            logs="**/*.log",
            cleanup=cleanup,
        )
    bench.elapsed_s = time.monotonic() - budget.started
    if args.profile is not None:
        if failed is not None:
            print(f"bench_nginx: aborted: {failed!r}", file=sys.stderr)
        return 0 if failed is None else 1
    return finish("bench_nginx", failed, bench, print_report, render_markdown, write_markdown)


if __name__ == "__main__":
    raise SystemExit(main())

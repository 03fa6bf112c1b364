"""What `scripts/bench_nginx.py` measured, the issue's targets, and the report: the tables and
targets printed, and the Markdown it writes between the `<!-- bench-nginx:begin -->` /
`<!-- bench-nginx:end -->` markers of docs/benchmarks.md, in a section "## Against nginx"
placed before "## Notes" (anything outside the markers is kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from harness.machine import NOISY_CPU_PCT
from harness.report import (
    between_markers,
    command_block,
    fmt,
    git_commit,
    md_table,
    md_warnings,
    print_table,
    print_warnings,
)
from harness.wrk import WrkResult

TARGETS = ("direct", "proxy_pass", "gateway", "limited")
KINDS = ("chat", "stream", "events")
KIND_TITLES = {
    "chat": "non-streamed",
    "stream": "streamed",
    "events": "per-event stream",
}
CPU_COLUMNS = ("wrk", "upstream", "proxy", "gateway", "other", "steal")

TARGET_C = 50
TARGET_CHAT_RATIO = 0.25  # gateway / proxy_pass, non-streamed, c=50
TARGET_LIMITED_RATIO = 0.90  # limited team / unlimited team
TARGET_ADDED_P50_MS = 0.15  # the gateway's added p50 at c=1 over proxy_pass's added p50
TARGET_STREAM_RATIO = 0.30  # gateway / proxy_pass, streamed, c=50

BEGIN_MARK = "<!-- bench-nginx:begin -->"
END_MARK = "<!-- bench-nginx:end -->"
HEADING = "## Against nginx"
BEFORE_HEADING = "## Notes"
INTRO = """\
The gateway next to nginx as the reference proxy, with Debian's nginx as the upstream and
Debian's `wrk` as the load. Regenerate with `python scripts/bench_nginx.py --write` (3–4
minutes; `--quick` for a smoke run; it installs nginx and wrk with apt-get where missing).
Everything between the `bench-nginx:begin` / `bench-nginx:end` markers is rewritten by the
script; text outside them is kept.
"""


@dataclass(frozen=True)
class Recording:
    """A real OpenAI answer from /work/shared/replay, as nginx serves it."""

    name: str
    note: str
    source: str
    request_body: bytes
    response_body: bytes
    content_type: str
    request_id: str
    usage: dict[str, int]
    events: int  # SSE events (blank-line ends); 0 for JSON


@dataclass
class Run:
    target: str
    kind: str
    concurrency: int
    wrk: WrkResult
    cpu_pct: dict[str, float]
    tries: int = 1
    phase: str = ""  # the part of the benchmark it belongs to
    workers: int = 1  # the gateway's `serve --workers`

    @property
    def rps(self) -> float:
        return self.wrk.rps

    def p_ms(self, name: str) -> float | None:
        return self.wrk.p_ms(name)

    @property
    def noise_pct(self) -> float:
        """Other work's share of a core. Steal is left out: on this VM it comes with every run
        that keeps both vCPUs waking each other (the gateway's), and a retry does not lower it."""
        return self.cpu_pct.get("other", 0.0)


@dataclass
class LedgerCheck:
    """A gateway process's ledger after SIGTERM, against the requests written to it."""

    phase: str
    sent: int = 0  # every request written to this gateway: checks, warm-ups, every try
    completed: int = 0  # of those, answered completely (wrk's count + the checks)
    rows: int | None = None
    by_outcome: dict[str, int] = field(default_factory=dict)
    usage: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def exact(self) -> bool:
        return self.rows == self.sent and self.exit_code == 0


@dataclass
class NginxBench:
    args: argparse.Namespace
    started: dt.datetime
    duration_s: int
    concurrency: tuple[int, ...]
    pinning: bool
    chat: Recording | None = None
    stream: Recording | None = None
    versions: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    ledgers: list[LedgerCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def run(self, target: str, kind: str, c: int) -> Run | None:
        return next(
            (
                r
                for r in self.runs
                if (r.target, r.kind, r.concurrency) == (target, kind, c) and not r.phase
            ),
            None,
        )

    def cores_run(self, target: str, kind: str, workers: int) -> Run | None:
        return next(
            (
                r
                for r in self.runs
                if r.phase == CORES_PHASE
                and (r.target, r.kind, r.workers) == (target, kind, workers)
            ),
            None,
        )


# ---------------------------------------------------------------- tables


CORES_PHASE = "cores"
CORES_C = 50


def cores_cells(bench: NginxBench) -> tuple[list[str], list[list[str]]]:
    """`serve --workers 1` (CPU 0) against `--workers 2` (both CPUs), limits through Redis."""
    headers = [
        "scenario", "1 worker req/s", "its CPU%", "2 workers req/s", "their CPU%", "2 / 1",
        "nginx proxy_pass req/s", "2 workers / proxy_pass",
    ]  # fmt: skip
    body: list[list[str]] = []
    for kind in KINDS:
        proxy = bench.run("proxy_pass", kind, CORES_C)
        for target in ("gateway", "limited"):
            one, two = (bench.cores_run(target, kind, n) for n in (1, 2))
            if one is None and two is None:
                continue
            body.append(
                [
                    f"{KIND_TITLES[kind]} c={CORES_C}, {target}",
                    fmt(one.rps, "rate") if one else "–",
                    f"{one.cpu_pct.get('gateway', 0):.0f}" if one else "–",
                    fmt(two.rps, "rate") if two else "–",
                    f"{two.cpu_pct.get('gateway', 0):.0f}" if two else "–",
                    _ratio(two.rps if two else None, one.rps if one else None),
                    fmt(proxy.rps, "rate") if proxy else "–",
                    _ratio(two.rps if two else None, proxy.rps if proxy else None),
                ]
            )
    return headers, body


def _ratio(top: float | None, bottom: float | None) -> str:
    return "–" if top is None or not bottom else f"{top / bottom:.2f}"


def results_cells(bench: NginxBench) -> tuple[list[str], list[list[str]]]:
    headers = [
        "scenario",
        "nginx direct",
        "nginx proxy_pass",
        "gateway",
        "gateway, every limit",
        "gateway / proxy_pass",
        "limited / unlimited",
    ]
    body: list[list[str]] = []
    for kind in KINDS:
        for c in bench.concurrency:
            runs = {t: bench.run(t, kind, c) for t in TARGETS}
            if not any(runs.values()):
                continue
            unit = "streams/s" if kind != "chat" else "req/s"
            metrics = [(unit, "rate", None), ("p50 ms", "ms", "p50"), ("p99 ms", "ms", "p99")]
            for label, kind_of, name in metrics:
                values = {
                    t: None if r is None else (r.rps if name is None else r.p_ms(name))
                    for t, r in runs.items()
                }
                body.append(
                    [
                        f"{KIND_TITLES[kind]} c={c} {label}",
                        *(fmt(values[t], kind_of) for t in TARGETS),
                        _ratio(values["gateway"], values["proxy_pass"]),
                        _ratio(values["limited"], values["gateway"]),
                    ]
                )
    return headers, body


def added_cells(bench: NginxBench) -> tuple[list[str], list[list[str]]]:
    headers = [
        "scenario",
        "proxy_pass − direct",
        "gateway − direct",
        "limited − direct",
        "gateway's added − proxy_pass's added",
    ]
    body = []
    for kind in KINDS:
        for c in bench.concurrency:
            p50 = {t: (r.p_ms("p50") if (r := bench.run(t, kind, c)) else None) for t in TARGETS}
            if p50["direct"] is None:
                continue

            def added(t: str, p50: dict[str, float | None] = p50) -> float | None:
                value, base = p50[t], p50["direct"]
                return None if value is None or base is None else value - base

            over = (
                None
                if p50["gateway"] is None or p50["proxy_pass"] is None
                else p50["gateway"] - p50["proxy_pass"]
            )
            body.append(
                [
                    f"{KIND_TITLES[kind]} c={c} p50",
                    *(
                        "–" if (v := added(t)) is None else f"{v:+.3f}"
                        for t in ("proxy_pass", "gateway", "limited")
                    ),
                    "–" if over is None else f"{over:+.3f}",
                ]
            )
    return headers, body


def run_cells(bench: NginxBench) -> tuple[list[str], list[list[str]]]:
    headers = [
        "target",
        "scenario",
        "c",
        "completed",
        "in flight at stop",
        "non-2xx",
        "socket errors",
        "s",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        *(f"CPU% {name}" for name in CPU_COLUMNS),
        "tries",
    ]
    body = []
    for r in bench.runs:
        errors = ", ".join(f"{k} {v}" for k, v in r.wrk.socket_errors.items()) or "0"
        body.append(
            [
                r.target if r.phase != CORES_PHASE else f"{r.target} ×{r.workers} workers",
                KIND_TITLES[r.kind],
                str(r.concurrency),
                f"{r.wrk.completed}",
                f"{r.wrk.in_flight}",
                f"{r.wrk.non_2xx}",
                errors,
                f"{r.wrk.wall_s:.2f}",
                fmt(r.rps, "rate"),
                *(fmt(r.p_ms(name), "ms") for name in ("p50", "p90", "p99", "max")),
                *(f"{r.cpu_pct.get(name, 0.0):.0f}" for name in CPU_COLUMNS),
                str(r.tries),
            ]
        )
    return headers, body


# ---------------------------------------------------------------- targets


@dataclass
class Goal:
    text: str
    measured: str
    met: bool | None


def _share(bench: NginxBench, top: str, bottom: str, kind: str, c: int) -> tuple[str, float]:
    a, b = bench.run(top, kind, c), bench.run(bottom, kind, c)
    if a is None or b is None or not b.rps:
        return "not measured", 0.0
    share = a.rps / b.rps
    return f"{a.rps:,.0f} vs {b.rps:,.0f} = {share:.0%}", share


def goals(bench: NginxBench) -> list[Goal]:
    out = []
    c = TARGET_C
    text, share = _share(bench, "gateway", "proxy_pass", "chat", c)
    out.append(
        Goal(
            f"non-streamed: gateway ≥ {TARGET_CHAT_RATIO:.0%} of nginx proxy_pass at c={c}",
            text,
            share >= TARGET_CHAT_RATIO,
        )
    )
    chat_text, chat_share = _share(bench, "limited", "gateway", "chat", c)
    stream_text, stream_share = _share(bench, "limited", "gateway", "stream", c)
    out.append(
        Goal(
            f"a team with every limit kind ≥ {TARGET_LIMITED_RATIO:.0%} of an unlimited team "
            f"(c={c}, non-streamed and streamed)",
            f"non-streamed {chat_text}; streamed {stream_text}",
            min(chat_share, stream_share) >= TARGET_LIMITED_RATIO,
        )
    )
    for kind in ("chat", "stream"):
        p50 = [
            r.p_ms("p50") if (r := bench.run(t, kind, 1)) else None
            for t in ("direct", "proxy_pass", "gateway")
        ]
        measured, over = "not measured", None
        if None not in p50:
            d, p, g = (value or 0.0 for value in p50)
            over = (g - d) - (p - d)
            measured = f"gateway +{g - d:.3f} ms, proxy_pass +{p - d:.3f} ms: {over:+.3f} ms"
        title = (
            f"{KIND_TITLES[kind]}: the gateway's added p50 at c=1 ≤ nginx proxy_pass's "
            f"+ {TARGET_ADDED_P50_MS:.2f} ms"
        )
        if kind == "chat":
            out.append(Goal(title, measured, over is not None and over <= TARGET_ADDED_P50_MS))
        else:
            out.append(Goal(f"(information) {title}", measured, None))
    text, share = _share(bench, "gateway", "proxy_pass", "stream", c)
    out.append(
        Goal(
            f"streamed: gateway ≥ {TARGET_STREAM_RATIO:.0%} of nginx proxy_pass at c={c}",
            text,
            share >= TARGET_STREAM_RATIO,
        )
    )
    text, share = _share(bench, "gateway", "proxy_pass", "events", c)
    out.append(
        Goal(
            f"(information) per-event stream from the fake upstream: gateway vs nginx "
            f"proxy_pass at c={c}",
            text,
            None,
        )
    )
    ledgers = "; ".join(
        f"{check.phase}: {'–' if check.rows is None else f'{check.rows:,}'} rows for "
        f"{check.sent:,} requests"
        for check in bench.ledgers
    )
    out.append(
        Goal(
            "ledger rows = requests sent to the gateway (after SIGTERM)",
            ledgers or "not measured",
            bool(bench.ledgers) and all(check.exact for check in bench.ledgers),
        )
    )
    return out


def verdict(met: bool | None) -> str:
    return "info" if met is None else ("met" if met else "NOT MET")


# ---------------------------------------------------------------- report


def setup_lines(bench: NginxBench) -> list[str]:
    args = bench.args
    chat, stream = bench.chat, bench.stream
    pin = (
        "gateway pinned to CPU 0; nginx upstream, nginx proxy, the fake upstream and wrk to CPU 1"
        if bench.pinning
        else "no CPU pinning"
    )
    lines = [
        f"{bench.versions.get('nginx', '?')}, {bench.versions.get('wrk', '?')}; {pin}; "
        "everything on 127.0.0.1",
        f"wrk: one thread, c connections, closed loop, {bench.duration_s} s per run after a "
        f"{args.warmup} s warm-up per target and kind; a Lua script POSTs the recorded request "
        "body and counts each request it writes; latency is wrk's (request written → response "
        "complete), from its µs histogram; req/s = completed / duration",
        f"a run during which other work took > {NOISY_CPU_PCT:.0f}% of a core is redone up to "
        f"{args.retries} times and the least disturbed try kept; steal (CPU time the "
        "hypervisor withheld) is shown, not retried: it comes with the runs that span both "
        "vCPUs",
        "nginx direct: one worker answers `POST /v1/chat/completions` with a recorded answer from "
        "a file (static file + `error_page 405 =200`, Content-Length framing; OpenAI sends "
        "chunked); nginx proxy_pass: one worker, upstream keep-alive, `proxy_buffering off`",
        "gateway: one team without limits, and a team with every limit kind "
        "(requests_per_minute, tokens_per_minute, requests_per_day, tokens_per_day, "
        "bytes_per_day, spend_per_day_usd, max_concurrent; and a per-key requests_per_minute), "
        "none reached; SQLite ledger in a temp dir (flushed every 100 ms), call log on by "
        "default (to a file)",
    ]
    if chat is not None:
        lines.append(
            f"non-streamed: `{chat.name}` ({chat.note}; {chat.source}): "
            f"{len(chat.request_body):,}-byte request, {len(chat.response_body):,}-byte "
            f"`{chat.content_type}` answer"
        )
    if stream is not None:
        lines.append(
            f"streamed: `{stream.name}` ({stream.note}; {stream.source}): "
            f"{len(stream.request_body):,}-byte request, {len(stream.response_body):,}-byte "
            f"`{stream.content_type}` answer of {stream.events} events, served by nginx at once"
        )
    spacing = ""
    direct = bench.run("direct", "events", 1)
    if direct is not None and (p50 := direct.p_ms("p50")) is not None and args.event_words > 1:
        gap = p50 / (args.event_words - 1)
        spacing = f" (at c=1 a whole stream took {p50:.0f} ms: {gap:.1f} ms a gap)"
    lines.append(
        f"per-event stream: nginx cannot write events one by one, so this case keeps the "
        f"project's fake upstream (`python -m gateway fake-upstream`): {args.event_words} words, "
        f"one SSE event each, {args.event_delay_ms} ms apart{spacing}, usage included; *direct* "
        "is the fake upstream itself and nginx proxy_pass relays it"
    )
    if bench.pinning:
        lines.append(
            "with this layout nginx direct and nginx proxy_pass run wholly on CPU 1, while each "
            "gateway call crosses between the CPUs (wrk → gateway → nginx and back): the "
            "gateway's runs are the ones where both vCPUs wake each other, and where steal shows"
        )
    return lines


def ledger_lines(bench: NginxBench) -> list[str]:
    lines = []
    for check in bench.ledgers:
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(check.by_outcome.items()))
        usage = "; ".join(
            f"{'stream' if stream else 'JSON'} {i} in ({cached} cached) / {o} out × {n:,}"
            for stream, i, cached, o, n in check.usage
        )
        rows = "–" if check.rows is None else f"{check.rows:,}"
        lines.append(
            f"{check.phase}: {rows} rows for {check.sent:,} requests written to the gateway "
            f"({check.completed:,} completed, the rest in flight when wrk stopped; exit code "
            f"{check.exit_code} on SIGTERM); by outcome: {outcomes or '–'} (rows other than "
            f"`ok 200` can only be of those in flight); usage of the ok rows: {usage or '–'}"
        )
    return lines


def print_report(bench: NginxBench) -> None:
    print_table(*results_cells(bench))
    print("p50 added over nginx direct, ms:")
    print_table(*added_cells(bench))
    for goal in goals(bench):
        print(f"[{verdict(goal.met):>8}] {goal.text}: {goal.measured}")
    for line in ledger_lines(bench):
        print(f"ledger: {line}")
    if any(r.phase == CORES_PHASE for r in bench.runs):
        print("several cores:")
        print_table(*cores_cells(bench))
    print_table(*run_cells(bench))
    print_warnings(bench.notes)


def render_markdown(bench: NginxBench) -> str:
    out = [
        BEGIN_MARK,
        f"Generated by `scripts/bench_nginx.py` on {bench.started:%Y-%m-%d %H:%M} UTC in "
        f"{bench.elapsed_s:.0f} s, commit {git_commit()}.",
        "",
        *command_block(),
        "",
        *(f"- {line}" for line in setup_lines(bench)),
        "",
        "### Results",
        "",
        md_table(*results_cells(bench)),
        "",
        "p50 added over nginx direct (the fake upstream for the per-event stream), ms:",
        "",
        md_table(*added_cells(bench)),
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        *(f"| {g.text} | {g.measured} | {verdict(g.met)} |" for g in goals(bench)),
        "",
        "### Ledger",
        "",
        *(f"- {line}" for line in ledger_lines(bench)),
        "",
        *cores_section(bench),
        "### Every run",
        "",
        "CPU% is CPU time in the run / wall time (100 = one core); *upstream* is nginx or the "
        "fake upstream, *proxy* nginx proxy_pass, *other* the rest of the machine's busy time.",
        "",
        md_table(*run_cells(bench), text_columns=2),
        *md_warnings("### Warnings", bench.notes),
        END_MARK,
    ]
    return "\n".join(out) + "\n"


def cores_section(bench: NginxBench) -> list[str]:
    if not any(r.phase == CORES_PHASE for r in bench.runs):
        return []
    return [
        "### Several cores",
        "",
        "`serve --workers 1` pinned to CPU 0 against `serve --workers 2` on both CPUs, with the "
        "limits in Redis (`limits.backend: redis`, a local redis-server on CPU 1) in both, nginx "
        "and wrk on CPU 1 as above: the second worker shares its CPU with them, so this shows "
        "how far two cores go here, not how the gateway scales on a machine with cores to spare.",
        "",
        md_table(*cores_cells(bench)),
        "",
    ]


def write_markdown(path: Path, section: str) -> None:
    """Replace what stands between the markers; without them, add the section (heading,
    intro, markers) before "## Notes", or at the end."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    parts = between_markers(old, BEGIN_MARK, END_MARK)
    if parts is not None:
        text = parts[0] + section.rstrip("\n") + parts[1]
    else:
        block = f"{HEADING}\n\n{INTRO}\n{section}"
        at = old.find(f"\n{BEFORE_HEADING}\n")
        if at >= 0:
            text = old[: at + 1] + block + "\n" + old[at + 1 :]
        else:
            text = (old.rstrip("\n") + "\n\n" if old else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

"""What `scripts/bench.py` measured, the targets it is checked against, and the report: the
comparison table and the targets printed, and the Markdown section it writes between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers (anything outside them is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from harness.client import Target
from harness.load import REPLY_WORDS, STREAM_REPLY_WORDS, WARMUP_S, RunResult
from harness.machine import NOISY_CPU_PCT
from harness.report import (
    between_markers,
    command_block,
    fmt,
    git_commit,
    md_table,
    md_warnings,
    mean,
    ms,
    print_table,
    print_warnings,
)
from harness.stack import GATEWAY_CPU, UPSTREAM_CPU

# The scenarios' shape, which the runs (bench.py) and the report both follow.
STREAM_CONCURRENCY = (1, 10)
LIMITED_TEAM_C = 50  # the limits-cost run: a team whose every limit is checked, never reached
LEDGER_APPEND_BATCH = 2_000

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


# ---------------------------------------------------------------- results


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


# ---------------------------------------------------------------- tables and targets


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
    kind = bench.args.export if hasattr(bench.args, "export") else None
    if kind:
        pairs = [(bench.run(f"gateway, no export #{n}", "chat", LIMITED_TEAM_C),
                  bench.run(f"gateway, {kind} export #{n}", "chat", LIMITED_TEAM_C))
                 for n in (1, 2)]  # fmt: skip
        measured = [
            f"{on.rps:,.0f} vs {off.rps:,.0f} req/s = {on.rps / off.rps:.0%}"
            for off, on in pairs
            if off is not None and on is not None and off.rps
        ]
        out.append(
            Goal(
                f"(information) the gateway with a {kind} export vs none, c={LIMITED_TEAM_C}, "
                "alternated",
                "; ".join(measured) or "–",
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


# ---------------------------------------------------------------- report


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
        *command_block(),
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
        *md_warnings("### Warnings", bench.notes),
        END_MARK,
    ]
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
    parts = between_markers(old, BEGIN_MARK, END_MARK)
    if parts is not None:
        before, after = parts[0], parts[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = _DEFAULT_HEAD + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def print_report(bench: Bench) -> None:
    print_table(*table_cells(bench))
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
    print_warnings(bench.notes)

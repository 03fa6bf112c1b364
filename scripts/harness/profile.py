"""Where a profiled process's time went: py-spy's raw (collapsed-stack) output, summed per
function (own time: the innermost frame; total time: anywhere on the stack) and per group of
source files (the gateway's parts, aiohttp, the event loop)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from harness.report import text_table

_FRAME = re.compile(r"^(?P<function>.+) \((?P<file>[^()]*?)(?::\d+)?\)$")

# The first group whose any prefix or fragment the file's path contains, in this order.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("handler stages (gateway/pipeline)", ("gateway/pipeline/",)),
    ("limits (gateway/limits)", ("gateway/limits/",)),
    ("metering (gateway/metering)", ("gateway/metering/",)),
    ("pricing (gateway/pricing)", ("gateway/pricing/",)),
    ("ledger (gateway/ledger, aiosqlite, sqlite3)", ("gateway/ledger/", "aiosqlite/", "sqlite3/")),
    (
        "logs and metrics (gateway/logs.py, gateway/web/metrics.py, logging, prometheus)",
        ("gateway/logs.py", "gateway/web/metrics.py", "/logging/", "prometheus_client/"),
    ),
    ("upstream client (gateway/upstream, httptools)", ("gateway/upstream/", "httptools/")),
    ("auth and keys (gateway/access)", ("gateway/access/",)),
    ("other gateway code", ("gateway/",)),
    ("aiohttp server machinery (aiohttp, multidict, yarl)", ("aiohttp/", "multidict/", "yarl/")),
    ("event loop (uvloop, asyncio)", ("uvloop/", "/asyncio/")),
    ("threads (threading, queue)", ("/threading.py", "/queue.py", "concurrent/")),
)
OTHER = "other (stdlib, libraries)"
ROOTS = ("<module>", "_run_module_as_main", "Thread._bootstrap")  # where a whole stack starts


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    file: str

    @property
    def name(self) -> str:
        return f"{self.function} ({short_path(self.file)})"


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker.startswith("/lib/") and "/" in tail else tail
    if "/gateway/" in path:
        return "gateway/" + path.split("/gateway/", 1)[1]
    return path


def group_of(path: str) -> str:
    probe = path if path.startswith("/") else "/" + path
    for name, fragments in GROUPS:
        if any(fragment in probe for fragment in fragments):
            return name
    return OTHER


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """Each stack (outermost first) and its sample count; unparseable frames are dropped."""
    stacks = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line or " " not in line:
            continue
        frames_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [
            Frame(match["function"], match["file"])
            for part in frames_text.split(";")
            if (match := _FRAME.match(part.strip()))
        ]
        if frames:
            stacks.append((frames, int(count)))
    return stacks


@dataclass
class Profile:
    samples: int
    own: Counter[Frame]
    total: Counter[Frame]
    group_own: Counter[str]
    group_total: Counter[str]


def summarise(stacks: list[tuple[list[Frame], int]]) -> Profile:
    profile = Profile(0, Counter(), Counter(), Counter(), Counter())
    for frames, count in stacks:
        profile.samples += count
        profile.own[frames[-1]] += count
        profile.group_own[group_of(frames[-1].file)] += count
        for frame in set(frames):
            profile.total[frame] += count
        for group in {group_of(frame.file) for frame in frames}:
            profile.group_total[group] += count
    return profile


def summarise_raw(text: str, top: int = 15) -> str:
    """A text report: samples, own and total time per group, the top functions by each."""
    profile = summarise(parse_raw(text))
    if not profile.samples:
        return "py-spy: no samples"

    def pct(count: int) -> str:
        return f"{100 * count / profile.samples:.1f}"

    groups = [name for name, _ in GROUPS] + [OTHER]
    group_rows = [
        [name, pct(profile.group_own[name]), pct(profile.group_total[name])]
        for name in sorted(groups, key=lambda g: -profile.group_own[g])
        if profile.group_total[name]
    ]
    own_rows = [
        [frame.name, pct(count), pct(profile.total[frame]), group_of(frame.file).split(" (")[0]]
        for frame, count in profile.own.most_common(top)
    ]
    total_rows = [
        [frame.name, pct(count), pct(profile.own[frame]), group_of(frame.file).split(" (")[0]]
        for frame, count in profile.total.most_common(top)
    ]
    cut = sum(count for frames, count in parse_raw(text) if frames[0].function not in ROOTS)
    return "\n\n".join(
        [
            f"py-spy: {profile.samples:,} samples (idle excluded); % of samples. "
            f"{100 * cut / profile.samples:.0f}% of the stacks start at a coroutine (one resumed "
            "from C, e.g. uvloop's task step, is not unwound to what awaits it), so total % is "
            "a lower bound; own % is exact. A thread's own time in C code (epoll, socket "
            "calls) counts for the Python frame that called it (Runner.run for uvloop's loop).",
            text_table(["group", "own %", "total %"], group_rows),
            text_table(["by own time", "own %", "total %", "group"], own_rows),
            text_table(["by total time", "total %", "own %", "group"], total_rows),
        ]
    )

"""wrk (Debian's `wrk` 4.x) as the load generator: the Lua script that makes its request, one
fixed-duration run, and what it printed, parsed.

The script sends one prepared POST (body read from a file, headers given), counts every
request it writes (`sent`, in each thread's Lua state; wrk's one check call of `request()`
left out) and, in `done()`, prints one JSON line
with wrk's own summary (completed requests, errors, latency percentiles in µs). The text wrk
prints with `--latency` is parsed too: it is what a reader sees, and the two must agree.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.runtime import BenchError

WRK_TIMEOUT_S = 10  # wrk's per-request timeout (its default, 2 s, would count slow streams)
RUN_GRACE_S = 30.0  # how long past its duration a wrk process may take before it is killed
JSON_TAG = "WRK_JSON "
PERCENTILES = (50, 75, 90, 99, 99.9)

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}

_LUA = """\
-- Written by scripts/harness/wrk.py: one prepared POST, every request counted.
local body_file = assert(io.open({body_path}, "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
{headers}

local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
end

sent = 0
local prepared
function init(args)
  prepared = wrk.format()
end

function request()
  sent = sent + 1
  return prepared
end

function done(summary, latency, requests)
  -- wrk calls request() once on the first thread's state to check what it returns
  -- (script_verify_request); that request is never sent.
  local written = -1
  for _, thread in ipairs(threads) do
    written = written + thread:get("sent")
  end
  local e = summary.errors
  io.write(string.format(
    '{tag}{{"sent":%d,"completed":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"min_us":%d,"max_us":%d,"mean_us":%.3f,' ..
    '"p50_us":%d,"p75_us":%d,"p90_us":%d,"p99_us":%d,"p99.9_us":%d}}\\n',
    written, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII


def lua_script(body_path: Path, headers: dict[str, str]) -> str:
    """The Lua for one kind of request: POST `body_path`'s bytes with `headers`."""
    for text in (str(body_path), *headers, *headers.values()):
        if not text.isascii() or any(ord(ch) < 32 for ch in text):
            raise BenchError(f"wrk script: {text!r} is not printable ASCII")
    lines = "\n".join(
        f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in headers.items()
    )
    return _LUA.format(body_path=_lua_string(str(body_path)), headers=lines, tag=JSON_TAG)


@dataclass
class WrkResult:
    """One wrk run: its summary (from `done()`), the text it printed, and the CPU it used."""

    connections: int
    duration_s: float
    sent: int = 0  # requests written (completed + in flight when wrk stopped)
    completed: int = 0
    wall_s: float = 0.0  # wrk's own measure of the run
    non_2xx: int = 0  # wrk's "Non-2xx or 3xx responses" (status > 399 in wrk's code)
    socket_errors: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)  # "p50", …, "min", "max", "mean"
    text_rps: float | None = None  # "Requests/sec:" as printed
    text_latency_us: dict[str, float] = field(default_factory=dict)  # "Latency Distribution"
    cpu_s: float = 0.0  # wrk's user + system CPU time
    output: str = ""

    @property
    def rps(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def in_flight(self) -> int:
        return max(self.sent - self.completed, 0)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())

    def p_ms(self, name: str) -> float | None:
        value = self.latency_us.get(name)
        return None if value is None else value / 1000


def to_us(text: str) -> float:
    """A wrk duration ("52.00us", "1.23ms", "2.00s") in µs."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_US[match.group(2)]


def parse_text(output: str) -> tuple[float | None, dict[str, float], int, dict[str, int]]:
    """From wrk's printed report: Requests/sec, the latency distribution (µs), the non-2xx
    count and the socket errors."""
    rps = None
    if found := re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M):
        rps = float(found.group(1))
    distribution: dict[str, float] = {}
    block = output.split("Latency Distribution", 1)
    if len(block) == 2:
        for percent, value in re.findall(r"^\s+([0-9.]+)%\s+(\S+)\s*$", block[1], re.M):
            distribution[f"p{percent.removesuffix('.000')}"] = to_us(value)
    non_2xx = 0
    if found := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        non_2xx = int(found.group(1))
    errors: dict[str, int] = {}
    if found := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, found.groups()), strict=True)
        )
    return rps, distribution, non_2xx, errors


def parse_output(output: str, connections: int, duration_s: float) -> WrkResult:
    result = WrkResult(connections, duration_s, output=output)
    summary = None
    for line in output.splitlines():
        if line.startswith(JSON_TAG):
            summary = json.loads(line[len(JSON_TAG) :])
    if summary is None:
        raise BenchError(f"wrk printed no summary line:\n{output[-2000:]}")
    result.sent = summary["sent"]
    result.completed = summary["completed"]
    result.wall_s = summary["duration_us"] / 1e6
    result.non_2xx = summary["status"]
    result.socket_errors = {
        name: summary[name] for name in ("connect", "read", "write", "timeout") if summary[name]
    }
    result.latency_us = {
        "min": summary["min_us"],
        "max": summary["max_us"],
        "mean": summary["mean_us"],
        **{f"p{p:g}": summary[f"p{p:g}_us"] for p in PERCENTILES},
    }
    result.text_rps, result.text_latency_us, text_non_2xx, text_errors = parse_text(output)
    if text_non_2xx != result.non_2xx or {k: v for k, v in text_errors.items() if v} != dict(
        result.socket_errors
    ):
        raise BenchError(f"wrk's text and summary disagree:\n{output[-2000:]}")
    return result


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    first = (done.stdout + done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


def run_wrk(
    binary: str,
    url: str,
    script: Path,
    connections: int,
    duration_s: float,
) -> WrkResult:
    """One closed-loop run: one wrk thread, `connections` keep-alive connections, `duration_s`
    seconds (whole seconds: wrk takes no fractions). wrk inherits this process's CPU affinity;
    its CPU time is the children's rusage around it (nothing else is reaped meanwhile)."""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"wrk: only http://127.0.0.1 URLs, not {url}")
    duration = max(1, round(duration_s))  # wrk takes whole seconds
    command = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=duration + RUN_GRACE_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk ran past {duration + RUN_GRACE_S:.0f} s: {command}") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    result = parse_output(done.stdout + done.stderr, connections, float(duration))
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result

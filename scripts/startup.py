#!/usr/bin/env python3
"""How long the gateway takes to start: process spawn until `/readyz` answers 200.

    python scripts/startup.py [--runs N]

Three configs, run interleaved so that machine noise falls on each alike, each a copy of the
sample config (`config/gateway.yaml`) with its ledger in a temp dir:

- `builtin`: the price database, its compiled copy already in the cache folder (every start
  after the first one of an installed genai-prices);
- `builtin, cold`: the price database with an empty cache folder (the first start, which
  imports genai-prices, compiles it and writes the copy);
- `table`: the sample YAML price table pinned (`pricing: config/pricing.yaml`).

Prints the median, fastest and slowest seconds of each. Only 127.0.0.1 is used; every wait is
bounded. Bytecode caches are allowed to be written (as `pip install` leaves them), whatever
PYTHONDONTWRITEBYTECODE says.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config_copy(folder: Path, pricing: str) -> Path:
    text = (REPO / "config" / "gateway.yaml").read_text()
    text = re.sub(r"(?m)^(\s*sqlite_path:).*$", rf"\1 {folder / 'ledger.sqlite3'}", text)
    text, replaced = re.subn(r"(?m)^pricing:.*$", f"pricing: {pricing}", text)
    if replaced != 1:
        raise SystemExit("config/gateway.yaml has no top-level `pricing:` line to replace")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(text)
    return path


def time_to_ready(config: Path, cache: Path) -> float:
    port = free_port()
    env = {**os.environ, "OPENAI_API_KEY": "sk-startup-bench", "GATEWAY_CACHE_DIR": str(cache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if process.poll() is not None:
                raise SystemExit(f"the gateway exited with {process.returncode}: {config}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.005)
        raise SystemExit(f"not ready within {READY_TIMEOUT_S:.0f} s: {config}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, choices=range(1, 51), metavar="N")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gateway-startup-") as tmp:
        root = Path(tmp)
        warm_cache = root / "cache"
        cases = {
            "builtin": (config_copy(root / "b", "{table: builtin}"), lambda _: warm_cache),
            "builtin, cold": (
                config_copy(root / "c", "{table: builtin}"),
                lambda run: root / f"cold-{run}",
            ),
            "table": (
                config_copy(root / "t", str(REPO / "config" / "pricing.yaml")),
                lambda _: warm_cache,
            ),  # fmt: skip
        }
        time_to_ready(cases["builtin"][0], warm_cache)  # bytecode and the compiled prices
        times: dict[str, list[float]] = {name: [] for name in cases}
        for run in range(args.runs):
            for name, (config, cache) in cases.items():
                times[name].append(time_to_ready(config, cache(run)))
    print(f"start-up to /readyz, {args.runs} runs each (seconds)")
    print(f"{'pricing':<16}{'median':>8}{'fastest':>9}{'slowest':>9}")
    for name, seconds in times.items():
        print(f"{name:<16}{statistics.median(seconds):>8.2f}{min(seconds):>9.2f}"
              f"{max(seconds):>9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

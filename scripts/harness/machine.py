"""What this machine says about the processes measured (/proc: CPU time, RSS, listen drops,
the rest of the machine's busy time), and how they are started, pinned and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.runtime import BenchError, tail

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
NOISY_CPU_PCT = 20.0  # a run is redone/flagged when the rest of the machine used this much CPU
QUIET_WINDOW_S = 1.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """A process and all its descendants (PostgreSQL's postmaster forks one per connection;
    as root it runs under `runuser`)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


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


def pin(pid: int, cpu: int | set[int]) -> None:
    """Pin every thread of a process to one CPU, or a set of them (like `taskset -a -p`)."""
    cpus = {cpu} if isinstance(cpu, int) else cpu
    try:
        tids = [int(entry) for entry in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


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

"""What bounds a benchmark run: its time budget, the hard alarm behind it, its progress lines
and log tails, and how it ends."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar


class BenchError(Exception):
    """The benchmark cannot go on (a process died, a check failed, time ran out)."""


class Budget:
    """The whole run's time limit, checked between phases and enforced inside them."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.started = time.monotonic()

    def remaining(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)

    def check(self, phase: str) -> None:
        if self.remaining() <= 0:
            raise BenchError(f"total runtime limit of {self.limit_s:.0f} s reached before {phase}")

    def run(self, runner: asyncio.Runner, make: Callable[[], Awaitable[Any]], phase: str) -> Any:
        self.check(phase)
        remaining = self.remaining()

        async def bounded() -> Any:
            try:
                async with asyncio.timeout(remaining):
                    return await make()
            except TimeoutError:
                raise BenchError(f"total runtime limit reached during {phase}") from None

        return runner.run(bounded())


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_guarded(
    body: Callable[[asyncio.Runner], None],
    workdir: Path,
    max_runtime_s: float,
    logs: str = "*.log",
    cleanup: Callable[[], None] | None = None,
) -> BaseException | None:
    """Run `body` on the gateway's event loop under a hard alarm. What stopped it, if anything,
    is returned after the last lines of each log under `workdir` (matching `logs`) are shown;
    `cleanup` runs last, either way, while the alarm still stands."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise BenchError("hard runtime limit reached")

    # A backstop in case a phase blocks outside the event loop's reach.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(max_runtime_s) + 60)
    from gateway.loop import new_event_loop

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            body(runner)
    except (BenchError, OSError, KeyboardInterrupt) as exc:
        for log in sorted(workdir.glob(logs)):
            if text := tail(log):
                progress(f"--- {log.name} (last lines)\n{text}")
        return exc
    finally:
        if cleanup is not None:
            cleanup()
        signal.alarm(0)
    return None


class Outcome(Protocol):
    """What a script measured: its load runs and the options it ran with."""

    @property
    def runs(self) -> list[Any]: ...

    @property
    def args(self) -> Any: ...


Measured = TypeVar("Measured", bound=Outcome)


def finish(
    program: str,
    failed: BaseException | None,
    outcome: Measured,
    show: Callable[[Measured], None],
    render: Callable[[Measured], str],
    write: Callable[[Path, str], None],
) -> int:
    """The exit status: 1 after a failure (what was measured is still shown), else 0 once the
    report is shown and, unless --no-write, its Markdown written to --out."""
    if failed is not None:
        print(f"{program}: aborted: {failed!r}", file=sys.stderr)
        if outcome.runs:
            show(outcome)
        return 1
    show(outcome)
    if not outcome.args.no_write:
        write(outcome.args.out, render(outcome))
        print(f"\nwrote {outcome.args.out}")
    return 0

"""What every command needs: its exit codes, its config loaded (or the problems printed and
exit 2), an event loop to run on, and reads against the configured ledger store."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config.loader import ConfigError, GatewayConfig, config_path_from, load_config
from gateway.ledger.readers import LedgerReader
from gateway.ledger.storage import open_reader
from gateway.loop import new_event_loop

T = TypeVar("T")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def load_or_exit(config_arg: str | None) -> GatewayConfig:
    try:
        return load_config(config_path_from(config_arg))
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def known_team(config: GatewayConfig, team: str) -> bool:
    if team in config.teams:
        return True
    print(f"unknown team '{team}' (teams: {', '.join(config.teams)})", file=sys.stderr)
    return False


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())  # type: ignore[arg-type]


def with_reader(config: GatewayConfig, read: Callable[[LedgerReader], Awaitable[T]]) -> T:
    """Run one command's reads against the configured store."""

    async def main() -> T:
        async with open_reader(config.storage) as reader:
            return await read(reader)

    return run_async(main)

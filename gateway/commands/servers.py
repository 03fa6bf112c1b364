"""The commands that run a server: `serve` (the gateway), `demo` (the fake upstream and a
gateway, offline) and `fake-upstream`. The development tools are imported only when their
command runs: the serving path never loads them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.commands.common import EXIT_FAILURE, EXIT_OK, load_or_exit, run_async
from gateway.config.loader import GatewayConfig, config_path_from


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging
    from gateway.server import ListenError, serve

    path = config_path_from(args.config)
    config = load_or_exit(args.config)
    setup_logging(config.log_level)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    if args.workers != 1:
        return _supervise(path, config, host, port, args.workers)
    in_group = args.worker_slot is not None  # one of `--workers N`: the port is shared
    try:
        run_async(lambda: serve(path, config, host, port, reuse_port=in_group))
    except ListenError as error:
        print(f"metering-gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _supervise(path: Path, config: GatewayConfig, host: str, port: int, workers: int) -> int:
    from gateway.front.workers import Supervisor, limits_needing_a_shared_store, worker_command

    if not 1 <= workers <= 64:
        print("metering-gateway: --workers takes 1 to 64", file=sys.stderr)
        return EXIT_FAILURE
    if limited := limits_needing_a_shared_store(config):
        shown = ", ".join(limited[:5]) + (", ..." if len(limited) > 5 else "")
        print(
            f"metering-gateway: --workers {workers} needs limits.backend: redis: limits kept in "
            f"each process's memory would each allow the whole limit ({shown} have limits)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if port == 0:
        print("metering-gateway: --workers needs a fixed port, not 0", file=sys.stderr)
        return EXIT_FAILURE
    print(f"metering-gateway: {workers} workers on http://{host}:{port}/v1", flush=True)
    return Supervisor(worker_command(path, host, port), workers).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.devtools.demo import run_demo

    logging.getLogger().setLevel(logging.WARNING)
    output: list[str] = []

    async def demo() -> None:
        output.append(await run_demo())

    run_async(demo)
    print(output[0])
    return EXIT_OK


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from gateway.devtools.fake_upstream import run_fake_upstream

    run_fake_upstream(args.host, args.port)
    return EXIT_OK

"""The commands that run a server: `serve` (the gateway), `demo` (the fake upstream and a
gateway, offline) and `fake-upstream`. The development tools are imported only when their
command runs: the serving path never loads them."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.commands.common import EXIT_FAILURE, EXIT_OK, load_or_exit, run_async
from gateway.config.loader import config_path_from


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging
    from gateway.server import ListenError, serve

    path = config_path_from(args.config)
    config = load_or_exit(args.config)
    setup_logging(config.log_level)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    try:
        run_async(lambda: serve(path, config, host, port))
    except ListenError as error:
        print(f"metering-gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


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

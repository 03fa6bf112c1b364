"""The `metering-gateway` command line: its argument parser and `main`; each command is a
function in `gateway.commands`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway.commands.billing import cmd_invoice, cmd_reconcile, cmd_report, cmd_reprice
from gateway.commands.common import EXIT_FAILURE, EXIT_USAGE
from gateway.commands.config_file import cmd_check_config, cmd_keys_new
from gateway.commands.export import cmd_export
from gateway.commands.keys import (
    cmd_keys_list,
    cmd_keys_new_stored,
    cmd_keys_renew,
    cmd_keys_revoke,
    cmd_keys_rotate,
)
from gateway.commands.prices import cmd_prices
from gateway.commands.servers import cmd_demo, cmd_fake_upstream, cmd_serve
from gateway.ledger.storage import StorageConfigError, StorageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-gateway",
        description="A metering, limiting gateway in front of the OpenAI API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    serve = commands.add_parser("serve", help="run the gateway")
    _config_option(serve)
    serve.add_argument("--host", help="listen address (default: listen.host)")
    serve.add_argument("--port", type=int, help="listen port (default: listen.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); limits then need limits.backend: redis",
    )
    serve.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(run=cmd_serve)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(run=cmd_check_config)

    keys = commands.add_parser("keys", help="manage gateway keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="command")
    new = key_commands.add_parser("new", help="mint a key and print its YAML entry")
    _config_option(new)
    new.add_argument("--team", required=True)
    new.add_argument("--id", help="key id (default: <team>-<n>)")
    new.add_argument("--expires", help="30d or YYYY-MM-DD (default: never)")
    new.add_argument(
        "--store",
        action="store_true",
        help="issue it in the ledger's database (as the admin API does), not as a YAML entry",
    )
    new.set_defaults(run=lambda args: (cmd_keys_new_stored if args.store else cmd_keys_new)(args))

    listing = key_commands.add_parser("list", help="config and API keys")
    _config_option(listing)
    listing.add_argument("--team")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(run=cmd_keys_list)
    renew = key_commands.add_parser("renew", help="move an API key's expiry")
    _config_option(renew)
    renew.add_argument("id")
    renew.add_argument("--expires", required=True, help="90d or YYYY-MM-DD")
    renew.set_defaults(run=cmd_keys_renew)
    revoke = key_commands.add_parser("revoke", help="revoke an API key everywhere")
    _config_option(revoke)
    revoke.add_argument("id")
    revoke.set_defaults(run=cmd_keys_revoke)
    rotate = key_commands.add_parser("rotate", help="a new secret for an API key")
    _config_option(rotate)
    rotate.add_argument("id")
    rotate.add_argument("--grace", help="how long the old secret keeps working: 90s, 30m, 1h, 2d")
    rotate.set_defaults(run=cmd_keys_rotate)

    report = commands.add_parser("report", help="usage and cost from the ledger")
    _config_option(report)
    report.add_argument("--since", help="YYYY-MM-DD, ISO time, or 7d / 12h ago")
    report.add_argument("--until", help="YYYY-MM-DD, ISO time, or 7d / 12h ago")
    report.add_argument("--by", default="team,key,model", help="team,key,model,day,status")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(run=cmd_report)

    invoice = commands.add_parser("invoice", help="one team's bill for a month")
    _config_option(invoice)
    invoice.add_argument("--team", required=True)
    invoice.add_argument("--month", required=True, help="YYYY-MM")
    invoice.add_argument("--format", choices=("table", "json", "csv"), default="table")
    invoice.set_defaults(run=cmd_invoice)

    reprice = commands.add_parser("reprice", help="recompute ledger costs under new prices")
    _config_option(reprice)
    reprice.add_argument("--since", required=True, help="YYYY-MM-DD, ISO time, or 7d ago")
    reprice.add_argument(
        "--pricing", help="builtin (the price database) or a table file (default: the config's)"
    )
    reprice.add_argument("--dry-run", action="store_true", help="report only, write nothing")
    reprice.set_defaults(run=cmd_reprice)

    prices = commands.add_parser("prices", help="the prices a call pays, from the price database")
    prices.add_argument("models", nargs="*", metavar="MODEL", help="models (default: every one)")
    prices.add_argument("--at", help="YYYY-MM-DD (UTC; default: today)")
    prices.add_argument("--tier", help="flex, priority, ... or batch (default: standard)")
    prices.add_argument("--format", choices=("table", "json"), default="table")
    prices.add_argument("--config", help="the prices this config charges (default: the database)")
    prices.set_defaults(run=cmd_prices)

    reconcile = commands.add_parser("reconcile", help="the gateway's figures beside OpenAI's")
    _config_option(reconcile)
    reconcile.add_argument("--month", required=True, help="YYYY-MM (UTC days)")
    reconcile.set_defaults(run=cmd_reconcile)

    export = commands.add_parser("export", help="send billable rows to the billing exports")
    _config_option(export)
    export.add_argument("--since", help="backfill rows started since: YYYY-MM-DD, ISO time, 7d")
    export.add_argument("--dry-run", action="store_true", help="count what would be sent")
    export.add_argument(
        "--resend", action="store_true", help="with --since: rows already delivered too"
    )
    export.add_argument("--status", action="store_true", help="each export's cursor, lag, errors")
    export.set_defaults(run=cmd_export)

    demo = commands.add_parser("demo", help="offline demo: fake upstream, gateway, report")
    demo.set_defaults(run=cmd_demo)

    fake = commands.add_parser("fake-upstream", help="an OpenAI-compatible fake upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=9797)
    fake.set_defaults(run=cmd_fake_upstream)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $GATEWAY_CONFIG, else config/gateway.yaml)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except StorageError as exc:  # the ledger's store, for every command that opens it
        print(f"{args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, StorageConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())

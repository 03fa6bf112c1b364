"""The `metering-gateway` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import TypeVar

import yaml

from gateway.config.loader import ConfigError, GatewayConfig, config_path_from, load_config
from gateway.ledger.readers import LedgerReader
from gateway.ledger.storage import StorageConfigError, StorageError, open_reader
from gateway.loop import new_event_loop

T = TypeVar("T")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _load(config_arg: str | None) -> GatewayConfig:
    try:
        return load_config(config_path_from(config_arg))
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _known_team(config: GatewayConfig, team: str) -> bool:
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


# ---------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging
    from gateway.server import ListenError, serve

    path = config_path_from(args.config)
    config = _load(args.config)
    setup_logging(config.log_level)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    try:
        run_async(lambda: serve(path, config, host, port))
    except ListenError as error:
        print(f"metering-gateway: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.access.keys import today_in

    config = _load(args.file)
    for warning in expired_key_warnings(config, args.file, today_in(config.limits_timezone)):
        print(warning, file=sys.stderr)
    for warning in unpriced_model_warnings(config, args.file):
        print(warning, file=sys.stderr)
    keys = sum(len(team.keys) for team in config.teams.values())
    print(f"{args.file}: ok ({len(config.teams)} teams, {keys} keys)")
    return EXIT_OK


def expired_key_warnings(config: GatewayConfig, filename: str, today: date) -> list[str]:
    """`FILE:LINE: warning: ...` for each key whose `expires` day is before `today` (the key
    still loads, and is refused with `key_expired`); LINE is its `expires:` line."""
    lines = _expires_lines(config.path)
    return [
        f"{filename}:{lines.get((team.name, key.id), 1)}: warning: key '{key.id}' of team "
        f"'{team.name}' expired on {key.expires.isoformat()}"
        for team in config.teams.values()
        for key in team.keys
        if key.expires is not None and key.expires < today
    ]


def unpriced_model_warnings(config: GatewayConfig, filename: str) -> list[str]:
    """`FILE:LINE: warning: ...` for each model a team's `models` allows that has no price of
    its own in what the team is priced with; LINE is the line of that model's name."""
    lines = _allowed_model_lines(config.path)
    warnings = []
    for team in config.teams.values():
        prices = config.team_prices(team.name)
        for model in sorted(team.models or ()):
            if prices.is_priced(model):
                continue
            found = prices.find(model)
            if prices.unknown_model == "reject":
                fate = "its calls are refused with 400 model_not_priced"
            elif found is not None:
                fate = f"priced as '{found[1]}', the nearest known model of its family"
            else:
                fate = "its calls cost 0"
            warnings.append(
                f"{filename}:{lines.get((team.name, model), 1)}: warning: model '{model}' allowed "
                f"for team '{team.name}' has no price ({fate})"
            )
    return sorted(warnings, key=lambda line: int(line[len(filename) + 1 :].split(":", 1)[0]))


def _team_items(path: Path, field: str) -> Iterator[tuple[str, yaml.Node]]:
    """(team, node) for each item of every team's `field` list in the YAML file, with its
    line numbers (a file that does not parse has none)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    teams = _entry(root, "teams")
    for team_key, team_node in teams.value if isinstance(teams, yaml.MappingNode) else []:
        items = _entry(team_node, field)
        for item in items.value if isinstance(items, yaml.SequenceNode) else []:
            yield team_key.value, item


def _allowed_model_lines(path: Path) -> dict[tuple[str, str], int]:
    """(team, model) → the line of that model in the team's `models` list (1-based)."""
    return {
        (team, item.value): item.start_mark.line + 1
        for team, item in _team_items(path, "models")
        if isinstance(item, yaml.ScalarNode)
    }


def _expires_lines(path: Path) -> dict[tuple[str, str], int]:
    """(team, key id) → the line of that key's `expires:` (1-based), read from the YAML."""
    found: dict[tuple[str, str], int] = {}
    for team, item in _team_items(path, "keys"):
        key_id, expires = _entry(item, "id"), _entry(item, "expires")
        if isinstance(key_id, yaml.ScalarNode) and expires is not None:
            found[(team, key_id.value)] = expires.start_mark.line + 1
    return found


def _entry(node: yaml.Node | None, name: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for key, value in node.value if key.value == name), None)


def cmd_keys_new(args: argparse.Namespace) -> int:
    from gateway.access.keys import mint_key, parse_expiry, today_in

    config = _load(args.config)
    if not _known_team(config, args.team):
        return EXIT_USAGE
    key_id = args.id or f"{args.team}-{len(config.teams[args.team].keys) + 1}"
    try:
        expires = (
            parse_expiry(args.expires, today_in(config.limits_timezone)) if args.expires else None
        )
    except ValueError:
        print(f"--expires: '{args.expires}' is not 30d or YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    key = mint_key(args.team, key_id, expires)
    print(f"key (shown once, store it now): {key.secret}")
    print(key.yaml_entry)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.access.keys import today_in
    from gateway.billing.reports import ReportQuery, key_lines, parse_when, render, usage_rows

    config = _load(args.config)
    zone = config.limits_timezone
    try:
        query = ReportQuery(
            by=[part.strip() for part in args.by.split(",") if part.strip()],
            since=parse_when(args.since, zone) if args.since else None,
            until=parse_when(args.until, zone) if args.until else None,
            zone=zone,
        )
        rows = with_reader(config, lambda reader: usage_rows(reader, query))
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(render(rows, args.format))
    if args.format == "table":
        print("\n".join(key_lines(config, today_in(zone))))
    return EXIT_OK


def cmd_invoice(args: argparse.Namespace) -> int:
    from gateway.billing.reports import build_invoice, month_bounds, render_invoice

    config = _load(args.config)
    if not _known_team(config, args.team):
        return EXIT_USAGE
    try:
        month_bounds(args.month, config.limits_timezone)
    except ValueError:
        print(f"--month: '{args.month}' is not YYYY-MM", file=sys.stderr)
        return EXIT_USAGE
    invoice = with_reader(
        config, lambda reader: build_invoice(reader, config, args.team, args.month)
    )
    print(render_invoice(invoice, args.format))
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


def cmd_reprice(args: argparse.Namespace) -> int:
    from gateway.billing.reports import parse_when
    from gateway.billing.reprice import reprice
    from gateway.pricing.book import BUILTIN, PriceBook
    from gateway.pricing.table import PricingError, load_price_table

    config = _load(args.config)
    try:
        if args.pricing is None:
            prices = config.pricing
        elif args.pricing == BUILTIN:
            prices = PriceBook.builtin(unknown_model=config.pricing.unknown_model)
        else:
            prices = PriceBook(load_price_table(args.pricing))
        since = parse_when(args.since, config.limits_timezone)
    except (PricingError, OSError, ValueError) as exc:
        print(f"reprice: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = with_reader(
        config, lambda reader: reprice(reader, config, prices, since, not args.dry_run)
    )
    print("\n".join(result.lines(applied=not args.dry_run)))
    return EXIT_OK


def cmd_prices(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from gateway.pricing.book import PriceBook, render_prices
    from gateway.pricing.table import PricingError

    try:
        on = date.fromisoformat(args.at) if args.at else datetime.now(UTC).date()
    except ValueError:
        print(f"--at: '{args.at}' is not YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    try:
        book = _load(args.config).pricing if args.config else PriceBook.builtin()
    except PricingError as exc:
        print(f"prices: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    entries, missing = [], []
    for model in args.models or book.listed_models():
        entry = book.describe(model, on=on, tier=args.tier)
        if entry is None:
            missing.append(model)
        else:
            entries.append(entry)
    if args.format == "json":
        print(json.dumps(entries, indent=2))
    else:
        print(render_prices(entries))
    for model in missing:
        print(f"prices: no price for '{model}'", file=sys.stderr)
    return EXIT_FAILURE if missing else EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    import os
    import urllib.error

    from gateway.billing.reconcile import ADMIN_KEY_ENV, reconcile, utc_month

    config = _load(args.config)
    admin_key = os.environ.get(ADMIN_KEY_ENV)
    if not admin_key:
        print(f"reconcile: set {ADMIN_KEY_ENV} to an OpenAI admin key", file=sys.stderr)
        return EXIT_USAGE
    try:
        utc_month(args.month)
    except ValueError:
        print(f"--month: '{args.month}' is not YYYY-MM", file=sys.stderr)
        return EXIT_USAGE
    try:
        lines = with_reader(config, lambda reader: reconcile(config, reader, args.month, admin_key))
    except (urllib.error.URLError, OSError) as exc:
        print(f"reconcile: the upstream's usage APIs could not be read: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(lines))
    return EXIT_OK


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from gateway.devtools.fake_upstream import run_fake_upstream

    run_fake_upstream(args.host, args.port)
    return EXIT_OK


# ---------------------------------------------------------------- parser


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
    new.set_defaults(run=cmd_keys_new)

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

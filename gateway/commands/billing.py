"""The commands that read the ledger: `report` (usage and cost), `invoice` (one team's month),
`reprice` (costs recomputed under other prices) and `reconcile` (the ledger beside OpenAI's own
usage and costs); the work itself is `gateway.billing`'s."""

from __future__ import annotations

import argparse
import sys

from gateway.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    known_team,
    load_or_exit,
    with_reader,
)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.access.keys import today_in
    from gateway.billing.reports import ReportQuery, key_lines, parse_when, render, usage_rows

    config = load_or_exit(args.config)
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

    config = load_or_exit(args.config)
    if not known_team(config, args.team):
        return EXIT_USAGE
    try:
        month_bounds(args.month, config.limits_timezone)
    except ValueError:
        print(f"--month: '{args.month}' is not YYYY-MM", file=sys.stderr)
        return EXIT_USAGE
    invoice = with_reader(
        config, lambda reader: build_invoice(reader, config, args.team, args.month)
    )
    text = render_invoice(invoice, args.format)
    print(text, end="" if text.endswith("\n") else "\n")  # a CSV ends with its own line end
    return EXIT_OK


def cmd_reprice(args: argparse.Namespace) -> int:
    from gateway.billing.reports import parse_when
    from gateway.billing.reprice import reprice
    from gateway.pricing.book import BUILTIN, PriceBook
    from gateway.pricing.errors import PricingError
    from gateway.pricing.table import load_price_table

    config = load_or_exit(args.config)
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


def cmd_reconcile(args: argparse.Namespace) -> int:
    import os
    import urllib.error

    from gateway.billing.reconcile import ADMIN_KEY_ENV, reconcile, utc_month

    config = load_or_exit(args.config)
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

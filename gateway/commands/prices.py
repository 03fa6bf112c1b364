"""The `prices` command: what a call to each model pays on a day and tier, from the price
database or from what a config charges."""

from __future__ import annotations

import argparse
import sys
from datetime import date

from gateway.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_or_exit


def cmd_prices(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from gateway.pricing.book import PriceBook
    from gateway.pricing.errors import PricingError
    from gateway.pricing.listing import render_prices

    try:
        on = date.fromisoformat(args.at) if args.at else datetime.now(UTC).date()
    except ValueError:
        print(f"--at: '{args.at}' is not YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    try:
        book = load_or_exit(args.config).pricing if args.config else PriceBook.builtin()
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

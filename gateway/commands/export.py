"""`metering-gateway export`: the billing exports by hand (SPEC "Billing export") — deliver
what is pending now, backfill from a date, preview, or show each export's state. It works
under the same lease as a running gateway's exporter, so the two never send at once."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

from gateway.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_or_exit, run_async
from gateway.config.loader import GatewayConfig
from gateway.export.exporter import Exporter, PassResult, make_exporters
from gateway.export.store import REFUSED, SKIPPED, ExportUnavailable
from gateway.ledger.storage import StorageError

LEASE_WAIT_S = 90.0  # a running gateway holds a lease only for one pass at a time
LISTED = 20


def cmd_export(args: argparse.Namespace) -> int:
    from gateway.billing.reports import parse_when

    config = load_or_exit(args.config)
    if not config.export:
        print(f"export: {config.path} configures no export (`export:`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = parse_when(args.since, config.limits_timezone) if args.since else None
    except ValueError as exc:
        print(f"export: --since: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_async(lambda: _run(config, args, since))
    except (ExportUnavailable, StorageError) as error:
        print(f"export: {error}", file=sys.stderr)
        return EXIT_FAILURE


async def _run(config: GatewayConfig, args: argparse.Namespace, since: float | None) -> int:
    exporters = make_exporters(config)
    store = exporters[0].store
    await store.open()
    try:
        failed = False
        for exporter in exporters:
            await exporter.start(loop_forever=False)
            try:
                if args.status:
                    await _print_status(exporter)
                elif args.dry_run:
                    result = await exporter.dry_run(since)
                    print(f"{exporter.label}: {result.would_send} row(s) would be sent"
                          f" ({result.skipped} skipped); nothing sent (--dry-run)")  # fmt: skip
                else:
                    result = await _under_lease(exporter, since, args.resend)
                    print(_summary(exporter, result))
                    failed = failed or not result.complete or result.refused > 0
            finally:
                await exporter.close()
        return EXIT_FAILURE if failed else EXIT_OK
    finally:
        await store.close()


async def _under_lease(exporter: Exporter, since: float | None, resend: bool) -> PassResult:
    deadline = time.monotonic() + LEASE_WAIT_S
    while True:
        if since is None:
            result = await exporter.deliver_pending()
        else:
            result = await exporter.backfill(since, resend=resend)
        if not result.held_elsewhere or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.5)


def _summary(exporter: Exporter, result: PassResult) -> str:
    line = (f"{exporter.label}: {result.sent} sent, {result.refused} refused,"
            f" {result.skipped} skipped; {exporter.lag} row(s) not yet acknowledged")  # fmt: skip
    if result.held_elsewhere:
        return f"{line}; another exporter held the lease for {LEASE_WAIT_S:.0f} s: try again"
    if result.outage is not None:
        return f"{line}; stopped: {exporter.config.kind} is not taking events ({result.outage})"
    if result.lost_lease:
        return f"{line}; stopped: the lease passed to another exporter"
    return line


async def _print_status(exporter: Exporter) -> None:
    store = exporter.store
    state = await store.state(exporter.label)
    assert state is not None
    lag = await exporter.refresh_lag()
    print(f"{exporter.label} ({state.kind}, {exporter.config.base_url})")
    print(f"  cursor: change {state.cursor[0]}, after {state.cursor[1] or '(start)'}")
    print(f"  delivered: {state.delivered} event(s), last {_when(state.last_delivered_at)}")
    print(f"  lag: {lag} billable row(s) not yet acknowledged")
    if state.holder and state.lease_until and state.lease_until > time.time():
        print(f"  lease: {state.holder} until {_when(state.lease_until)}")
    if state.last_error:
        print(f"  last error: {state.last_error} at {_when(state.last_error_at)}")
    for listed, title in ((REFUSED, "refused"), (SKIPPED, "skipped"),
                          ("repriced", "repriced after it was sent, not corrected")):  # fmt: skip
        count, rows = await store.listed(exporter.label, listed, LISTED)
        if not count:
            continue
        print(f"  {title}: {count} row(s)")
        for row in rows:
            detail = row.note or ""
            if listed == "repriced":
                detail = f"sent {row.value}, ledger now {row.ledger_value}"
            print(f"    {row.request_id}  {detail}")
        if count > len(rows):
            print(f"    ... and {count - len(rows)} more")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

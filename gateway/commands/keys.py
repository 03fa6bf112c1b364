"""`keys list`, `keys renew`, `keys revoke`, `keys rotate` and `keys new --store`: the keys
issued over the admin API, changed offline against the ledger's database like `report` reads
it. Running gateways put a change in force within `SYNC_INTERVAL_S`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.access.admin import KeyAdmin
from gateway.access.store import make_key_store
from gateway.billing.reports import plain_table
from gateway.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_or_exit, run_async
from gateway.errors import GatewayError

T = TypeVar("T")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _with_admin(args: argparse.Namespace, act: Callable[[KeyAdmin], Awaitable[T]]) -> T:
    config = load_or_exit(args.config)

    async def main() -> T:
        store = make_key_store(config.storage)
        await store.open()
        try:
            return await act(KeyAdmin(lambda: config, store))
        finally:
            await store.close()

    return run_async(main)


def _refused(args: argparse.Namespace, error: GatewayError) -> int:
    print(f"keys {args.keys_command}: {error.message}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_keys_list(args: argparse.Namespace) -> int:
    try:
        objects = _with_admin(args, lambda admin: admin.objects(args.team))
    except GatewayError as error:
        return _refused(args, error)
    if args.format == "json":
        print(json.dumps({"object": "list", "data": objects}, indent=2))
        return EXIT_OK
    rows = [
        {
            "id": key["id"], "team": key["team"], "source": key["source"],
            "expires": key["expires"] or "never", "revoked_at": key["revoked_at"] or "",
            "limits": ",".join(f"{k}={v}" for k, v in key["limits"].items()) or "-",
        }
        for key in objects
    ]  # fmt: skip
    print(plain_table(rows) if rows else "no keys")
    return EXIT_OK


def cmd_keys_renew(args: argparse.Namespace) -> int:
    try:
        row = _with_admin(args, lambda admin: admin.patch(args.id, args.expires, set_expires=True))
    except GatewayError as error:
        return _refused(args, error)
    print(f"{row.id}: expires {row.expires.isoformat() if row.expires else 'never'}")
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        _with_admin(args, lambda admin: admin.revoke(args.id))
    except GatewayError as error:
        return _refused(args, error)
    print(f"{args.id}: revoked")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    grace = parse_duration(args.grace) if args.grace else 0.0
    if grace is None:
        print(f"--grace: '{args.grace}' is not a duration like 90s, 30m, 1h or 2d", file=sys.stderr)
        return EXIT_USAGE
    try:
        row, secret = _with_admin(args, lambda admin: admin.rotate(args.id, grace))
    except GatewayError as error:
        return _refused(args, error)
    print(secret)  # alone on its first line, for scripts
    how = f"the old one works for {args.grace} more" if grace else "the old one no longer works"
    print(f"{row.id}: rotated; {how}", file=sys.stderr)
    return EXIT_OK


def cmd_keys_new_stored(args: argparse.Namespace) -> int:
    try:
        row, secret = _with_admin(
            args, lambda admin: admin.create(args.team, args.id, args.expires)
        )
    except GatewayError as error:
        return _refused(args, error)
    print(secret)
    expires = row.expires.isoformat() if row.expires else "never"
    print(f"{row.id}: a key of team {row.team}, expires {expires} (shown once)", file=sys.stderr)
    return EXIT_OK


def parse_duration(text: str) -> float | None:
    """`90s`, `30m`, `1h`, `2d` or plain seconds."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        return None
    return value * (unit or 1) if value >= 0 else None

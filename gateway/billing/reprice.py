"""`metering-gateway reprice`: recompute the ledger's costs under new prices.

Every row keeps its usage (tokens, tool calls, seconds, characters, bytes), its start time,
service tier and batch flag, so its cost can be recomputed exactly with the prices in force
when it started; teams' own `pricing:` overrides from the config are applied over the new
prices, as the gateway would.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from gateway.config.loader import GatewayConfig
from gateway.ledger.readers import LedgerReader
from gateway.ledger.rollups import UNSEAL, hour_of, unseal
from gateway.ledger.writer import CHANGE_SEQ, NOW_SEQ, TICK
from gateway.metering.usage import CallUsage
from gateway.pricing.arithmetic import format_usd
from gateway.pricing.book import PriceBook

# Every column: a ledger written before the unit columns existed reads them as absent (0).
_ROWS = "SELECT * FROM requests WHERE started_at >= ?"
_UPDATE = (
    "UPDATE requests SET cost_nanousd = ?, pricing_hash = ?, price_unknown = ? WHERE request_id = ?"
)
# A row whose cost changes is stamped with the change clock, moved on in the same transaction:
# the billing exports see it again and correct what they sent.
_UPDATE_CHANGED = _UPDATE.replace(" WHERE", f", {CHANGE_SEQ} = {NOW_SEQ} WHERE")


@dataclass
class RepriceResult:
    examined: int = 0
    changed: int = 0
    old_total: int = 0
    new_total: int = 0
    by_model: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def lines(self, applied: bool) -> list[str]:
        out = [
            f"{self.examined} rows examined, {self.changed} with a new cost "
            f"({'updated' if applied else 'dry run: nothing written'})",
            f"total: {format_usd(self.old_total)} -> {format_usd(self.new_total)} USD",
        ]
        for model, (rows, old, new) in sorted(self.by_model.items()):
            out.append(f"  {model or '(no model)'}: {rows} rows, {format_usd(old)} -> "
                       f"{format_usd(new)} USD")  # fmt: skip
        return out


def _books(config: GatewayConfig, base: PriceBook) -> dict[str | None, PriceBook]:
    books: dict[str | None, PriceBook] = {None: base}
    for name, team in config.teams.items():
        overrides = team.pricing_overrides
        books[name] = base.with_overrides(overrides) if overrides else base
    return books


async def reprice(
    reader: LedgerReader, config: GatewayConfig, prices: PriceBook, since: float, apply: bool
) -> RepriceResult:
    books = _books(config, prices)
    result = RepriceResult()
    updates, changed = [], []
    for row in await reader.rows(_ROWS, (since,)):
        book = books.get(row.get("team"), prices)
        model, old = row.get("model"), row.get("cost_nanousd") or 0
        new, priced = book.cost_of(
            CallUsage.from_mapping(row),
            model=model,
            at=row.get("started_at") or 0.0,
            service_tier=row.get("service_tier"),
            batch=bool(row.get("batch")),
            billable=200 <= (row.get("status") or 0) < 300,
        )
        result.examined += 1
        result.old_total += old
        result.new_total += new
        if new != old:
            result.changed += 1
            entry = result.by_model[model or ""]
            entry[0] += 1
            entry[1] += old
            entry[2] += new
        update = (new, book.content_hash, int(not priced), row["request_id"])
        (changed if new != old else updates).append(update)
    if apply and (updates or changed):
        # The rollups of the hours repriced are dropped before and after the change (a seal
        # in between would sum the old costs), so they are summed again from the new ones.
        await unseal_since(reader, since)
        await reader.transaction([(TICK, [()]), (_UPDATE, updates), (_UPDATE_CHANGED, changed)])
        await unseal_since(reader, since)
    return result


async def unseal_since(reader: LedgerReader, since: float) -> None:
    await reader.execute_many(UNSEAL, [(float(hour_of(since)), since)])
    for statement, params in unseal(since):
        await reader.execute_many(statement, [params])

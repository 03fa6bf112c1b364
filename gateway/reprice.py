"""`metering-gateway reprice`: recompute the ledger's costs under a new price table.

Every row keeps its tokens and bytes, so its cost can be recomputed exactly; teams' own
`pricing:` overrides from the config are applied over the new table, as the gateway would.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from gateway.pricing import PriceTable, format_usd
from gateway.readers import LedgerReader

_ROWS = """
SELECT request_id, team, model, status, input_tokens, cached_input_tokens, output_tokens,
       request_bytes, response_bytes, cost_nanousd
FROM requests WHERE started_at >= ?
"""
_UPDATE = (
    "UPDATE requests SET cost_nanousd = ?, pricing_hash = ?, price_unknown = ? WHERE request_id = ?"
)


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


def _tables(config: GatewayConfig, base: PriceTable) -> dict[str | None, PriceTable]:
    tables: dict[str | None, PriceTable] = {None: base}
    for name, team in config.teams.items():
        tables[name] = (
            base.with_overrides(team.pricing_overrides) if team.pricing_overrides else base
        )
    return tables


async def reprice(
    reader: LedgerReader, config: GatewayConfig, prices: PriceTable, since: float, apply: bool
) -> RepriceResult:
    tables = _tables(config, prices)
    result = RepriceResult()
    updates = []
    for row in await reader.tuples(_ROWS, (since,)):
        request_id, team, model, status, inp, cached, out, req, resp, old = row
        table = tables.get(team, prices)
        new, priced = table.cost_nanousd(
            model,
            input_tokens=inp or 0,
            cached_input_tokens=cached or 0,
            output_tokens=out or 0,
            request_bytes=req or 0,
            response_bytes=resp or 0,
            billable=200 <= (status or 0) < 300,
        )
        result.examined += 1
        result.old_total += old or 0
        result.new_total += new
        if new != (old or 0):
            result.changed += 1
            entry = result.by_model[model or ""]
            entry[0] += 1
            entry[1] += old or 0
            entry[2] += new
        updates.append((new, table.content_hash, int(not priced), request_id))
    if apply and updates:
        await reader.execute_many(_UPDATE, updates)
    return result

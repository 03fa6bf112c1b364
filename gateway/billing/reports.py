"""Usage reports from the ledger: grouped sums as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.access.keys import days_left
from gateway.config.loader import Billing, GatewayConfig
from gateway.ledger.readers import Dialect, LedgerReader, count_where
from gateway.pricing.arithmetic import format_usd

GROUPINGS: dict[str, str | None] = {
    "team": "team",
    "key": "key_id",
    "model": "model",
    "day": None,  # the calendar day in the query's zone, a dialect expression
    "status": "status",
    "outcome": "outcome",
    "shadow": "shadow_rejected_by",
}
_SUMS = [
    ("calls", "COUNT(*)"),
    ("errors", count_where("outcome != 'ok'")),
    ("input_tokens", "SUM(input_tokens)"),
    ("cached_input_tokens", "SUM(cached_input_tokens)"),
    ("output_tokens", "SUM(output_tokens)"),
    ("reasoning_tokens", "SUM(reasoning_tokens)"),
    ("estimated_calls", "SUM(tokens_estimated)"),
    ("shadow_refused", count_where("shadow_rejected_by IS NOT NULL")),
    ("request_bytes", "SUM(request_bytes)"),
    ("response_bytes", "SUM(response_bytes)"),
    ("cost_nanousd", "SUM(cost_nanousd)"),
]
# Units most calls do not have: a report or an invoice shows them only where they are not 0.
EXTRA_UNITS = (
    "cache_write_tokens", "audio_input_tokens", "audio_output_tokens", "image_input_tokens",
    "image_output_tokens", "rejected_prediction_tokens", "web_search_calls", "file_search_calls",
    "audio_seconds", "input_characters",
)  # fmt: skip
_EXTRA_SUMS = [*((name, f"SUM({name})") for name in EXTRA_UNITS), ("batch_calls", "SUM(batch)")]
_EXTRA_NAMES = tuple(name for name, _ in _EXTRA_SUMS)


def _without_zero_extras(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Drop the extra unit columns that are 0 in every row (so a plain chat report looks as
    it always did)."""
    unused = [name for name in _EXTRA_NAMES if not any(row.get(name) for row in rows)]
    for row in rows:
        for name in unused:
            row.pop(name, None)
    return rows


@dataclass(frozen=True)
class ReportQuery:
    by: Sequence[str] = ("team", "key", "model")
    since: float | None = None
    until: float | None = None
    zone: ZoneInfo = ZoneInfo("UTC")  # days are calendar days in this zone


def parse_when(value: str, zone: ZoneInfo, now: datetime | None = None) -> float:
    """`2026-11-01` (start of that day in `zone`), an ISO datetime, or `7d`/`12h` ago."""
    text = value.strip()
    now = now or datetime.now(UTC)
    if text[:-1].isdigit() and text[-1:] in ("d", "h", "m"):
        unit = {"d": "days", "h": "hours", "m": "minutes"}[text[-1]]
        return (now - timedelta(**{unit: int(text[:-1])})).timestamp()
    try:
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


async def usage_rows(reader: LedgerReader, query: ReportQuery) -> list[dict[str, object]]:
    unknown = [name for name in query.by if name not in GROUPINGS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)} (use {', '.join(GROUPINGS)})")
    groups = [f"{_grouping(name, reader.dialect, query)} AS {name}" for name in query.by]
    sums = [f"COALESCE({expr}, 0) AS {name}" for name, expr in _SUMS + _EXTRA_SUMS]
    where, params = [], []
    if query.since is not None:
        where.append("started_at >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("started_at < ?")
        params.append(query.until)
    sql = f"SELECT {', '.join(groups + sums)} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if query.by:
        order = ", ".join(str(i + 1) for i in range(len(query.by)))
        sql += f" GROUP BY {order} ORDER BY {reader.dialect.nulls_first(order)}"
    rows = _without_zero_extras(await reader.rows(sql, params))
    for row in rows:
        row["cost_usd"] = format_usd(int(row["cost_nanousd"]))
    return rows


def _grouping(name: str, dialect: Dialect, query: ReportQuery) -> str:
    return GROUPINGS[name] or dialect.local_day(query.zone)


def render(rows: list[dict[str, object]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return _csv(rows)
    return _table(rows)


def _csv(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


_TABLE_COLUMNS = {
    "calls": "calls",
    "errors": "errors",
    "input_tokens": "input",
    "cached_input_tokens": "cached",
    "output_tokens": "output",
    "reasoning_tokens": "reasoning",
    "request_bytes": "req bytes",
    "response_bytes": "resp bytes",
    "cost_usd": "cost USD",
    "shadow_refused": "shadow-refused",
}


def _table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "no calls in the ledger for this period"
    sums = dict(_SUMS + _EXTRA_SUMS)
    keys = [k for k in rows[0] if k not in _TABLE_COLUMNS and k not in sums]
    extras = [k for k in _EXTRA_NAMES if k in rows[0]]
    base = list(_TABLE_COLUMNS)
    at = base.index("cost_usd")
    columns = keys + base[:at] + extras + base[at:]
    titles = [*keys, *(_TABLE_COLUMNS[c] for c in base[:at]), *map(_extra_title, extras)]
    titles += [_TABLE_COLUMNS[c] for c in base[at:]]
    cells = [["-" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(t), *(len(r[i]) for r in cells)) for i, t in enumerate(titles)]
    numeric = [c not in keys for c in columns]

    def line(values: list[str]) -> str:
        cells = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in cells).rstrip()

    return "\n".join([line(titles), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _extra_title(name: str) -> str:
    return name.removesuffix("_tokens").replace("_", " ")


def key_lines(config: GatewayConfig, today: date) -> list[str]:
    """Each key's expiry, and whether it needs renewing (within `renew_warning_days`)."""
    lines = ["", "keys:"]
    for team in config.teams.values():
        for key in team.keys:
            left = days_left(key, today)
            if left is None:
                state = "no expiry"
            elif left < 0:
                state = f"EXPIRED on {key.expires}"
            elif left <= config.renew_warning_days:
                state = f"expires {key.expires} ({left}d left) - RENEW"
            else:
                state = f"expires {key.expires} ({left}d left)"
            lines.append(f"  {team.name}/{key.id}: {state}")
    return lines


# ---------------------------------------------------------------- invoices

_INVOICE_LINES = """
SELECT COALESCE(model, '') AS model, COUNT(*) AS calls,
       SUM(input_tokens) AS input_tokens, SUM(cached_input_tokens) AS cached_input_tokens,
       SUM(output_tokens) AS output_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
       SUM(request_bytes) AS request_bytes, SUM(response_bytes) AS response_bytes,
       SUM(cost_nanousd) AS amount_nanousd, {extras}
FROM requests
WHERE team = ? AND started_at >= ? AND started_at < ? AND status BETWEEN 200 AND 299
GROUP BY 1 ORDER BY 1
"""


def month_bounds(month: str, zone: ZoneInfo) -> tuple[float, float, int]:
    """Start and end (unix seconds) of a YYYY-MM month in `zone`, and its number of days."""
    first = datetime.strptime(month, "%Y-%m").replace(tzinfo=zone)
    following = (first + timedelta(days=32)).replace(day=1)
    return first.timestamp(), following.timestamp(), (following - first).days


async def build_invoice(reader: LedgerReader, config: GatewayConfig, team: str, month: str) -> dict:
    """The bill of one team for one month under its plan, exact in nano-USD."""
    start, end, days = month_bounds(month, config.limits_timezone)
    extras = ", ".join(f"COALESCE({expr}, 0) AS {name}" for name, expr in _EXTRA_SUMS)
    lines = _without_zero_extras(
        await reader.rows(_INVOICE_LINES.format(extras=extras), (team, start, end))
    )
    billing = config.teams[team].billing
    usage_total = sum(int(line["amount_nanousd"]) for line in lines)
    calls = sum(int(line["calls"]) for line in lines)
    adjustments = _plan_adjustments(billing, usage_total, calls, days)
    total = usage_total + sum(int(a["amount_nanousd"]) for a in adjustments)
    return {
        "team": team,
        "month": month,
        "plan": billing.plan,
        "currency": config.team_prices(team).currency,
        "lines": lines,
        "adjustments": adjustments,
        "total_nanousd": total,
        "total_usd": total / 1e9,
    }


def _plan_adjustments(billing: Billing, usage_total: int, calls: int, days: int) -> list[dict]:
    if billing.plan == "usage":
        return []
    rate = billing.rate_nanousd
    billed = calls
    description = f"{calls} calls x {format_usd(rate)} USD"
    if billing.plan == "capped_per_request":
        assert billing.max_requests_per_day is not None
        cap = billing.max_requests_per_day * days
        billed = min(calls, cap)
        description = (
            f"min({calls} calls, {billing.max_requests_per_day}/day x {days} days = {cap})"
            f" x {format_usd(rate)} USD"
        )
    return [
        {"description": f"usage charges replaced by plan {billing.plan}",
         "amount_nanousd": -usage_total},
        {"description": description, "amount_nanousd": billed * rate},
    ]  # fmt: skip


def render_invoice(invoice: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(invoice, indent=2)
    extras = [k for k in _EXTRA_NAMES if invoice["lines"] and k in invoice["lines"][0]]
    fields = [*_LINE_FIELDS[:-1], *extras, _LINE_FIELDS[-1]]
    rows = [
        {"item": line["model"] or "(no model)", **{k: line[k] for k in fields}}
        for line in invoice["lines"]
    ]
    rows += [
        {"item": adjustment["description"], "amount_nanousd": adjustment["amount_nanousd"]}
        for adjustment in invoice["adjustments"]
    ]
    rows.append({"item": "total", "amount_nanousd": invoice["total_nanousd"]})
    for row in rows:
        row["amount_usd"] = format_usd(int(row["amount_nanousd"]))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(
            out, fieldnames=["item", *fields, "amount_usd"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    header = (
        f"invoice: team {invoice['team']}, {invoice['month']}, plan {invoice['plan']}, "
        f"{invoice['currency']}"
    )
    table_rows = [{k: v for k, v in row.items() if k != "amount_nanousd"} for row in rows]
    return header + "\n\n" + plain_table(table_rows)


_LINE_FIELDS = (
    "calls", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "request_bytes", "response_bytes", "amount_nanousd",
)  # fmt: skip


def plain_table(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        first, *rest = zip(values, widths, strict=True)
        return "  ".join([first[0].ljust(first[1])] + [v.rjust(w) for v, w in rest]).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])

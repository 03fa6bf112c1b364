"""The `prices` command's views of what a model pays: one entry as JSON numbers of USD
(`price_entry`, what `prices --format json` prints) and the text table (`render_prices`).

Which prices apply (model, date, tier, batch) is decided by `PriceBook.describe`; this module
only turns the resolved integer pico-USD rates into exact decimal USD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from gateway.pricing.arithmetic import PICO_PER_USD, Tiered, UnitRates
from gateway.pricing.catalog_model import Resolved

_TOKEN_UNITS = ("input", "cached_input", "cache_write", "output", "audio_input", "audio_output",
                "image_input", "image_output")  # fmt: skip
_CALL_UNITS = ("web_search", "file_search")


def price_entry(
    model: str, source: str, tier: str, resolved: Resolved, fee: int, transfer: int
) -> dict[str, Any]:
    """One model's prices in the `prices --format json` shape: `resolved` rates at `tier`,
    `fee` nano-USD per call, `transfer` nano-USD per body byte."""
    entry: dict[str, Any] = {
        "model": model,
        "source": source,
        "valid_from": resolved.valid_from.isoformat() if resolved.valid_from else None,
        "tier": tier,
        "usd_per_million": _per_million(resolved.rates, None, resolved.halve),
        "usd_per_call": {
            unit: _usd(getattr(resolved.rates, unit), PICO_PER_USD, resolved.halve)
            for unit in _CALL_UNITS
        },
        "per_request": _number(Decimal(fee) / 10**9),
        "transfer_per_mb": _number(Decimal(transfer) / 1000),
    }
    # Only where the model has such prices, as `above_input_tokens`:
    if resolved.rates.audio_hour is not None:
        entry["usd_per_hour"] = {"audio": _usd(resolved.rates.audio_hour, PICO_PER_USD,
                                               resolved.halve)}  # fmt: skip
    if resolved.rates.input_character is not None:
        entry["usd_per_million_characters"] = {
            "input": _usd(resolved.rates.input_character, 10**6, resolved.halve)
        }
    starts = resolved.rates.tier_starts()
    if starts:
        entry["above_input_tokens"] = [
            {"threshold": start,
             "usd_per_million": _per_million(resolved.rates, start + 1, resolved.halve)}
            for start in starts
        ]  # fmt: skip
    return entry


def _per_million(rates: UnitRates, input_tokens: int | None, halve: bool) -> dict[str, Any]:
    out = {}
    for name in _TOKEN_UNITS:
        rate = getattr(rates, name)
        if isinstance(rate, Tiered):
            rate = rate.base if input_tokens is None else rate.at(input_tokens)
        out[name] = _usd(rate, 10**6, halve)
    return out


def _usd(pico: int | None, per_usd: int, halve: bool) -> int | float | None:
    if pico is None:
        return None
    return _number(Decimal(pico) / per_usd / (2 if halve else 1))


def _number(amount: Decimal) -> int | float:
    """A JSON number for an exact decimal amount (shortest form: 0.075, 10)."""
    return int(amount) if amount == amount.to_integral_value() else float(amount)


def render_prices(entries: Sequence[Mapping[str, Any]]) -> str:
    """The `prices --format table` view: USD per 1M tokens, per call, per MB."""
    header = ["model", "tier", "from", "input", "cached", "cache_write", "output", "audio_in",
              "audio_out", "image_in", "image_out", "web_search", "file_search",
              "per_request", "other"]  # fmt: skip
    rows = [header]
    for entry in entries:
        per_million = entry["usd_per_million"]
        values = [per_million[name] for name in _TOKEN_UNITS]
        if "above_input_tokens" in entry:
            for tier in entry["above_input_tokens"]:
                above = tier["usd_per_million"]
                values = [
                    f"{_text(v)} (>{tier['threshold']}: {_text(above[n])})" if above[n] != v else v
                    for v, n in zip(values, _TOKEN_UNITS, strict=True)
                ]
        rows.append(
            [entry["model"], entry["tier"], entry["valid_from"] or "-",
             *(_text(v) for v in values),
             *(_text(entry["usd_per_call"][unit]) for unit in _CALL_UNITS),
             _text(entry["per_request"]), _other(entry)]
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    return "\n".join([*lines, "USD per 1M tokens; web_search, file_search, per_request: per call"])


def _other(entry: Mapping[str, Any]) -> str:
    parts = []
    if "usd_per_hour" in entry:
        parts.append(f"{_text(entry['usd_per_hour']['audio'])}/hour of audio")
    if "usd_per_million_characters" in entry:
        parts.append(f"{_text(entry['usd_per_million_characters']['input'])}/1M characters")
    return ", ".join(parts) or "-"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(Decimal(str(value)).normalize(), "f")

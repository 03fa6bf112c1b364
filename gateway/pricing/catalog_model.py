"""One model of the price database, compiled: its dated and variant prices in integer
pico-USD, which of them a call pays (`CatalogModel.resolve`), and their JSON form on disk.

genai-prices' prices are compiled once, at load, into integer pico-USD (1e-12 USD): per token
(USD per 1M tokens × 10^6), per tool call (USD per 1000 calls × 10^9), per character (USD per
1M characters × 10^6) and per hour of audio (USD per hour × 10^12), each checked exact; a
price that is not a whole number of pico-USD at that scale is refused with `PricingError`.
After that a call is priced with integers only. The whole database is `gateway.pricing.catalog`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

from gateway.pricing.arithmetic import RATE_FIELDS, Rate, Tiered, UnitRates
from gateway.pricing.errors import PricingError

_EPOCH = date(1970, 1, 1)
_SECONDS_PER_DAY = 86_400

# genai-prices price key → (UnitRates field, pico-USD per unit for 1 USD of that key's price).
_PRICE_KEYS: dict[str, tuple[str, int]] = {
    "input_mtok": ("input", 10**6),
    "cache_read_mtok": ("cached_input", 10**6),
    "cache_write_mtok": ("cache_write", 10**6),
    "output_mtok": ("output", 10**6),
    "input_audio_mtok": ("audio_input", 10**6),
    "output_audio_mtok": ("audio_output", 10**6),
    "input_image_mtok": ("image_input", 10**6),
    "output_image_mtok": ("image_output", 10**6),
    "web_searches_kcount": ("web_search", 10**9),
    "storage_searches_kcount": ("file_search", 10**9),
    "input_mchars": ("input_character", 10**6),
    # Transcription is input audio by duration; `audio_hours` is the same price, unspecific.
    "input_audio_hours": ("audio_hour", 10**12),
    "audio_hours": ("audio_hour", 10**12),
}


def utc_day(at: float) -> int:
    """The UTC day (days since 1970-01-01) of a unix time: dated prices change at UTC midnight."""
    return int(at // _SECONDS_PER_DAY)


def day_number(on: date) -> int:
    """The days since 1970-01-01 of a date: `utc_day` of its start."""
    return (on - _EPOCH).days


@dataclass(frozen=True, slots=True)
class _Dated:
    """The standard prices from `start` (None: from always)."""

    start: date | None
    start_day: int | None
    rates: UnitRates


@dataclass(frozen=True, slots=True)
class _Variant:
    """Partial prices for a request context (`service_tier`, `processing: batch`)."""

    when: tuple[tuple[str, str], ...]
    start: date | None
    start_day: int | None
    rates: UnitRates  # None: not overridden

    @property
    def is_batch(self) -> bool:
        return ("processing", "batch") in self.when


@dataclass(frozen=True, slots=True)
class Resolved:
    """What one model charges on one day, at one tier, batch or not."""

    rates: UnitRates
    halve: bool  # batch without a batch price: 50% of the standard cost
    valid_from: date | None


@dataclass
class CatalogModel:
    """One model of the database, its prices in integer pico-USD."""

    id: str
    prices: tuple[_Dated, ...]
    variants: tuple[_Variant, ...]
    _resolved: dict[tuple[int, str | None, bool], Resolved] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def tiers(self) -> tuple[str, ...]:
        """The service tiers the database prices for this model."""
        found = dict.fromkeys(value for v in self.variants for key, value in v.when
                              if key == "service_tier")  # fmt: skip
        return tuple(found)

    def resolve(self, day: int, tier: str | None, batch: bool) -> Resolved:
        """The prices in force on `day` for `tier` (None: standard), as genai-prices resolves
        them: the last dated price that has started, then each matching variant in force,
        first to last, setting the prices it has that no earlier variant set."""
        key = (day, tier, batch)
        found = self._resolved.get(key)
        if found is not None:
            return found
        standard = self.prices[0]
        for dated in reversed(self.prices):
            if dated.start_day is None or day >= dated.start_day:
                standard = dated
                break
        rates, valid_from = standard.rates, standard.start
        context = {}
        if tier:
            context["service_tier"] = tier
        if batch:
            context["processing"] = "batch"
        batch_priced = False
        if context:
            overrides: dict[str, Any] = {}
            for variant in self.variants:
                if variant.start_day is not None and day < variant.start_day:
                    continue
                if not all(context.get(k) == v for k, v in variant.when):
                    continue
                batch_priced = batch_priced or variant.is_batch
                if variant.start is not None and (valid_from is None or variant.start > valid_from):
                    valid_from = variant.start
                for name in RATE_FIELDS:
                    value = getattr(variant.rates, name)
                    if value is not None:
                        overrides.setdefault(name, value)
            if overrides:
                rates = UnitRates(**overrides).over(rates)
        found = Resolved(rates, batch and not batch_priced, valid_from)
        if len(self._resolved) >= 64:
            self._resolved.clear()
        self._resolved[key] = found
        return found


# ---------------------------------------------------------------- from genai-prices' objects


def compile_model(info: Any) -> CatalogModel:
    """A genai-prices `ModelInfo` → CatalogModel, every price checked exact in pico-USD."""
    from genai_prices.types import ModelPrice as LibraryPrice

    where = f"genai-prices openai {info.id}"
    if isinstance(info.prices, LibraryPrice):
        dated = (_Dated(None, None, _rates(info.prices, where)),)
    else:
        dated = tuple(
            _Dated(*_start(c.constraint, where), _rates(c.prices, f"{where} ({c.constraint})"))
            for c in info.prices
        )
        if not dated:
            dated = (_Dated(None, None, UnitRates()),)
    variants = tuple(
        _Variant(tuple(v.when.items()), *_start(v.constraint, where),
                 _rates(v.prices, f"{where} {v.when}"))
        for v in info.price_variants or ()
    )  # fmt: skip
    return CatalogModel(info.id, dated, variants)


def _start(constraint: Any, where: str) -> tuple[date | None, int | None]:
    if constraint is None:
        return None, None
    start = getattr(constraint, "start_date", None)
    if not isinstance(start, date):
        raise PricingError(f"{where}: unsupported price constraint {constraint!r}")
    return start, day_number(start)


def _rates(prices: Any, where: str) -> UnitRates:
    values: dict[str, Any] = {}
    for key, value in prices.__dict__.items():
        if value is None or key not in _PRICE_KEYS:
            continue  # e.g. cache_audio_read_mtok: the ledger has no count for it
        name, scale = _PRICE_KEYS[key]
        if name in values:
            continue  # input_audio_hours before audio_hours
        values[name] = _exact_rate(value, scale, f"{where}.{key}")
    return UnitRates(**values)


def _exact_rate(value: Any, scale: int, where: str) -> int | Tiered:
    if hasattr(value, "tiers"):
        return Tiered(
            _exact(value.base, scale, where),
            tuple((int(t.start), _exact(t.price, scale, where)) for t in value.tiers),
        )
    return _exact(value, scale, where)


def _exact(value: Decimal, scale: int, where: str) -> int:
    amount = Decimal(value) * scale
    if not amount.is_finite() or amount < 0 or amount != amount.to_integral_value():
        raise PricingError(
            f"{where}: {value} USD is not a whole number of pico-USD per unit "
            f"(×{scale}); the gateway cannot bill it exactly"
        )
    return int(amount)


# ---------------------------------------------------------------- the JSON form on disk


def model_to_json(model: CatalogModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "prices": [[_date_json(d.start), _rates_json(d.rates)] for d in model.prices],
        "variants": [[list(map(list, v.when)), _date_json(v.start), _rates_json(v.rates)]
                     for v in model.variants],
    }  # fmt: skip


def model_from_json(data: Mapping[str, Any]) -> CatalogModel:
    prices = tuple(_Dated(*_start_from_json(start), _rates_from_json(rates))
                   for start, rates in data["prices"])  # fmt: skip
    variants = tuple(
        _Variant(tuple((str(k), str(v)) for k, v in when), *_start_from_json(start),
                 _rates_from_json(rates))
        for when, start, rates in data["variants"]
    )  # fmt: skip
    return CatalogModel(str(data["id"]), prices, variants)


def _date_json(start: date | None) -> str | None:
    return start.isoformat() if start else None


def _start_from_json(text: str | None) -> tuple[date | None, int | None]:
    if text is None:
        return None, None
    start = date.fromisoformat(text)
    return start, day_number(start)


def _rates_json(rates: UnitRates) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in RATE_FIELDS:
        value = getattr(rates, name)
        if isinstance(value, Tiered):
            out[name] = {"base": value.base, "tiers": [list(t) for t in value.tiers]}
        elif value is not None:
            out[name] = value
    return out


def _rates_from_json(data: Mapping[str, Any]) -> UnitRates:
    values: dict[str, Rate] = {}
    for name, value in data.items():
        if name not in RATE_FIELDS:
            raise ValueError(f"unknown rate {name!r}")
        if isinstance(value, dict):
            values[name] = Tiered(int(value["base"]),
                                  tuple((int(s), int(r)) for s, r in value["tiers"]))  # fmt: skip
        else:
            values[name] = int(value)
    return UnitRates(**values)

"""Price tables in integer nano-USD (1e-9 USD), and the integer arithmetic every price uses.

No float ever takes part in money arithmetic. A YAML table's prices are written as decimal USD:
per 1M tokens for models, per 10^6 body bytes for transfer, per call for the flat fee. 1 USD
per 1M tokens is exactly 1000 nano-USD per token, so every price with at most 3 decimals
becomes an exact integer; finer prices are refused.

The cost of a call's usage is computed in `usage_cost_nanousd` from `UnitRates`: integer
pico-USD (1e-12 USD) per token, per character and per tool call, per hour of audio. The exact
sum is rounded once, half up, to whole nano-USD (a batch call's half of it likewise, once);
transfer and per-call fees, whole nano-USD already, are added after. A unit without a price of
its own is billed at its parent's rate: cached input, cache writes, audio and image input at
the input rate; audio and image output at the output rate; reasoning and rejected-prediction
tokens are output (OpenAI counts both inside `completion_tokens` and bills them as output).
The price database over this arithmetic is `gateway.pricing.book`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import yaml

NANO_PER_USD = 10**9
# USD per 10^6 units (tokens or bytes) → nano-USD per unit.
NANO_PER_UNIT_PER_USD_PER_MILLION = NANO_PER_USD // 10**6
PICO_PER_NANO = 1000
PICO_PER_USD = 10**12
MS_PER_HOUR = 3_600_000
UNKNOWN_MODEL_POLICIES = ("estimate", "zero", "reject")

_TABLE_FIELDS = frozenset({"currency", "source", "transfer_per_mb", "per_request", "models"})
_MODEL_FIELDS = frozenset({"input", "cached_input", "output", "per_request", "transfer_per_mb"})
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
# What "the model's name without a date suffix" strips for family estimates (also 20250807).
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
NAME_CACHE_SIZE = 4096  # model names seen, per table: they come from clients, so it is bounded


def base_model_name(model: str) -> str:
    """A dated snapshot's base name (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`)."""
    return _SNAPSHOT_SUFFIX.sub("", model)


def nearest_family(model: str, names: Any) -> str | None:
    """The nearest known model of its family: the longest of `names` that the model's name,
    without a date suffix, starts with (`gpt-5-acme-preview` → `gpt-5`); None when none does."""
    stem = _DATE_SUFFIX.sub("", model)
    best: str | None = None
    for name in names:
        if stem.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best


class PricingError(ValueError):
    """A price table that cannot be used, saying what is wrong and where."""


# ---------------------------------------------------------------- usage and its arithmetic


class UsageLike(Protocol):
    """What a call used, counted as OpenAI reports it: `input_tokens` includes the cached,
    cache-write, audio and image input tokens; `output_tokens` includes the reasoning, audio,
    image and rejected-prediction tokens. `gateway.ledger.writer.CallRecord` has these fields; a
    missing or NULL field counts 0."""

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    request_bytes: int
    response_bytes: int


@dataclass(slots=True)
class CallUsage:
    """One call's usage, with the ledger's unit names (see `UsageLike` for how they nest)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    rejected_prediction_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
    audio_seconds: float = 0.0
    input_characters: int = 0
    request_bytes: int = 0
    response_bytes: int = 0

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> CallUsage:
        """From a ledger row read as a dict: absent columns and NULLs count 0."""
        return cls(**{name: row.get(name) or 0 for name in USAGE_FIELDS})


USAGE_FIELDS = tuple(f.name for f in fields(CallUsage))
_PRICED_UNITS = tuple(name for name in USAGE_FIELDS if not name.endswith("_bytes"))


@dataclass(frozen=True, slots=True)
class Tiered:
    """A long-context price: `base` until the prompt's input tokens exceed a tier's start, then
    that tier's price for every token of the call (genai-prices' and OpenAI's "cliff")."""

    base: int
    tiers: tuple[tuple[int, int], ...]  # (start, rate), ascending starts

    def at(self, input_tokens: int) -> int:
        rate = self.base
        for start, price in self.tiers:
            if input_tokens > start:
                rate = price
        return rate


Rate = int | Tiered


@dataclass(frozen=True, slots=True)
class UnitRates:
    """A model's prices as they apply to one call, in integer pico-USD (1e-12 USD): per token,
    per character, per tool call, per hour of audio. None: no price of its own (the parent's
    rate applies; a unit without a parent then costs nothing)."""

    input: Rate | None = None
    cached_input: Rate | None = None
    cache_write: Rate | None = None
    output: Rate | None = None
    audio_input: Rate | None = None
    audio_output: Rate | None = None
    image_input: Rate | None = None
    image_output: Rate | None = None
    web_search: int | None = None
    file_search: int | None = None
    audio_hour: int | None = None
    input_character: int | None = None

    def over(self, base: UnitRates) -> UnitRates:
        """These rates where set, else `base`'s (a tier's or batch's partial prices)."""
        return UnitRates(
            *(
                mine if (mine := getattr(self, name)) is not None else getattr(base, name)
                for name in RATE_FIELDS
            )
        )

    def tier_starts(self) -> tuple[int, ...]:
        return tuple(
            sorted(
                {
                    start
                    for name in RATE_FIELDS
                    if isinstance(rate := getattr(self, name), Tiered)
                    for start, _ in rate.tiers
                }
            )
        )


RATE_FIELDS = tuple(f.name for f in fields(UnitRates))


def _count(usage: object, name: str) -> int:
    value = getattr(usage, name, 0)
    return value if value and value > 0 else 0


def rate_at(rate: Rate | None, parent: int, input_tokens: int) -> int:
    """The rate a call with `input_tokens` pays: `rate`'s (its tier's), else its parent's."""
    if rate is None:
        return parent
    return rate if type(rate) is int else rate.at(input_tokens)  # type: ignore[union-attr]


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator to the nearest integer, halves up (both non-negative)."""
    return (2 * numerator + denominator) // (2 * denominator)


def usage_cost_nanousd(rates: UnitRates, usage: object, *, halve: bool = False) -> int:
    """The exact cost of a call's usage, rounded once, half up, to whole nano-USD; `halve`
    takes 50% of the exact cost before that one rounding (batch without a batch price).

    The parts of input (cached, cache write, audio, image) are taken out of it in that order,
    each at most what is left, so a reply that over-reports a part is never billed twice; the
    rest is billed at the input rate. Output likewise (audio, image; reasoning and rejected
    predictions stay at the output rate). Integers only, but for `audio_seconds`, which is
    taken to the millisecond first.
    """
    n = _count(usage, "input_tokens")
    input_rate = rate_at(rates.input, 0, n)
    pico = _parts_of(usage, n, input_rate, n, (
        ("cached_input_tokens", rates.cached_input),
        ("cache_write_tokens", rates.cache_write),
        ("audio_input_tokens", rates.audio_input),
        ("image_input_tokens", rates.image_input),
    ))  # fmt: skip
    output_rate = rate_at(rates.output, 0, n)
    pico += _parts_of(usage, _count(usage, "output_tokens"), output_rate, n, (
        ("audio_output_tokens", rates.audio_output),
        ("image_output_tokens", rates.image_output),
    ))  # fmt: skip

    if calls := _count(usage, "web_search_calls"):
        pico += calls * (rates.web_search or 0)
    if calls := _count(usage, "file_search_calls"):
        pico += calls * (rates.file_search or 0)
    if characters := _count(usage, "input_characters"):
        pico += characters * (rates.input_character or 0)
    denominator = PICO_PER_NANO * (2 if halve else 1)
    seconds = getattr(usage, "audio_seconds", 0)
    if seconds and seconds > 0 and rates.audio_hour:
        # An hour's price over whole milliseconds: exact with the denominator scaled to match.
        scaled = pico * MS_PER_HOUR + round(seconds * 1000) * rates.audio_hour
        return round_half_up(scaled, denominator * MS_PER_HOUR)
    return round_half_up(pico, denominator)


def _parts_of(
    usage: object,
    total: int,
    parent_rate: int,
    input_tokens: int,
    parts: tuple[tuple[str, Rate | None], ...],
) -> int:
    """pico-USD of `total` tokens: each part (a field of `usage` and its rate) taken out in
    order, at most what is left, at its own rate or else the parent's; the rest at the
    parent's."""
    pico = 0
    for unit, rate in parts:
        if count := min(_count(usage, unit), total):
            total -= count
            pico += count * rate_at(rate, parent_rate, input_tokens)
    return pico + total * parent_rate


def has_usage(usage: object) -> bool:
    """Whether the call used anything a price could apply to (tokens, calls, seconds...)."""
    return any((getattr(usage, name, 0) or 0) > 0 for name in _PRICED_UNITS)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices in nano-USD: per token, and optionally its own per-call fees.

    `per_request_nanousd` / `transfer_nanousd_per_byte` replace the table's values for this
    model when set; None means the table's values apply.
    """

    input_nanousd: int
    cached_input_nanousd: int
    output_nanousd: int
    per_request_nanousd: int | None = None
    transfer_nanousd_per_byte: int | None = None
    rates: UnitRates = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every other unit has no price of its own: billed at its parent's (input or output).
        object.__setattr__(
            self,
            "rates",
            UnitRates(
                input=self.input_nanousd * PICO_PER_NANO,
                cached_input=self.cached_input_nanousd * PICO_PER_NANO,
                output=self.output_nanousd * PICO_PER_NANO,
            ),
        )


class PricesByCounts:
    """`cost_nanousd` for callers that have only the classic counts (tokens and bytes), on
    any price source with a `cost_of`."""

    def cost_nanousd(
        self,
        model: str | None,
        *,
        input_tokens: int,
        cached_input_tokens: int,
        output_tokens: int,
        request_bytes: int,
        response_bytes: int,
        billable: bool,
        at: float | None = None,
    ) -> tuple[int, bool]:
        """(cost, priced) of a call with only these counts, at `at` (None: now), standard."""
        usage = CallUsage(
            input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens,
            output_tokens=output_tokens,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
        )
        when = at if at is not None else time.time()
        return self.cost_of(usage, model=model, at=when, billable=billable)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PriceTable(PricesByCounts):
    """A YAML price table. Used alone, a model it does not list is estimated as the nearest
    known model of its family (`nearest_family`), and flagged unpriced."""

    currency: str
    source: str
    transfer_nanousd_per_byte: int
    per_request_nanousd: int
    models: Mapping[str, ModelPrice]
    content_hash: str = field(init=False, repr=False, compare=False)
    _found: dict[str, tuple[ModelPrice, bool] | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "content_hash", _content_hash(self))

    def price_for(self, model: str | None) -> ModelPrice | None:
        """The model's price, else its base model's for a dated snapshot, else None."""
        if not model:
            return None
        found = self.models.get(model)
        if found is None:
            base = _SNAPSHOT_SUFFIX.sub("", model)
            found = self.models.get(base) if base != model else None
        return found

    def find(self, model: str | None) -> tuple[ModelPrice, bool] | None:
        """(price, estimated): the model's own price, else its family's (estimated), else None."""
        if not model:
            return None
        try:
            return self._found[model]
        except KeyError:
            pass
        price = self.price_for(model)
        found: tuple[ModelPrice, bool] | None = (price, False) if price is not None else None
        if found is None and (family := nearest_family(model, self.models)) is not None:
            found = (self.models[family], True)
        if len(self._found) >= NAME_CACHE_SIZE:
            self._found.clear()
        self._found[model] = found
        return found

    def is_priced(self, model: str | None) -> bool:
        """Whether the model has a price of its own (a call without a model needs none)."""
        return not model or self.price_for(model) is not None

    def known_models(self) -> frozenset[str]:
        return frozenset(self.models)

    def with_overrides(self, overrides: Mapping[str, Any], origin: str = "pricing") -> PriceTable:
        """This table under a team's `pricing:` mapping (same shape, every field optional)."""
        team = _parse_partial(overrides, origin)
        currency = team.get("currency", self.currency)
        if currency != self.currency:
            raise PricingError(
                f"pricing.currency: {currency!r} differs from the global {self.currency!r}"
            )
        return PriceTable(
            currency=currency,
            source=team.get("source", self.source),
            transfer_nanousd_per_byte=team.get("transfer", self.transfer_nanousd_per_byte),
            per_request_nanousd=team.get("per_request", self.per_request_nanousd),
            models={**self.models, **team.get("models", {})},
        )

    def fees(self, price: ModelPrice | None) -> tuple[int, int]:
        """(nano-USD per body byte, nano-USD per call) for a call priced with `price`."""
        if price is None:
            return self.transfer_nanousd_per_byte, self.per_request_nanousd
        return (
            _first_set(price.transfer_nanousd_per_byte, self.transfer_nanousd_per_byte),
            _first_set(price.per_request_nanousd, self.per_request_nanousd),
        )

    def cost_of(
        self,
        usage: UsageLike,
        *,
        model: str | None,
        at: float | None = None,
        service_tier: str | None = None,
        batch: bool = False,
        billable: bool = True,
    ) -> tuple[int, bool]:
        """(cost in nano-USD, priced) of one call: P = D·C_D + usage·prices + fee.

        A table has one price per model at every date and tier (`at` and `service_tier` do
        not change it); `batch` bills 50% of the usage's exact cost, rounded once. `priced` is
        False when the model has no price of its own (estimated or unknown); the transfer and
        per-call fees are charged all the same. A call without a model and without usage
        (e.g. GET /v1/models) has nothing unpriced.
        """
        if not billable:
            return 0, True
        found = self.find(model)
        price = found[0] if found is not None else None
        transfer, fee = self.fees(price)
        usage_cost = usage_cost_nanousd(price.rates, usage, halve=batch) if price else 0
        priced = (found is not None and not found[1]) or (not model and not has_usage(usage))
        return call_fees(usage, transfer, fee) + usage_cost, priced


    def token_rates_picousd(
        self, model: str | None, *, at: float | None = None, input_tokens: int = 0
    ) -> tuple[int, int] | None:
        """(input, output) pico-USD per token the model's call would pay (its family's for an
        estimate), or None without a price: for budgets before the call is made."""
        found = self.find(model)
        if found is None:
            return None
        rates = found[0].rates
        return rate_at(rates.input, 0, input_tokens), rate_at(rates.output, 0, input_tokens)


def call_fees(usage: object, transfer_nanousd_per_byte: int, per_request_nanousd: int) -> int:
    """Transfer (request + response body bytes) and the flat fee, in nano-USD."""
    moved = _count(usage, "request_bytes") + _count(usage, "response_bytes")
    return moved * transfer_nanousd_per_byte + per_request_nanousd


def _first_set(value: int | None, default: int) -> int:
    return default if value is None else value


def format_usd(nanousd: int) -> str:
    """Exact decimal USD: at most 9 decimals, trailing zeros trimmed down to 2."""
    sign = "-" if nanousd < 0 else ""
    whole, fraction = divmod(abs(nanousd), NANO_PER_USD)
    decimals = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


# ---------------------------------------------------------------- loading and validation


def load_price_table(
    source: str | Path | Mapping[str, Any], base_dir: Path | None = None
) -> PriceTable:
    """A price table from a YAML file (relative paths resolve against `base_dir`) or inline."""
    if isinstance(source, Mapping):
        return parse_price_table(source, "pricing")
    path = Path(source)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    text = path.read_text(encoding="utf-8")
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PricingError(f"{path}: not valid YAML: {exc}") from exc
    return parse_price_table({} if mapping is None else mapping, str(path))


def parse_price_table(mapping: Mapping[str, Any], origin: str) -> PriceTable:
    """A complete table: fees default to 0, currency to USD, models to none."""
    parts = _parse_partial(mapping, origin)
    return PriceTable(
        currency=parts.get("currency", "USD"),
        source=parts.get("source", ""),
        transfer_nanousd_per_byte=parts.get("transfer", 0),
        per_request_nanousd=parts.get("per_request", 0),
        models=parts.get("models", {}),
    )


def _parse_partial(mapping: Any, origin: str) -> dict[str, Any]:
    """The fields present in a table mapping, validated and converted to nano-USD."""
    if not isinstance(mapping, Mapping):
        raise PricingError(f"{origin}: must be a mapping, not {type(mapping).__name__}")
    _refuse_unknown(mapping, _TABLE_FIELDS, origin)
    parts: dict[str, Any] = {}
    for name in ("currency", "source"):
        if name in mapping:
            parts[name] = _text(mapping[name], f"{origin}: {name}")
    if "transfer_per_mb" in mapping:
        parts["transfer"] = _per_million(mapping["transfer_per_mb"], f"{origin}: transfer_per_mb")
    if "per_request" in mapping:
        parts["per_request"] = _per_call(mapping["per_request"], f"{origin}: per_request")
    if "models" in mapping:
        parts["models"] = _models(mapping["models"], origin)
    return parts


def _models(value: Any, origin: str) -> dict[str, ModelPrice]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PricingError(f"{origin}: models: must be a mapping of model name to prices")
    prices = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name:
            raise PricingError(f"{origin}: models: model names must be non-empty strings")
        prices[name] = _model_price(spec, f"{origin}: models.{name}")
    return prices


def _model_price(spec: Any, where: str) -> ModelPrice:
    if not isinstance(spec, Mapping) or not spec:
        raise PricingError(
            f"{where}: must be a mapping with input, cached_input, output (USD per 1M tokens)"
        )
    _refuse_unknown(spec, _MODEL_FIELDS, where)
    input_price = _per_million(spec.get("input", 0), f"{where}.input")
    cached = spec.get("cached_input")
    return ModelPrice(
        input_nanousd=input_price,
        cached_input_nanousd=input_price
        if cached is None
        else _per_million(cached, f"{where}.cached_input"),
        output_nanousd=_per_million(spec.get("output", 0), f"{where}.output"),
        per_request_nanousd=_optional(spec, "per_request", where, _per_call),
        transfer_nanousd_per_byte=_optional(spec, "transfer_per_mb", where, _per_million),
    )


def _optional(spec: Mapping[str, Any], name: str, where: str, convert: Any) -> int | None:
    value = spec.get(name)
    return None if value is None else convert(value, f"{where}.{name}")


def _refuse_unknown(mapping: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in known)
    if unknown:
        raise PricingError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PricingError(f"{where}: must be a string")
    return value


def _per_million(value: Any, where: str) -> int:
    return _to_nano(value, NANO_PER_UNIT_PER_USD_PER_MILLION, where, "per unit")


def _per_call(value: Any, where: str) -> int:
    return _to_nano(value, NANO_PER_USD, where, "per call")


def _to_nano(value: Any, scale: int, where: str, unit: str) -> int:
    """A decimal USD amount × scale, which must come out a whole number of nano-USD."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise PricingError(f"{where}: must be a number of USD, not {value!r}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:  # pragma: no cover - str() of a number always parses
        raise PricingError(f"{where}: {value!r} is not a number") from exc
    if not amount.is_finite():
        raise PricingError(f"{where}: must be a finite number, not {value!r}")
    if amount < 0:
        raise PricingError(f"{where}: must not be negative (got {value})")
    nano = amount * scale
    if nano != nano.to_integral_value():
        raise PricingError(
            f"{where}: {value} is not a whole number of nano-USD {unit} "
            f"(at most {_decimals(scale)} decimals)"
        )
    return int(nano)


def _decimals(scale: int) -> int:
    return len(str(scale)) - 1


def _content_hash(table: PriceTable) -> str:
    """sha256 of everything that affects a cost; `source` is informational and left out."""
    canonical = {
        "currency": table.currency,
        "transfer_nanousd_per_byte": table.transfer_nanousd_per_byte,
        "per_request_nanousd": table.per_request_nanousd,
        "models": {
            name: [
                price.input_nanousd,
                price.cached_input_nanousd,
                price.output_nanousd,
                price.per_request_nanousd,
                price.transfer_nanousd_per_byte,
            ]
            for name, price in table.models.items()
        },
    }
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()

"""YAML price tables (`PriceTable`): a model's prices in integer nano-USD (1e-9 USD).

A table's prices are written as decimal USD: per 1M tokens for models, per 10^6 body bytes
for transfer, per call for the flat fee. 1 USD per 1M tokens is exactly 1000 nano-USD per
token, so every price with at most 3 decimals becomes an exact integer; finer prices are
refused. A table prices calls alone, or as the overrides over the price database in a
`gateway.pricing.book.PriceBook`; the cost arithmetic is `gateway.pricing.arithmetic`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.pricing.arithmetic import (
    NANO_PER_UNIT_PER_USD_PER_MILLION,
    NANO_PER_USD,
    PICO_PER_NANO,
    UnitRates,
    UsageLike,
    call_fees,
    has_usage,
    usage_cost_nanousd,
)
from gateway.pricing.errors import PricingError
from gateway.pricing.names import base_model_name, nearest_family, remember
from gateway.pricing.price_source import PricesByCounts

_TABLE_FIELDS = frozenset({"currency", "source", "transfer_per_mb", "per_request", "models"})
_MODEL_FIELDS = frozenset({"input", "cached_input", "output", "per_request", "transfer_per_mb"})


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
            base = base_model_name(model)
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
        remember(self._found, model, found)
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

    def _standard_rates(self, model: str | None, at: float | None) -> UnitRates | None:
        """A table has one price per model at every date: `at` does not change it."""
        found = self.find(model)
        return found[0].rates if found is not None else None


def _first_set(value: int | None, default: int) -> int:
    return default if value is None else value


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

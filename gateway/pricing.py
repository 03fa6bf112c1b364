"""The price table, in integer nano-USD end to end (no float ever touches money).

Prices are written as decimal USD per 1M tokens (per 10^6 bytes for transfer); 1 USD per 1M
tokens is exactly 1000 nano-USD per token, so any price with 3 decimals is an exact integer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

NANO_PER_USD = 10**9
NANO_PER_TOKEN_PER_USD_PER_MILLION = 1000  # USD/1M tokens → nano-USD/token
_MODEL_FIELDS = {"input", "cached_input", "output"}
_TABLE_FIELDS = {"currency", "source", "transfer_per_mb", "per_request", "models"}
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class PricingError(ValueError):
    """A price table that cannot be used, with what is wrong in it."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """nano-USD per token."""

    input: int
    cached_input: int
    output: int


@dataclass(frozen=True)
class PriceTable:
    currency: str = "USD"
    source: str = ""
    transfer_nanousd_per_byte: int = 0
    per_request_nanousd: int = 0
    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    content_hash: str = ""

    def price_for(self, model: str | None) -> ModelPrice | None:
        """The exact model's price, else its base model's (dated snapshots)."""
        if not model:
            return None
        found = self.models.get(model)
        if found is None:
            found = self.models.get(_SNAPSHOT_SUFFIX.sub("", model))
        return found

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
    ) -> tuple[int, bool]:
        """P = D·C_D + tokens·prices + fee; (cost, whether the model had a price)."""
        price = self.price_for(model)
        if not billable:
            return 0, True
        cost = (request_bytes + response_bytes) * self.transfer_nanousd_per_byte
        cost += self.per_request_nanousd
        if price is not None:
            cached = min(cached_input_tokens, input_tokens)
            cost += (input_tokens - cached) * price.input
            cost += cached * price.cached_input
            cost += output_tokens * price.output
        has_tokens = input_tokens or output_tokens
        return cost, price is not None or not has_tokens

    def with_overrides(self, overrides: Mapping[str, Any]) -> PriceTable:
        """A team's `pricing:` mapping over this table: its models and fees replace ours."""
        if not isinstance(overrides, Mapping):
            raise PricingError("pricing must be a mapping")
        team = parse_price_table(overrides, "team pricing")
        models = {**self.models, **team.models}
        merged = replace(
            self,
            models=models,
            transfer_nanousd_per_byte=team.transfer_nanousd_per_byte
            if "transfer_per_mb" in overrides
            else self.transfer_nanousd_per_byte,
            per_request_nanousd=team.per_request_nanousd
            if "per_request" in overrides
            else self.per_request_nanousd,
        )
        return replace(merged, content_hash=_hash_of(merged))


def _nano(value: Any, scale: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PricingError(f"{what}: must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise PricingError(f"{what}: '{value}' is not a number") from exc
    if amount < 0:
        raise PricingError(f"{what}: must not be negative")
    nano = amount * scale
    if nano != nano.to_integral_value():
        raise PricingError(f"{what}: {value} is finer than 1 nano-USD per unit")
    return int(nano)


def _model_price(name: str, spec: Any) -> ModelPrice:
    if not isinstance(spec, Mapping):
        raise PricingError(f"models.{name}: must be a mapping of input/cached_input/output")
    unknown = set(spec) - _MODEL_FIELDS
    if unknown:
        raise PricingError(f"models.{name}: unknown field(s) {', '.join(sorted(unknown))}")
    scale = NANO_PER_TOKEN_PER_USD_PER_MILLION
    input_price = _nano(spec.get("input", 0), scale, f"models.{name}.input")
    return ModelPrice(
        input=input_price,
        cached_input=_nano(spec["cached_input"], scale, f"models.{name}.cached_input")
        if spec.get("cached_input") is not None
        else input_price,
        output=_nano(spec.get("output", 0), scale, f"models.{name}.output"),
    )


def parse_price_table(mapping: Mapping[str, Any], origin: str) -> PriceTable:
    if not isinstance(mapping, Mapping):
        raise PricingError(f"{origin}: a price table must be a mapping")
    unknown = set(mapping) - _TABLE_FIELDS
    if unknown:
        raise PricingError(f"{origin}: unknown field(s) {', '.join(sorted(unknown))}")
    models = mapping.get("models") or {}
    if not isinstance(models, Mapping):
        raise PricingError(f"{origin}: models must be a mapping")
    table = PriceTable(
        currency=str(mapping.get("currency", "USD")),
        source=str(mapping.get("source", "")),
        transfer_nanousd_per_byte=_nano(
            mapping.get("transfer_per_mb", 0),
            NANO_PER_TOKEN_PER_USD_PER_MILLION,
            "transfer_per_mb",
        ),
        per_request_nanousd=_nano(mapping.get("per_request", 0), NANO_PER_USD, "per_request"),
        models={str(name): _model_price(str(name), spec) for name, spec in models.items()},
    )
    return replace(table, content_hash=_hash_of(table))


def _hash_of(table: PriceTable) -> str:
    canonical = {
        "currency": table.currency,
        "transfer": table.transfer_nanousd_per_byte,
        "per_request": table.per_request_nanousd,
        "models": {
            name: [p.input, p.cached_input, p.output] for name, p in sorted(table.models.items())
        },
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def load_price_table(source: str | Path | Mapping[str, Any]) -> PriceTable:
    """A price table from a YAML file's path, or from the mapping itself (inline config)."""
    if isinstance(source, Mapping):
        return parse_price_table(source, "pricing")
    path = Path(source)
    with path.open(encoding="utf-8") as handle:
        return parse_price_table(yaml.safe_load(handle) or {}, str(path))


def format_usd(nanousd: int) -> str:
    """Exact decimal USD: at least 2 decimals, at most 9, no trailing zeros past 2."""
    sign = "-" if nanousd < 0 else ""
    whole, fraction = divmod(abs(nanousd), NANO_PER_USD)
    digits = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"

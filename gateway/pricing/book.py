"""The price book: OpenAI's prices from the maintained genai-prices database, under overrides.

The database (`gateway.pricing.catalog`) is compiled into integer pico-USD once, at load;
after that a call is priced with integers only (`gateway.pricing.arithmetic`).

Rounding: a call's usage cost is summed exactly (in pico-USD, durations in milliseconds) and
rounded once, half up, to whole nano-USD; a batch call without a batch price in the database
pays 50% of that exact sum, rounded once. The per-call fee and transfer (`per_request`,
`transfer_per_mb`, whole nano-USD already) are added after and are never halved.

What applies to a call (`PriceBook.cost_of`):
- the model: an override entry of that name wins (it replaces the database's entry whole, at
  every date and tier, and also covers every name the database resolves to the entry whose id
  is the override's name); else genai-prices' own matching of OpenAI model names (dated
  snapshots such as `gpt-4o-mini-2024-07-18` resolve), cached per name; else a dated
  snapshot's base name among the overrides; else `unknown_model`: `estimate` prices it as the
  nearest known model of its family (`gateway.pricing.names.nearest_family`; none: 0), `zero`
  prices its usage 0, `reject` does the same where a caller still prices it (the caller
  answers 400 `model_not_priced` first: `is_priced`). Either way the row is flagged unpriced.
- the date: the database's dated prices (`ConditionalPrice` with `StartDateConstraint`) in force
  on the UTC day of the call's start;
- the tier: the `service_tier` the response reports selects the database's price variants
  (`flex`, `priority`, ...); none, or one the database has no prices for, is the standard tier;
- batch: the database's batch price variant where it has one in force (units it leaves out keep
  the standard price, as the database says), else 50% of the standard cost;
- long context: a tiered price (above N input tokens) applies to every token of a call whose
  input exceeds N, as the database says.
- units: see `gateway.pricing.arithmetic.usage_cost_nanousd`; a unit without a price of its own
  is billed at its parent's rate (cached input, cache write, audio and image input → input;
  audio and image output → output). OpenAI's per-modality cached prices (cached audio or image
  tokens of Realtime models) are not used: the ledger counts cached tokens as one number,
  priced as cached (text) input.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from gateway.pricing.arithmetic import (
    UnitRates,
    UsageLike,
    call_fees,
    has_usage,
    usage_cost_nanousd,
)
from gateway.pricing.catalog import Catalog, builtin_catalog
from gateway.pricing.catalog_model import CatalogModel, Resolved, day_number, utc_day
from gateway.pricing.errors import PricingError
from gateway.pricing.listing import price_entry
from gateway.pricing.names import base_model_name, nearest_family, remember
from gateway.pricing.price_source import PricesByCounts
from gateway.pricing.table import ModelPrice, PriceTable, parse_price_table

BUILTIN = "builtin"
STANDARD_TIER = "standard"
BATCH_TIER = "batch"  # `prices --tier batch`: Batch API prices
UNKNOWN_MODEL_POLICIES = ("estimate", "zero", "reject")

_Found = tuple[ModelPrice | CatalogModel, str | None]  # (price, family it was estimated from)


@dataclass(frozen=True)
class PriceBook(PricesByCounts):
    """What a config charges: the database (or none: a table alone), an override table over it
    (models replace whole entries; `transfer_per_mb` / `per_request` apply), and what happens
    to a model neither knows. `config.team_prices(team)` gives one per team."""

    table: PriceTable
    catalog: Catalog | None = None
    unknown_model: str = "estimate"
    content_hash: str = field(init=False, repr=False, compare=False)
    _found: dict[str, _Found | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _families: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unknown_model not in UNKNOWN_MODEL_POLICIES:
            raise PricingError(f"unknown_model: must be one of {', '.join(UNKNOWN_MODEL_POLICIES)}")
        if self.catalog is not None and self.table.currency != "USD":
            raise PricingError(
                f"overrides: currency {self.table.currency!r}: the price database is in USD"
            )
        names = frozenset(self.table.models) | (self.catalog.names if self.catalog else set())
        object.__setattr__(self, "_families", names)
        object.__setattr__(self, "content_hash", self._hash())

    @classmethod
    def builtin(
        cls, overrides: PriceTable | None = None, unknown_model: str = "estimate"
    ) -> PriceBook:
        """The database, under an override table (none: the database alone)."""
        table = overrides if overrides is not None else parse_price_table({}, "overrides")
        return cls(table, builtin_catalog(), unknown_model)

    def _hash(self) -> str:
        if self.catalog is None and self.unknown_model == "estimate":
            return self.table.content_hash  # a table alone hashes as it always has
        canonical = {
            "database": self.catalog.identity if self.catalog else None,
            "table": self.table.content_hash,
            "unknown_model": self.unknown_model,
        }
        encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()

    # ---- what the rest of the gateway reads

    @property
    def currency(self) -> str:
        return self.table.currency

    @property
    def source(self) -> str:
        if self.catalog is None:
            return self.table.source
        return self.catalog.source + (f"; overrides: {self.table.source}" if self.table.source
                                      else "")  # fmt: skip

    @property
    def transfer_nanousd_per_byte(self) -> int:
        return self.table.transfer_nanousd_per_byte

    @property
    def per_request_nanousd(self) -> int:
        return self.table.per_request_nanousd

    def known_models(self) -> frozenset[str]:
        """Every name with a price of its own that can be listed (regex matches aside)."""
        return self._families

    def with_overrides(self, overrides: Mapping[str, Any], origin: str = "pricing") -> PriceBook:
        """This book under a team's `pricing:` mapping (the table shape, every field optional)."""
        return PriceBook(
            self.table.with_overrides(overrides, origin), self.catalog, self.unknown_model
        )

    # ---- models

    def _known(self, model: str) -> ModelPrice | CatalogModel | None:
        table = self.table.models
        own = table.get(model)
        if own is not None:
            return own
        if self.catalog is not None:
            entry = self.catalog.find(model) or self.catalog.by_id.get(model)
            if entry is not None:
                return table.get(entry.id, entry)
        base = base_model_name(model)
        return table.get(base) if base != model else None

    def find(self, model: str | None) -> _Found | None:
        """(price, None) for a model with a price of its own; (price, family) for an estimate
        under `unknown_model: estimate`; None otherwise. Cached per name, bounded."""
        if not model:
            return None
        try:
            return self._found[model]
        except KeyError:
            pass
        price = self._known(model)
        found: _Found | None = (price, None) if price is not None else None
        if found is None and self.unknown_model == "estimate":
            # The database's names are lower case (its matching ignores case); a table's as written.
            family = nearest_family(model, self._families) or nearest_family(
                model.lower(), self._families
            )
            estimate = self._known(family) if family is not None else None
            if estimate is not None and family is not None:
                found = (estimate, family)
        remember(self._found, model, found)
        return found

    def is_priced(self, model: str | None) -> bool:
        """Whether the model has a price of its own (a call without a model needs none). Under
        `unknown_model: reject` the caller answers 400 `model_not_priced` when it has not."""
        if not model:
            return True
        found = self.find(model)
        return found is not None and found[1] is None

    def resolve(
        self, price: ModelPrice | CatalogModel, day: int, tier: str | None, batch: bool
    ) -> Resolved:
        if isinstance(price, ModelPrice):
            return Resolved(price.rates, batch, None)
        return price.resolve(day, tier, batch)

    # ---- costs

    def cost_of(
        self,
        usage: UsageLike,
        *,
        model: str | None,
        at: float,
        service_tier: str | None = None,
        batch: bool = False,
        billable: bool = True,
    ) -> tuple[int, bool]:
        """(cost in nano-USD, priced) of one call started at `at` (unix seconds), served at
        `service_tier` (as the response reports it; None: standard), `batch` for Batch API
        usage. `priced` is False when the model has no price of its own (estimated, zero or
        rejected); transfer and the per-call fee are charged all the same. A call without a
        model and without usage (e.g. GET /v1/models) has nothing unpriced."""
        if not billable:
            return 0, True
        found = self.find(model)
        if found is None:
            transfer, fee = self.table.fees(None)
            return call_fees(usage, transfer, fee), not model and not has_usage(usage)
        price, family = found
        transfer, fee = self.table.fees(price if isinstance(price, ModelPrice) else None)
        resolved = self.resolve(price, utc_day(at), service_tier, batch)
        cost = usage_cost_nanousd(resolved.rates, usage, halve=resolved.halve)
        return call_fees(usage, transfer, fee) + cost, family is None

    def _standard_rates(self, model: str | None, at: float | None) -> UnitRates | None:
        found = self.find(model)
        if found is None:
            return None
        when = at if at is not None else time.time()
        return self.resolve(found[0], utc_day(when), None, False).rates

    # ---- the `prices` command

    def listed_models(self) -> list[str]:
        """Every model the book prices: the database's, then the override table's own."""
        ids = [model.id for model in self.catalog.models] if self.catalog else []
        return ids + [name for name in self.table.models if name not in set(ids)]

    def describe(self, model: str, *, on: date, tier: str | None = None) -> dict[str, Any] | None:
        """The prices a call to `model` pays on `on` at `tier` (None: standard; `batch`: the
        Batch API's), in the `prices --format json` shape; None for a model without a price."""
        found = self.find(model)
        if found is None:
            return None
        price, family = found
        batch = tier == BATCH_TIER
        resolved = self.resolve(price, day_number(on), None if batch else tier, batch)
        if isinstance(price, ModelPrice):
            source = self.table.source or "pricing table"
            transfer, fee = self.table.fees(price)
        else:
            source = self.catalog.source if self.catalog else ""
            transfer, fee = self.table.fees(None)
        if family is not None:
            source = f"estimated as {family} ({source})"
        return price_entry(model, source, tier or STANDARD_TIER, resolved, fee, transfer)

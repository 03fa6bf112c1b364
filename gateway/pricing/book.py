"""The price book: OpenAI's prices from the maintained genai-prices database, under overrides.

The database is the `genai-prices` package's own packaged snapshot (nothing is downloaded at
run time; upgrading the package is how new prices arrive). Its OpenAI models are compiled once,
at load, into integer pico-USD (1e-12 USD): per token (USD per 1M tokens × 10^6), per tool call
(USD per 1000 calls × 10^9), per character (USD per 1M characters × 10^6) and per hour of audio
(USD per hour × 10^12), each checked exact; a price that is not a whole number of pico-USD at
that scale is refused with `PricingError`. After that a call is priced with integers only.

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
  nearest known model of its family (`gateway.pricing.table.nearest_family`; none: 0), `zero`
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
- units: see `gateway.pricing.table.usage_cost_nanousd`; a unit without a price of its own is billed
  at its parent's rate (cached input, cache write, audio and image input → input; audio and
  image output → output). OpenAI's per-modality cached prices (cached audio or image tokens of
  Realtime models) are not used: the ledger counts cached tokens as one number, priced as
  cached (text) input.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from gateway.pricing.table import (
    NAME_CACHE_SIZE,
    PICO_PER_USD,
    RATE_FIELDS,
    UNKNOWN_MODEL_POLICIES,
    CallUsage,
    ModelPrice,
    PricesByCounts,
    PriceTable,
    PricingError,
    Rate,
    Tiered,
    UnitRates,
    UsageLike,
    base_model_name,
    call_fees,
    has_usage,
    nearest_family,
    parse_price_table,
    rate_at,
    usage_cost_nanousd,
)

CATALOG_FORMAT = 1  # of the compiled copy on disk: bump when its layout or meaning changes

__all__ = [
    "CallUsage",
    "Catalog",
    "CatalogModel",
    "PriceBook",
    "PricingError",
    "UsageLike",
    "builtin_catalog",
]

BUILTIN = "builtin"
STANDARD_TIER = "standard"
BATCH_TIER = "batch"  # `prices --tier batch`: Batch API prices
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
_TOKEN_UNITS = ("input", "cached_input", "cache_write", "output", "audio_input", "audio_output",
                "image_input", "image_output")  # fmt: skip
_CALL_UNITS = ("web_search", "file_search")


def _day(at: float) -> int:
    """The UTC day (days since 1970-01-01) of a unix time: dated prices change at UTC midnight."""
    return int(at // _SECONDS_PER_DAY)


def _day_of(on: date) -> int:
    return (on - _EPOCH).days


# ---------------------------------------------------------------- the compiled database


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


class Catalog:
    """genai-prices' OpenAI provider, compiled: its models, their dated and variant prices in
    integer pico-USD, and their name-matching rules (evaluated as genai-prices does, cached
    per name). Built from the package (`from_library`) or from its compiled copy on disk
    (`builtin_catalog`): importing the package takes longer than the rest of start-up."""

    def __init__(
        self,
        models: tuple[CatalogModel, ...],
        matches: tuple[Clause, ...],
        version: str,
        digest: str,
    ) -> None:
        self.models = models
        self.matches = matches
        self.version = version
        self.digest = digest
        self.by_id = {model.id: model for model in models}
        self.names = frozenset(
            name for model, clause in zip(models, matches, strict=True)
            for name in (model.id.lower(), *_literal_names(clause))
        )  # fmt: skip
        starts = [d.start for m in models for d in (*m.prices, *m.variants) if d.start]
        self.data_date: date | None = max(starts, default=None)
        self._found: dict[str, CatalogModel | None] = {}

    @classmethod
    def from_library(cls, provider: Any, version: str) -> Catalog:
        models = tuple(_compile(info) for info in provider.models)
        matches = tuple(_clause(info.match, f"genai-prices openai {info.id}")
                        for info in provider.models)  # fmt: skip
        digest = hashlib.sha256(
            json.dumps([_model_json(m) for m in models], sort_keys=True).encode()
            + json.dumps(matches).encode()
        ).hexdigest()
        return cls(models, matches, version, digest)

    @property
    def identity(self) -> str:
        """What the ledger's `pricing_hash` names: package version, data date, content."""
        return f"genai-prices {self.version} openai {self.data_date} {self.digest}"

    @property
    def source(self) -> str:
        return f"genai-prices {self.version}"

    def find(self, model: str) -> CatalogModel | None:
        """The database's model for a name, matched as genai-prices' `Provider.find_model`
        does: case-insensitively, first rule that matches; failing that, once more with a
        compact date suffix (`-20251211`) spelled `-2025-12-11`. Cached, bounded."""
        try:
            return self._found[model]
        except KeyError:
            pass
        name = model.lower()
        found = self._first_match(name)
        if found is None and (dashed := _dashed_dates(name)) != name:
            found = self._first_match(dashed)
        if len(self._found) >= NAME_CACHE_SIZE:
            self._found.clear()
        self._found[model] = found
        return found

    def _first_match(self, name: str) -> CatalogModel | None:
        for model, clause in zip(self.models, self.matches, strict=True):
            if _matches(clause, name):
                return model
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "version": self.version,
            "digest": self.digest,
            "models": [_model_json(m) for m in self.models],
            "matches": list(self.matches),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Catalog:
        if data.get("format") != CATALOG_FORMAT:
            raise ValueError(f"catalog format {data.get('format')!r}, not {CATALOG_FORMAT}")
        models = tuple(_model_from_json(m) for m in data["models"])
        matches = tuple(_clause_from_json(c) for c in data["matches"])
        return cls(models, matches, data["version"], data["digest"])


# A name-matching rule, as plain data: ("equals" | "starts_with" | "ends_with" | "contains" |
# "regex", text) or ("or" | "and", (rule, ...)).
Clause = tuple[str, Any]
_TEXT_CLAUSES = ("equals", "starts_with", "ends_with", "contains", "regex")
_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")


def _clause(rule: Any, where: str) -> Clause:
    for kind in _TEXT_CLAUSES:
        if isinstance(text := getattr(rule, kind, None), str):
            return (kind, text if kind == "regex" else text.lower())
    for kind in ("or", "and"):
        children = getattr(rule, kind + "_", None)
        if children is not None:
            return (kind, tuple(_clause(child, where) for child in children))
    raise PricingError(f"{where}: unsupported model-name rule {rule!r}")


def _clause_from_json(data: Sequence[Any]) -> Clause:
    kind, value = data
    if kind in _TEXT_CLAUSES:
        return (kind, str(value))
    if kind in ("or", "and"):
        return (kind, tuple(_clause_from_json(child) for child in value))
    raise ValueError(f"unknown rule {kind!r}")


def _matches(clause: Clause, name: str) -> bool:
    """Whether a lower-cased model name matches a rule (texts other than regexes are stored
    lower-cased; a regex is searched in the lower-cased name, as genai-prices does)."""
    kind, value = clause
    if kind == "equals":
        return name == value
    if kind == "starts_with":
        return name.startswith(value)
    if kind == "ends_with":
        return name.endswith(value)
    if kind == "contains":
        return value in name
    if kind == "regex":
        return re.search(value, name) is not None
    if kind == "or":
        return any(_matches(child, name) for child in value)
    return all(_matches(child, name) for child in value)


def _literal_names(clause: Clause) -> Iterable[str]:
    """The names a rule spells out whole (equals, starts_with): what `known_models` lists."""
    kind, value = clause
    if kind in ("equals", "starts_with"):
        yield value
    elif kind == "or":
        for child in value:
            yield from _literal_names(child)


def _dashed_dates(name: str) -> str:
    def dashed(found: re.Match[str]) -> str:
        year, month, day = (int(found.group(i)) for i in range(2, 5))
        try:
            date(year, month, day)
        except ValueError:
            return found.group(0)
        return f"{found.group(1)}{year:04d}-{month:02d}-{day:02d}"

    return _COMPACT_DATE.sub(dashed, name)


def _model_json(model: CatalogModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "prices": [[_date_json(d.start), _rates_json(d.rates)] for d in model.prices],
        "variants": [[list(map(list, v.when)), _date_json(v.start), _rates_json(v.rates)]
                     for v in model.variants],
    }  # fmt: skip


def _model_from_json(data: Mapping[str, Any]) -> CatalogModel:
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
    return start, _day_of(start)


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


@cache
def builtin_catalog() -> Catalog:
    """The packaged database (never a downloaded or custom snapshot), compiled once per
    installed package and kept compiled on disk (`compiled_catalog_path`), so that a start
    does not import genai-prices (a third of a second) unless the package changed."""
    path = compiled_catalog_path()
    if path is not None:
        try:
            return Catalog.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not there yet, or unreadable: compile it anew
    catalog = _catalog_from_package()
    if path is not None:
        _write_quietly(path, json.dumps(catalog.to_json(), separators=(",", ":")).encode())
    return catalog


def _catalog_from_package() -> Catalog:
    from genai_prices import __version__
    from genai_prices.data import providers

    provider = next((p for p in providers if p.id == "openai"), None)
    if provider is None:  # pragma: no cover - the package always has OpenAI
        raise PricingError(f"genai-prices {__version__} has no OpenAI prices")
    return Catalog.from_library(provider, __version__)


def compiled_catalog_path() -> Path | None:
    """Where the compiled database of the installed genai-prices lives: the cache folder
    (`$GATEWAY_CACHE_DIR`, else `$XDG_CACHE_HOME/metering-gateway`, else
    `~/.cache/metering-gateway`), named by a hash of the package's data, its matching code,
    its installed version and this compiler's format. None: the package cannot be found."""
    spec = importlib.util.find_spec("genai_prices")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    key = hashlib.sha256(str(CATALOG_FORMAT).encode())
    try:
        for part in ("data.py", "types.py"):
            key.update((package / part).read_bytes())
        key.update(repr(sorted(p.name for p in package.parent.glob("genai_prices-*.dist-info")))
                   .encode())  # fmt: skip
    except OSError:
        return None
    return _cache_dir() / f"genai-prices-{key.hexdigest()[:20]}.json"


def _cache_dir() -> Path:
    if configured := os.environ.get("GATEWAY_CACHE_DIR"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metering-gateway"


def _write_quietly(path: Path, data: bytes) -> None:
    """Write atomically, or not at all (a read-only home only costs the next start time)."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".catalog-", delete=False) as f:
            temporary = f.name
            f.write(data)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from a container's user
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _compile(info: Any) -> CatalogModel:
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
    return start, _day_of(start)


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


# ---------------------------------------------------------------- the book


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
        if len(self._found) >= NAME_CACHE_SIZE:
            self._found.clear()
        self._found[model] = found
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
        resolved = self.resolve(price, _day(at), service_tier, batch)
        cost = usage_cost_nanousd(resolved.rates, usage, halve=resolved.halve)
        return call_fees(usage, transfer, fee) + cost, family is None

    def token_rates_picousd(
        self, model: str | None, *, at: float | None = None, input_tokens: int = 0
    ) -> tuple[int, int] | None:
        """(input, output) pico-USD per token a standard call would pay (its family's for an
        estimate), or None without a price: for budgets before the call is made."""
        found = self.find(model)
        if found is None:
            return None
        when = at if at is not None else time.time()
        rates = self.resolve(found[0], _day(when), None, False).rates
        return rate_at(rates.input, 0, input_tokens), rate_at(rates.output, 0, input_tokens)

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
        resolved = self.resolve(price, _day_of(on), None if batch else tier, batch)
        if isinstance(price, ModelPrice):
            source = self.table.source or "pricing table"
            transfer, fee = self.table.fees(price)
        else:
            source = self.catalog.source if self.catalog else ""
            transfer, fee = self.table.fees(None)
        if family is not None:
            source = f"estimated as {family} ({source})"
        entry: dict[str, Any] = {
            "model": model,
            "source": source,
            "valid_from": resolved.valid_from.isoformat() if resolved.valid_from else None,
            "tier": tier or STANDARD_TIER,
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

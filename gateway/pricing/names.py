"""Model names as clients send them, matched to a priced model.

A dated snapshot's base name (`base_model_name`), the nearest known model of a family for an
estimate (`nearest_family`), genai-prices' name-matching rules held as plain data (`Clause`),
and the bound on every per-name cache (`remember`): the names come from clients.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any, TypeVar

from gateway.pricing.errors import PricingError

NAME_CACHE_SIZE = 4096  # model names seen, per table: they come from clients, so it is bounded
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
# What "the model's name without a date suffix" strips for family estimates (also 20250807).
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")

Found = TypeVar("Found")


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


def remember(cache: dict[str, Found], name: str, found: Found) -> None:
    """Keep what a name was found to be, emptying the cache first when it is full."""
    if len(cache) >= NAME_CACHE_SIZE:
        cache.clear()
    cache[name] = found


# ---------------------------------------------------------------- genai-prices' matching rules

# A name-matching rule, as plain data: ("equals" | "starts_with" | "ends_with" | "contains" |
# "regex", text) or ("or" | "and", (rule, ...)).
Clause = tuple[str, Any]
_TEXT_CLAUSES = ("equals", "starts_with", "ends_with", "contains", "regex")
_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")


def clause_of(rule: Any, where: str) -> Clause:
    """A genai-prices `match` rule as plain data (texts but regexes lower-cased)."""
    for kind in _TEXT_CLAUSES:
        if isinstance(text := getattr(rule, kind, None), str):
            return (kind, text if kind == "regex" else text.lower())
    for kind in ("or", "and"):
        children = getattr(rule, kind + "_", None)
        if children is not None:
            return (kind, tuple(clause_of(child, where) for child in children))
    raise PricingError(f"{where}: unsupported model-name rule {rule!r}")


def clause_from_json(data: Sequence[Any]) -> Clause:
    """A rule as the compiled copy on disk holds it (a JSON list) → Clause."""
    kind, value = data
    if kind in _TEXT_CLAUSES:
        return (kind, str(value))
    if kind in ("or", "and"):
        return (kind, tuple(clause_from_json(child) for child in value))
    raise ValueError(f"unknown rule {kind!r}")


def clause_matches(clause: Clause, name: str) -> bool:
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
        return any(clause_matches(child, name) for child in value)
    return all(clause_matches(child, name) for child in value)


def literal_names(clause: Clause) -> Iterable[str]:
    """The names a rule spells out whole (equals, starts_with): what `known_models` lists."""
    kind, value = clause
    if kind in ("equals", "starts_with"):
        yield value
    elif kind == "or":
        for child in value:
            yield from literal_names(child)


def dashed_dates(name: str) -> str:
    """A compact date suffix (`-20251211`) spelled as the database's names are (`-2025-12-11`)."""

    def dashed(found: re.Match[str]) -> str:
        year, month, day = (int(found.group(i)) for i in range(2, 5))
        try:
            date(year, month, day)
        except ValueError:
            return found.group(0)
        return f"{found.group(1)}{year:04d}-{month:02d}-{day:02d}"

    return _COMPACT_DATE.sub(dashed, name)

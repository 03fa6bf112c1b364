"""The readers of `pricing` (the global price book) and `teams.<team>.pricing` (a team's own
prices over it): custom keys (`fields.custom`), since their values are price books."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config.fields import Key, accepted
from gateway.config.nodes import Problems, mapping, plain
from gateway.config.reader import Context, read_entries
from gateway.pricing.book import BUILTIN, PriceBook
from gateway.pricing.errors import PricingError
from gateway.pricing.table import load_price_table


def read_prices(
    key: Key, node: yaml.Node | None, where: str, problems: Problems, context: Context
) -> dict[str, Any]:
    """`pricing`: absent → the database; a path or an inline table → that table alone (unknown
    models estimated); a mapping of the keys `key.section` declares (`{table, overrides,
    unknown_model}`) → a table (default: the database) under an override table."""
    book = _prices(key, node, where, problems, context)
    context.prices = book
    return {key.field: book}


def read_team_prices(
    key: Key, node: yaml.Node | None, where: str, problems: Problems, context: Context
) -> dict[str, Any]:
    """`teams.<team>.pricing`: the global book under the team's table, and the table as
    written (a reload applies it over a new global table)."""
    if node is None or context.prices is None:
        return {}
    overrides = None
    try:
        overrides = plain(node)
        prices = context.prices.with_overrides(overrides)
    except (PricingError, ValueError, TypeError, AttributeError) as exc:
        problems.add(node, f"{where}: {exc}")
        return {"pricing_overrides": overrides}
    return {key.field: prices, "pricing_overrides": overrides}


def _prices(
    key: Key, node: yaml.Node | None, where: str, problems: Problems, context: Context
) -> PriceBook | None:
    if node is None:
        return PriceBook.builtin()
    assert key.section is not None
    if isinstance(node, yaml.MappingNode) and any(
        isinstance(name, yaml.ScalarNode) and name.value in accepted(key.section)
        for name, _ in node.value
    ):
        return _layered_prices(key.section, node, where, problems, context)
    try:
        value = plain(node)
        if isinstance(value, str):
            return PriceBook(load_price_table(_resolve_path(value, context.config_dir)))
        return PriceBook(load_price_table(value))
    except (PricingError, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        problems.add(node, f"{where}: {exc}")
        return None


def _layered_prices(
    declaration: type, node: yaml.MappingNode, where: str, problems: Problems, context: Context
) -> PriceBook | None:
    entries = mapping(node, where, problems, accepted(declaration))
    before = len(problems)  # an unknown key still leaves a book to price teams' tables with
    spec = read_entries(declaration, entries, node, where, problems, context)
    overrides: Any = None
    try:
        if spec.overrides is not None:
            overrides = plain(spec.overrides)
            if isinstance(overrides, str):
                overrides = _table_mapping(_resolve_path(overrides, context.config_dir))
    except (PricingError, OSError, yaml.YAMLError) as exc:
        problems.add(spec.overrides, f"{where}.overrides: {exc}")
        return None
    if len(problems) > before:
        return None
    try:
        if spec.table == BUILTIN:
            base = PriceBook.builtin(unknown_model=spec.unknown_model)
        else:
            table = load_price_table(_resolve_path(spec.table, context.config_dir))
            base = PriceBook(table, unknown_model=spec.unknown_model)
    except (PricingError, OSError, ValueError, yaml.YAMLError) as exc:
        problems.add(entries.get("table", node), f"{where}.table: {exc}")
        return None
    if overrides is None:
        return base
    try:
        return base.with_overrides(overrides, f"{where}.overrides")
    except (PricingError, ValueError, TypeError) as exc:
        problems.add(spec.overrides, str(exc))
        return None


def _resolve_path(value: str, config_dir: Path) -> Path:
    """Relative paths resolve against the working directory, else the config's own folder."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    beside_config = config_dir / path
    return beside_config if beside_config.exists() else path


def _table_mapping(path: Path) -> Any:
    """A table file's mapping as written (overrides apply only the fields they give)."""
    text = path.read_text(encoding="utf-8")
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PricingError(f"{path}: not valid YAML: {exc}") from exc
    return {} if mapping is None else mapping

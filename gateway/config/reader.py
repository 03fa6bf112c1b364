"""Reading a section's YAML mapping by its declaration (`fields.declared`): every key checked,
every problem collected as `file:line: message`, every absent or invalid key at its default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gateway.config.fields import CUSTOM, LIST, MAP, SECTION, VALUE, Key, Rule, accepted, declared
from gateway.config.nodes import Problems, mapping, plain

if TYPE_CHECKING:
    from gateway.pricing.book import PriceBook


@dataclass(slots=True)
class Context:
    """What a custom reader needs beyond its node."""

    config_dir: Path  # relative paths in the config may be beside it
    prices: PriceBook | None = None  # the global book, once read (teams' own prices go over it)


@dataclass(frozen=True, slots=True)
class Place:
    where: str  # the mapping, as messages name it
    prefix: str  # what its keys' places start with
    name: str | None  # its name, where it is an entry of a map


def read_section(
    cls: type,
    node: yaml.Node,
    where: str,
    problems: Problems,
    context: Context,
    *,
    prefix: str | None = None,
    name: str | None = None,
    identity: dict[str, Any] | None = None,
    entry: bool = False,
    rules: tuple[Rule, ...] = (),
) -> Any:
    """The `cls` a mapping node declares, or None when a required key is missing or invalid.

    `where` names the mapping in messages (`teams.t.queue`); its keys are at `prefix` (`where.`
    unless given: the root's are `listen`, not `config.listen`). `name` is the mapping's own
    name in a map (a team's), `identity` the fields it fills without a key. An `entry` of a list
    with a required key missing or invalid is dropped unread: one problem, not a cascade.
    """
    entries = mapping(node, where, problems, accepted(cls))
    value = read_entries(
        cls,
        entries,
        node,
        where,
        problems,
        context,
        prefix=prefix,
        name=name,
        identity=identity,
        entry=entry,
    )
    if value is not None:
        for rule in rules:
            rule(value, entries, node, where, problems)
    return value


def read_entries(
    cls: type,
    entries: dict[str, yaml.Node],
    node: yaml.Node,
    where: str,
    problems: Problems,
    context: Context,
    *,
    prefix: str | None = None,
    name: str | None = None,
    identity: dict[str, Any] | None = None,
    entry: bool = False,
) -> Any:
    """`read_section` past the mapping itself (its unknown and duplicate keys reported)."""
    here = Place(where, where + "." if prefix is None else prefix, name)
    values = _read_keys(cls, entries, node, here, problems, context, entry)
    return None if values is None else cls(**(identity or {}), **values)


def _read_keys(
    cls: type,
    entries: dict[str, yaml.Node],
    node: yaml.Node,
    here: Place,
    problems: Problems,
    context: Context,
    entry: bool,
) -> dict[str, Any] | None:
    keys = declared(cls)
    needed = [key for key in keys if key.required]
    values: dict[str, Any] = {}
    for key in needed if entry else keys:
        values.update(_read_key(key, entries.get(key.name), here, problems, context))
    for key in needed:
        if key.name not in entries:
            problems.add(node, f"{here.where}: missing '{key.name}'")
    if any(key.field not in values for key in needed):
        return None
    if entry:
        for key in keys:
            if not key.required:
                values.update(_read_key(key, entries.get(key.name), here, problems, context))
    return values


def _read_key(
    key: Key, node: yaml.Node | None, here: Place, problems: Problems, context: Context
) -> dict[str, Any]:
    """The field values one key gives: its value, its default, or (required, and missing or
    invalid) nothing."""
    place = here.prefix + key.name
    if key.shape == CUSTOM:
        assert key.read is not None
        return key.read(key, node, place, problems, context)
    if node is None:
        return {} if key.required else {key.field: key.default_value()}
    if key.shape == VALUE:
        assert key.check is not None
        try:
            return {key.field: key.check(node if key.check.raw else plain(node))}
        except ValueError as exc:
            problems.add(node, f"{here.where}.{key.name}: {exc}")
            return {} if key.required else {key.field: key.default_value()}
    assert key.section is not None
    if key.shape == SECTION:
        value = read_section(key.section, node, place, problems, context, rules=key.rules)
        return {key.field: value}
    if key.shape == LIST:
        return {key.field: _read_list(key, node, place, here.name, problems, context)}
    assert key.shape == MAP
    return {key.field: _read_map(key, node, place, problems, context)}


def _read_list(
    key: Key, node: yaml.Node, place: str, owner: str | None, problems: Problems, context: Context
) -> tuple[Any, ...]:
    if not isinstance(node, yaml.SequenceNode):
        problems.add(node, f"{place} must be a list")
        return ()
    identity = {key.owner: owner} if key.owner else {}
    items = (
        read_section(
            key.section,
            item,
            f"{place}[{index}]",
            problems,
            context,
            identity=identity,
            entry=True,
            rules=key.rules,
        )  # fmt: skip
        for index, item in enumerate(node.value)
    )
    entries = tuple(item for item in items if item is not None)
    for rule in key.list_rules:
        rule(entries, node, place, problems)
    return entries


def _read_map(
    key: Key, node: yaml.Node, place: str, problems: Problems, context: Context
) -> dict[str, Any]:
    entries = mapping(node, place, problems)
    value = {
        name: read_section(
            key.section,
            item,
            f"{place}.{name}",
            problems,
            context,
            name=name,
            identity={key.key_field: name} if key.key_field else {},
        )
        for name, item in entries.items()
    }
    for rule in key.rules:
        rule(value, entries, node, place, problems)
    return value

"""Checks of a section as a whole, run once its keys are read (see `fields.Rule`): what no
single key's check can see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gateway.config.nodes import Problems

MAX_PORT = 65535


def port_fits(
    listen: Any, entries: Mapping[str, yaml.Node], node: yaml.Node, where: str, problems: Problems
) -> None:
    """`listen.port` at most 65535 (reported at the `listen` mapping)."""
    if listen.port > MAX_PORT:
        problems.add(node, f"{where}.port: must be <= {MAX_PORT}")


def plan_has_its_parameters(
    billing: Any, entries: Mapping[str, yaml.Node], node: yaml.Node, where: str, problems: Problems
) -> None:
    """A per-request plan needs `rate_usd`; the capped one `max_requests_per_day` as well."""
    plan = billing.plan
    if plan in ("per_request", "capped_per_request") and "rate_usd" not in entries:
        problems.add(node, f"{where}: plan '{plan}' needs rate_usd")
    if plan == "capped_per_request" and "max_requests_per_day" not in entries:
        problems.add(node, f"{where}: plan 'capped_per_request' needs max_requests_per_day")


def keys_are_unique(
    teams: Mapping[str, Any],
    entries: Mapping[str, yaml.Node],
    node: yaml.Node,
    where: str,
    problems: Problems,
) -> None:
    """No key id, and no key hash, in two places (across all teams)."""
    key_nodes = _key_nodes(entries)
    seen_ids: dict[str, str] = {}
    seen_hashes: dict[bytes, str] = {}
    for team in teams.values():
        for key in team.keys:
            key_node = key_nodes.get((team.name, key.id))
            if key.id in seen_ids:
                problems.add(
                    key_node, f"duplicate key id '{key.id}' (also in team {seen_ids[key.id]})"
                )
            if key.sha256 in seen_hashes:
                problems.add(
                    key_node,
                    f"key '{key.id}' has the same sha256 as key '{seen_hashes[key.sha256]}'",
                )
            seen_ids.setdefault(key.id, team.name)
            seen_hashes.setdefault(key.sha256, key.id)


def _key_nodes(teams: Mapping[str, yaml.Node]) -> dict[tuple[str, str], yaml.Node]:
    """(team, key id) → the YAML node of that key, for pointing at duplicates."""
    located = {}
    for team, node in teams.items():
        if not isinstance(node, yaml.MappingNode):
            continue
        for key_node, value_node in node.value:
            if key_node.value == "keys" and isinstance(value_node, yaml.SequenceNode):
                for item in value_node.value:
                    if isinstance(item, yaml.MappingNode):
                        for k, v in item.value:
                            if k.value == "id" and isinstance(v, yaml.ScalarNode):
                                located[(team, v.value)] = item
    return located


def export_is_complete(
    export: Any, entries: Mapping[str, yaml.Node], node: yaml.Node, where: str, problems: Problems
) -> None:
    """What a kind needs beyond the keys every export has."""
    if export.kind in ("stripe", "lago") and export.api_key_env is None:
        problems.add(node, f"{where}: a {export.kind} export needs api_key_env")
    if export.kind != "webhook" and export.event_name is None:
        problems.add(node, f"{where}: a {export.kind} export needs event_name")
    if export.kind == "webhook" and export.url is None:
        problems.add(node, f"{where}: a webhook export needs url")
    if export.kind != "webhook" and not export.customers:
        problems.add(node, f"{where}: a {export.kind} export needs customers (team: id)")


def exports_are_distinct(
    exports: tuple[Any, ...], node: yaml.Node, where: str, problems: Problems
) -> None:
    seen: set[str] = set()
    for export in exports:
        if export.label in seen:
            problems.add(
                node, f"{where}: two exports are called '{export.label}': give each a name"
            )
        seen.add(export.label)

"""YAML composed into nodes (not loaded), so every value keeps the line it came from, and the
collector of `file:line: message` problems."""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import yaml


class Problems:
    """Every problem found so far; validation goes on after one, so all are listed at once."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, str]] = []

    def add(self, node: yaml.Node | None, message: str) -> None:
        self.add_at(node.start_mark.line + 1 if node is not None else 1, message)

    def add_at(self, line: int, message: str) -> None:
        self._found.append((line, f"{self.filename}:{line}: {message}"))

    def __bool__(self) -> bool:
        return bool(self._found)

    def __len__(self) -> int:
        return len(self._found)

    def sorted(self) -> list[str]:
        """In file order (stable, so problems on one line keep the order they were found)."""
        return [text for _, text in sorted(self._found, key=lambda found: found[0])]


def compose(text: str, problems: Problems) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.add_at(mark.line + 1 if mark else 1, f"invalid YAML: {exc.problem}")
    except yaml.YAMLError as exc:
        problems.add_at(1, f"invalid YAML: {exc}")
    return None


def plain(node: yaml.Node) -> Any:
    """The Python value of a node, as PyYAML's safe loader would construct it."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def mapping(
    node: yaml.Node, where: str, problems: Problems, allowed: Set[str] | None = None
) -> dict[str, yaml.Node]:
    """A mapping node's entries by key; reports wrong type, duplicates and unknown keys."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, f"{where} must be a mapping")
        return {}
    entries: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            problems.add(key_node, f"{where}: keys must be strings")
            continue
        if key in entries:
            problems.add(key_node, f"{where}: duplicate key '{key}'")
            continue
        if allowed is not None and key not in allowed:
            problems.add(key_node, f"{where}: unknown key '{key}'")
            continue
        entries[key] = value_node
    return entries

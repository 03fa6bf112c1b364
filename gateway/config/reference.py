"""The README's config reference, derived from the schema: a row per documented key (path,
type and default, meaning), and the keys each section accepts."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config.fields import LIST, MAP, Key, accepted, declared
from gateway.config.schema import GatewayConfig

# How `documented_keys` names a section: by its path, but for these two.
_LABELS = {"": "top", "teams.<team>.limits": "limits (team or key)"}


def sections(root: type = GatewayConfig) -> Iterator[tuple[str, type, tuple[Key, ...]]]:
    """(path, dataclass, keys) of each section, depth first; a section declared in two places
    (`Limits`) is walked at the first only."""
    seen = {root}
    pending = [("", root)]
    while pending:
        path, cls = pending.pop(0)
        yield path, cls, declared(cls)
        children = []
        for key in declared(cls):
            if key.section is None or key.section in seen:
                continue
            seen.add(key.section)
            place = _join(path, key.name)
            if key.shape == LIST:
                place += "[]"
            elif key.shape == MAP:
                place += f".{key.placeholder}"
            children.append((place, key.section))
        pending[:0] = children


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def documented_keys() -> dict[str, set[str]]:
    """Every key the validator accepts, by section (the README's reference is checked on it)."""
    return {_LABELS.get(path, path): set(accepted(cls)) for path, cls, _ in sections()}


def reference_rows() -> dict[str, str]:
    """The reference table's row of each documented key, by its path (`listen.host`)."""
    rows = {}
    for path, _, keys in sections():
        for key in keys:
            if key.doc is None:
                continue  # a section without a row of its own: its keys have theirs
            place = _join(path, key.name)
            shown = key.shown_default()
            kind = f"{key.type_label} ({shown})" if shown else key.type_label
            rows[place] = f"| `{place}` | {kind} | {key.doc} |"
    return rows

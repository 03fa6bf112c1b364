"""How a config key is declared: once, in the dataclass field that holds its value, with its
YAML name, default, check and one-line doc (the field's metadata). The reader, the defaults
and the README's config reference all read these declarations (`declared`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from gateway.config.checks import Check
from gateway.config.nodes import Problems

META = "gateway.config"  # the metadata entry of a field that is a config key

VALUE = "value"  # a scalar or list value, checked by `check`
SECTION = "section"  # a mapping whose keys `section` (a dataclass) declares
LIST = "list"  # a list of such mappings
MAP = "map"  # a mapping of names to such mappings
CUSTOM = "custom"  # read by its own `read` function

AUTO: Any = object()  # `shown`: the default, as `show_value` writes it
NO_DEFAULT: Any = object()  # `default` of a required key (and of the root's `pricing`)

# A check of a section as a whole, run once its keys are read: (the value built, the mapping's
# entries, its node, its place, problems).
Rule = Callable[[Any, Mapping[str, yaml.Node], yaml.Node, str, Problems], None]
# A check of a list of sections as a whole: (the entries read, the list's node, its place,
# problems).
ListRule = Callable[[tuple[Any, ...], yaml.Node, str, Problems], None]


@dataclass(frozen=True, slots=True)
class Key:
    """One config key. `field` and `name` are filled in by `declared`."""

    shape: str
    doc: str | None  # the reference's meaning column; a section without one has no row
    check: Check | None = None
    section: type | None = None
    name: str = ""  # the YAML key (the field's name unless given)
    field: str = ""  # the dataclass field it fills
    required: bool = False
    default: Any = NO_DEFAULT
    kind: str | None = None  # the reference's type column, where not the check's
    shown: Any = AUTO  # the reference's default: AUTO, a text, or None for none
    rules: tuple[Rule, ...] = ()
    list_rules: tuple[ListRule, ...] = ()  # LIST: checks of its entries together
    # CUSTOM: (key, node or None, place, problems, reader.Context) → the fields' values
    read: Callable[..., dict[str, Any]] | None = None
    owner: str | None = None  # LIST: the entries' field that gets the enclosing name
    key_field: str | None = None  # MAP: the entries' field that gets their name
    placeholder: str | None = None  # MAP: how the reference writes a name (`<team>`)

    @property
    def has_default(self) -> bool:
        return self.shape in (SECTION, LIST) or self.default is not NO_DEFAULT

    def default_value(self) -> Any:
        if self.shape == SECTION:
            assert self.section is not None
            return self.section()
        if self.shape == LIST:
            return ()
        return self.default

    @property
    def type_label(self) -> str:
        if self.kind is not None:
            return self.kind
        if self.check is not None:
            return self.check.kind
        return "list" if self.shape == LIST else "mapping"

    def shown_default(self) -> str | None:
        """The reference's `(default)`, or None where it gives none."""
        if self.shown is not AUTO:
            return self.shown
        if self.shape != VALUE or self.default is None or self.default is NO_DEFAULT:
            return None
        assert self.check is not None
        return f"`{self.check.show(self.default)}`"


def _declare(key: Key, *, default: Any = dataclasses.MISSING, factory: Any = None) -> Any:
    """The dataclass field holding a key (MISSING: no dataclass default)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={META: key})
    return dataclasses.field(default=default, metadata={META: key})


def setting(
    default: Any,
    check: Check,
    doc: str,
    *,
    name: str = "",
    kind: str | None = None,
    shown: Any = AUTO,
    bare: bool = False,
) -> Any:
    """A key with a default. `bare`: the dataclass field has none (the reader always gives it)."""
    key = Key(VALUE, doc, check, name=name, default=default, kind=kind, shown=shown)
    return _declare(key) if bare else _declare(key, default=default)


def required(check: Check, doc: str) -> Any:
    """A key without a default: a mapping without it is refused (`missing 'id'`)."""
    return _declare(Key(VALUE, doc, check, required=True))


def section(
    cls: type,
    doc: str | None = None,
    *,
    name: str = "",
    rules: tuple[Rule, ...] = (),
    bare: bool = False,
) -> Any:
    """A mapping of the keys `cls` declares; absent, `cls()`."""
    key = Key(SECTION, doc, section=cls, name=name, rules=rules)
    return _declare(key) if bare else _declare(key, factory=cls)


def section_list(
    cls: type,
    doc: str,
    *,
    owner: str,
    rules: tuple[Rule, ...] = (),
    list_rules: tuple[ListRule, ...] = (),
) -> Any:
    """A list of mappings of the keys `cls` declares; absent, empty. `rules` check each entry,
    `list_rules` the entries together."""
    key = Key(LIST, doc, section=cls, owner=owner, rules=rules, list_rules=list_rules)
    return _declare(key, default=())


def section_map(
    cls: type, doc: str, *, key_field: str, placeholder: str, rules: tuple[Rule, ...] = ()
) -> Any:
    """A required mapping of names to mappings of the keys `cls` declares."""
    key = Key(
        MAP,
        doc,
        section=cls,
        required=True,
        rules=rules,
        key_field=key_field,
        placeholder=placeholder,
    )
    return _declare(key)


def custom(
    read: Callable[..., dict[str, Any]],
    doc: str,
    *,
    kind: str,
    section: type | None = None,
    shown: Any = AUTO,
    bare: bool = False,
) -> Any:
    """A key its own reader turns into field values (absent, the reader gets None)."""
    if bare:  # absent, what the reader makes of nothing (the root's `pricing`: the database)
        return _declare(Key(CUSTOM, doc, section=section, kind=kind, shown=shown, read=read))
    key = Key(CUSTOM, doc, section=section, kind=kind, shown=shown, read=read, default=None)
    return _declare(key, default=None)


@cache
def declared(cls: type) -> tuple[Key, ...]:
    """The config keys of a section's dataclass, in declaration order (the order they are read
    in, so problems on one line come in this order)."""
    keys = []
    for field in dataclasses.fields(cls):
        key = field.metadata.get(META)
        if key is not None:
            keys.append(dataclasses.replace(key, field=field.name, name=key.name or field.name))
    return tuple(keys)


@cache
def accepted(cls: type) -> frozenset[str]:
    """The YAML keys a section accepts; any other is refused as unknown."""
    return frozenset(key.name for key in declared(cls))

"""The price database: genai-prices' OpenAI models, compiled, and its compiled copy on disk.

The database is the `genai-prices` package's own packaged snapshot (nothing is downloaded at
run time; upgrading the package is how new prices arrive). Its OpenAI models are compiled once
(`gateway.pricing.catalog_model`) and kept compiled on disk, so that a start does not import
the package unless it changed (`builtin_catalog`). A model's name is matched as genai-prices
matches it (`Catalog.find`, rules in `gateway.pricing.names`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

from gateway.pricing.catalog_model import (
    CatalogModel,
    compile_model,
    model_from_json,
    model_to_json,
)
from gateway.pricing.errors import PricingError
from gateway.pricing.names import (
    Clause,
    clause_from_json,
    clause_matches,
    clause_of,
    dashed_dates,
    literal_names,
    remember,
)

# Of the compiled copy on disk (this module's and `catalog_model`'s JSON form): bump when its
# layout or meaning changes.
CATALOG_FORMAT = 1


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
            for name in (model.id.lower(), *literal_names(clause))
        )  # fmt: skip
        starts = [d.start for m in models for d in (*m.prices, *m.variants) if d.start]
        self.data_date: date | None = max(starts, default=None)
        self._found: dict[str, CatalogModel | None] = {}

    @classmethod
    def from_library(cls, provider: Any, version: str) -> Catalog:
        models = tuple(compile_model(info) for info in provider.models)
        matches = tuple(clause_of(info.match, f"genai-prices openai {info.id}")
                        for info in provider.models)  # fmt: skip
        digest = hashlib.sha256(
            json.dumps([model_to_json(m) for m in models], sort_keys=True).encode()
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
        if found is None and (dashed := dashed_dates(name)) != name:
            found = self._first_match(dashed)
        remember(self._found, model, found)
        return found

    def _first_match(self, name: str) -> CatalogModel | None:
        for model, clause in zip(self.models, self.matches, strict=True):
            if clause_matches(clause, name):
                return model
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "version": self.version,
            "digest": self.digest,
            "models": [model_to_json(m) for m in self.models],
            "matches": list(self.matches),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Catalog:
        if data.get("format") != CATALOG_FORMAT:
            raise ValueError(f"catalog format {data.get('format')!r}, not {CATALOG_FORMAT}")
        models = tuple(model_from_json(m) for m in data["models"])
        matches = tuple(clause_from_json(c) for c in data["matches"])
        return cls(models, matches, data["version"], data["digest"])


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

"""The keys in force: the config file's, with the API's merged in.

An API key becomes a `KeyConfig` of its team, so authentication, limits, `/gateway/me` and
the reports treat it exactly as a config key. What a config cannot say is kept beside it in
`ApiKeyIndex`: revoked digests (refused as `key_revoked`, not as unknown) and a rotated-out
secret's digest with the moment its grace ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.access.store import StoredKey
from gateway.config.loader import GatewayConfig, KeyConfig
from gateway.config.nodes import Problems, compose
from gateway.config.reader import Context, read_section
from gateway.config.schema import Limits

log = logging.getLogger("gateway.keys")


class InvalidLimits(ValueError):
    """Limits an API body gives that the config file would refuse (the first problem)."""


def parse_limits(limits: Any) -> Limits:
    """An API body's `limits` object, checked as the config file's `limits:` is."""
    if not isinstance(limits, dict):
        raise InvalidLimits("'limits' must be an object")
    problems = Problems("limits")
    node = compose(orjson.dumps(limits).decode(), problems)
    parsed = None
    if node is not None:
        parsed = read_section(Limits, node, "limits", problems, Context(config_dir=Path()))
    if problems or parsed is None:
        first = problems.sorted()[0] if problems else "limits: invalid"
        raise InvalidLimits(first.split(": ", 1)[1] if first.startswith("limits:") else first)
    return parsed


@dataclass(slots=True)
class ApiKeyIndex:
    revoked: dict[bytes, tuple[str, str]] = field(default_factory=dict)  # digest → (team, id)
    previous: dict[bytes, tuple[KeyConfig, float]] = field(default_factory=dict)
    stored: dict[str, StoredKey] = field(default_factory=dict)  # id → row, revoked included


def with_api_keys(
    config: GatewayConfig, stored: list[StoredKey]
) -> tuple[GatewayConfig, ApiKeyIndex]:
    """The config with every live API key added to its team, and the index beside it. A row
    whose team has left the config, or whose id a config key now holds, is left out (logged)."""
    index = ApiKeyIndex(stored={key.id: key for key in stored})
    config_ids = {key.id for team in config.teams.values() for key in team.keys}
    added: dict[str, list[KeyConfig]] = {}
    for row in stored:
        if row.revoked_at is not None:
            # Its current secret is refused as revoked; a rotated-out one was already on its
            # way out, and revoking ends its grace: it is unknown (SPEC).
            index.revoked[bytes.fromhex(row.sha256)] = (row.team, row.id)
            continue
        if row.team not in config.teams or row.id in config_ids:
            log.warning(
                "API key %r is not in force: %s", row.id,
                f"team {row.team!r} is not in the config" if row.team not in config.teams
                else "a config key has its id",
            )  # fmt: skip
            continue
        try:
            limits = parse_limits(row.limits)
        except InvalidLimits as error:  # written by another version, say: never silently open
            log.error("API key %r is not in force: its limits are invalid: %s", row.id, error)
            continue
        key = KeyConfig(
            id=row.id,
            team=row.team,
            sha256=bytes.fromhex(row.sha256),
            expires=row.expires,
            limits=limits,
        )
        added.setdefault(row.team, []).append(key)
        if row.previous_sha256 and row.previous_until:
            previous = replace(key, sha256=bytes.fromhex(row.previous_sha256))
            index.previous[previous.sha256] = (previous, row.previous_until)
    if not added:
        return config, index
    teams = {
        name: replace(team, keys=team.keys + tuple(added[name])) if name in added else team
        for name, team in config.teams.items()
    }
    return replace(config, teams=teams), index

"""Changing the keys issued over the API: the checks and the store writes the admin API
(`gateway.web.keys_api`) and the `keys` commands share. Every refusal is a `GatewayError`
with the SPEC's code; nothing is written when one is raised."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from gateway.access.keys import KEY_PREFIX, hash_key, parse_expiry, today_in
from gateway.access.keyset import InvalidLimits, parse_limits
from gateway.access.store import KeyStore, StoredKey
from gateway.config.loader import GatewayConfig, KeyConfig
from gateway.errors import (
    INVALID_REQUEST,
    KEY_EXISTS,
    KEY_IS_REVOKED,
    KEY_MANAGED_BY_CONFIG,
    KEY_NOT_FOUND,
    TEAM_NOT_FOUND,
    GatewayError,
)
from gateway.front.workers import in_a_group_without_shared_limits

MAX_GRACE_S = 30 * 86400
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Limits as the config names them (spend caps in USD), for config keys' objects.
_NANOUSD_NAMES = {"spend_per_day_nanousd": "spend_per_day_usd",
                  "spend_per_month_nanousd": "spend_per_month_usd"}  # fmt: skip


class KeyAdmin:
    def __init__(
        self,
        config: Callable[[], GatewayConfig],
        store: KeyStore,
        after_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config  # the file's: its teams, and its keys as config keys
        self.store = store
        self._after_change = after_change

    async def create(
        self, team: str, key_id: str | None = None, expires: str | None = None,
        limits: Any = None,
    ) -> tuple[StoredKey, str]:  # fmt: skip
        """A new key of `team`, and its secret (never stored)."""
        config = self._config()
        if team not in config.teams:
            raise GatewayError(TEAM_NOT_FOUND, f"No team '{team[:100]}' in the config.")
        if key_id is None:
            key_id = f"{team}-{secrets.token_hex(4)}"
        check_id(key_id)
        if self.config_key(key_id) is not None:
            raise GatewayError(KEY_EXISTS, f"A config key has the id '{key_id}'.")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        row = StoredKey(
            id=key_id, team=team, sha256=hash_key(secret).hex(), expires=self.expiry(expires),
            limits=checked_limits({} if limits is None else limits, config), created_at=now,
            updated_at=now,
        )  # fmt: skip
        if not await self.store.insert(row):
            raise GatewayError(KEY_EXISTS, f"A key with the id '{key_id}' exists.")
        await self._changed()
        return row, secret

    async def objects(self, team: str | None = None) -> list[dict[str, Any]]:
        """Every key (config keys first within a team), revoked ones included."""
        config = self._config()
        if team is not None and team not in config.teams:
            raise GatewayError(TEAM_NOT_FOUND, f"No team '{team[:100]}' in the config.")
        found = [
            config_object(key)
            for name, config_team in config.teams.items()
            if team is None or name == team
            for key in config_team.keys
        ]
        found += [
            stored_object(row) for row in await self.store.all() if team is None or row.team == team
        ]
        found.sort(key=lambda item: (item["team"], item["source"] != "config", item["id"]))
        return found

    async def object(self, key_id: str) -> dict[str, Any]:
        config_key = self.config_key(key_id)
        if config_key is not None:
            return config_object(config_key)
        return stored_object(await self.stored(key_id))

    async def patch(
        self, key_id: str, expires: str | None = None, limits: Any = None, *,
        set_expires: bool = False, set_limits: bool = False,
    ) -> StoredKey:  # fmt: skip
        """Renew (`expires`; None with `set_expires` makes it never expire) or change limits."""
        row = await self.changeable(key_id)
        changes: dict[str, Any] = {}
        if set_expires:
            changes["expires"] = self.expiry(expires)
        if set_limits:
            changes["limits"] = checked_limits(limits, self._config())
        updated = later(row, **changes)
        await self.store.update(updated)
        await self._changed()
        return updated

    async def rotate(self, key_id: str, grace_s: float = 0) -> tuple[StoredKey, str]:
        """A new secret; the old one keeps working `grace_s` seconds."""
        row = await self.changeable(key_id)
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise invalid(f"'grace_s' must be between 0 and {MAX_GRACE_S}.", "grace_s")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        updated = later(
            row,
            sha256=hash_key(secret).hex(),
            previous_sha256=row.sha256 if grace_s else None,
            previous_until=time.time() + grace_s if grace_s else None,
        )
        await self.store.update(updated)
        await self._changed()
        return updated, secret

    async def revoke(self, key_id: str) -> None:
        """Revoke (ends a rotation's grace too); revoking again changes nothing."""
        if self.config_key(key_id) is not None:
            raise config_managed(key_id)
        row = await self.stored(key_id)
        if row.revoked_at is None:
            await self.store.update(later(row, revoked_at=time.time()))
            await self._changed()

    # ------------------------------------------------------------ helpers

    async def _changed(self) -> None:
        if self._after_change is not None:
            await self._after_change()

    def config_key(self, key_id: str) -> KeyConfig | None:
        teams = self._config().teams.values()
        return next((k for team in teams for k in team.keys if k.id == key_id), None)

    async def stored(self, key_id: str) -> StoredKey:
        row = next((row for row in await self.store.all() if row.id == key_id), None)
        if row is None:
            raise GatewayError(KEY_NOT_FOUND, f"No key '{key_id[:100]}'.")
        return row

    async def changeable(self, key_id: str) -> StoredKey:
        if self.config_key(key_id) is not None:
            raise config_managed(key_id)
        row = await self.stored(key_id)
        if row.revoked_at is not None:
            raise GatewayError(KEY_IS_REVOKED, f"The key '{key_id}' is revoked.")
        return row

    def expiry(self, value: str | None) -> date | None:
        """`YYYY-MM-DD`, `90d` or None; never a day already past."""
        if value is None:
            return None
        today = today_in(self._config().limits_timezone)
        try:
            if not isinstance(value, str):
                raise ValueError
            expires = parse_expiry(value, today)
        except ValueError:
            raise invalid(
                "'expires' must be a date (YYYY-MM-DD), a number of days ('90d') or null.",
                "expires",
            ) from None
        if expires < today:
            raise invalid(f"'expires' ({expires.isoformat()}) is in the past.", "expires")
        return expires


def later(row: StoredKey, **changes: Any) -> StoredKey:
    """The row changed, its `updated_at` moved on (strictly: replicas poll for it)."""
    return replace(row, updated_at=max(time.time(), row.updated_at + 0.001), **changes)


def check_id(key_id: Any) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise invalid(
            "'id' must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a "
            "letter or digit.",
            "id",
        )


def checked_limits(value: Any, config: GatewayConfig) -> dict[str, Any]:
    try:
        limits = parse_limits(value)
    except InvalidLimits as error:
        raise invalid(f"Invalid limits: {error}.", "limits") from None
    if limits.configured() and in_a_group_without_shared_limits(config):
        raise invalid(
            "This gateway runs as several worker processes with its limits in each one's "
            "memory: a key's limits need limits.backend: redis to hold across them.",
            "limits",
        )
    return dict(value)


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(INVALID_REQUEST, message, param=param)


def config_managed(key_id: str) -> GatewayError:
    return GatewayError(
        KEY_MANAGED_BY_CONFIG,
        f"The key '{key_id}' is in the config file: change it there (the API only reads it).",
    )


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def stored_object(row: StoredKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "team": row.team,
        "source": "api",
        "sha256": row.sha256,
        "expires": row.expires.isoformat() if row.expires else None,
        "limits": row.limits,
        "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }


def config_object(key: KeyConfig) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for name, value in key.limits.configured().items():
        if name in _NANOUSD_NAMES:
            limits[_NANOUSD_NAMES[name]] = value / 1e9
        else:
            limits[name] = value
    return {
        "id": key.id,
        "team": key.team,
        "source": "config",
        "sha256": key.sha256.hex(),
        "expires": key.expires.isoformat() if key.expires else None,
        "limits": limits,
        "created_at": None,
        "revoked_at": None,
    }

"""Who is calling and what they may call: key lookup, expiry, and the team's allow-lists."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date

from gateway.access.keys import KeyRing, bearer_secret, days_left, hash_key
from gateway.access.keyset import ApiKeyIndex
from gateway.config.loader import GatewayConfig, KeyConfig, TeamConfig
from gateway.errors import (
    ENDPOINT_NOT_ALLOWED,
    INVALID_API_KEY,
    KEY_EXPIRED,
    KEY_REVOKED,
    MODEL_NOT_ALLOWED,
    GatewayError,
)


@dataclass(frozen=True, slots=True)
class Caller:
    key: KeyConfig
    team: TeamConfig
    days_left: int | None


class KeyRevoked(GatewayError):
    """A key issued over the API and revoked: refused, and its row names the key and team."""

    def __init__(self, team: str, key_id: str) -> None:
        super().__init__(
            KEY_REVOKED, f"This gateway key ({key_id}) has been revoked. Ask for a new key."
        )
        self.team, self.key_id = team, key_id


class Authenticator:
    """The keys in force (`config`'s, API keys merged in by `gateway.access.keyset`), and what
    only the API's keys can be: revoked, or rotated out and still in their grace."""

    def __init__(self, config: GatewayConfig, api_keys: ApiKeyIndex | None = None) -> None:
        self._config = config
        self._ring = KeyRing(config.keys_by_hash())
        self._api_keys = api_keys or ApiKeyIndex()

    def authenticate(self, authorization: str | None, today: date) -> Caller:
        secret = bearer_secret(authorization)
        if secret is None:
            raise GatewayError(
                INVALID_API_KEY,
                "You didn't provide an API key. Send your gateway key as "
                "'Authorization: Bearer <key>'.",
            )
        key = self._ring.find(secret)
        if key is None:
            key = self._not_in_the_ring(hash_key(secret))
        return Caller(key=key, team=self._config.teams[key.team], days_left=days_left(key, today))

    def _not_in_the_ring(self, digest: bytes) -> KeyConfig:
        index = self._api_keys
        rotated = index.previous.get(digest)
        if rotated is not None and time.time() < rotated[1]:
            return rotated[0]
        if digest in index.revoked and rotated is None:
            team, key_id = index.revoked[digest]
            raise KeyRevoked(team, key_id)
        raise GatewayError(INVALID_API_KEY, "Incorrect API key provided.")


def ensure_not_expired(caller: Caller) -> None:
    if caller.days_left is not None and caller.days_left < 0:
        raise GatewayError(
            KEY_EXPIRED, f"This gateway key expired on {caller.key.expires}. Ask for a new key."
        )


def authorize_endpoint(team: TeamConfig, method: str, api_path: str) -> None:
    """Raise unless the team may call this method and path."""
    full_path = "/v1" + api_path
    if team.endpoints is not None and not any(
        rule.allows(method, full_path) for rule in team.endpoints
    ):
        raise GatewayError(
            ENDPOINT_NOT_ALLOWED, f"Team '{team.name}' may not call {method} {full_path}."
        )


def authorize_model(team: TeamConfig, model: str | None) -> None:
    """Raise unless the team may use this model (None: the request names none)."""
    if team.models is not None and model is not None and model not in team.models:
        raise GatewayError(
            MODEL_NOT_ALLOWED,
            f"Team '{team.name}' may not use model '{model}'.",
            param="model",
        )

"""Gateway keys: hashing, lookup, expiry, and minting new ones."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.config.loader import KeyConfig

KEY_PREFIX = "mgw-"


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """Finds the configured key for a presented secret.

    Only sha256 digests are held. The dict lookup is keyed by the digest, so its timing can
    reveal nothing usable about the secret; the final comparison is constant-time anyway.
    """

    def __init__(self, keys: dict[bytes, KeyConfig]) -> None:
        self._by_hash = keys

    def find(self, secret: str) -> KeyConfig | None:
        digest = hash_key(secret)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.sha256, digest):
            return None
        return key


def bearer_secret(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    secret = secret.strip()
    return secret or None


def today_in(zone: ZoneInfo, now: datetime | None = None) -> date:
    return (now or datetime.now(zone)).astimezone(zone).date()


def days_left(key: KeyConfig, today: date) -> int | None:
    """Days until the key's last valid day: 0 on that day, negative once expired."""
    if key.expires is None:
        return None
    return (key.expires - today).days


@dataclass(frozen=True)
class NewKey:
    secret: str
    sha256_hex: str
    yaml_entry: str


def mint_key(team: str, key_id: str, expires: date | None) -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(secret).hex()
    lines = [
        f"# add under teams.{team}.keys:",
        f"- id: {key_id}",
        f"  sha256: {digest}",
    ]
    if expires is not None:
        lines.append(f"  expires: {expires.isoformat()}")
    return NewKey(secret=secret, sha256_hex=digest, yaml_entry="\n".join(lines))


def parse_expiry(value: str, today: date) -> date:
    """`30d` (days from today) or an ISO date."""
    text = value.strip().lower()
    if text.endswith("d") and text[:-1].isdigit():
        return today + timedelta(days=int(text[:-1]))
    return date.fromisoformat(text)

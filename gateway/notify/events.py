"""The events a check finds: keys about to expire or expired, and quotas or spend caps past a
configured share. Each event's id names what it is about (the key and day, the limit, window
and share), so finding it again, on any replica or after a restart, adds nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson

from gateway.config.loader import GatewayConfig
from gateway.limits.windows import CONFIG_NAMES, SPEND, Calendar, Meter


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    created_at: float
    team: str
    key_id: str | None
    data: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "created_at": iso(self.created_at),
            "team": self.team,
            "key_id": self.key_id,
            "data": self.data,
        }


def iso(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _event_id(*parts: object) -> str:
    """Short and stable: `evt_` and a digest of what the event is about."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()
    return "evt_" + digest[:32]


def key_events(config: GatewayConfig, today: date, now: float) -> list[Event]:
    """`key_expiring` once a day per key within `renew_warning_days` of its last valid day,
    `key_expired` once after it."""
    found = []
    for team in config.teams.values():
        for key in team.keys:
            if key.expires is None:
                continue
            days_left = (key.expires - today).days
            expires = key.expires.isoformat()
            if 0 <= days_left <= config.renew_warning_days:
                found.append(
                    Event(
                        _event_id("key_expiring", key.id, expires, today.isoformat()),
                        "key_expiring",
                        now,
                        team.name,
                        key.id,
                        {"expires": expires, "days_left": days_left},
                    )  # fmt: skip
                )
            elif days_left < 0:
                found.append(
                    Event(
                        _event_id("key_expired", key.id, expires),
                        "key_expired",
                        now,
                        team.name,
                        key.id,
                        {"expires": expires},
                    )  # fmt: skip
                )
    return found


def budget_events(
    meters: list[tuple[str, str | None, Meter]],
    thresholds: tuple[float, ...],
    calendar: Calendar,
    now: float,
) -> list[Event]:
    """`budget_threshold` once per limit, window and share reached, for each (team, key id or
    None for the team's own limits, meter)."""
    found = []
    for team, key_id, meter in meters:
        for quota in meter.quotas:
            quota.roll(calendar, now)
            if quota.limit <= 0:
                continue
            window_start, _ = calendar.window(quota.period, now)
            name = CONFIG_NAMES.get(quota.name, quota.name)
            scale = 1e9 if quota.kind == SPEND else 1
            for share in thresholds:
                if quota.used < share * quota.limit:
                    continue
                found.append(
                    Event(
                        _event_id("budget", team, key_id, name, window_start, share),
                        "budget_threshold",
                        now,
                        team,
                        key_id,
                        {
                            "limit": name,
                            "threshold": share,
                            "used": quota.used / scale if scale != 1 else quota.used,
                            "limit_value": quota.limit / scale if scale != 1 else quota.limit,
                            "window_start": iso(window_start),
                        },
                    )  # fmt: skip
                )
    return found


def body_for(event: Event, form: str) -> bytes:
    """The request body a webhook of this format gets."""
    if form == "slack":
        return orjson.dumps({"text": slack_text(event)})
    return orjson.dumps(event.document())


def slack_text(event: Event) -> str:
    data, who = event.data, f"key `{event.key_id}`" if event.key_id else "the team"
    if event.type == "key_expiring":
        days = data["days_left"]
        when = "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
        return (
            f":hourglass: Gateway key `{event.key_id}` of team `{event.team}` expires {when} "
            f"({data['expires']}): renew it."
        )
    if event.type == "key_expired":
        return (
            f":no_entry: Gateway key `{event.key_id}` of team `{event.team}` expired on "
            f"{data['expires']}."
        )
    return (
        f":warning: Team `{event.team}`, {who}: {data['limit']} is at {data['used']} of "
        f"{data['limit_value']} ({data['threshold']:.0%} reached) since {data['window_start']}."
    )

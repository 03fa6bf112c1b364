"""`/gateway/keys`: the admin's key API (SPEC "Keys managed over the API"). Create, list, get
(with this month's usage and spend), patch (renew, limits), rotate (with a grace) and revoke;
the checks and writes are `gateway.access.admin`'s.

A key's secret is returned once, by the answer that creates or rotates it; only its sha256 is
stored. Config keys are listed, read-only. A change is in force on this replica before the
answer goes out (the store is re-read), and on the others within `SYNC_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.access.admin import KeyAdmin, invalid, stored_object
from gateway.access.store import KeyStoreUnavailable
from gateway.access.sync import KeySync
from gateway.config.loader import GatewayConfig
from gateway.errors import KEY_STORE_UNAVAILABLE, GatewayError
from gateway.web.api import UsageApi, check_admin, error_response

MAX_BODY = 64 * 1024


class KeysApi:
    def __init__(self, usage: UsageApi, config: Any, sync: KeySync) -> None:
        self._usage = usage
        self._file_config = config  # () -> the file's config
        self.admin = KeyAdmin(config, sync.store, lambda: sync.refresh(force=True))

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/gateway/keys", self.create),
            web.get("/gateway/keys", self.list),
            web.get("/gateway/keys/{key_id}", self.get),
            web.patch("/gateway/keys/{key_id}", self.patch),
            web.post("/gateway/keys/{key_id}/rotate", self.rotate),
            web.delete("/gateway/keys/{key_id}", self.revoke),
        ]

    async def create(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            body = await _body(request)
            _only(body, {"team", "id", "expires", "limits"})
            team = body.get("team")
            if not isinstance(team, str) or not team:
                raise invalid("'team' is required: the name of a team in the config.", "team")
            row, secret = await self.admin.create(
                team, body.get("id"), _expires(body.get("expires")), body.get("limits")
            )
            return _json({**stored_object(row), "key": secret}, status=201)

        return await self._admin(request, verb)

    async def list(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            objects = await self.admin.objects(request.query.get("team"))
            return _json({"object": "list", "data": objects})

        return await self._admin(request, verb)

    async def get(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            key_id = request.match_info["key_id"]
            document = await self.admin.object(key_id)
            document.update(await self._usage_of(key_id))
            return _json(document)

        return await self._admin(request, verb)

    async def patch(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            key_id = request.match_info["key_id"]
            await self.admin.changeable(key_id)  # 404 / 409 before the body's own problems
            body = await _body(request)
            _only(body, {"expires", "limits"})
            row = await self.admin.patch(
                key_id,
                _expires(body.get("expires")),
                body.get("limits"),
                set_expires="expires" in body,
                set_limits="limits" in body,
            )
            return _json(stored_object(row))

        return await self._admin(request, verb)

    async def rotate(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            key_id = request.match_info["key_id"]
            await self.admin.changeable(key_id)
            body = await _body(request, empty_ok=True)
            _only(body, {"grace_s"})
            grace = body.get("grace_s", 0)
            if not isinstance(grace, int | float) or isinstance(grace, bool):
                raise invalid("'grace_s' must be a number of seconds.", "grace_s")
            row, secret = await self.admin.rotate(key_id, grace)
            return _json({**stored_object(row), "key": secret})

        return await self._admin(request, verb)

    async def revoke(self, request: web.Request) -> web.Response:
        async def verb() -> web.Response:
            key_id = request.match_info["key_id"]
            await self.admin.revoke(key_id)
            return _json({"id": key_id, "revoked": True})

        return await self._admin(request, verb)

    # ------------------------------------------------------------ helpers

    async def _admin(self, request: web.Request, verb: Any) -> web.Response:
        try:
            config: GatewayConfig = self._file_config()
            check_admin(config, request)
            return await verb()
        except GatewayError as error:
            return error_response(error)
        except KeyStoreUnavailable:
            unavailable = GatewayError(
                KEY_STORE_UNAVAILABLE, "The key store cannot be reached now; nothing was changed."
            )
            return error_response(unavailable)

    async def _usage_of(self, key_id: str) -> dict[str, Any]:
        calendar = self._usage.limiter.calendar
        day_start, _ = calendar.window("day")
        month_start, _ = calendar.window("month")
        await self._usage.flush()
        month, today = await asyncio.gather(
            self._usage.ledger.rows(_USAGE, (key_id, month_start)),
            self._usage.ledger.rows(_USAGE, (key_id, day_start)),
        )
        totals = month[0] if month else {}
        spent_today = int((today[0] if today else {}).get("cost") or 0)
        spent_month = int(totals.get("cost") or 0)
        return {
            "usage": {
                "requests": int(totals.get("requests") or 0),
                "input_tokens": int(totals.get("input_tokens") or 0),
                "output_tokens": int(totals.get("output_tokens") or 0),
                "cost_usd": spent_month / 1e9,
            },
            "spend_usd": {"today": spent_today / 1e9, "month": spent_month / 1e9},
        }


_USAGE = (
    "SELECT COUNT(*) AS requests, COALESCE(SUM(input_tokens), 0) AS input_tokens, "
    "COALESCE(SUM(output_tokens), 0) AS output_tokens, COALESCE(SUM(cost_nanousd), 0) AS cost "
    "FROM requests WHERE key_id = ? AND started_at >= ?"
)


def _expires(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise invalid(
            "'expires' must be a date (YYYY-MM-DD), a number of days ('90d') or null.", "expires"
        )
    return value


async def _body(request: web.Request, empty_ok: bool = False) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise invalid(f"The body is larger than {MAX_BODY} bytes.")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise invalid(f"The body is larger than {MAX_BODY} bytes.")
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.")
    return body


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"Unknown field '{str(unknown[0])[:100]}'.", str(unknown[0])[:100])


def _json(document: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")

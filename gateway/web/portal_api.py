"""The portal's JSON answers (SPEC "The developer portal"): a key holder's latest calls and
their team's invoice; for the admin key, every call, the refusals by limit and the prices in
force. Each reads the ledger through the one reader, so the portal shows the ledger's numbers.
"""

from __future__ import annotations

import re
from datetime import datetime

from aiohttp import web

from gateway.access.auth import Caller
from gateway.billing.queries import (
    ADMIN_CALL_FIELDS,
    CALL_FIELDS,
    MAX_TIME,
    QueryError,
    latest_calls,
    now,
    refusals,
)
from gateway.billing.reports import build_invoice, render_invoice
from gateway.errors import GatewayError
from gateway.web.api import (
    UsageApi,
    _int,
    check_admin,
    error_response,
)

DEFAULT_CALLS, MAX_CALLS = 50, 500
_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


class PortalApi:
    def __init__(self, usage: UsageApi) -> None:
        self.usage = usage

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/gateway/me/calls", self.calls),
            web.get("/gateway/me/invoice", self.invoice),
            web.get("/gateway/refusals", self.refusals),
            web.get("/gateway/prices", self.prices),
        ]

    # ------------------------------------------------------------ latest calls

    async def calls(self, request: web.Request) -> web.Response:
        """The latest calls, newest first, `limit` at a time, before a request id."""
        try:
            caller = self.usage.caller_or_admin(request)
            limit = _int(request.query, "limit", 1, MAX_CALLS) or DEFAULT_CALLS
            filters: dict[str, str] = {}
            if caller is not None:
                filters["key_id"] = caller.key.id
            else:
                for name, column in (("team", "team"), ("key", "key_id")):
                    if name in request.query:
                        filters[column] = request.query[name]
            await self.usage.flush()
            before = request.query.get("before")
            cursor = None
            if before is not None:
                cursor = (await self._started_at(before, caller), before)
            fields = CALL_FIELDS if caller is not None else ADMIN_CALL_FIELDS
            rows = await latest_calls(self.usage.ledger, fields, filters, limit + 1, cursor)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        data = [{field: row[field] for field in fields} for row in rows[:limit]]
        return web.json_response({"data": data, "has_more": len(rows) > limit})

    async def _started_at(self, request_id: str, caller: Caller | None) -> float:
        sql = "SELECT started_at, key_id FROM requests WHERE request_id = ?"
        found = await self.usage.ledger.rows(sql, [request_id])
        if not found or (caller is not None and found[0]["key_id"] != caller.key.id):
            raise QueryError("before", "before must be the request_id of one of these calls")
        return float(found[0]["started_at"])

    # ------------------------------------------------------------ the invoice

    async def invoice(self, request: web.Request) -> web.Response:
        config = self.usage.config
        try:
            caller = self.usage.caller_or_admin(request)
            if caller is not None:
                team = caller.team.name
            else:
                team = request.query.get("team", "")
                if team not in config.teams:
                    raise QueryError("team", "team must name one of the gateway's teams")
            month = request.query.get(
                "month", datetime.now(config.limits_timezone).strftime("%Y-%m")
            )
            if not _MONTH.fullmatch(month):
                raise QueryError("month", "month must be YYYY-MM")
            fmt = request.query.get("format", "json")
            if fmt not in ("json", "csv"):
                raise QueryError("format", "format must be json or csv")
            await self.usage.flush()
            document = await build_invoice(self.usage.ledger, config, team, month)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        if fmt == "json":
            return web.json_response(document)
        response = web.Response(
            text=render_invoice(document, "csv"), content_type="text/csv", charset="utf-8"
        )
        safe_team = re.sub(r"[^A-Za-z0-9_.-]", "_", team)
        response.headers["Content-Disposition"] = (
            f'attachment; filename="invoice-{safe_team}-{month}.csv"'
        )
        return response

    # ------------------------------------------------------------ admin views

    async def refusals(self, request: web.Request) -> web.Response:
        """Refused calls by team, key, limit and code over a range (the admin's "which limits
        are hit"): the partial index on refused rows answers it without a range scan."""
        try:
            check_admin(self.usage.config, request)
            seconds = "an integer (unix seconds)"
            start = _int(request.query, "start_time", 0, MAX_TIME, seconds)
            if start is None:
                raise QueryError("start_time", "start_time is required (unix seconds)")
            end = _int(request.query, "end_time", 0, MAX_TIME, seconds) or now()
            await self.usage.flush()
            rows = await refusals(self.usage.ledger, start, end)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        return web.json_response({"data": [dict(row) for row in rows]})

    async def prices(self, request: web.Request) -> web.Response:
        """The prices in force today for every model the config prices or names, in the
        `prices --config F --format json` shape."""
        config = self.usage.config
        try:
            check_admin(config, request)
        except GatewayError as error:
            return error_response(error)
        book = config.pricing
        named = {m for team in config.teams.values() for m in (team.models or ())}
        today = datetime.now(config.limits_timezone).date()
        entries = []
        for model in sorted(set(book.listed_models()) | named):
            entry = book.describe(model, on=today)
            if entry is not None:
                entries.append(entry)
        return web.json_response({"data": entries, "unknown_model": book.unknown_model})

"""The gateway's own HTTP answers: `/gateway/me`, `/gateway/usage`, and OpenAI's
organization usage and costs endpoints (project = team, API key = gateway key id)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from gateway.access.auth import Authenticator, Caller, ensure_not_expired
from gateway.access.keys import bearer_secret, today_in
from gateway.billing.queries import (
    BUCKET_LIMITS,
    COMPLETION_PATHS,
    GROUP_COLUMNS,
    MAX_TIME,
    Bucket,
    Page,
    QueryError,
    UsageQuery,
    bucket_page,
    check_query,
    now,
    spend_since,
)
from gateway.config.loader import GatewayConfig
from gateway.errors import ADMIN_UNAUTHORIZED, INVALID_REQUEST, GatewayError, error_body
from gateway.ledger.readers import LedgerReader
from gateway.limits.admission import Limiter
from gateway.pricing.arithmetic import format_usd

log = logging.getLogger("gateway.web")

ConfigGetter = Callable[[], GatewayConfig]


class UsageApi:
    def __init__(
        self,
        config: ConfigGetter,
        limiter: Limiter,
        flush: Callable,
        reader: LedgerReader,
        authenticator: Callable[[], Authenticator] | None = None,
    ) -> None:
        self._config = config
        self._limiter = limiter
        self.flush = flush
        self.ledger = reader
        # The pipeline's: with the API's keys, their revocations and rotation graces.
        self._authenticator = authenticator or (lambda: Authenticator(self._config()))

    @property
    def config(self) -> GatewayConfig:
        return self._config()

    @property
    def authenticator(self) -> Authenticator:
        return self._authenticator()

    def caller_or_admin(self, request: web.Request) -> Caller | None:
        """The caller's own key (refused when unknown, revoked or expired), or None for the
        admin key."""
        config = self._config()
        if is_admin(config, request):
            return None
        return _key_holder(config, self._authenticator(), request)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/gateway/me", self.me),
            web.get("/gateway/me/usage", self.me_usage),
            web.get("/gateway/usage", self.gateway_usage),
            web.get("/v1/organization/usage/completions", self.openai_completions),
            web.get("/v1/organization/costs", self.openai_costs),
        ]

    # ------------------------------------------------------------ /gateway/me

    async def me(self, request: web.Request) -> web.Response:
        config = self._config()
        try:
            caller = _key_holder(config, self._authenticator(), request)
        except GatewayError as error:
            return error_response(error)
        await self.flush()
        return web.json_response(await self._me_document(config, caller))

    async def _me_document(self, config: GatewayConfig, caller: Caller) -> dict[str, Any]:
        key, team = caller.key, caller.team
        day_start, _ = self._limiter.calendar.window("day")
        month_start, _ = self._limiter.calendar.window("month")
        today, month, _ = await asyncio.gather(
            spend_since(self.ledger, "key_id", key.id, day_start),
            spend_since(self.ledger, "key_id", key.id, month_start),
            self._limiter.refresh(self._limiter.meters_for(key, team)),
        )
        return {
            "team": team.name,
            "key_id": key.id,
            "expires": key.expires.isoformat() if key.expires else None,
            "days_left": caller.days_left,
            "plan": team.billing.plan,
            "renew_warning": caller.days_left is not None
            and caller.days_left <= config.renew_warning_days,
            "limits": self._limiter.remaining(key, team),
            "spend_usd": {"today": _usd(today), "month": _usd(month)},
        }

    async def me_usage(self, request: web.Request) -> web.Response:
        """The caller's own key's usage over time (the portal's charts): per bucket the sums,
        the latency p50/p95, and `results[]`, one per `group_by` group (`model`; the admin
        key: every key, grouped by any of `team,key,model`)."""
        try:
            caller = self.caller_or_admin(request)
            query = _usage_query(request.query, default_width="1d")
            _only(query.group_by, {"model"} if caller is not None else {"team", "key", "model"})
            if caller is not None:
                query.teams, query.key_ids = [], [caller.key.id]
            check_query(query)
            await self.flush()
            whole = UsageQuery(**{**vars(query), "group_by": []})
            limits = BUCKET_LIMITS["1m"]
            # A key's calls are few: its percentiles are exact from its rows. The admin's span
            # every call, and are summed from the hourly rollups, without percentiles.
            admin = caller is None
            if admin and query.group_by:
                grouped = await bucket_page(self.ledger, query, limits=limits, rollups=True)
                totals = summed_groups(grouped)
            else:
                totals = await bucket_page(
                    self.ledger, whole, limits=limits, percentiles=not admin, rollups=admin
                )
                grouped = totals
                if query.group_by:
                    grouped = await bucket_page(self.ledger, query, limits=limits)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        data = []
        for bucket, groups in zip(totals.buckets, grouped.buckets, strict=True):
            sums = bucket.groups[0] if bucket.groups else {}
            data.append(
                {
                    "start_time": bucket.start_time,
                    "end_time": bucket.end_time,
                    **{field: int(sums.get(field) or 0) for field in _ME_FIELDS},
                    "latency_p50_ms": sums.get("latency_p50_ms"),
                    "latency_p95_ms": sums.get("latency_p95_ms"),
                    "results": [_group_result(group) for group in groups.groups],
                }
            )
        return web.json_response(
            {
                "key_id": caller.key.id if caller else None,
                "bucket_width": query.bucket_width,
                "data": data,
                "has_more": totals.has_more,
                "next_page": totals.next_page,
            }
        )

    # ------------------------------------------------------------ admin

    def _check_admin(self, request: web.Request) -> None:
        check_admin(self._config(), request)

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    async def gateway_usage(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            query = _usage_query(request.query, default_width="1h")
            check_query(query)
            query.limit = query.limit or BUCKET_LIMITS[query.bucket_width][1]
            await self.flush()
            page = await bucket_page(self.ledger, query, percentiles=True)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        data = []
        for bucket in page.buckets:
            results = []
            for group in bucket.groups:
                group["cost_usd"] = format_usd(int(group["cost_nanousd"]))
                results.append(_rename(group, {"team": "team", "key_id": "key", "model": "model"}))
            data.append({"start_time": bucket.start_time, "end_time": bucket.end_time,
                         "results": results})  # fmt: skip
        return web.json_response(
            {
                "object": "gateway.usage",
                "bucket_width": query.bucket_width,
                "data": data,
                "has_more": page.has_more,
                "next_page": page.next_page,
            }  # fmt: skip
        )

    async def openai_completions(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            query = _usage_query(request.query, default_width="1d")
            requested = list(query.group_by)
            _only(requested, {"project_id", "user_id", "api_key_id", "model", "batch",
                              "service_tier"})  # fmt: skip
            # The gateway has no users, batches or tiers: those groups are always null.
            query.group_by = [name for name in requested if name in GROUP_COLUMNS]
            query.paths = COMPLETION_PATHS
            query.billable_only = True
            check_query(query)
            await self.flush()
            page = await bucket_page(self.ledger, query)
        except (GatewayError, QueryError) as error:
            return error_response(error)
        return web.json_response(_openai_page(page, requested, _completion_result))

    async def openai_costs(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            query = _usage_query(request.query, default_width="1d")
            check_query(query, max_width="1d")
            _only(query.group_by, {"project_id", "line_item", "api_key_id"})
            query.billable_only = True
            await self.flush()
            page = await bucket_page(self.ledger, query, limits=(7, 180))
        except (GatewayError, QueryError) as error:
            return error_response(error)
        currency = self._config().pricing.currency.lower()
        return web.json_response(
            _openai_page(page, query.group_by, lambda g, by: _cost_result(g, by, currency))
        )


# ---------------------------------------------------------------- shapes


def _openai_page(page, group_by, result_of) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": bucket.start_time,
                "end_time": bucket.end_time,
                "results": [result_of(group, group_by) for group in bucket.groups],
            }
            for bucket in page.buckets
        ],
        "has_more": page.has_more,
        "next_page": page.next_page,
    }


def _completion_result(group: dict[str, Any], group_by) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": int(group["input_tokens"] or 0),
        "output_tokens": int(group["output_tokens"] or 0),
        "input_cached_tokens": int(group["cached_input_tokens"] or 0),
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": int(group["requests"]),
        "project_id": group.get("team") if "project_id" in group_by else None,
        "user_id": None,
        "api_key_id": group.get("key_id") if "api_key_id" in group_by else None,
        "model": group.get("model") if "model" in group_by else None,
        "batch": False if "batch" in group_by else None,
    }


def _cost_result(group: dict[str, Any], group_by, currency: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "object": "organization.costs.result",
        "amount": {"value": int(group["cost_nanousd"] or 0) / 1e9, "currency": currency},
        "line_item": group.get("model") if "line_item" in group_by else None,
        "project_id": group.get("team") if "project_id" in group_by else None,
        "api_key_id": group.get("key_id") if "api_key_id" in group_by else None,
    }


_ME_FIELDS = (
    "requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens", "request_bytes", "response_bytes", "cost_nanousd",
)  # fmt: skip


def is_admin(config: GatewayConfig, request: web.Request) -> bool:
    """The caller presents the admin key (set, and equal in constant time)."""
    expected = os.environ.get(config.admin.key_env, "")
    presented = bearer_secret(request.headers.get("Authorization")) or ""
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


def summed_groups(page: Page) -> Page:
    """The page with each bucket's groups summed into one (the totals of a grouped page)."""
    buckets = []
    for bucket in page.buckets:
        sums = [0] * len(_ME_FIELDS)
        for group in bucket.groups:
            for i, value in enumerate(map(group.get, _ME_FIELDS)):
                if value:
                    sums[i] += value
        groups = [dict(zip(_ME_FIELDS, sums, strict=True))] if bucket.groups else []
        buckets.append(Bucket(bucket.start_time, bucket.end_time, groups))
    return Page(buckets, page.has_more, page.next_page)


def _group_result(group: dict[str, Any]) -> dict[str, Any]:
    """One group of a bucket: its names (`team`, `key`, `model`) and its sums as integers."""
    result: dict[str, Any] = {
        name: group[column] for column, name in _GROUP_NAMES if column in group
    }
    result.update({field: int(group.get(field) or 0) for field in _ME_FIELDS})
    return result


_GROUP_NAMES = (("team", "team"), ("key_id", "key"), ("model", "model"))


def check_admin(config: GatewayConfig, request: web.Request) -> None:
    """Refuse (401 `invalid_admin_key`) unless the caller presents the admin key."""
    if not is_admin(config, request):
        raise GatewayError(ADMIN_UNAUTHORIZED, "This endpoint needs the gateway's admin key.")


def _rename(group: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(k, k): v for k, v in group.items()}


# ---------------------------------------------------------------- parameters


def _values(query: MultiMapping[str], name: str) -> list[str]:
    """`name=a,b`, repeated `name=a&name=b`, or the SDK's `name[]=a&name[]=b`."""
    values = [*query.getall(name, []), *query.getall(name + "[]", [])]
    return [part for value in values for part in value.split(",") if part]


# Plain ASCII decimal integers only: no exponents, "nan", underscores or other scripts' digits,
# and short enough that converting one costs nothing.
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


def _int(
    query: MultiMapping[str], name: str, low: int, high: int | None, what: str = "an integer"
) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    if not _INTEGER.fullmatch(value.strip()):
        raise QueryError(name, f"{name} must be {what}")
    number = int(value)
    if high is None and number < low:
        raise QueryError(name, f"{name} must be at least {low}")
    if high is not None and not low <= number <= high:
        raise QueryError(name, f"{name} must be between {low} and {high}")
    return number


def _usage_query(query: MultiMapping[str], default_width: str) -> UsageQuery:
    seconds = "an integer (unix seconds)"
    start = _int(query, "start_time", 0, MAX_TIME, seconds)
    if start is None:
        raise QueryError("start_time", "start_time is required (unix seconds)")
    end = _int(query, "end_time", 0, MAX_TIME, seconds)
    limit = _int(query, "limit", 1, None)  # its maximum is the endpoint's, for the width
    group_by = _values(query, "group_by")
    return UsageQuery(
        start_time=start,
        end_time=now() if end is None else end,
        bucket_width=query.get("bucket_width", default_width),
        group_by=group_by,
        teams=_values(query, "project_ids") + _values(query, "teams"),
        key_ids=_values(query, "api_key_ids") + _values(query, "keys"),
        models=_values(query, "models"),
        limit=limit,
        page=query.get("page"),
    )


def _only(group_by: list[str] | tuple, allowed: set[str]) -> None:  # type: ignore[type-arg]
    for name in group_by:
        if name not in allowed:
            raise QueryError("group_by", f"group_by '{name}' is not supported here")


def _key_holder(
    config: GatewayConfig, authenticator: Authenticator, request: web.Request
) -> Caller:
    """The caller's own gateway key, refused when unknown, revoked or expired."""
    caller = authenticator.authenticate(
        request.headers.get("Authorization"), today_in(config.limits_timezone)
    )
    ensure_not_expired(caller)
    return caller


def _usd(nanousd: int) -> float:
    return nanousd / 1e9


def error_response(error: GatewayError | QueryError) -> web.Response:
    if isinstance(error, QueryError):
        body = error_body(INVALID_REQUEST, str(error), error.param)
        return web.Response(status=400, body=body, content_type="application/json")
    return web.Response(
        status=error.kind.status, body=error.body(), content_type="application/json"
    )

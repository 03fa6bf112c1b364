"""Usage and cost queries over the ledger, bucketed in time, for the admin APIs and the portal.

They read through a `LedgerReader`, so they answer the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.ledger.readers import LedgerReader, Row
from gateway.ledger.rollups import ROLLED_UP_SUMS, ROW_SUMS, SUMMED

BUCKET_SECONDS = {"1m": 60, "1h": 3600, "1d": 86400}
HOUR, DAY = 3600, 86400
# OpenAI's bucket limits per width: (default, max).
BUCKET_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# The latest moment a query may name: 9999-12-31T23:59:59Z (unix seconds).
MAX_TIME = 253_402_300_799
# Group names as the APIs spell them → ledger columns.
GROUP_COLUMNS = {
    "project_id": "team",
    "team": "team",
    "api_key_id": "key_id",
    "key": "key_id",
    "model": "model",
    "line_item": "model",
}


class QueryError(ValueError):
    """A bad query parameter; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class UsageQuery:
    start_time: int
    end_time: int
    bucket_width: str = "1d"
    group_by: Sequence[str] = ()
    teams: Sequence[str] = ()
    key_ids: Sequence[str] = ()
    models: Sequence[str] = ()
    paths: Sequence[str] = ()
    billable_only: bool = False
    limit: int | None = None
    page: str | None = None

    @property
    def width(self) -> int:
        return BUCKET_SECONDS[self.bucket_width]


@dataclass
class Bucket:
    start_time: int
    end_time: int
    groups: list[dict[str, object]] = field(default_factory=list)


@dataclass
class Page:
    buckets: list[Bucket]
    has_more: bool
    next_page: str | None


_SUMS = ROW_SUMS


def check_query(query: UsageQuery, *, max_width: str | None = None) -> None:
    if query.bucket_width not in BUCKET_SECONDS:
        raise QueryError("bucket_width", "bucket_width must be one of 1m, 1h, 1d")
    if max_width is not None and query.bucket_width != max_width:
        raise QueryError("bucket_width", f"bucket_width must be {max_width}")
    for name, moment in (("start_time", query.start_time), ("end_time", query.end_time)):
        if not 0 <= moment <= MAX_TIME:
            raise QueryError(name, f"{name} must be unix seconds between 0 and {MAX_TIME}")
    if query.end_time <= query.start_time:
        raise QueryError("end_time", "end_time must be after start_time")
    for name in query.group_by:
        if name not in GROUP_COLUMNS:
            raise QueryError("group_by", f"cannot group by '{name}'")


async def bucket_page(
    reader: LedgerReader,
    query: UsageQuery,
    *,
    percentiles: bool = False,
    limits: tuple[int, int] | None = None,
    rollups: bool = False,
) -> Page:
    """One page of buckets (empty ones included), each with its grouped sums.

    `limits` is (default, max) buckets per page; OpenAI's for the width when not given.
    `rollups`: sum the sealed hours from `usage_hourly` (`gateway.ledger.rollups`), the same
    answer at a fraction of the reads, where the query allows it (hour or day buckets, no
    path or status filter, no percentiles).
    """
    width = query.width
    first = page_start(query)
    default, maximum = limits or BUCKET_LIMITS[query.bucket_width]
    if query.limit is not None and not 1 <= query.limit <= maximum:
        raise QueryError(
            "limit", f"limit must be between 1 and {maximum} for bucket_width {query.bucket_width}"
        )
    limit = query.limit or default
    total = -(-(query.end_time - first) // width)  # whole buckets, rounded up
    count = max(0, min(limit, total))
    buckets = [
        Bucket(first + i * width, min(first + (i + 1) * width, query.end_time))
        for i in range(count)
    ]
    if buckets and rollups and not percentiles and _rolls_up(query):
        await _fill_from_rollups(reader, query, buckets)
    elif buckets:
        await _fill(reader, query, buckets, percentiles)
    has_more = total > count
    return Page(buckets, has_more, _encode_page(first + count * width) if has_more else None)


async def _fill(
    reader: LedgerReader, query: UsageQuery, buckets: list[Bucket], percentiles: bool
) -> None:
    columns = list(dict.fromkeys(GROUP_COLUMNS[g] for g in query.group_by))
    where, params = _where(query, buckets[0].start_time, buckets[-1].end_time)
    group_select = "".join(f", {c}" for c in columns)
    bucket = reader.dialect.bucket_index()
    order = reader.dialect.nulls_first(", ".join(["1", *columns]))
    sql = (
        f"SELECT {bucket} AS bucket{group_select}, {_SUMS} "
        f"FROM requests WHERE {where} GROUP BY 1{''.join(f', {c}' for c in columns)} "
        f"ORDER BY {order}"
    )
    first, width = buckets[0].start_time, query.width
    for group in await reader.rows(sql, [first, width, *params]):
        buckets[group.pop("bucket")].groups.append(group)
    if percentiles:
        await _add_percentiles(reader, columns, where, [first, width, *params], buckets)


def _rolls_up(query: UsageQuery) -> bool:
    return query.width % HOUR == 0 and not query.paths and not query.billable_only


async def _fill_from_rollups(
    reader: LedgerReader, query: UsageQuery, buckets: list[Bucket]
) -> None:
    """The sealed hours from the rollups, the rest from `requests`, summed per group."""
    first, end = buckets[0].start_time, buckets[-1].end_time
    state = await reader.rows("SELECT sealed_until, daily_until FROM rollup_state", [])
    sealed_until = int(state[0]["sealed_until"]) if state else 0
    daily_until = int(state[0]["daily_until"]) if state and query.width % DAY == 0 else 0
    days_to = max(first, min(daily_until, end - end % DAY))
    hours_to = max(days_to, min(sealed_until, end - end % HOUR))
    columns = list(dict.fromkeys(GROUP_COLUMNS[g] for g in query.group_by))
    select = "".join(f", {c}" for c in columns)
    names = (*columns, *SUMMED)
    parts = []
    for table, start, stop, sums, column in (
        ("usage_daily", first, days_to, ROLLED_UP_SUMS, "hour"),
        ("usage_hourly", days_to, hours_to, ROLLED_UP_SUMS, "hour"),
        ("requests", hours_to, end, _SUMS, "started_at"),
    ):
        if start >= stop:
            continue
        where, params = _where(query, start, stop, column=column)
        order = reader.dialect.nulls_first(", ".join(["1", *columns]))
        sql = (
            f"SELECT {reader.dialect.bucket_index(column)} AS bucket{select}, {sums} "
            f"FROM {table} WHERE {where} GROUP BY 1{select} ORDER BY {order}"
        )
        parts.append(await reader.tuples(sql, [first, query.width, *params]))
    if len(parts) == 1:  # one source (the usual case once hours are sealed): no merging
        for row in parts[0]:
            buckets[row[0]].groups.append(dict(zip(names, row[1:], strict=True)))
        return
    merged: dict[tuple, list] = {}
    width = len(columns) + 1
    for rows in parts:
        for row in rows:
            held = merged.get(row[:width])
            if held is None:
                merged[row[:width]] = list(row[width:])
            else:
                for i, value in enumerate(row[width:]):
                    held[i] = (held[i] or 0) + (value or 0)
    for key in sorted(merged, key=lambda k: tuple((v is not None, v) for v in k)):
        buckets[key[0]].groups.append(dict(zip(names, (*key[1:], *merged[key]), strict=True)))


def _where(
    query: UsageQuery, start: int, end: int, column: str = "started_at"
) -> tuple[str, list[object]]:
    clauses, params = [f"{column} >= ?", f"{column} < ?"], [start, end]
    for column, values in (
        ("team", query.teams),
        ("key_id", query.key_ids),
        ("model", query.models),
        ("path", query.paths),
    ):
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    if query.billable_only:
        clauses.append("status BETWEEN 200 AND 299")
    return " AND ".join(clauses), params


async def _add_percentiles(
    reader: LedgerReader, columns: list[str], where: str, params: list, buckets: list[Bucket]
) -> None:
    select = "".join(f", {c}" for c in columns)
    sql = (
        f"SELECT {reader.dialect.bucket_index()} AS bucket{select}, latency_ms "
        f"FROM requests WHERE {where}"
    )
    latencies: dict[tuple, list[float]] = {}
    for row in await reader.tuples(sql, params):
        latencies.setdefault(tuple(row[:-1]), []).append(row[-1] or 0.0)
    for index, bucket in enumerate(buckets):
        for group in bucket.groups:
            values = sorted(latencies.get((index, *(group[c] for c in columns)), []))
            group["latency_p50_ms"] = _percentile(values, 0.50)
            group["latency_p95_ms"] = _percentile(values, 0.95)


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    return round(values[max(0, math.ceil(q * len(values)) - 1)], 3)


def _encode_page(bucket_start: int) -> str:
    return "page_" + base64.urlsafe_b64encode(str(bucket_start).encode()).decode().rstrip("=")


_PAGE_TOKEN = re.compile(r"page_[A-Za-z0-9_-]{1,24}")
_PAGE_VALUE = re.compile(r"[0-9]{1,15}")


def page_start(query: UsageQuery) -> int:
    """The first bucket's start: the query's (aligned) start, or where `page` says to go on.

    A cursor is only accepted for the query it came from: aligned to the bucket width and
    inside [start_time, end_time); anything else is a 400 naming `page`."""
    width = query.width
    first = query.start_time - query.start_time % width
    if not query.page:
        return first
    cursor = _decode_page(query.page)
    if cursor % width or not first <= cursor < query.end_time:
        raise QueryError("page", "page is not a cursor for this query")
    return cursor


def _decode_page(token: str) -> int:
    if not _PAGE_TOKEN.fullmatch(token):
        raise QueryError("page", "page is not a cursor this API returned")
    raw = token.removeprefix("page_")
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise QueryError("page", "page is not a cursor this API returned") from exc
    if not _PAGE_VALUE.fullmatch(text):
        raise QueryError("page", "page is not a cursor this API returned")
    return int(text)


async def spend_since(reader: LedgerReader, column: str, value: str, since: float) -> int:
    """nano-USD spent by one key or team since a moment."""
    rows: list[Row] = await reader.rows(
        f"SELECT COALESCE(SUM(cost_nanousd), 0) AS spent FROM requests "
        f"WHERE {column} = ? AND started_at >= ?",
        (value, since),
    )
    return int(rows[0]["spent"]) if rows else 0


def now() -> int:
    """The default end_time: calls made during the current second are included."""
    return math.ceil(time.time())


CALL_FIELDS = (
    "request_id", "started_at", "path", "model", "stream", "status", "outcome", "error_code",
    "input_tokens", "output_tokens", "cost_nanousd", "latency_ms", "ttfb_ms",
)  # fmt: skip
ADMIN_CALL_FIELDS = ("team", "key_id", *CALL_FIELDS)


async def latest_calls(
    reader: LedgerReader,
    fields: Sequence[str],
    filters: dict[str, str],
    limit: int,
    before: tuple[float, str] | None = None,
) -> list[Row]:
    """Up to `limit` calls, newest first (`started_at`, then `request_id`), matching the
    `filters` (column → value), strictly before `before` (its `started_at` and id)."""
    clauses = [f"{column} = ?" for column in filters]
    params: list[object] = list(filters.values())
    if before is not None:
        clauses.append("(started_at < ? OR (started_at = ? AND request_id < ?))")
        params += [before[0], before[0], before[1]]
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    return await reader.rows(
        f"SELECT {', '.join(fields)} FROM requests {where}"
        "ORDER BY started_at DESC, request_id DESC LIMIT ?",
        [*params, limit],
    )


async def refusals(reader: LedgerReader, start: float, end: float) -> list[Row]:
    """Refused calls by team, key, limit and code (the partial index on refused rows)."""
    return await reader.rows(
        "SELECT team, key_id, rejected_by, error_code, status, COUNT(*) AS refused "
        "FROM requests WHERE outcome IN ('rejected', 'queue_timeout') "
        "AND started_at >= ? AND started_at < ? "
        "GROUP BY team, key_id, rejected_by, error_code, status "
        "ORDER BY refused DESC, team, key_id",
        [start, end],
    )

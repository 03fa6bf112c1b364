"""An upstream list filtered to the caller's team: pages of the upstream's list read until
the caller's own `limit` is met, so that `limit` / `after` / `before` / `has_more` work as
OpenAI's do (`collect_list`). Which items are the caller's is asked of a `visible` callback
(the object store's `visible_to`); nothing here answers HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.errors import INVALID_REQUEST, UPSTREAM_UNAVAILABLE, error_body
from gateway.pipeline.object_ids import as_object_id

DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100
MIN_PAGE_SIZE = 100
# The Files API's list is the exception: up to 10,000 items a page, 10,000 by default.
_LIST_LIMITS = {"file": (10_000, 10_000)}

FetchPage = Callable[[dict[str, str]], Awaitable[tuple[int, bytes]]]
Visible = Callable[[list[str]], Awaitable[set[str]]]


def list_limits(kind: str) -> tuple[int, int]:
    """(default, max) of `limit` on a kind's list, as OpenAI's API has them."""
    return _LIST_LIMITS.get(kind, (DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT))


async def collect_list(
    fetch_page: FetchPage,
    query: dict[str, str],
    visible: Visible,
    max_pages: int = 50,
    *,
    default_limit: int = DEFAULT_LIST_LIMIT,
    max_limit: int = MAX_LIST_LIMIT,
    page_size: int | None = None,
) -> tuple[int, bytes]:
    """An upstream list answer (status, body) holding only the caller's items.

    Pages the upstream (`fetch_page(query)`: its status and body, decoded of any
    Content-Encoding, for the list with these query parameters) until it has `limit` visible
    items (the query's `limit`, `default_limit` if absent, at most `max_limit`) or the
    upstream has no more, `max_pages` pages at most. The upstream is asked for `page_size`
    items a page (default: `limit`, at least 100, at most `max_limit`), each next page
    `after` the last upstream id of the one before.

    The answer is OpenAI's list: `{"object": "list", "data", "first_id", "last_id",
    "has_more"}`, plus the first page's other top-level keys. `has_more` is true when items
    the caller has not seen may be the caller's (another visible item of the last page, past
    `limit`; or upstream pages not fetched); `last_id` is then the last item the caller got,
    so paging on with `after=last_id` (the SDKs use `data[-1].id`) continues right after it
    and sees each of the caller's items once. `before=X` (without `after`) pages backwards
    the same way: the `limit` visible items nearest before X, in list order; `has_more` says
    whether more may lie before `first_id`. Full at the end of an upstream page, it stops
    there: `has_more` is then the upstream's (true even if none of the rest is the caller's,
    and the next call finds that out). When `max_pages` pass without one visible item, the
    answer is empty with `has_more` true (no cursor: an id of another team's is not shown).

    A non-2xx upstream answer is returned unchanged; a 2xx answer without a `data` list, as
    502 (it cannot be filtered, and it is not passed on unfiltered). A `limit` that is not a
    positive integer is a 400 `invalid_request`.
    """
    limit_text = query.get("limit")
    limit = default_limit
    if limit_text is not None:
        try:
            limit = int(limit_text)
        except ValueError:
            limit = 0
        if limit < 1:
            message = f"Invalid 'limit': {limit_text!r}: expected a positive integer."
            return 400, error_body(INVALID_REQUEST, message, param="limit")
    limit = min(limit, max_limit)
    size = page_size or min(max(limit, MIN_PAGE_SIZE), max_limit)
    backwards = "before" in query and "after" not in query
    cursor = "before" if backwards else "after"
    page_query = {**query, "limit": str(size)}

    kept: list[dict[str, Any]] = []
    first_page: dict[str, Any] | None = None
    has_more = True
    for _ in range(max_pages):
        status, body = await fetch_page(page_query)
        if not 200 <= status < 300:
            return status, body
        page = _list_page(body)
        if page is None:
            message = "The upstream's list answer could not be read, so it was not passed on."
            return 502, error_body(UPSTREAM_UNAVAILABLE, message)
        first_page = first_page or page
        items = [
            item for item in page["data"] if isinstance(item, dict) and as_object_id(item.get("id"))
        ]
        allowed = await visible([item["id"] for item in items]) if items else set()
        # Nearest the cursor first: forwards, the page's order; backwards, its reverse.
        ordered = list(reversed(items)) if backwards else items
        overflow = False
        for item in ordered:
            if item["id"] in allowed:
                if len(kept) == limit:
                    overflow = True
                    break
                kept.append(item)
        upstream_more = page.get("has_more") is True and bool(ordered)
        if overflow or len(kept) == limit or not upstream_more:
            # Full at a page's end: the upstream's has_more stands, rather than fetching
            # pages just to learn whether one of them holds another visible item.
            has_more = overflow or upstream_more
            break
        page_query = {**page_query, cursor: ordered[-1]["id"]}
    if backwards:
        kept.reverse()
    result: dict[str, Any] = {
        "object": "list",
        "data": kept,
        "first_id": kept[0]["id"] if kept else None,
        "last_id": kept[-1]["id"] if kept else None,
        "has_more": has_more,
    }
    for key, value in (first_page or {}).items():
        result.setdefault(key, value)
    return 200, orjson.dumps(result)


def _list_page(body: bytes) -> dict[str, Any] | None:
    try:
        page = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        return None
    return page

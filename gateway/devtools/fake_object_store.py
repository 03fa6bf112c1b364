"""The fake upstream's objects in memory: the store of every kind of object, with ids like
OpenAI's (`file-fake1`, `batch_fake2`, `vs_fake3`, ...) counted up from 1 in each state, so a
test's ids are known in advance; OpenAI's cursor pages (`limit`, `after`, `before`, `order`;
answers with `first_id`, `last_id`, `has_more`) and its error shape (`ObjectError`).

The calls on each kind are `gateway.devtools.fake_file_objects`' and
`gateway.devtools.fake_model_objects`'; which call goes where, `gateway.devtools.fake_objects`'.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# The id prefix of each kind of object, as OpenAI spells it.
ID_PREFIXES = {
    "file": "file-",
    "upload": "upload_",
    "part": "part_",
    "batch": "batch_",
    "vector_store": "vs_",
    "response": "resp_",
    "fine_tuning_job": "ftjob-",
    "container": "cntr_",
    "conversation": "conv_",
    "item": "msg_",
}
FILE_LIST_LIMIT = 10_000
LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20


class ObjectError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass
class Call:
    method: str
    segments: list[str]  # the path under /v1, split at "/"
    query: dict[str, str]
    body: dict[str, Any]
    now: int
    data: bytes = b""  # a multipart upload's file part


# A call on the objects API: its answer's payload, or `ObjectError`.
Handler = Callable[["FakeObjects", Call], Any]
# (path pattern under /v1, "*" for an id; method; handler)
Route = tuple[tuple[str, ...], str, Handler]


def no_such(kind: str, object_id: str) -> ObjectError:
    return ObjectError(404, f"No such {kind} object: {object_id}", param="id")


def required(call: Call, name: str) -> Any:
    value = call.body.get(name)
    if value is None:
        raise ObjectError(400, f"Missing required parameter: '{name}'.", param=name)
    return value


def page(
    items: list[dict[str, Any]],
    query: dict[str, str],
    *,
    default_limit: int = DEFAULT_LIST_LIMIT,
    max_limit: int = LIST_LIMIT,
    orderable: bool = True,
) -> dict[str, Any]:
    """One page of a list, `items` in creation order; newest first unless `order=asc`."""
    order = query.get("order", "desc") if orderable else "desc"
    if order not in ("asc", "desc"):
        raise ObjectError(400, f"Invalid 'order': {order!r}.", param="order")
    ordered = list(reversed(items)) if order == "desc" else list(items)
    try:
        limit = int(query.get("limit", default_limit))
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        message = f"Invalid 'limit': expected an integer between 1 and {max_limit}."
        raise ObjectError(400, message, param="limit")
    ids = [item["id"] for item in ordered]
    after, before = query.get("after"), query.get("before")
    if after is not None:
        rest = ordered[_cursor(ids, after, "after") + 1 :]
        data, has_more = rest[:limit], len(rest) > limit
    elif before is not None:
        rest = ordered[: _cursor(ids, before, "before")]
        data, has_more = rest[-limit:], len(rest) > limit
    else:
        data, has_more = ordered[:limit], len(ordered) > limit
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _cursor(ids: list[str], cursor: str, name: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        message = f"Invalid '{name}': no object {cursor} in this list."
        raise ObjectError(400, message, param=name) from None


@dataclass
class FakeObjects:
    """Every object of one fake upstream, by kind, in creation order."""

    # The files' contents by id: `FakeState.files`, shared with the upload/download routes.
    contents: dict[str, bytes] = field(default_factory=dict)
    store: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {kind: {} for kind in ID_PREFIXES}
    )
    # Each vector store's files, each response's input items, each conversation's items, each
    # upload's parts: by the owner's id, then the member's id.
    members: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{ID_PREFIXES[kind]}fake{next(self.counter)}"

    def add(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        self.store[kind][item["id"]] = item
        return item

    def get(self, kind: str, object_id: str, name: str | None = None) -> dict[str, Any]:
        item = self.store[kind].get(object_id)
        if item is None:
            raise no_such(name or kind.replace("_", " ").title().replace(" ", ""), object_id)
        return item

    def remove(self, kind: str, object_id: str, name: str | None = None) -> dict[str, Any]:
        item = self.get(kind, object_id, name)
        del self.store[kind][object_id]
        self.members.pop(object_id, None)
        return item

    def members_of(self, object_id: str) -> dict[str, dict[str, Any]]:
        return self.members.setdefault(object_id, {})

    def add_file(
        self, content: bytes, filename: str, purpose: str, now: int, file_id: str | None = None
    ) -> dict[str, Any]:
        """A file object and its content (an upload, or a file the fake makes itself)."""
        file_id = file_id or self.new_id("file")
        self.contents[file_id] = content
        return self.add(
            "file",
            {
                "object": "file",
                "id": file_id,
                "purpose": purpose,
                "filename": filename,
                "bytes": len(content),
                "created_at": now,
                "expires_at": None,
                "status": "processed",
                "status_details": None,
            },
        )

    def store_response(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """A created response, kept for GET / DELETE unless it says `"store": false`."""
        if response.get("store") is False:
            return
        self.add("response", response)
        items = self.members_of(response["id"])
        for item in input_items:
            items[item["id"]] = item


def message_items(objects: FakeObjects, given: Any) -> list[dict[str, Any]]:
    """Input items as stored: a string is one user message; each item gets an id."""
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    items = []
    for item in given if isinstance(given, list) else ():
        if isinstance(item, dict):
            items.append({"id": objects.new_id("item"), "type": "message", **item})
    return items

"""Walls between teams: which objects a call names, who owns each object, and lists filtered
to the caller's team.

Teams share one upstream key, so the upstream sees every team's files, batches, vector stores
... as one organization's. The gateway records the team that created each object (`objects`
table, `ObjectStore`) and checks it before forwarding a call that names one:

- `route(method, api_path)`: what a call does to the objects API (`create` / `use` / `list`),
  and every object id its path names (`ObjectRoute.referenced`, the main one first);
- `may_reference(body)` then `referenced_ids(json_body)`: the ids a JSON body names
  (`input_file_id`, `previous_response_id`, `tools[].vector_store_ids`, content parts' `file_id`,
  ...), which must belong to the caller too;
- `created_ids(kind, api_path, answer)` / `created_ids_in_stream(head)`: the objects a 2xx
  answer makes the caller the owner of;
- `collect_list(...)`: an upstream list filtered to the caller's objects, paged so that the
  caller's own `limit` / `after` / `has_more` work as OpenAI's do.

Pure functions except the store; nothing here answers HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import orjson

from gateway.config.loader import StorageConfig
from gateway.errors import INVALID_REQUEST, UPSTREAM_UNAVAILABLE, error_body
from gateway.ledger.storage import StorageError, postgres_dsn
from gateway.ledger.writer import _PRAGMAS, prepare_database

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("gateway.objects")

KINDS = (
    "file",
    "upload",
    "batch",
    "vector_store",
    "response",
    "fine_tuning_job",
    "container",
    "conversation",
    "chat_completion",
)


# ------------------------------------------------------------------ classifying a request


@dataclass(frozen=True, slots=True)
class ObjectRoute:
    """What a call does to the objects API.

    `action`: `create` (POST on a collection), `use` (anything under `/{collection}/{id}`) or
    `list` (GET on a collection). `object_id`: the id a use names. `deletes`: the call is the
    object's own DELETE (`DELETE /files/{id}`, not `DELETE /vector_stores/{vs}/files/{id}`).
    `referenced`: every object id the path names, all of which must be the caller's: the main
    one first, then any other object a sub-resource names (`/vector_stores/{vs}/files/{file}`).
    """

    action: str
    kind: str
    object_id: str | None = None
    deletes: bool = False
    referenced: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Collection:
    kind: str
    segments: tuple[str, ...]  # the collection's path under /v1, split at "/"
    # Names that may follow the collection but are not object ids (`/responses/input_tokens`).
    not_ids: frozenset[str] = frozenset()
    # A sub-collection of an object whose members are objects of another kind:
    # `/vector_stores/{vs}/files/{file_id}` names the file `file_id`.
    members: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)


_COLLECTIONS = (
    _Collection("file", ("files",)),
    _Collection("upload", ("uploads",)),
    _Collection("batch", ("batches",)),
    _Collection("vector_store", ("vector_stores",), members=("files",)),
    _Collection("response", ("responses",), not_ids=frozenset({"input_tokens", "compact"})),
    _Collection("fine_tuning_job", ("fine_tuning", "jobs")),
    _Collection("container", ("containers",)),
    _Collection("conversation", ("conversations",)),
    _Collection("chat_completion", ("chat", "completions")),
)
_BY_FIRST_SEGMENT = {collection.segments[0]: collection for collection in _COLLECTIONS}
COLLECTION_PATHS = {collection.kind: collection.path for collection in _COLLECTIONS}


def route(method: str, api_path: str) -> ObjectRoute | None:
    """The objects-API route of a call, None for a call that names no object.

    `api_path` is the path after `/v1`, e.g. `/files/file-abc/content` (a query string, if
    left on, is ignored; so is one trailing slash). The rule for ids: on a collection's path,
    POST is a `create` and GET a `list` (GET is a list on every collection, also where OpenAI
    has none today, so that a list added later is filtered rather than leaked; other methods
    name no object); the segment after the collection is always an object id, except the few
    names OpenAI uses there for calls on no object (`/responses/input_tokens`,
    `/responses/compact`: None), and everything below it is a use of that object, whatever the
    method. An empty segment (`/files//content`) is an id too, the empty one: no one owns it,
    so the call is refused, never forwarded as a call on no object.

    `POST /chat/completions` is a `create` only when the body stores the completion
    (`creates_stored_chat_completion`); otherwise the caller should treat it as no route.
    """
    path = api_path.partition("?")[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    segments = path.split("/")
    if len(segments) < 2 or segments[0] != "":
        return None
    collection = _BY_FIRST_SEGMENT.get(segments[1])
    if collection is None:
        return None
    size = len(collection.segments)
    if tuple(segments[1 : 1 + size]) != collection.segments:
        return None
    rest = segments[1 + size :]
    method = method.upper()
    if not rest:
        if method == "POST":
            return ObjectRoute("create", collection.kind)
        if method in ("GET", "HEAD"):
            return ObjectRoute("list", collection.kind)
        return None
    object_id = rest[0]
    if object_id in collection.not_ids:
        return None
    referenced = [object_id]
    if len(rest) >= 3 and rest[1] in collection.members and rest[2] not in referenced:
        referenced.append(rest[2])
    deletes = method == "DELETE" and len(rest) == 1
    return ObjectRoute("use", collection.kind, object_id, deletes, tuple(referenced))


def creates_stored_chat_completion(json_body: dict[str, Any] | None) -> bool:
    """Whether `POST /chat/completions` with this body stores the completion (`"store": true`;
    OpenAI's default is not to), making it an object its creator may read back later."""
    return isinstance(json_body, dict) and json_body.get("store") is True


# ------------------------------------------------------------------ objects an answer creates

_MAX_ID_LENGTH = 512


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID_LENGTH else None


def created_ids(kind: str, api_path: str, answer: dict[str, Any]) -> list[tuple[str, str]]:
    """The (object_id, kind) pairs a 2xx JSON answer makes the caller the owner of.

    - a create (a POST on the collection, `kind` its route's kind): the answer's `id`;
    - `POST /uploads/{id}/complete`: the file it makes (`"file": {"id": ...}`);
    - any answer showing an object that the upstream made *for* the caller's object, which the
      caller will then fetch by id: a batch's `output_file_id` / `error_file_id`, a
      fine-tuning job's `result_files`, a response's code-interpreter `container_id`s. So the
      handler may call this for every 2xx JSON answer of a create or a use (the caller's
      ownership of the object itself was checked before forwarding).

    A list answer creates nothing.
    """
    if not isinstance(answer, dict) or answer.get("object") == "list":
        return []
    path = api_path.partition("?")[0].rstrip("/")
    found: list[tuple[str, str]] = []
    if path == COLLECTION_PATHS.get(kind) and (object_id := _id(answer.get("id"))):
        found.append((object_id, kind))
    if kind == "upload" and path.endswith("/complete"):
        file = answer.get("file")
        if isinstance(file, dict) and (file_id := _id(file.get("id"))):
            found.append((file_id, "file"))
    found.extend(_made_for(kind, answer))
    return list(dict.fromkeys(found))


def _made_for(kind: str, answer: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Objects the upstream made for an object of this kind, named in its answer."""
    if kind == "batch":
        for key in ("output_file_id", "error_file_id"):
            if file_id := _id(answer.get(key)):
                yield file_id, "file"
    elif kind == "fine_tuning_job":
        files = answer.get("result_files")
        for value in files if isinstance(files, list) else ():
            if file_id := _id(value):
                yield file_id, "file"
    elif kind == "response":
        output = answer.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict) or item.get("type") != "code_interpreter_call":
                continue
            if container_id := _id(item.get("container_id")):
                yield container_id, "container"


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\n|\r")
_CREATED = re.compile(rb'"type"\s*:\s*"response\.created"')
# A `response.created` event cut short: the response object as OpenAI writes it, id first.
_CUT_RESPONSE_ID = re.compile(rb'"response"\s*:\s*\{\s*"id"\s*:\s*"([^"\\]{1,512})"')


def created_ids_in_stream(head: bytes) -> list[tuple[str, str]]:
    """The object a streamed create makes, from the first bytes of its SSE answer: the id in
    the first `response.created` event of `POST /responses` (`{"type": "response.created",
    "response": {"id": "resp_..."`), or a stored chat completion's id in its first chunk.

    Any JSON spacing and key order, `\\n\\n`, `\\r\\n\\r\\n` or `\\r\\r` framing, `event:` /
    `id:` / comment lines. `head` should reach past the end of the first event; an event cut
    short is still read when its response object starts with its id, as OpenAI writes it.
    [] when no id is found: the object stays unknown and is refused, also to its creator.
    """
    for event in _EVENT_END.split(head):
        data = _event_data(event)
        if not data:
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            if _CREATED.search(data) and (cut := _CUT_RESPONSE_ID.search(data)):
                return [(cut.group(1).decode("utf-8", "replace"), "response")]
            return []  # the first event with data, unreadable: nothing to go on
        if not isinstance(payload, dict):
            return []
        if payload.get("type") == "response.created":
            response = payload.get("response")
            if isinstance(response, dict) and (response_id := _id(response.get("id"))):
                return [(response_id, "response")]
            return []
        if payload.get("object") == "chat.completion.chunk":
            chunk_id = _id(payload.get("id"))
            return [(chunk_id, "chat_completion")] if chunk_id else []
        # Another first event (an error): no object was made.
        return []
    return []


_FINAL_RESPONSE = re.compile(rb'"type"\s*:\s*"response\.(completed|incomplete|failed)"')


def created_ids_in_stream_tail(tail: bytes) -> list[tuple[str, str]]:
    """Objects a streamed response made on the way (a code-interpreter container), from the
    final `response.completed` / `incomplete` / `failed` event in the stream's last bytes.
    [] when that event is not whole within them."""
    for event in reversed(_EVENT_END.split(tail)):
        data = _event_data(event)
        if not data or not _FINAL_RESPONSE.search(data):
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        response = payload.get("response") if isinstance(payload, dict) else None
        if isinstance(response, dict):
            return created_ids("response", COLLECTION_PATHS["response"], response)
        return []
    return []


def _event_data(event: bytes) -> bytes:
    """An SSE event's `data:` lines joined, as the SSE spec joins them."""
    lines = []
    for line in _LINE_END.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


# ------------------------------------------------------------------ objects a body names

# A JSON body names objects only under one of these keys (a `\u` escape could spell any of
# them, so it sends the body to the walk too).
_REFERENCE_MARKERS = (
    b"file",  # file_id, file_ids, input_file_id, training_file, validation_file
    b"previous_response_id",
    b"conversation",
    b"vector_store_ids",
    b"container",
    b"\\u",
)
_TOP_LEVEL_IDS = ("input_file_id", "training_file", "validation_file", "previous_response_id")
# Annotations whose `file_id` is a container's file (`cfile_...`), covered by the container.
_NOT_FILE_IDS = frozenset({"container_file_citation"})
MAX_WALK_DEPTH = 12


def may_reference(body: bytes) -> bool:
    """Cheap pre-check on a raw JSON body: False when it cannot name any object, so the walk of
    `referenced_ids` is skipped for the common body (a plain chat call)."""
    return any(marker in body for marker in _REFERENCE_MARKERS)  # ~6 µs for a 1 kB body


def referenced_ids(json_body: dict[str, Any]) -> list[str]:
    """The ids of the objects a JSON request body names, each of which must be the caller's
    (first seen first, no repeats).

    Top level: `input_file_id`, `training_file`, `validation_file`, `previous_response_id`,
    `conversation` (a string or `{"id": ...}`). At any depth (up to `MAX_WALK_DEPTH`
    containers, deeper than any part of OpenAI's bodies): `file_id` (content parts
    `{"type": "input_file" | "input_image", "file_id"}`, chat's `{"type": "file", "file":
    {"file_id"}}`, an image edit's `images[].file_id` / `mask.file_id`, ...; except a
    `container_file_citation`'s), `file_ids`, `vector_store_ids` (`tools[].vector_store_ids`,
    `tool_resources....`) and a code-interpreter tool's `container` id. Only strings count:
    `{"file_id": {"type": "string"}}` in a JSON schema names nothing.
    """
    found: dict[str, None] = {}

    def add(value: Any) -> None:
        if isinstance(value, str):
            found[value] = None

    for key in _TOP_LEVEL_IDS:
        add(json_body.get(key))
    conversation = json_body.get("conversation")
    add(conversation.get("id") if isinstance(conversation, dict) else conversation)

    _walk(json_body, 0, found)
    return list(found)


def _walk(node: dict[str, Any] | list[Any], depth: int, found: dict[str, None]) -> None:
    """Every id named at any depth below this container (depth-first, in document order)."""
    if depth >= MAX_WALK_DEPTH:
        return
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                _walk(item, depth + 1, found)
        return
    kind = node.get("type")
    file_id = node.get("file_id")
    if isinstance(file_id, str) and kind not in _NOT_FILE_IDS:
        found[file_id] = None
    for key in ("file_ids", "vector_store_ids"):
        values = node.get(key)
        if isinstance(values, list):
            found.update((value, None) for value in values if isinstance(value, str))
    if kind == "code_interpreter" and isinstance(container := node.get("container"), str):
        found[container] = None
    for value in node.values():
        if isinstance(value, dict | list):
            _walk(value, depth + 1, found)


# ------------------------------------------------------------------ filtered lists

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
        items = [item for item in page["data"] if isinstance(item, dict) and _id(item.get("id"))]
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


# ------------------------------------------------------------------ the owners' store


@dataclass(frozen=True, slots=True)
class Owner:
    team: str
    key_id: str | None
    kind: str
    deleted: bool


class ObjectStoreUnavailable(StorageError):
    """The objects table could not be read or written; the message is safe to print."""


DEFAULT_MAX_CACHED = 100_000
_SQLITE_CHUNK = 5_000  # ids per SELECT ... IN (?, ...): well under SQLite's 32766 variables
_COLUMNS = "object_id, kind, team, key_id, deleted_at"
_Row = tuple[str, str, str, str | None, float]  # object_id, kind, team, key_id, created_at


class ObjectStore:
    """Who owns each object: the `objects` table of the ledger's database, behind an
    in-memory cache of the owners already seen.

    `owners` asks the database only for the ids not cached (another replica may have made
    them), in one query; an id found nowhere is not cached, so a replica sees an object
    another one records later. `record` commits before it returns (the creating call's
    answer waits for it, so that another replica already sees the owner when the caller uses
    the object) and never takes an object from another team (the first owner wins). A
    deletion made through another replica is not seen in this one's cache until the entry is
    evicted: it only means the owner's call is forwarded and the upstream says 404.

    The store's failures raise `ObjectStoreUnavailable`.
    """

    def __init__(
        self, max_cached: int = DEFAULT_MAX_CACHED, clock: Callable[[], float] = time.time
    ) -> None:
        self._cache: dict[str, Owner] = {}
        self._max_cached = max_cached
        self._clock = clock

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def owners(self, ids: Sequence[str]) -> dict[str, Owner]:
        """The owner of each of these ids that has one (unknown ids are left out)."""
        found: dict[str, Owner] = {}
        missing: list[str] = []
        for object_id in dict.fromkeys(ids):
            owner = self._cache.get(object_id)
            if owner is None:
                missing.append(object_id)
            else:
                found[object_id] = owner
        if missing:
            for object_id, owner in (await self._select(missing)).items():
                self._remember(object_id, owner)
                found[object_id] = owner
        return found

    async def visible_to(self, team: str, ids: Sequence[str]) -> set[str]:
        """Those of these ids that are objects of this team, not deleted (for `collect_list`)."""
        return {
            object_id
            for object_id, owner in (await self.owners(ids)).items()
            if owner.team == team and not owner.deleted
        }

    async def record(self, pairs: list[tuple[str, str]], team: str, key_id: str | None) -> None:
        """Make this team the owner of these (object_id, kind) objects, committed on return; an
        object another team already owns keeps its owner (a warning is logged). An object
        whose owner is cached is not written again: an owner never changes (so recording a
        batch's output file on each retrieval costs nothing after the first)."""
        kinds: dict[str, str] = {}
        for object_id, kind in pairs:
            if object_id:
                kinds.setdefault(object_id, kind)  # an id twice: its first kind
        known = {
            object_id: self._cache[object_id] for object_id in kinds if object_id in self._cache
        }
        rows = [
            (object_id, kind, team, key_id, self._clock())
            for object_id, kind in kinds.items()
            if object_id not in known
        ]
        stored = await self._insert(rows) if rows else {}
        for object_id, owner in stored.items():
            self._remember(object_id, owner)
        for object_id, owner in {**known, **stored}.items():
            if owner.team != team:
                log.warning(
                    "object %s (%s) belongs to team %s: not recorded for team %s",
                    object_id, kinds[object_id], owner.team, team,
                )  # fmt: skip

    async def mark_deleted(self, object_id: str) -> None:
        """The owner's DELETE of the object succeeded."""
        await self._update_deleted(object_id, self._clock())
        owner = self._cache.get(object_id)
        if owner is not None:
            self._cache[object_id] = Owner(owner.team, owner.key_id, owner.kind, True)

    def _remember(self, object_id: str, owner: Owner) -> None:
        self._cache.pop(object_id, None)
        self._cache[object_id] = owner
        while len(self._cache) > self._max_cached:
            del self._cache[next(iter(self._cache))]  # the oldest entry

    # ------------------------------------------------------------ what a backend provides

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        raise NotImplementedError

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        """Insert the rows whose id is new; the owner of each id afterwards."""
        raise NotImplementedError

    async def _update_deleted(self, object_id: str, when: float) -> None:
        raise NotImplementedError


def _owner(row: Sequence[Any]) -> tuple[str, Owner]:
    object_id, kind, team, key_id, deleted_at = row
    return object_id, Owner(team, key_id, kind, deleted_at is not None)


_SQLITE_INSERT = (
    "INSERT INTO objects (object_id, kind, team, key_id, created_at, deleted_at) "
    "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (object_id) DO NOTHING"
)
_MARK_DELETED = "UPDATE objects SET deleted_at = ? WHERE object_id = ? AND deleted_at IS NULL"


class SqliteObjectStore(ObjectStore):
    """The objects table in the SQLite ledger's file, on a connection of its own (WAL, so the
    ledger's writer and other processes on the file go on at the same time)."""

    def __init__(
        self,
        path: Path,
        max_cached: int = DEFAULT_MAX_CACHED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_cached, clock)
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one statement sequence at a time on the connection

    async def open(self) -> None:
        try:
            await asyncio.to_thread(prepare_database, self.path)
            self._db = await aiosqlite.connect(self.path)
            for statement in _PRAGMAS:
                await self._db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ObjectStoreUnavailable("the objects store is not open")
        return self._db

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        db = self._connection()
        found: dict[str, Owner] = {}
        try:
            async with self._lock:
                for start in range(0, len(ids), _SQLITE_CHUNK):
                    chunk = ids[start : start + _SQLITE_CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    sql = f"SELECT {_COLUMNS} FROM objects WHERE object_id IN ({marks})"
                    async with db.execute(sql, chunk) as cursor:
                        found.update(_owner(row) for row in await cursor.fetchall())
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None
        return found

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        db = self._connection()
        ids = [row[0] for row in rows]
        marks = ", ".join("?" * len(ids))
        try:
            async with self._lock:
                try:
                    await db.executemany(_SQLITE_INSERT, rows)
                    sql = f"SELECT {_COLUMNS} FROM objects WHERE object_id IN ({marks})"
                    async with db.execute(sql, ids) as cursor:
                        stored = dict(_owner(row) for row in await cursor.fetchall())
                    await db.commit()
                except BaseException:
                    await db.rollback()
                    raise
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None
        return stored

    async def _update_deleted(self, object_id: str, when: float) -> None:
        db = self._connection()
        try:
            async with self._lock:
                await db.execute(_MARK_DELETED, (when, object_id))
                await db.commit()
        except sqlite3.Error as exc:
            raise ObjectStoreUnavailable(f"objects table in {self.path}: {exc}") from None


_PG_SELECT = f"SELECT {_COLUMNS} FROM objects WHERE object_id = ANY($1::text[])"
_PG_INSERT = (
    "INSERT INTO objects (object_id, kind, team, key_id, created_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[]) "
    "ON CONFLICT (object_id) DO NOTHING"
)
_PG_MARK_DELETED = "UPDATE objects SET deleted_at = $1 WHERE object_id = $2 AND deleted_at IS NULL"
PG_POOL_SIZE = 4


class PostgresObjectStore(ObjectStore):
    """The objects table in the PostgreSQL ledger's database (created with the ledger's
    schema, whichever starts first), over a small pool of its own."""

    def __init__(
        self,
        dsn: str,
        max_cached: int = DEFAULT_MAX_CACHED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_cached, clock)
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        import asyncpg

        from gateway.ledger.postgres import CONNECT_TIMEOUT_S, WRITE_ERRORS, create_schema, safe_dsn

        try:
            # min_size 0: a connection lost in an outage is replaced on the next acquire.
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=PG_POOL_SIZE, timeout=CONNECT_TIMEOUT_S
            )
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                await create_schema(connection, safe_dsn(self._dsn))
        except (*WRITE_ERRORS, ValueError) as exc:  # ValueError: a malformed DSN
            await self.close()
            raise self._unavailable(exc) from None
        except StorageError:  # a ledger this version cannot use
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _unavailable(self, exc: BaseException) -> ObjectStoreUnavailable:
        from gateway.ledger.postgres import safe_dsn

        return ObjectStoreUnavailable(f"objects table at {safe_dsn(self._dsn)}: {exc}")

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        from gateway.ledger.postgres import CONNECT_TIMEOUT_S, WRITE_ERRORS

        if self._pool is None:
            raise ObjectStoreUnavailable("the objects store is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                return await work(connection)
        except WRITE_ERRORS as exc:
            raise self._unavailable(exc) from None

    async def _select(self, ids: list[str]) -> dict[str, Owner]:
        records = await self._run(lambda connection: connection.fetch(_PG_SELECT, ids))
        return dict(_owner(tuple(record)) for record in records)

    async def _insert(self, rows: list[_Row]) -> dict[str, Owner]:
        columns = [list(column) for column in zip(*rows, strict=True)]
        ids = columns[0]

        async def insert(connection: asyncpg.Connection) -> list[Any]:
            async with connection.transaction():
                await connection.execute(_PG_INSERT, *columns)
                return await connection.fetch(_PG_SELECT, ids)

        return dict(_owner(tuple(record)) for record in await self._run(insert))

    async def _update_deleted(self, object_id: str, when: float) -> None:
        await self._run(lambda connection: connection.execute(_PG_MARK_DELETED, when, object_id))


def make_object_store(
    storage: StorageConfig,
    max_cached: int = DEFAULT_MAX_CACHED,
    clock: Callable[[], float] = time.time,
) -> ObjectStore:
    """The objects store of the configured ledger store (not yet open): the SQLite file of
    `storage.sqlite_path`, or the PostgreSQL database of `$storage.dsn_env`."""
    if storage.backend == "postgres":
        return PostgresObjectStore(postgres_dsn(storage), max_cached, clock)
    return SqliteObjectStore(storage.sqlite_path, max_cached, clock)

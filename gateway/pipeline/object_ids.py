"""Which objects a call names and which it creates, for the walls between teams: pure
functions of a call's method, path, body and answer (nothing here answers HTTP or stores).

- `route(method, api_path)`: what a call does to the objects API (`create` / `use` / `list`),
  and every object id its path names (`ObjectRoute.referenced`, the main one first);
- `may_reference(body)` then `referenced_ids(json_body)`: the ids a JSON body names
  (`input_file_id`, `previous_response_id`, `tools[].vector_store_ids`, content parts' `file_id`,
  ...), which must belong to the caller too;
- `created_ids(kind, api_path, answer)` / `created_ids_in_stream(head)`: the objects a 2xx
  answer makes the caller the owner of.

Who owns each object is `gateway.ledger.object_store`'s; lists filtered to the caller's team,
`gateway.pipeline.object_lists`'.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

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


def as_object_id(value: Any) -> str | None:
    """The value as an object id: a non-empty string of at most 512 characters, else None."""
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
    if path == COLLECTION_PATHS.get(kind) and (object_id := as_object_id(answer.get("id"))):
        found.append((object_id, kind))
    if kind == "upload" and path.endswith("/complete"):
        file = answer.get("file")
        if isinstance(file, dict) and (file_id := as_object_id(file.get("id"))):
            found.append((file_id, "file"))
    found.extend(_made_for(kind, answer))
    return list(dict.fromkeys(found))


def _made_for(kind: str, answer: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Objects the upstream made for an object of this kind, named in its answer."""
    if kind == "batch":
        for key in ("output_file_id", "error_file_id"):
            if file_id := as_object_id(answer.get(key)):
                yield file_id, "file"
    elif kind == "fine_tuning_job":
        files = answer.get("result_files")
        for value in files if isinstance(files, list) else ():
            if file_id := as_object_id(value):
                yield file_id, "file"
    elif kind == "response":
        output = answer.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict) or item.get("type") != "code_interpreter_call":
                continue
            if container_id := as_object_id(item.get("container_id")):
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
            if isinstance(response, dict) and (response_id := as_object_id(response.get("id"))):
                return [(response_id, "response")]
            return []
        if payload.get("object") == "chat.completion.chunk":
            chunk_id = as_object_id(payload.get("id"))
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

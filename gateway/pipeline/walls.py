"""The pipeline's walls between teams: which object route a call takes, 404 for another
team's objects, the objects an answer creates claimed for the caller's team, and lists
filtered to it. What an id or a body names is `gateway.pipeline.object_ids`' business."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from gateway.errors import OBJECT_NOT_FOUND, GatewayError
from gateway.ledger.object_store import ObjectStore
from gateway.pipeline import object_ids, object_lists
from gateway.pipeline.call import Answer, Call
from gateway.upstream.client import UpstreamResponse

# Hot JSON calls that name no object in their path (a stored chat completion is a create,
# decided by its body: `created_by_body`), and those whose bodies cannot name one either.
_POSTS_ON_NO_OBJECT = frozenset(
    {"/chat/completions", "/completions", "/embeddings", "/moderations", "/audio/speech",
     "/images/generations"}
)  # fmt: skip
_BODIES_NAMING_NO_OBJECT = _POSTS_ON_NO_OBJECT - {"/chat/completions"}

_OBJECT_NAMES = (
    ("file-", "File"), ("upload_", "Upload"), ("batch_", "Batch"), ("vs_", "VectorStore"),
    ("resp_", "Response"), ("ftjob-", "FineTuningJob"), ("cntr_", "Container"),
    ("conv_", "Conversation"), ("chatcmpl-", "ChatCompletion"),
)  # fmt: skip


class Walls:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def check_owned(self, call: Call, ids: list[str] | tuple[str, ...]) -> None:
        """404, never forwarded, unless every object the call names is the caller team's."""
        if not ids:
            return
        assert call.caller is not None
        team = call.caller.team.name
        owners = await self.store.owners(ids)
        for object_id in ids:
            owner = owners.get(object_id)
            if owner is None or owner.team != team:
                raise GatewayError(
                    OBJECT_NOT_FOUND,
                    f"No such {_object_name(object_id)}object: {object_id[:200]}",
                    param="id",
                )

    async def claim(self, call: Call, ids: list[tuple[str, str]]) -> None:
        assert call.caller is not None
        await self.store.record(ids, call.caller.team.name, call.caller.key.id)

    async def claim_answer(self, call: Call, answer: Answer) -> dict | None:
        """Make the caller's team the owner of what a 2xx JSON answer created; the answer's
        object, parsed (None: not a 2xx JSON object)."""
        route, recorder = call.objects, answer.recorder
        assert route is not None and recorder is not None and call.facts is not None
        if call.record.status >= 300 or not recorder.complete:
            return None
        if route.deletes:
            assert route.object_id is not None
            await self.store.mark_deleted(route.object_id)
            return None
        try:
            body = orjson.loads(recorder.head())
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        await self.claim(call, object_ids.created_ids(route.kind, call.facts.api_path, body))
        return body

    async def after_stream(self, call: Call, answer: Answer, claims: bool, ok: bool) -> None:
        """A streamed answer has gone out: the object it deleted, the ones its end names."""
        route = call.objects
        if route is not None and route.deletes and ok:
            assert route.object_id is not None
            await self.store.mark_deleted(route.object_id)
        if claims and answer.is_sse and answer.recorder is not None:
            await self.claim(call, object_ids.created_ids_in_stream_tail(answer.recorder.tail()))

    async def filtered_list(
        self,
        call: Call,
        kind: str,
        fetch_page: Callable[[dict[str, str]], Awaitable[tuple[int, bytes]]],
    ) -> tuple[int, bytes]:
        """A list of a kind of objects, filtered to the caller's team (paging the upstream)."""
        assert call.caller is not None
        team = call.caller.team.name
        default_limit, max_limit = object_lists.list_limits(kind)
        return await object_lists.collect_list(
            fetch_page,
            dict(call.request.query),
            lambda ids: self.store.visible_to(team, ids),
            default_limit=default_limit,
            max_limit=max_limit,
        )


def _object_name(object_id: str) -> str:
    """OpenAI's name for the kind of object an id names, as its own 404 says it."""
    return next((name + " " for prefix, name in _OBJECT_NAMES if object_id.startswith(prefix)), "")


def may_name_objects(api_path: str, body: bytes) -> bool:
    """Cheap look at the raw body before the walk of `object_ids.referenced_ids`; a chat body
    names objects only as content parts' `file_id` (an escaped key goes to the walk too)."""
    if api_path == "/chat/completions":
        return b"file" in body or b"\\u" in body
    return api_path not in _BODIES_NAMING_NO_OBJECT and object_ids.may_reference(body)


def object_route(method: str, api_path: str) -> object_ids.ObjectRoute | None:
    if method == "POST" and api_path in _POSTS_ON_NO_OBJECT:
        return None
    route = object_ids.route(method, api_path)
    if route is not None and route.kind == "chat_completion" and route.action == "create":
        return None  # a create only when its body stores it: `created_by_body`
    return route


def created_by_body(
    route: object_ids.ObjectRoute | None, api_path: str, body: dict
) -> object_ids.ObjectRoute | None:
    """A JSON create whose body says it stores nothing creates no object."""
    if api_path == "/chat/completions" and route is None:
        if object_ids.creates_stored_chat_completion(body):
            return object_ids.ObjectRoute("create", "chat_completion")
        return None
    if api_path == "/responses" and route is not None and body.get("store") is False:
        return None
    return route


def claims_objects(call: Call, upstream: UpstreamResponse) -> bool:
    """Whether this answer is read for the objects it creates (or the one it deletes).
    A file's content is never read: it can be large and is no object's description."""
    route = call.objects
    return (
        route is not None
        and route.action != "list"
        and upstream.ok
        and (upstream.content_type in ("application/json", "text/event-stream") or route.deletes)
        and not call.facts.api_path.endswith("/content")  # type: ignore[union-attr]
    )


class ClaimingStream:
    """An upstream stream that claims the object its first event names before that event
    is passed on, so the caller can use the object as soon as it has seen its id."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        claim: Callable[[list[tuple[str, str]]], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._claim: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = claim
        self._head = b""

    async def readany(self) -> bytes:
        chunk = await self._upstream.readany()
        if self._claim is not None:
            self._head += chunk
            found = object_ids.created_ids_in_stream(self._head)
            if found or not chunk or len(self._head) > 65536 or b"\n\n" in self._head:
                claim, self._claim = self._claim, None
                if found:
                    await claim(found)
        return chunk

    def close(self) -> None:
        self._upstream.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._upstream, name)

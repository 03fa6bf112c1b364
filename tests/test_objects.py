"""Walls between teams, the parts: which objects a call names (`route`, `referenced_ids`),
what an answer creates, the owners' store on real SQLite and PostgreSQL, and lists filtered
to one team against the fake upstream."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest

from gateway.config.loader import StorageConfig
from gateway.ledger.object_store import (
    ObjectStore,
    ObjectStoreUnavailable,
    Owner,
    PostgresObjectStore,
    SqliteObjectStore,
    make_object_store,
)
from gateway.ledger.storage import StorageConfigError
from gateway.ledger.writer import Ledger
from gateway.pipeline.object_ids import (
    MAX_WALK_DEPTH,
    ObjectRoute,
    created_ids,
    created_ids_in_stream,
    created_ids_in_stream_tail,
    creates_stored_chat_completion,
    may_reference,
    referenced_ids,
    route,
)
from gateway.pipeline.object_lists import collect_list, list_limits
from tests.conftest import UPSTREAM_KEY, Fake
from tests.services import PostgresServer

FIXTURE_LEDGER = Path("/work/shared/fixtures/ledger-0c35914.sqlite3")
T0 = 1_700_000_000.0


def use(kind: str, object_id: str, *others: str, deletes: bool = False) -> ObjectRoute:
    return ObjectRoute("use", kind, object_id, deletes, (object_id, *others))


def create(kind: str) -> ObjectRoute:
    return ObjectRoute("create", kind)


def listing(kind: str) -> ObjectRoute:
    return ObjectRoute("list", kind)


ROUTES: list[tuple[str, str, ObjectRoute | None]] = [
    # files
    ("POST", "/files", create("file")),
    ("GET", "/files", listing("file")),
    ("GET", "/files?purpose=batch&limit=5", listing("file")),
    ("GET", "/files/file-abc", use("file", "file-abc")),
    ("DELETE", "/files/file-abc", use("file", "file-abc", deletes=True)),
    ("GET", "/files/file-abc/content", use("file", "file-abc")),
    ("DELETE", "/files/file-abc/content", use("file", "file-abc")),
    ("PUT", "/files", None),
    ("DELETE", "/files", None),
    # uploads
    ("POST", "/uploads", create("upload")),
    ("POST", "/uploads/upload_1/parts", use("upload", "upload_1")),
    ("POST", "/uploads/upload_1/complete", use("upload", "upload_1")),
    ("POST", "/uploads/upload_1/cancel", use("upload", "upload_1")),
    # batches
    ("POST", "/batches", create("batch")),
    ("GET", "/batches", listing("batch")),
    ("GET", "/batches/batch_1", use("batch", "batch_1")),
    ("POST", "/batches/batch_1/cancel", use("batch", "batch_1")),
    # vector stores: every sub-path uses the store; its files name a file too
    ("POST", "/vector_stores", create("vector_store")),
    ("GET", "/vector_stores", listing("vector_store")),
    ("GET", "/vector_stores/vs_1", use("vector_store", "vs_1")),
    ("POST", "/vector_stores/vs_1", use("vector_store", "vs_1")),
    ("DELETE", "/vector_stores/vs_1", use("vector_store", "vs_1", deletes=True)),
    ("GET", "/vector_stores/vs_1/files", use("vector_store", "vs_1")),
    ("POST", "/vector_stores/vs_1/files", use("vector_store", "vs_1")),
    ("GET", "/vector_stores/vs_1/files/file-9", use("vector_store", "vs_1", "file-9")),
    ("POST", "/vector_stores/vs_1/files/file-9", use("vector_store", "vs_1", "file-9")),
    ("DELETE", "/vector_stores/vs_1/files/file-9", use("vector_store", "vs_1", "file-9")),
    ("GET", "/vector_stores/vs_1/files/file-9/content", use("vector_store", "vs_1", "file-9")),
    ("POST", "/vector_stores/vs_1/search", use("vector_store", "vs_1")),
    ("POST", "/vector_stores/vs_1/file_batches", use("vector_store", "vs_1")),
    ("GET", "/vector_stores/vs_1/file_batches/vsfb_1/files", use("vector_store", "vs_1")),
    ("POST", "/vector_stores/vs_1/file_batches/vsfb_1/cancel", use("vector_store", "vs_1")),
    # responses: input_tokens and compact are calls on no object
    ("POST", "/responses", create("response")),
    ("GET", "/responses", listing("response")),
    ("GET", "/responses/resp_1", use("response", "resp_1")),
    ("DELETE", "/responses/resp_1", use("response", "resp_1", deletes=True)),
    ("GET", "/responses/resp_1/input_items", use("response", "resp_1")),
    ("POST", "/responses/resp_1/cancel", use("response", "resp_1")),
    ("POST", "/responses/input_tokens", None),
    ("POST", "/responses/compact", None),
    ("GET", "/responses/anything-else", use("response", "anything-else")),
    # fine-tuning jobs (checkpoints' permissions and graders are no job)
    ("POST", "/fine_tuning/jobs", create("fine_tuning_job")),
    ("GET", "/fine_tuning/jobs", listing("fine_tuning_job")),
    ("GET", "/fine_tuning/jobs/ftjob-1", use("fine_tuning_job", "ftjob-1")),
    ("GET", "/fine_tuning/jobs/ftjob-1/events", use("fine_tuning_job", "ftjob-1")),
    ("GET", "/fine_tuning/jobs/ftjob-1/checkpoints", use("fine_tuning_job", "ftjob-1")),
    ("POST", "/fine_tuning/jobs/ftjob-1/cancel", use("fine_tuning_job", "ftjob-1")),
    ("POST", "/fine_tuning/jobs/ftjob-1/pause", use("fine_tuning_job", "ftjob-1")),
    ("POST", "/fine_tuning/jobs/ftjob-1/resume", use("fine_tuning_job", "ftjob-1")),
    ("GET", "/fine_tuning/checkpoints/ft:gpt-4o-mini:org::1/permissions", None),
    ("POST", "/fine_tuning/alpha/graders/run", None),
    ("GET", "/fine_tuning", None),
    # containers: their files are the container's, not Files API objects
    ("POST", "/containers", create("container")),
    ("GET", "/containers", listing("container")),
    ("GET", "/containers/cntr_1", use("container", "cntr_1")),
    ("DELETE", "/containers/cntr_1", use("container", "cntr_1", deletes=True)),
    ("GET", "/containers/cntr_1/files", use("container", "cntr_1")),
    ("POST", "/containers/cntr_1/files", use("container", "cntr_1")),
    ("GET", "/containers/cntr_1/files/cfile_1", use("container", "cntr_1")),
    ("DELETE", "/containers/cntr_1/files/cfile_1", use("container", "cntr_1")),
    ("GET", "/containers/cntr_1/files/cfile_1/content", use("container", "cntr_1")),
    # conversations
    ("POST", "/conversations", create("conversation")),
    ("GET", "/conversations", listing("conversation")),
    ("GET", "/conversations/conv_1", use("conversation", "conv_1")),
    ("POST", "/conversations/conv_1", use("conversation", "conv_1")),
    ("DELETE", "/conversations/conv_1", use("conversation", "conv_1", deletes=True)),
    ("GET", "/conversations/conv_1/items", use("conversation", "conv_1")),
    ("POST", "/conversations/conv_1/items", use("conversation", "conv_1")),
    ("GET", "/conversations/conv_1/items/msg_1", use("conversation", "conv_1")),
    ("DELETE", "/conversations/conv_1/items/msg_1", use("conversation", "conv_1")),
    # stored chat completions
    ("POST", "/chat/completions", create("chat_completion")),
    ("GET", "/chat/completions", listing("chat_completion")),
    ("GET", "/chat/completions/chatcmpl-1", use("chat_completion", "chatcmpl-1")),
    ("POST", "/chat/completions/chatcmpl-1", use("chat_completion", "chatcmpl-1")),
    ("DELETE", "/chat/completions/chatcmpl-1", use("chat_completion", "chatcmpl-1", deletes=True)),
    ("GET", "/chat/completions/chatcmpl-1/messages", use("chat_completion", "chatcmpl-1")),
    # no object
    ("POST", "/embeddings", None),
    ("POST", "/completions", None),
    ("GET", "/models", None),
    ("GET", "/models/gpt-4o-mini", None),
    ("GET", "/chat", None),
    ("GET", "/filesystem", None),
    ("POST", "/audio/transcriptions", None),
    # shapes: one trailing slash, an empty id, a lowercase method, no leading slash
    ("GET", "/files/", listing("file")),
    ("GET", "/files/file-abc/", use("file", "file-abc")),
    ("GET", "/files//content", use("file", "")),
    ("get", "/batches", listing("batch")),
    ("delete", "/files/file-abc", use("file", "file-abc", deletes=True)),
    ("GET", "files/file-abc", None),
    ("GET", "", None),
    ("GET", "/", None),
]


@pytest.mark.parametrize(("method", "path", "expected"), ROUTES)
def test_route_names_the_object_and_action_of_each_call(
    method: str, path: str, expected: ObjectRoute | None
) -> None:
    assert route(method, path) == expected


def test_a_chat_completion_is_a_stored_object_only_with_store_true() -> None:
    assert creates_stored_chat_completion({"model": "gpt-4o-mini", "store": True}) is True
    assert creates_stored_chat_completion({"model": "gpt-4o-mini"}) is False
    assert creates_stored_chat_completion({"model": "gpt-4o-mini", "store": False}) is False
    assert creates_stored_chat_completion({"model": "gpt-4o-mini", "store": "true"}) is False
    assert creates_stored_chat_completion(None) is False


CREATED: list[tuple[str, str, dict[str, Any], list[tuple[str, str]]]] = [
    ("file", "/files", {"id": "file-1", "object": "file"}, [("file-1", "file")]),
    ("file", "/files/", {"id": "file-1", "object": "file"}, [("file-1", "file")]),
    ("file", "/files/file-1", {"id": "file-1", "object": "file"}, []),
    ("upload", "/uploads", {"id": "upload_1", "object": "upload", "file": None},
     [("upload_1", "upload")]),
    ("upload", "/uploads/upload_1/complete",
     {"id": "upload_1", "object": "upload", "status": "completed",
      "file": {"id": "file-2", "object": "file"}},
     [("file-2", "file")]),
    ("upload", "/uploads/upload_1/parts", {"id": "part_1", "object": "upload.part"}, []),
    ("batch", "/batches", {"id": "batch_1", "object": "batch", "output_file_id": None},
     [("batch_1", "batch")]),
    ("batch", "/batches/batch_1",
     {"id": "batch_1", "object": "batch", "output_file_id": "file-out",
      "error_file_id": "file-err"},
     [("file-out", "file"), ("file-err", "file")]),
    ("vector_store", "/vector_stores", {"id": "vs_1", "object": "vector_store"},
     [("vs_1", "vector_store")]),
    ("vector_store", "/vector_stores/vs_1/files", {"id": "file-1", "object": "vector_store.file"},
     []),
    ("response", "/responses",
     {"id": "resp_1", "object": "response",
      "output": [{"type": "code_interpreter_call", "container_id": "cntr_9"},
                 {"type": "message", "id": "msg_1"}]},
     [("resp_1", "response"), ("cntr_9", "container")]),
    ("fine_tuning_job", "/fine_tuning/jobs", {"id": "ftjob-1", "object": "fine_tuning.job",
                                              "result_files": []},
     [("ftjob-1", "fine_tuning_job")]),
    ("fine_tuning_job", "/fine_tuning/jobs/ftjob-1",
     {"id": "ftjob-1", "object": "fine_tuning.job", "result_files": ["file-res"]},
     [("file-res", "file")]),
    ("container", "/containers", {"id": "cntr_1", "object": "container"},
     [("cntr_1", "container")]),
    ("conversation", "/conversations", {"id": "conv_1", "object": "conversation"},
     [("conv_1", "conversation")]),
    ("chat_completion", "/chat/completions", {"id": "chatcmpl-1", "object": "chat.completion"},
     [("chatcmpl-1", "chat_completion")]),
    ("file", "/files", {"object": "list", "data": [{"id": "file-1"}]}, []),
    ("file", "/files", {"object": "file"}, []),
    ("file", "/files", {"id": 7, "object": "file"}, []),
    ("file", "/files", {"id": "", "object": "file"}, []),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "path", "answer", "expected"), CREATED)
def test_created_ids_are_the_objects_an_answer_makes_the_caller_own(
    kind: str, path: str, answer: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert created_ids(kind, path, answer) == expected


CREATED_EVENT = {
    "type": "response.created",
    "sequence_number": 0,
    "response": {"id": "resp_abc", "object": "response", "status": "in_progress"},
}
IN_PROGRESS = {"type": "response.in_progress", "sequence_number": 1, "response": {"id": "x"}}


def sse(events: list[dict[str, Any]], newline: bytes = b"\n", dumps: Any = orjson.dumps) -> bytes:
    out = b""
    for event in events:
        data = dumps(event)
        data = data if isinstance(data, bytes) else data.encode()
        out += b"event: " + event["type"].encode() + newline + b"data: " + data + newline * 2
    return out


def spaced(event: dict[str, Any]) -> str:
    """Other key order (id last, response first) and generous spacing."""
    response = dict(reversed(list(event["response"].items())))
    reordered = {"response": response, "sequence_number": 0, "type": event["type"]}
    return json.dumps(reordered, separators=(" ,  ", " :   "))


STREAM_HEADS = [
    ("lf", sse([CREATED_EVENT, IN_PROGRESS])),
    ("crlf", sse([CREATED_EVENT, IN_PROGRESS], b"\r\n")),
    ("cr", sse([CREATED_EVENT, IN_PROGRESS], b"\r")),
    ("lf spaced", sse([CREATED_EVENT, IN_PROGRESS], dumps=spaced)),
    ("crlf spaced", sse([CREATED_EVENT, IN_PROGRESS], b"\r\n", dumps=spaced)),
    ("no space after data:", b"data:" + orjson.dumps(CREATED_EVENT) + b"\n\n"),
    ("comment first", b": keep-alive\n\n" + sse([CREATED_EVENT])),
    ("data in two lines",
     b'event: response.created\ndata: {"type": "response.created",\n'
     b'data: "response": {"object": "response", "id": "resp_abc"}}\n\n'),
    ("cut short", b'event: response.created\r\ndata: {"type":"response.created",'
                  b'"sequence_number":0,"response":{"id":"resp_abc","object":"response","instr'),
    ("not yet terminated", b"event: response.created\ndata: " + orjson.dumps(CREATED_EVENT)),
]  # fmt: skip


@pytest.mark.parametrize(("framing", "head"), STREAM_HEADS, ids=[name for name, _ in STREAM_HEADS])
def test_the_response_id_is_read_from_the_first_event_of_a_stream(
    framing: str, head: bytes
) -> None:
    assert created_ids_in_stream(head) == [("resp_abc", "response")]


def test_a_stream_without_a_readable_created_event_creates_nothing() -> None:
    error = {"type": "error", "code": "server_error", "message": "boom", "sequence_number": 0}
    assert created_ids_in_stream(sse([error, CREATED_EVENT])) == []
    assert created_ids_in_stream(b"") == []
    assert created_ids_in_stream(b"event: response.created\n\n") == []
    # cut short with the id not first: no guessing
    cut = b'data: {"type":"response.created","response":{"object":"response","id":"resp_x'
    assert created_ids_in_stream(cut) == []
    assert created_ids_in_stream(b'data: {"type":"response.created","response":{}}\n\n') == []


def test_a_stored_chat_completion_stream_names_its_id_in_the_first_chunk() -> None:
    chunk = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "choices": []}
    head = b"data: " + orjson.dumps(chunk) + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    assert created_ids_in_stream(head) == [("chatcmpl-7", "chat_completion")]


REFERENCES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("batch", {"input_file_id": "file-in", "endpoint": "/v1/chat/completions",
               "completion_window": "24h"}, ["file-in"]),
    ("fine-tuning job", {"model": "gpt-4o-mini", "training_file": "file-t",
                         "validation_file": "file-v"}, ["file-t", "file-v"]),
    ("vector store file", {"file_id": "file-1"}, ["file-1"]),
    ("vector store", {"name": "docs", "file_ids": ["file-1", "file-2"]}, ["file-1", "file-2"]),
    ("chained response", {"model": "gpt-4o-mini", "input": "more",
                          "previous_response_id": "resp_1", "conversation": "conv_1"},
     ["resp_1", "conv_1"]),
    ("conversation object", {"model": "gpt-4o-mini", "conversation": {"id": "conv_2"}},
     ["conv_2"]),
    ("tools and content parts", {
        "model": "gpt-4o-mini",
        "tools": [
            {"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]},
            {"type": "code_interpreter", "container": "cntr_1"},
            {"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-c"]}},
        ],
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_file", "file_id": "file-in"},
            {"type": "input_image", "file_id": "file-img", "detail": "auto"},
        ]}],
    }, ["vs_1", "vs_2", "cntr_1", "file-c", "file-in", "file-img"]),
    ("chat file part", {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "summarize"},
        {"type": "file", "file": {"file_id": "file-chat"}},
    ]}]}, ["file-chat"]),
    ("image edit", {"model": "gpt-image-1", "prompt": "p", "images": [{"file_id": "file-i1"}],
                    "mask": {"file_id": "file-m"}}, ["file-i1", "file-m"]),
    ("replayed output with citations", {"input": [{
        "type": "message", "role": "assistant", "content": [{
            "type": "output_text", "text": "see", "annotations": [
                {"type": "container_file_citation", "container_id": "cntr_1",
                 "file_id": "cfile_1"},
                {"type": "file_citation", "file_id": "file-cited", "index": 0},
            ]}]}]}, ["file-cited"]),
    ("assistant tool resources", {"tool_resources": {
        "file_search": {"vector_store_ids": ["vs_9"]},
        "code_interpreter": {"file_ids": ["file-9"]},
    }}, ["vs_9", "file-9"]),
    ("a JSON schema naming the keys", {"tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object",
        "properties": {"file_id": {"type": "string"}, "file_ids": {"type": "array"}},
        "required": ["file_id"],
    }}]}, []),
    ("values that are no ids", {"previous_response_id": 5, "conversation": None,
                                "file_ids": [1, None, "file-ok"]}, ["file-ok"]),
    ("repeats", {"file_id": "file-1", "file_ids": ["file-1", "file-2"]}, ["file-1", "file-2"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "expected"), REFERENCES, ids=[c for c, _, _ in REFERENCES]
)
def test_referenced_ids_are_every_object_a_body_names(
    case: str, body: dict[str, Any], expected: list[str]
) -> None:
    assert referenced_ids(body) == expected
    assert may_reference(orjson.dumps(body)) is True  # the pre-check never skips such a body


def buried(depth: int) -> dict[str, Any]:
    """A body whose `file_id` dict is `depth` containers below the body."""
    node: Any = {"file_id": f"file-d{depth}"}
    for _ in range(depth - 1):
        node = [node]
    return {"a": node}


def test_the_walk_goes_as_deep_as_its_bound_and_no_deeper() -> None:
    assert referenced_ids(buried(MAX_WALK_DEPTH - 1)) == [f"file-d{MAX_WALK_DEPTH - 1}"]
    assert referenced_ids(buried(MAX_WALK_DEPTH)) == []


def test_a_plain_chat_or_embeddings_body_skips_the_walk() -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
    assert may_reference(orjson.dumps(chat)) is False
    assert may_reference(b'{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]}') is False
    assert may_reference(b"") is False


def test_an_escaped_key_is_still_found() -> None:
    body = b'{"model": "gpt-4o-mini", "previous_response\\u005fid": "resp_1"}'
    assert may_reference(body) is True
    assert referenced_ids(orjson.loads(body)) == ["resp_1"]


# ------------------------------------------------------------------ the store


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def objects_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT * FROM objects ORDER BY object_id").fetchall()


def count_selects(store: ObjectStore) -> list[list[str]]:
    """Every database lookup of the store: the ids it asked for."""
    asked: list[list[str]] = []
    select = store._select

    async def counted(ids: list[str]) -> dict[str, Owner]:
        asked.append(list(ids))
        return await select(ids)

    store._select = counted  # type: ignore[method-assign]
    return asked


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteObjectStore]:
    store = SqliteObjectStore(tmp_path / "ledger.sqlite3", clock=Clock())
    await store.open()
    yield store
    await store.close()


RESEARCH_FILE = Owner("research", "research-dev", "file", False)


async def test_a_recorded_object_has_its_owner_committed_and_cached(
    sqlite_store: SqliteObjectStore,
) -> None:
    await sqlite_store.record(
        [("file-1", "file"), ("batch_1", "batch"), ("file-1", "upload")], "research", "research-dev"
    )
    assert objects_rows(sqlite_store.path) == [
        ("batch_1", "batch", "research", "research-dev", T0, None),
        ("file-1", "file", "research", "research-dev", T0, None),
    ]
    asked = count_selects(sqlite_store)
    assert await sqlite_store.owners(["file-1", "batch_1", "file-unknown"]) == {
        "file-1": RESEARCH_FILE,
        "batch_1": Owner("research", "research-dev", "batch", False),
    }
    assert asked == [["file-unknown"]]  # the recorded ones came from the cache
    await sqlite_store.record([], "research", "research-dev")
    assert len(objects_rows(sqlite_store.path)) == 2


async def test_recording_a_cached_object_again_writes_nothing(
    sqlite_store: SqliteObjectStore,
) -> None:
    await sqlite_store.record([("file-out", "file")], "research", "research-dev")
    inserted: list[list[tuple]] = []
    insert = sqlite_store._insert

    async def counted(rows: list[Any]) -> dict[str, Owner]:
        inserted.append(rows)
        return await insert(rows)

    sqlite_store._insert = counted  # type: ignore[method-assign]
    await sqlite_store.record([("file-out", "file")], "research", "research-dev")
    await sqlite_store.record([("file-out", "file"), ("file-2", "file")], "research", "r2")
    assert inserted == [[("file-2", "file", "research", "r2", T0)]]


async def test_the_first_owner_wins_and_a_second_claim_is_logged(
    sqlite_store: SqliteObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    await sqlite_store.record([("file-1", "file")], "research", "research-dev")
    with caplog.at_level(logging.WARNING, logger="gateway.objects"):
        await sqlite_store.record(
            [("file-1", "file"), ("file-2", "file")], "product", "product-web"
        )
    assert [r.getMessage() for r in caplog.records] == [
        "object file-1 (file) belongs to team research: not recorded for team product"
    ]
    assert await sqlite_store.owners(["file-1", "file-2"]) == {
        "file-1": RESEARCH_FILE,
        "file-2": Owner("product", "product-web", "file", False),
    }
    assert await sqlite_store.visible_to("product", ["file-1", "file-2", "file-3"]) == {"file-2"}


async def test_a_deleted_object_keeps_its_owner_and_says_deleted(
    sqlite_store: SqliteObjectStore,
) -> None:
    await sqlite_store.record([("file-1", "file"), ("file-2", "file")], "research", "research-dev")
    sqlite_store._clock.now = T0 + 5  # type: ignore[attr-defined]
    await sqlite_store.mark_deleted("file-1")
    await sqlite_store.mark_deleted("file-unknown")
    assert objects_rows(sqlite_store.path) == [
        ("file-1", "file", "research", "research-dev", T0, T0 + 5),
        ("file-2", "file", "research", "research-dev", T0, None),
    ]
    assert (await sqlite_store.owners(["file-1"]))["file-1"] == Owner(
        "research", "research-dev", "file", True
    )
    assert await sqlite_store.visible_to("research", ["file-1", "file-2"]) == {"file-2"}


async def test_owners_survive_a_restart_and_are_read_in_one_query(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = SqliteObjectStore(path, clock=Clock())
    await first.open()
    await first.record([("file-1", "file"), ("vs_1", "vector_store")], "research", "research-dev")
    await first.close()

    again = SqliteObjectStore(path, clock=Clock())
    await again.open()
    asked = count_selects(again)
    try:
        assert await again.owners(["file-1", "vs_1", "file-zz"]) == {
            "file-1": RESEARCH_FILE,
            "vs_1": Owner("research", "research-dev", "vector_store", False),
        }
        assert await again.owners(["file-1", "vs_1"]) == {
            "file-1": RESEARCH_FILE,
            "vs_1": Owner("research", "research-dev", "vector_store", False),
        }
        await again.owners(["vs_1", "file-zz", "file-zz"])
    finally:
        await again.close()
    assert asked == [["file-1", "vs_1", "file-zz"], ["file-zz"]]


async def test_two_replicas_on_one_file_see_each_others_objects(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    one, two = SqliteObjectStore(path), SqliteObjectStore(path)
    await one.open()
    await two.open()
    try:
        assert await two.owners(["file-1"]) == {}  # a miss is not cached...
        await one.record([("file-1", "file")], "research", "research-dev")
        assert await two.owners(["file-1"]) == {"file-1": RESEARCH_FILE}  # ...so this finds it
        await two.record([("file-1", "file"), ("resp_1", "response")], "product", "product-web")
        assert await one.owners(["file-1", "resp_1"]) == {
            "file-1": RESEARCH_FILE,
            "resp_1": Owner("product", "product-web", "response", False),
        }
    finally:
        await one.close()
        await two.close()


async def test_the_cache_is_bounded_and_an_evicted_owner_is_read_again(tmp_path: Path) -> None:
    store = SqliteObjectStore(tmp_path / "ledger.sqlite3", max_cached=2)
    await store.open()
    asked = count_selects(store)
    try:
        for n in (1, 2, 3):
            await store.record([(f"file-{n}", "file")], "research", "research-dev")
        assert await store.owners(["file-1", "file-2", "file-3"]) == {
            f"file-{n}": RESEARCH_FILE for n in (1, 2, 3)
        }
    finally:
        await store.close()
    assert asked == [["file-1"]]


async def test_a_store_not_open_or_unreachable_says_so(tmp_path: Path) -> None:
    store = SqliteObjectStore(tmp_path / "ledger.sqlite3")
    with pytest.raises(ObjectStoreUnavailable, match="the objects store is not open"):
        await store.owners(["file-1"])
    (tmp_path / "a-file").write_text("")
    blocked = SqliteObjectStore(tmp_path / "a-file" / "ledger.sqlite3")
    with pytest.raises(ObjectStoreUnavailable, match="objects table in"):
        await blocked.open()


def test_the_store_follows_the_ledgers_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = make_object_store(StorageConfig(sqlite_path=tmp_path / "l.sqlite3"))
    assert isinstance(sqlite, SqliteObjectStore) and sqlite.path == tmp_path / "l.sqlite3"
    postgres = StorageConfig(backend="postgres", dsn_env="TEST_OBJECTS_DSN")
    monkeypatch.delenv("TEST_OBJECTS_DSN", raising=False)
    with pytest.raises(StorageConfigError, match=r"\$TEST_OBJECTS_DSN"):
        make_object_store(postgres)
    monkeypatch.setenv("TEST_OBJECTS_DSN", "postgresql://gateway@127.0.0.1:1/gateway")
    assert isinstance(make_object_store(postgres), PostgresObjectStore)


async def test_an_old_ledger_gains_the_objects_table_with_every_row_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    shutil.copy(FIXTURE_LEDGER, path)
    with sqlite3.connect(path) as db:
        old_columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(requests)"))
        rows_sql = f"SELECT {old_columns} FROM requests ORDER BY request_id"
        before = db.execute(rows_sql).fetchall()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert len(before) == 10 and "objects" not in tables

    ledger = Ledger(path, flush_interval_ms=20)
    await ledger.open()
    await ledger.close()
    store = SqliteObjectStore(path, clock=Clock())
    await store.open()
    await store.record([("file-1", "file")], "legacy", "legacy-key")
    await store.close()

    with sqlite3.connect(path) as db:
        after = db.execute(rows_sql).fetchall()
        columns = [(row[1], row[2], row[5]) for row in db.execute("PRAGMA table_info(objects)")]
        indexes = db.execute("PRAGMA index_list(objects)").fetchall()
        index_columns = [row[2] for row in db.execute("PRAGMA index_info(objects_team_kind)")]
    assert after == before
    assert columns == [
        ("object_id", "TEXT", 1),
        ("kind", "TEXT", 0),
        ("team", "TEXT", 0),
        ("key_id", "TEXT", 0),
        ("created_at", "REAL", 0),
        ("deleted_at", "REAL", 0),
    ]
    assert "objects_team_kind" in {row[1] for row in indexes}
    assert index_columns == ["team", "kind"]
    assert objects_rows(path) == [("file-1", "file", "legacy", "legacy-key", T0, None)]


# ------------------------------------------------------------------ the store on PostgreSQL


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_server.new_database() as dsn:
        yield dsn


async def pg_rows(dsn: str) -> list[tuple]:
    connection = await asyncpg.connect(dsn)
    try:
        records = await connection.fetch("SELECT * FROM objects ORDER BY object_id")
    finally:
        await connection.close()
    return [tuple(record) for record in records]


async def test_the_postgres_store_creates_its_table_with_the_ledgers_types(pg_dsn: str) -> None:
    store = PostgresObjectStore(pg_dsn)
    await store.open()
    await store.close()
    connection = await asyncpg.connect(pg_dsn)
    try:
        columns = await connection.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'objects' ORDER BY ordinal_position"
        )
        indexes = await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'objects' ORDER BY indexname"
        )
        requests = await connection.fetchval("SELECT count(*) FROM requests")
    finally:
        await connection.close()
    assert [tuple(row) for row in columns] == [
        ("object_id", "text"),
        ("kind", "text"),
        ("team", "text"),
        ("key_id", "text"),
        ("created_at", "double precision"),
        ("deleted_at", "double precision"),
    ]
    assert [row[0] for row in indexes] == ["objects_pkey", "objects_team_kind"]
    assert requests == 0  # the ledger's table too, whichever of the two opens first


async def test_the_postgres_store_records_keeps_first_owners_and_marks_deletions(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(T0 + 0.25)
    one, two = PostgresObjectStore(pg_dsn, clock=clock), PostgresObjectStore(pg_dsn, clock=clock)
    await one.open()
    await two.open()
    try:
        assert await two.owners(["file-1"]) == {}
        await one.record([("file-1", "file"), ("batch_1", "batch")], "research", "research-dev")
        assert await two.owners(["file-1", "batch_1", "file-x"]) == {
            "file-1": RESEARCH_FILE,
            "batch_1": Owner("research", "research-dev", "batch", False),
        }
        with caplog.at_level(logging.WARNING, logger="gateway.objects"):
            await two.record([("file-1", "file"), ("resp_1", "response")], "product", "product-web")
        assert [r.getMessage() for r in caplog.records] == [
            "object file-1 (file) belongs to team research: not recorded for team product"
        ]
        clock.now = T0 + 9.5
        await one.mark_deleted("batch_1")
        assert await one.owners(["batch_1", "resp_1"]) == {
            "batch_1": Owner("research", "research-dev", "batch", True),
            "resp_1": Owner("product", "product-web", "response", False),
        }
    finally:
        await one.close()
        await two.close()
    assert await pg_rows(pg_dsn) == [
        ("batch_1", "batch", "research", "research-dev", T0 + 0.25, T0 + 9.5),
        ("file-1", "file", "research", "research-dev", T0 + 0.25, None),
        ("resp_1", "response", "product", "product-web", T0 + 0.25, None),
    ]
    again = PostgresObjectStore(pg_dsn)
    await again.open()
    try:
        assert await again.visible_to("research", ["file-1", "batch_1", "resp_1"]) == {"file-1"}
    finally:
        await again.close()


async def test_an_unreachable_postgres_store_says_where_without_the_password() -> None:
    store = PostgresObjectStore("postgresql://gateway:s3cret@127.0.0.1:1/gateway")
    with pytest.raises(ObjectStoreUnavailable) as caught:
        await store.open()
    assert str(caught.value).startswith(
        "objects table at postgresql://gateway@127.0.0.1:1/gateway: "
    )
    assert "s3cret" not in str(caught.value)


# ------------------------------------------------------------------ filtered lists

RESEARCH_FILES = ["file-fake7", "file-fake5", "file-fake3", "file-fake1"]  # newest first
PRODUCT_FILES = ["file-fake6", "file-fake4", "file-fake2"]


class Upstream:
    """The fake upstream's files list, as the gateway's `fetch_page` asks for it."""

    def __init__(self, fake: Fake, http: aiohttp.ClientSession) -> None:
        self.url = fake.base_url + "/files"
        self.http = http
        self.asked: list[dict[str, str]] = []

    async def fetch_page(self, query: dict[str, str]) -> tuple[int, bytes]:
        self.asked.append(dict(query))
        headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        async with self.http.get(self.url, params=query, headers=headers) as response:
            return response.status, await response.read()


@pytest.fixture
async def teams_files(
    fake: Fake, direct: openai.AsyncOpenAI, tmp_path: Path
) -> AsyncIterator[tuple[Upstream, SqliteObjectStore]]:
    """Seven files upstream, the odd ones research's, the even ones product's."""
    store = SqliteObjectStore(tmp_path / "ledger.sqlite3")
    await store.open()
    for n in range(1, 8):
        uploaded = await direct.files.create(file=(f"f{n}.jsonl", b"{}\n"), purpose="batch")
        assert uploaded.id == f"file-fake{n}"
        team = "research" if n % 2 else "product"
        await store.record([(uploaded.id, "file")], team, f"{team}-key")
    async with aiohttp.ClientSession() as http:
        yield Upstream(fake, http), store
    await store.close()


def page_of(answer: tuple[int, bytes]) -> dict[str, Any]:
    status, body = answer
    assert status == 200, body
    return orjson.loads(body)


def summary(page: dict[str, Any]) -> tuple[list[str], str | None, str | None, bool]:
    return (
        [item["id"] for item in page["data"]],
        page["first_id"],
        page["last_id"],
        page["has_more"],
    )


async def test_a_filtered_list_holds_only_the_callers_items_page_by_page(
    teams_files: tuple[Upstream, SqliteObjectStore],
) -> None:
    upstream, store = teams_files

    async def research(ids: list[str]) -> set[str]:
        return await store.visible_to("research", ids)

    first = page_of(await collect_list(upstream.fetch_page, {"limit": "2"}, research, page_size=3))
    assert summary(first) == (["file-fake7", "file-fake5"], "file-fake7", "file-fake5", True)
    assert first["object"] == "list"
    assert upstream.asked == [{"limit": "3"}]  # full at a page's end: no page fetched to peek

    upstream.asked.clear()
    query = {"limit": "2", "after": "file-fake5"}
    second = page_of(await collect_list(upstream.fetch_page, query, research, page_size=3))
    assert summary(second) == (["file-fake3", "file-fake1"], "file-fake3", "file-fake1", False)
    assert upstream.asked == [
        {"limit": "3", "after": "file-fake5"},
        {"limit": "3", "after": "file-fake2"},
    ]
    # A full item's worth of the upstream's answer is passed on as it was.
    assert second["data"][0] == {
        "object": "file",
        "id": "file-fake3",
        "purpose": "batch",
        "filename": "f3.jsonl",
        "bytes": 3,
        "created_at": 1_700_000_000,
        "expires_at": None,
        "status": "processed",
        "status_details": None,
    }


async def test_a_visible_item_past_the_limit_on_the_same_page_means_has_more(
    teams_files: tuple[Upstream, SqliteObjectStore],
) -> None:
    upstream, store = teams_files

    async def product(ids: list[str]) -> set[str]:
        return await store.visible_to("product", ids)

    first = page_of(await collect_list(upstream.fetch_page, {"limit": "2"}, product, page_size=3))
    assert summary(first) == (["file-fake6", "file-fake4"], "file-fake6", "file-fake4", True)
    assert upstream.asked == [{"limit": "3"}, {"limit": "3", "after": "file-fake5"}]
    query = {"limit": "2", "after": "file-fake4"}
    rest = page_of(await collect_list(upstream.fetch_page, query, product, page_size=3))
    assert summary(rest) == (["file-fake2"], "file-fake2", "file-fake2", False)


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
@pytest.mark.parametrize("page_size", [None, 1, 2, 3])
async def test_paging_to_the_end_sees_each_of_the_callers_items_once(
    teams_files: tuple[Upstream, SqliteObjectStore], limit: int, page_size: int | None
) -> None:
    upstream, store = teams_files
    for team, expected in (("research", RESEARCH_FILES), ("product", PRODUCT_FILES)):

        async def visible(ids: list[str], team: str = team) -> set[str]:
            return await store.visible_to(team, ids)

        seen: list[str] = []
        query = {"limit": str(limit)}
        for _ in range(10):
            page = page_of(
                await collect_list(upstream.fetch_page, query, visible, page_size=page_size)
            )
            seen += [item["id"] for item in page["data"]]
            assert len(page["data"]) <= limit
            if not page["has_more"]:
                break
            query = {"limit": str(limit), "after": page["data"][-1]["id"]}  # as the SDK does
        assert seen == expected


async def test_paging_backwards_with_before_gives_the_nearest_items_in_list_order(
    teams_files: tuple[Upstream, SqliteObjectStore],
) -> None:
    upstream, store = teams_files

    async def research(ids: list[str]) -> set[str]:
        return await store.visible_to("research", ids)

    query = {"limit": "2", "before": "file-fake1"}
    page = page_of(await collect_list(upstream.fetch_page, query, research, page_size=3))
    assert summary(page) == (["file-fake5", "file-fake3"], "file-fake5", "file-fake3", True)
    assert upstream.asked == [
        {"limit": "3", "before": "file-fake1"},
        {"limit": "3", "before": "file-fake4"},
    ]
    query = {"limit": "2", "before": "file-fake5"}
    page = page_of(await collect_list(upstream.fetch_page, query, research, page_size=3))
    assert summary(page) == (["file-fake7"], "file-fake7", "file-fake7", False)


async def test_the_upstream_is_asked_for_big_pages_within_the_apis_limits(
    teams_files: tuple[Upstream, SqliteObjectStore],
) -> None:
    upstream, store = teams_files

    async def research(ids: list[str]) -> set[str]:
        return await store.visible_to("research", ids)

    default, most = list_limits("file")
    assert (default, most) == (10_000, 10_000)
    assert list_limits("batch") == (20, 100)
    page = page_of(
        await collect_list(
            upstream.fetch_page, {"purpose": "batch"}, research, default_limit=default,
            max_limit=most,
        )
    )  # fmt: skip
    assert summary(page) == (RESEARCH_FILES, "file-fake7", "file-fake1", False)
    page = page_of(await collect_list(upstream.fetch_page, {"limit": "500"}, research))
    assert summary(page) == (RESEARCH_FILES, "file-fake7", "file-fake1", False)
    assert upstream.asked == [{"purpose": "batch", "limit": "10000"}, {"limit": "100"}]


def canned(*answers: tuple[int, bytes]) -> tuple[Any, list[dict[str, str]]]:
    asked: list[dict[str, str]] = []
    replies = list(answers)

    async def fetch_page(query: dict[str, str]) -> tuple[int, bytes]:
        asked.append(dict(query))
        return replies.pop(0) if len(replies) > 1 else replies[0]

    return fetch_page, asked


async def nobody(ids: list[str]) -> set[str]:
    return set()


async def everybody(ids: list[str]) -> set[str]:
    return set(ids)


async def test_an_upstream_error_is_passed_on_unchanged() -> None:
    error = (
        401,
        b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}',
    )
    fetch_page, _ = canned(error)
    assert await collect_list(fetch_page, {}, everybody) == error
    page = (200, b'{"object":"list","data":[{"id":"a"}],"has_more":true}')
    fetch_page, asked = canned(page, (503, b"busy"))
    assert await collect_list(fetch_page, {"limit": "5"}, nobody) == (503, b"busy")
    assert asked == [{"limit": "100"}, {"limit": "100", "after": "a"}]


async def test_an_answer_that_cannot_be_filtered_is_not_passed_on() -> None:
    for body in (b"not json", b'{"object": "list"}', b"[1, 2]", b'{"data": {"id": "a"}}'):
        fetch_page, _ = canned((200, body))
        status, answer = await collect_list(fetch_page, {}, everybody)
        assert status == 502
        assert orjson.loads(answer) == {
            "error": {
                "message": "The upstream's list answer could not be read, so it was not passed on.",
                "type": "upstream_error",
                "param": None,
                "code": "upstream_unavailable",
            }
        }


@pytest.mark.parametrize("limit", ["0", "-3", "ten", ""])
async def test_a_limit_that_is_not_a_positive_integer_is_refused(limit: str) -> None:
    fetch_page, asked = canned((200, b'{"data": []}'))
    status, body = await collect_list(fetch_page, {"limit": limit}, everybody)
    assert (status, asked) == (400, [])
    assert orjson.loads(body) == {
        "error": {
            "message": f"Invalid 'limit': {limit!r}: expected a positive integer.",
            "type": "invalid_request_error",
            "param": "limit",
            "code": "invalid_request",
        }
    }


async def test_pages_without_one_visible_item_stop_at_max_pages_with_has_more() -> None:
    page = (200, b'{"object":"list","data":[{"id":"x1"},{"id":"x2"}],"has_more":true,'
                 b'"first_id":"x1","last_id":"x2","x_extra":"kept"}')  # fmt: skip
    fetch_page, asked = canned(page)
    answer = page_of(await collect_list(fetch_page, {"order": "asc"}, nobody, max_pages=3))
    assert answer == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": True,
        "x_extra": "kept",
    }
    assert asked == [
        {"order": "asc", "limit": "100"},
        {"order": "asc", "limit": "100", "after": "x2"},
        {"order": "asc", "limit": "100", "after": "x2"},
    ]


async def test_items_without_an_id_are_never_shown() -> None:
    body = (
        b'{"object":"list","data":[{"id":"a"},{"name":"no id"},"text",{"id":5}],"has_more":false}'
    )
    fetch_page, _ = canned((200, body))
    answer = page_of(await collect_list(fetch_page, {}, everybody))
    assert summary(answer) == (["a"], "a", "a", False)


@pytest.mark.parametrize("framing", [b"\n\n", b"\r\n\r\n"])
def test_a_streamed_responses_containers_are_read_from_its_final_event(framing: bytes):
    final = orjson.dumps(
        {
            "type": "response.completed",
            "response": {
                "id": "resp_1",
                "object": "response",
                "output": [
                    {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_9"},
                    {"type": "message", "content": []},
                ],
            },
        },
        option=orjson.OPT_INDENT_2,
    ).replace(b"\n", b" ")
    tail = (
        b'data: {"type":"response.output_text.delta","delta":"x"}'
        + framing
        + b"event: response.completed"
        + framing[: len(framing) // 2]
        + b"data: "
        + final
        + framing
    )
    assert created_ids_in_stream_tail(tail) == [("resp_1", "response"), ("cntr_9", "container")]
    assert created_ids_in_stream_tail(tail[: len(tail) // 2 + 40]) == []
    assert created_ids_in_stream_tail(b'data: {"type":"response.output_text.delta"}\n\n') == []

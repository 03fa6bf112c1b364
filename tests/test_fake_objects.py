"""The fake upstream's objects, through the official SDK as OpenAI's own would be used: ids in
OpenAI's shapes, counted from 1 in each fake; lists paged by cursor; objects the upstream makes
itself (a batch's output, a job's results) there to fetch."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.pipeline.object_ids import created_ids_in_stream
from tests.conftest import UPSTREAM_KEY, Fake

AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


async def raw(fake: Fake, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, fake.base_url + path, headers=AUTH, **kwargs) as response,
    ):
        return response.status, orjson.loads(await response.read())


async def upload(direct: openai.AsyncOpenAI, name: str, data: bytes = b"{}\n") -> str:
    return (await direct.files.create(file=(name, data), purpose="batch")).id


async def test_files_are_listed_newest_first_by_cursor_and_deleted_for_good(
    fake: Fake, direct: openai.AsyncOpenAI
) -> None:
    ids = [await upload(direct, f"f{n}.jsonl") for n in (1, 2, 3)]
    assert ids == ["file-fake1", "file-fake2", "file-fake3"]
    first = await direct.files.list(limit=2)
    assert [f.id for f in first.data] == ["file-fake3", "file-fake2"]
    assert (first.has_more, first.first_id, first.last_id) == (True, "file-fake3", "file-fake2")
    assert [f.id async for f in direct.files.list(limit=1)] == [
        "file-fake3",
        "file-fake2",
        "file-fake1",
    ]
    assert [f.id for f in (await direct.files.list(order="asc")).data] == ids
    status, body = await raw(fake, "GET", "/files", params={"limit": "2", "after": "file-fake2"})
    assert (status, [f["id"] for f in body["data"]], body["has_more"]) == (
        200,
        ["file-fake1"],
        False,
    )
    assert (await direct.files.retrieve("file-fake2")).filename == "f2.jsonl"

    deleted = await direct.files.delete("file-fake2")
    assert (deleted.id, deleted.deleted) == ("file-fake2", True)
    assert [f.id for f in (await direct.files.list()).data] == ["file-fake3", "file-fake1"]
    with pytest.raises(openai.NotFoundError, match="No such File object: file-fake2"):
        await direct.files.retrieve("file-fake2")
    with pytest.raises(openai.NotFoundError):
        await direct.files.content("file-fake2")
    assert "file-fake2" not in fake.state.files


async def test_a_list_refuses_a_bad_limit_or_cursor(fake: Fake) -> None:
    status, body = await raw(fake, "GET", "/batches", params={"limit": "101"})
    assert (status, body["error"]["param"]) == (400, "limit")
    status, body = await raw(fake, "GET", "/files", params={"after": "file-nope"})
    assert (status, body["error"]["message"]) == (
        400,
        "Invalid 'after': no object file-nope in this list.",
    )


async def test_an_upload_in_parts_completes_into_a_file_with_its_bytes_in_order(
    direct: openai.AsyncOpenAI,
) -> None:
    started = await direct.uploads.create(
        bytes=11, filename="big.jsonl", purpose="batch", mime_type="application/jsonl"
    )
    assert (started.id, started.status, started.file) == ("upload_fake1", "pending", None)
    one = await direct.uploads.parts.create(started.id, data=b"hello ")
    two = await direct.uploads.parts.create(started.id, data=b"world")
    assert (one.id, two.id, two.upload_id) == ("part_fake2", "part_fake3", "upload_fake1")
    with pytest.raises(openai.BadRequestError, match="The parts hold 6 bytes, the upload 11"):
        await direct.uploads.complete(started.id, part_ids=[one.id])
    done = await direct.uploads.complete(started.id, part_ids=[two.id, one.id])
    assert done.status == "completed" and done.file is not None
    assert (done.file.id, done.file.bytes, done.file.filename) == ("file-fake4", 11, "big.jsonl")
    assert (await direct.files.content(done.file.id)).content == b"worldhello "
    with pytest.raises(openai.BadRequestError, match="already completed"):
        await direct.uploads.cancel(started.id)
    other = await direct.uploads.create(
        bytes=1, filename="x", purpose="batch", mime_type="text/plain"
    )
    assert (await direct.uploads.cancel(other.id)).status == "cancelled"


async def test_a_batch_is_done_once_retrieved_with_an_output_file_to_fetch(
    direct: openai.AsyncOpenAI,
) -> None:
    lines = b'{"custom_id": "a", "method": "POST"}\n{"custom_id": "b", "method": "POST"}\n'
    input_file = await upload(direct, "in.jsonl", lines)
    batch = await direct.batches.create(
        input_file_id=input_file, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (batch.id, batch.status, batch.output_file_id) == ("batch_fake2", "validating", None)
    done = await direct.batches.retrieve(batch.id)
    assert (done.status, done.output_file_id) == ("completed", "file-fake3")
    assert (done.request_counts.total, done.request_counts.completed) == (2, 2)
    output = (await direct.files.content("file-fake3")).content.splitlines()
    assert [orjson.loads(line)["custom_id"] for line in output] == ["a", "b"]
    with pytest.raises(openai.ConflictError):
        await direct.batches.cancel(batch.id)
    second = await direct.batches.create(
        input_file_id=input_file, endpoint="/v1/responses", completion_window="24h"
    )
    assert (await direct.batches.cancel(second.id)).status == "cancelled"
    assert [b.id for b in (await direct.batches.list(limit=5)).data] == [
        "batch_fake4",
        "batch_fake2",
    ]
    with pytest.raises(openai.NotFoundError, match="No such File object: file-nope"):
        await direct.batches.create(
            input_file_id="file-nope", endpoint="/v1/responses", completion_window="24h"
        )


async def test_a_vector_store_holds_files_lists_them_and_is_deleted(
    direct: openai.AsyncOpenAI,
) -> None:
    first, second = await upload(direct, "a.txt", b"aaaa"), await upload(direct, "b.txt", b"bb")
    store = await direct.vector_stores.create(name="docs", file_ids=[first])
    assert (store.id, store.file_counts.total, store.usage_bytes) == ("vs_fake3", 1, 4)
    added = await direct.vector_stores.files.create(store.id, file_id=second)
    assert (added.id, added.vector_store_id, added.status) == (second, "vs_fake3", "completed")
    listed = await direct.vector_stores.files.list(store.id)
    assert [f.id for f in listed.data] == [second, first]
    assert (await direct.vector_stores.retrieve(store.id)).file_counts.total == 2
    assert (await direct.vector_stores.files.retrieve(first, vector_store_id=store.id)).id == first
    removed = await direct.vector_stores.files.delete(first, vector_store_id=store.id)
    assert removed.deleted is True
    renamed = await direct.vector_stores.update(store.id, name="manuals")
    assert (renamed.name, renamed.file_counts.total) == ("manuals", 1)
    assert [s.id for s in (await direct.vector_stores.list()).data] == ["vs_fake3"]
    with pytest.raises(openai.NotFoundError, match="No such File object: file-nope"):
        await direct.vector_stores.files.create(store.id, file_id="file-nope")
    assert (await direct.vector_stores.delete(store.id)).deleted is True
    with pytest.raises(openai.NotFoundError, match="No such VectorStore object: vs_fake3"):
        await direct.vector_stores.retrieve(store.id)


async def test_a_created_response_is_stored_chained_and_deleted(
    direct: openai.AsyncOpenAI,
) -> None:
    created = await direct.responses.create(model="gpt-4o-mini", input="hi there")
    assert created.id == "resp_fake1"
    again = await direct.responses.retrieve(created.id)
    assert (again.id, again.output_text, again.status) == (
        "resp_fake1",
        created.output_text,
        "completed",
    )
    items = await direct.responses.input_items.list(created.id)
    assert [(i.id, i.type, i.role) for i in items.data] == [("msg_fake2", "message", "user")]
    chained = await direct.responses.create(
        model="gpt-4o-mini", input="more", previous_response_id=created.id
    )
    assert (chained.id, chained.previous_response_id) == ("resp_fake3", "resp_fake1")
    with pytest.raises(openai.BadRequestError) as caught:
        await direct.responses.create(
            model="gpt-4o-mini", input="x", previous_response_id="resp_nope"
        )
    assert caught.value.code == "previous_response_not_found"
    unstored = await direct.responses.create(model="gpt-4o-mini", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await direct.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="background"):
        await direct.responses.cancel(created.id)
    await direct.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError, match="No such Response object: resp_fake1"):
        await direct.responses.retrieve(created.id)


async def test_a_streamed_response_is_stored_under_the_id_of_its_created_event(
    fake: Fake, direct: openai.AsyncOpenAI
) -> None:
    body = {"model": "gpt-4o-mini", "input": "hello", "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(fake.base_url + "/responses", json=body, headers=AUTH) as response,
    ):
        head = await response.content.read(400)
        await response.read()
    assert created_ids_in_stream(head) == [("resp_fake1", "response")]
    assert (await direct.responses.retrieve("resp_fake1")).status == "completed"


async def test_a_fine_tuning_job_succeeds_once_retrieved_with_a_result_file(
    direct: openai.AsyncOpenAI,
) -> None:
    training = await upload(direct, "train.jsonl")
    job = await direct.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training)
    assert (job.id, job.status, job.training_file) == ("ftjob-fake2", "validating_files", training)
    done = await direct.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.result_files, done.fine_tuned_model) == (
        "succeeded",
        ["file-fake3"],
        "ft:gpt-4o-mini:fake::fake2",
    )
    assert (await direct.files.content("file-fake3")).content == b"step,train_loss\n1,0.5\n"
    events = await direct.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events.data] == ["Created fine-tuning job"]
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        await direct.fine_tuning.jobs.cancel(job.id)
    second = await direct.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training)
    assert (await direct.fine_tuning.jobs.cancel(second.id)).status == "cancelled"
    listed = await direct.fine_tuning.jobs.list(limit=1)
    assert ([j.id for j in listed.data], listed.has_more) == (["ftjob-fake4"], True)


async def test_containers_are_created_listed_and_deleted(direct: openai.AsyncOpenAI) -> None:
    first = await direct.containers.create(name="sandbox")
    second = await direct.containers.create(name="other")
    assert (first.id, first.status, first.name) == ("cntr_fake1", "running", "sandbox")
    assert (await direct.containers.retrieve(first.id)).name == "sandbox"
    assert [c.id for c in (await direct.containers.list()).data] == [second.id, first.id]
    await direct.containers.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="No such Container object: cntr_fake1"):
        await direct.containers.retrieve(first.id)


async def test_a_conversation_keeps_its_items_and_takes_responses(
    direct: openai.AsyncOpenAI,
) -> None:
    conversation = await direct.conversations.create(
        items=[{"type": "message", "role": "user", "content": "hello"}], metadata={"a": "1"}
    )
    assert (conversation.id, conversation.metadata) == ("conv_fake1", {"a": "1"})
    items = await direct.conversations.items.list(conversation.id)
    assert [i.id for i in items.data] == ["msg_fake2"]
    updated = await direct.conversations.update(conversation.id, metadata={"b": "2"})
    assert updated.metadata == {"b": "2"}
    answer = await direct.responses.create(
        model="gpt-4o-mini", input="go on", conversation=conversation.id
    )
    assert answer.status == "completed"
    with pytest.raises(openai.NotFoundError, match="Conversation with id 'conv_nope' not found"):
        await direct.responses.create(model="gpt-4o-mini", input="x", conversation="conv_nope")
    assert (await direct.conversations.delete(conversation.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await direct.conversations.retrieve(conversation.id)


async def test_paths_the_fake_does_not_serve_are_still_unknown_urls(fake: Fake) -> None:
    for method, path in (
        ("GET", "/files/file-1/a/b"),
        ("POST", "/responses/input_tokens"),
        ("PATCH", "/batches"),
        ("GET", "/fine_tuning/checkpoints/x/permissions"),
    ):
        status, body = await raw(fake, method, path)
        assert (status, body["error"]["code"]) == (404, "unknown_url"), (method, path)

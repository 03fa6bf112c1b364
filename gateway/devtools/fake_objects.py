"""The fake upstream's objects: files, uploads, batches, vector stores, stored responses,
fine-tuning jobs, containers and conversations, in memory, with OpenAI's cursor pagination
(`limit`, `after`, `before`, `order`; answers with `first_id`, `last_id`, `has_more`).

No HTTP here: `FakeObjects.handle` takes a call's method, path, query and body and returns the
answer's payload or raises `ObjectError`; `gateway.devtools.fake_upstream` serves it. Ids look like
OpenAI's (`file-fake1`, `batch_fake2`, `vs_fake3`, ...) and count up from 1 in each state,
so a test's ids are known in advance. Objects the fake makes on its own, as OpenAI does, are
there too: a batch is `completed` with an output file once retrieved after its creation, a
fine-tuning job `succeeded` with a result file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

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


_Handler = Callable[["FakeObjects", Call], Any]


def _no_such(kind: str, object_id: str) -> ObjectError:
    return ObjectError(404, f"No such {kind} object: {object_id}", param="id")


def _required(call: Call, name: str) -> Any:
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
            raise _no_such(name or kind.replace("_", " ").title().replace(" ", ""), object_id)
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

    def handle(self, call: Call) -> Any:
        """The payload of a call on the objects API; `ObjectError` for OpenAI's errors,
        `LookupError` for a path the fake does not serve."""
        for pattern, method, handler in _ROUTES:
            if method == call.method and _matches(pattern, call.segments):
                return handler(self, call)
        raise LookupError(call.segments)


def _matches(pattern: tuple[str, ...], segments: list[str]) -> bool:
    return len(pattern) == len(segments) and all(
        want == "*" or want == got for want, got in zip(pattern, segments, strict=True)
    )


# ------------------------------------------------------------------ files


def _list_files(objects: FakeObjects, call: Call) -> Any:
    files = list(objects.store["file"].values())
    if purpose := call.query.get("purpose"):
        files = [item for item in files if item["purpose"] == purpose]
    return page(files, call.query, default_limit=FILE_LIST_LIMIT, max_limit=FILE_LIST_LIMIT)


def _get_file(objects: FakeObjects, call: Call) -> Any:
    return objects.get("file", call.segments[1], "File")


def _delete_file(objects: FakeObjects, call: Call) -> Any:
    file_id = call.segments[1]
    objects.remove("file", file_id, "File")
    objects.contents.pop(file_id, None)
    return {"id": file_id, "object": "file", "deleted": True}


# ------------------------------------------------------------------ uploads


def _create_upload(objects: FakeObjects, call: Call) -> Any:
    for name in ("filename", "purpose", "bytes", "mime_type"):
        _required(call, name)
    return objects.add(
        "upload",
        {
            "id": objects.new_id("upload"),
            "object": "upload",
            "bytes": call.body["bytes"],
            "created_at": call.now,
            "filename": call.body["filename"],
            "purpose": call.body["purpose"],
            "status": "pending",
            "expires_at": call.now + 3600,
            "file": None,
        },
    )


def _pending_upload(objects: FakeObjects, upload_id: str) -> dict[str, Any]:
    upload = objects.get("upload", upload_id, "Upload")
    if upload["status"] != "pending":
        raise ObjectError(400, f"Upload {upload_id} is already {upload['status']}.", param="id")
    return upload


def _add_part(objects: FakeObjects, call: Call) -> Any:
    upload_id = call.segments[1]
    _pending_upload(objects, upload_id)
    part = {
        "id": objects.new_id("part"),
        "object": "upload.part",
        "created_at": call.now,
        "upload_id": upload_id,
    }
    objects.members_of(upload_id)[part["id"]] = {**part, "data": call.data}
    return part


def _complete_upload(objects: FakeObjects, call: Call) -> Any:
    upload_id = call.segments[1]
    upload = _pending_upload(objects, upload_id)
    part_ids = _required(call, "part_ids")
    parts = objects.members_of(upload_id)
    if not isinstance(part_ids, list) or any(part not in parts for part in part_ids):
        raise ObjectError(400, "Invalid 'part_ids': no such part of this upload.", param="part_ids")
    content = b"".join(parts[part]["data"] for part in part_ids)
    if len(content) != upload["bytes"]:
        message = f"The parts hold {len(content)} bytes, the upload {upload['bytes']}."
        raise ObjectError(400, message, param="part_ids")
    file = objects.add_file(content, upload["filename"], upload["purpose"], call.now)
    upload.update(status="completed", file=file)
    return upload


def _cancel_upload(objects: FakeObjects, call: Call) -> Any:
    upload = _pending_upload(objects, call.segments[1])
    upload["status"] = "cancelled"
    return upload


# ------------------------------------------------------------------ batches


def _create_batch(objects: FakeObjects, call: Call) -> Any:
    input_file_id = _required(call, "input_file_id")
    endpoint = _required(call, "endpoint")
    objects.get("file", input_file_id, "File")
    return objects.add(
        "batch",
        {
            "id": objects.new_id("batch"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": call.body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": call.now,
            "in_progress_at": None,
            "expires_at": call.now + 86_400,
            "completed_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": call.body.get("metadata"),
        },
    )


def _get_batch(objects: FakeObjects, call: Call) -> Any:
    batch = objects.get("batch", call.segments[1], "Batch")
    if batch["status"] == "validating":
        _run_batch(objects, batch, call.now)
    return batch


def _run_batch(objects: FakeObjects, batch: dict[str, Any], now: int) -> None:
    """The batch done: one answer line per input line, in an output file of its own."""
    lines = objects.contents.get(batch["input_file_id"], b"").splitlines()
    answers = []
    for number, line in enumerate(lines, 1):
        try:
            custom_id = orjson.loads(line).get("custom_id")
        except (orjson.JSONDecodeError, AttributeError):
            custom_id = None
        answer = {
            "id": f"batch_req_fake{number}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_fake{number}", "body": {}},
            "error": None,
        }
        answers.append(orjson.dumps(answer) + b"\n")
    output = objects.add_file(b"".join(answers), "batch_output.jsonl", "batch_output", now)
    counts = {"total": len(lines), "completed": len(lines), "failed": 0}
    batch.update(
        status="completed",
        output_file_id=output["id"],
        in_progress_at=now,
        completed_at=now,
        request_counts=counts,
    )


def _list_batches(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["batch"].values()), call.query, orderable=False)


def _cancel_batch(objects: FakeObjects, call: Call) -> Any:
    batch = objects.get("batch", call.segments[1], "Batch")
    if batch["status"] in ("completed", "failed", "expired"):
        raise ObjectError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
    batch.update(status="cancelled", cancelled_at=call.now)
    return batch


# ------------------------------------------------------------------ vector stores


def _create_vector_store(objects: FakeObjects, call: Call) -> Any:
    store = objects.add(
        "vector_store",
        {
            "id": objects.new_id("vector_store"),
            "object": "vector_store",
            "created_at": call.now,
            "name": call.body.get("name"),
            "usage_bytes": 0,
            "file_counts": _file_counts(0),
            "status": "completed",
            "expires_after": None,
            "expires_at": None,
            "last_active_at": call.now,
            "metadata": call.body.get("metadata") or {},
        },
    )
    for file_id in call.body.get("file_ids") or ():
        _attach_file(objects, store, file_id, call.now)
    return store


def _file_counts(count: int) -> dict[str, int]:
    return {"in_progress": 0, "completed": count, "failed": 0, "cancelled": 0, "total": count}


def _attach_file(
    objects: FakeObjects, store: dict[str, Any], file_id: Any, now: int
) -> dict[str, Any]:
    if not isinstance(file_id, str):
        raise ObjectError(400, "Invalid 'file_id'.", param="file_id")
    file = objects.get("file", file_id, "File")
    entry = {
        "id": file_id,
        "object": "vector_store.file",
        "created_at": now,
        "usage_bytes": file["bytes"],
        "vector_store_id": store["id"],
        "status": "completed",
        "last_error": None,
        "attributes": {},
    }
    files = objects.members_of(store["id"])
    files[file_id] = entry
    store["file_counts"] = _file_counts(len(files))
    store["usage_bytes"] = sum(item["usage_bytes"] for item in files.values())
    return entry


def _get_vector_store(objects: FakeObjects, call: Call) -> Any:
    return objects.get("vector_store", call.segments[1], "VectorStore")


def _modify_vector_store(objects: FakeObjects, call: Call) -> Any:
    store = objects.get("vector_store", call.segments[1], "VectorStore")
    for name in ("name", "metadata", "expires_after"):
        if name in call.body:
            store[name] = call.body[name]
    return store


def _delete_vector_store(objects: FakeObjects, call: Call) -> Any:
    store_id = call.segments[1]
    objects.remove("vector_store", store_id, "VectorStore")
    return {"id": store_id, "object": "vector_store.deleted", "deleted": True}


def _list_vector_stores(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["vector_store"].values()), call.query)


def _add_vector_store_file(objects: FakeObjects, call: Call) -> Any:
    store = objects.get("vector_store", call.segments[1], "VectorStore")
    return _attach_file(objects, store, _required(call, "file_id"), call.now)


def _list_vector_store_files(objects: FakeObjects, call: Call) -> Any:
    store_id = call.segments[1]
    objects.get("vector_store", store_id, "VectorStore")
    return page(list(objects.members_of(store_id).values()), call.query)


def _vector_store_file(objects: FakeObjects, call: Call) -> dict[str, Any]:
    store_id, file_id = call.segments[1], call.segments[3]
    objects.get("vector_store", store_id, "VectorStore")
    entry = objects.members_of(store_id).get(file_id)
    if entry is None:
        raise _no_such("VectorStoreFile", file_id)
    return entry


def _delete_vector_store_file(objects: FakeObjects, call: Call) -> Any:
    entry = _vector_store_file(objects, call)
    store = objects.get("vector_store", call.segments[1])
    files = objects.members_of(store["id"])
    del files[entry["id"]]
    store["file_counts"] = _file_counts(len(files))
    return {"id": entry["id"], "object": "vector_store.file.deleted", "deleted": True}


# ------------------------------------------------------------------ responses


def _get_response(objects: FakeObjects, call: Call) -> Any:
    return objects.get("response", call.segments[1], "Response")


def _delete_response(objects: FakeObjects, call: Call) -> Any:
    response_id = call.segments[1]
    objects.remove("response", response_id, "Response")
    return {"id": response_id, "object": "response", "deleted": True}


def _response_input_items(objects: FakeObjects, call: Call) -> Any:
    response_id = call.segments[1]
    objects.get("response", response_id, "Response")
    return page(list(objects.members_of(response_id).values()), call.query)


def _cancel_response(objects: FakeObjects, call: Call) -> Any:
    response = objects.get("response", call.segments[1], "Response")
    if response.get("background") is not True:
        raise ObjectError(400, "Only responses created with background=true can be cancelled.")
    response["status"] = "cancelled"
    return response


# ------------------------------------------------------------------ fine-tuning jobs


def _create_job(objects: FakeObjects, call: Call) -> Any:
    model = _required(call, "model")
    training_file = _required(call, "training_file")
    objects.get("file", training_file, "File")
    validation_file = call.body.get("validation_file")
    if validation_file is not None:
        objects.get("file", validation_file, "File")
    return objects.add(
        "fine_tuning_job",
        {
            "object": "fine_tuning.job",
            "id": objects.new_id("fine_tuning_job"),
            "model": model,
            "created_at": call.now,
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": "org-fake",
            "result_files": [],
            "status": "validating_files",
            "validation_file": validation_file,
            "training_file": training_file,
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto"},
            "trained_tokens": None,
            "error": None,
            "seed": call.body.get("seed", 42),
            "metadata": call.body.get("metadata"),
        },
    )


def _get_job(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    if job["status"] == "validating_files":
        metrics = b"step,train_loss\n1,0.5\n"
        result = objects.add_file(metrics, "step_metrics.csv", "fine-tune-results", call.now)
        job.update(
            status="succeeded",
            finished_at=call.now,
            fine_tuned_model=f"ft:{job['model']}:fake::{job['id'].removeprefix('ftjob-')}",
            result_files=[result["id"]],
            trained_tokens=100,
        )
    return job


def _list_jobs(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["fine_tuning_job"].values()), call.query, orderable=False)


def _cancel_job(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise ObjectError(400, f"Job {job['id']} is already {job['status']}.")
    job["status"] = "cancelled"
    return job


def _job_events(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    event = {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{job['id'].removeprefix('ftjob-')}",
        "created_at": job["created_at"],
        "level": "info",
        "message": "Created fine-tuning job",
        "data": {},
        "type": "message",
    }
    return page([event], call.query, orderable=False)


# ------------------------------------------------------------------ containers


def _create_container(objects: FakeObjects, call: Call) -> Any:
    name = _required(call, "name")
    for file_id in call.body.get("file_ids") or ():
        objects.get("file", file_id, "File")
    return objects.add(
        "container",
        {
            "id": objects.new_id("container"),
            "object": "container",
            "created_at": call.now,
            "status": "running",
            "expires_after": call.body.get("expires_after")
            or {"anchor": "last_active_at", "minutes": 20},
            "last_active_at": call.now,
            "name": name,
        },
    )


def _get_container(objects: FakeObjects, call: Call) -> Any:
    return objects.get("container", call.segments[1], "Container")


def _delete_container(objects: FakeObjects, call: Call) -> Any:
    container_id = call.segments[1]
    objects.remove("container", container_id, "Container")
    return {"id": container_id, "object": "container.deleted", "deleted": True}


def _list_containers(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["container"].values()), call.query)


# ------------------------------------------------------------------ conversations


def _create_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation = objects.add(
        "conversation",
        {
            "id": objects.new_id("conversation"),
            "object": "conversation",
            "created_at": call.now,
            "metadata": call.body.get("metadata") or {},
        },
    )
    items = objects.members_of(conversation["id"])
    for item in message_items(objects, call.body.get("items")):
        items[item["id"]] = item
    return conversation


def message_items(objects: FakeObjects, given: Any) -> list[dict[str, Any]]:
    """Input items as stored: a string is one user message; each item gets an id."""
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    items = []
    for item in given if isinstance(given, list) else ():
        if isinstance(item, dict):
            items.append({"id": objects.new_id("item"), "type": "message", **item})
    return items


def _get_conversation(objects: FakeObjects, call: Call) -> Any:
    return objects.get("conversation", call.segments[1], "Conversation")


def _update_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation = objects.get("conversation", call.segments[1], "Conversation")
    conversation["metadata"] = _required(call, "metadata")
    return conversation


def _delete_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation_id = call.segments[1]
    objects.remove("conversation", conversation_id, "Conversation")
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def _conversation_items(objects: FakeObjects, call: Call) -> Any:
    conversation_id = call.segments[1]
    objects.get("conversation", conversation_id, "Conversation")
    return page(list(objects.members_of(conversation_id).values()), call.query)


_ROUTES: tuple[tuple[tuple[str, ...], str, _Handler], ...] = (
    (("files",), "GET", _list_files),
    (("files", "*"), "GET", _get_file),
    (("files", "*"), "DELETE", _delete_file),
    (("uploads",), "POST", _create_upload),
    (("uploads", "*", "parts"), "POST", _add_part),
    (("uploads", "*", "complete"), "POST", _complete_upload),
    (("uploads", "*", "cancel"), "POST", _cancel_upload),
    (("batches",), "POST", _create_batch),
    (("batches",), "GET", _list_batches),
    (("batches", "*"), "GET", _get_batch),
    (("batches", "*", "cancel"), "POST", _cancel_batch),
    (("vector_stores",), "POST", _create_vector_store),
    (("vector_stores",), "GET", _list_vector_stores),
    (("vector_stores", "*"), "GET", _get_vector_store),
    (("vector_stores", "*"), "POST", _modify_vector_store),
    (("vector_stores", "*"), "DELETE", _delete_vector_store),
    (("vector_stores", "*", "files"), "POST", _add_vector_store_file),
    (("vector_stores", "*", "files"), "GET", _list_vector_store_files),
    (("vector_stores", "*", "files", "*"), "GET", _vector_store_file),
    (("vector_stores", "*", "files", "*"), "DELETE", _delete_vector_store_file),
    (("responses", "*"), "GET", _get_response),
    (("responses", "*"), "DELETE", _delete_response),
    (("responses", "*", "input_items"), "GET", _response_input_items),
    (("responses", "*", "cancel"), "POST", _cancel_response),
    (("fine_tuning", "jobs"), "POST", _create_job),
    (("fine_tuning", "jobs"), "GET", _list_jobs),
    (("fine_tuning", "jobs", "*"), "GET", _get_job),
    (("fine_tuning", "jobs", "*", "cancel"), "POST", _cancel_job),
    (("fine_tuning", "jobs", "*", "events"), "GET", _job_events),
    (("containers",), "POST", _create_container),
    (("containers",), "GET", _list_containers),
    (("containers", "*"), "GET", _get_container),
    (("containers", "*"), "DELETE", _delete_container),
    (("conversations",), "POST", _create_conversation),
    (("conversations", "*"), "GET", _get_conversation),
    (("conversations", "*"), "POST", _update_conversation),
    (("conversations", "*"), "DELETE", _delete_conversation),
    (("conversations", "*", "items"), "GET", _conversation_items),
)
# The collections `gateway.devtools.fake_upstream` routes here.
COLLECTIONS = ("files", "uploads", "batches", "vector_stores", "responses", "fine_tuning",
               "containers", "conversations")  # fmt: skip

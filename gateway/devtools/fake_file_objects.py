"""The fake upstream's calls on files, uploads, batches and vector stores: each a function of
the store and the call, returning the answer's payload or raising `ObjectError`. Objects the
fake makes on its own, as OpenAI does, are there too: a batch is `completed` with an output
file once retrieved after its creation.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.devtools.fake_object_store import (
    FILE_LIST_LIMIT,
    Call,
    FakeObjects,
    ObjectError,
    Route,
    no_such,
    page,
    required,
)
from gateway.devtools.fake_tokens import (
    DEFAULT_REPLY_WORDS,
    TOKENS_PER_MESSAGE,
    Tokens,
    chat_usage,
    reply_text,
    responses_usage,
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
        required(call, name)
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
    part_ids = required(call, "part_ids")
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
    input_file_id = required(call, "input_file_id")
    endpoint = required(call, "endpoint")
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
    """The batch done: one answer line per input line, in an output file of its own. Each
    answer is a chat completion counted as the HTTP fake counts one (prompt words + 3 a
    message; 12 reply words, or `max_tokens`), and the batch states the sum as its `usage`
    and the first line's model as its `model`, as OpenAI's batches do; unless its metadata
    says `fake_usage: output_only` (the usage is then in the output file alone)."""
    lines = objects.contents.get(batch["input_file_id"], b"").splitlines()
    answers, prompt_total, reply_total, model = [], 0, 0, None
    for number, line in enumerate(lines, 1):
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            request = {}
        request = request if isinstance(request, dict) else {}
        body = request.get("body") if isinstance(request.get("body"), dict) else {}
        model = model or body.get("model")
        prompt = _prompt_words(body.get("messages"))
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        reply = DEFAULT_REPLY_WORDS
        if isinstance(limit, int) and 0 <= limit < DEFAULT_REPLY_WORDS:
            reply = limit
        prompt_total, reply_total = prompt_total + prompt, reply_total + reply
        completion = {
            "id": f"chatcmpl-fakebatch{number}",
            "object": "chat.completion",
            "created": now,
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply_text(reply)}}],
            "usage": chat_usage(Tokens(prompt, reply, 0, 0)),
        }  # fmt: skip
        answer = {
            "id": f"batch_req_fake{number}",
            "custom_id": request.get("custom_id"),
            "response": {"status_code": 200, "request_id": f"req_fake{number}", "body": completion},
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
        model=model,
    )
    metadata = batch.get("metadata") if isinstance(batch.get("metadata"), dict) else {}
    if metadata.get("fake_usage") != "output_only":
        batch["usage"] = responses_usage(Tokens(prompt_total, reply_total, 0, 0))


def _prompt_words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        len(message.get("content", "").split()) + TOKENS_PER_MESSAGE
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), str)
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
    return _attach_file(objects, store, required(call, "file_id"), call.now)


def _list_vector_store_files(objects: FakeObjects, call: Call) -> Any:
    store_id = call.segments[1]
    objects.get("vector_store", store_id, "VectorStore")
    return page(list(objects.members_of(store_id).values()), call.query)


def _vector_store_file(objects: FakeObjects, call: Call) -> dict[str, Any]:
    store_id, file_id = call.segments[1], call.segments[3]
    objects.get("vector_store", store_id, "VectorStore")
    entry = objects.members_of(store_id).get(file_id)
    if entry is None:
        raise no_such("VectorStoreFile", file_id)
    return entry


def _delete_vector_store_file(objects: FakeObjects, call: Call) -> Any:
    entry = _vector_store_file(objects, call)
    store = objects.get("vector_store", call.segments[1])
    files = objects.members_of(store["id"])
    del files[entry["id"]]
    store["file_counts"] = _file_counts(len(files))
    return {"id": entry["id"], "object": "vector_store.file.deleted", "deleted": True}


FILE_ROUTES: tuple[Route, ...] = (
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
)

"""The fake upstream's objects API: which function answers each call on files, uploads,
batches, vector stores, stored responses, fine-tuning jobs, containers and conversations.

No HTTP here: `handle_object_call` takes a call's method, path, query and body and returns the
answer's payload or raises `ObjectError`; `gateway.devtools.fake_upstream` serves it. The
objects live in memory, with OpenAI's ids and cursor pages (`gateway.devtools.fake_object_store`);
the calls on them are `gateway.devtools.fake_file_objects`' (files, uploads, batches, vector
stores) and `gateway.devtools.fake_model_objects`' (responses, fine-tuning jobs, containers,
conversations).
"""

from __future__ import annotations

from typing import Any

from gateway.devtools.fake_file_objects import FILE_ROUTES
from gateway.devtools.fake_model_objects import MODEL_ROUTES
from gateway.devtools.fake_object_store import Call, FakeObjects, Route

_ROUTES: tuple[Route, ...] = FILE_ROUTES + MODEL_ROUTES
# The collections `gateway.devtools.fake_upstream` routes here.
COLLECTIONS = ("files", "uploads", "batches", "vector_stores", "responses", "fine_tuning",
               "containers", "conversations")  # fmt: skip


def handle_object_call(objects: FakeObjects, call: Call) -> Any:
    """The payload of a call on the objects API; `ObjectError` for OpenAI's errors,
    `LookupError` for a path the fake does not serve."""
    for pattern, method, handler in _ROUTES:
        if method == call.method and _matches(pattern, call.segments):
            return handler(objects, call)
    raise LookupError(call.segments)


def _matches(pattern: tuple[str, ...], segments: list[str]) -> bool:
    return len(pattern) == len(segments) and all(
        want == "*" or want == got for want, got in zip(pattern, segments, strict=True)
    )

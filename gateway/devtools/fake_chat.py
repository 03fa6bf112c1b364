"""The fake upstream's text endpoints: `/v1/chat/completions`, `/v1/completions` and
`/v1/responses`, answered whole or streamed as OpenAI streams them (`data:` chunks with
`include_usage`'s exact semantics; the responses API's named events), with the deterministic
token counts of `gateway.devtools.fake_tokens`. A stored response is kept among the fake's
objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.devtools.fake_http import (
    CONTEXT,
    FAKE_STATE,
    ApiError,
    RequestContext,
    answer_time,
    json_response,
    read_json,
    stream_chunks,
)
from gateway.devtools.fake_object_store import FakeObjects, message_items
from gateway.devtools.fake_tokens import (
    Tokens,
    chat_prompt_tokens,
    chat_usage,
    chunk_words,
    count_in_usage_api,
    item_tokens,
    legacy_usage,
    reply_deltas,
    reply_length,
    reply_text,
    responses_input_tokens,
    responses_usage,
    token_counts,
    token_items,
)

_SSE_TYPE = "text/event-stream; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
_MALFORMED_EVENT = b'data: {"id": broken\n\n'


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _named_sse(kind: str, sequence: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _data_events(
    head: dict[str, Any],
    choice_lists: Iterable[list[dict[str, Any]]],
    usage: dict[str, Any] | None,
    malformed: bool,
) -> list[bytes]:
    """Events of a `data:`-only stream with OpenAI's exact include_usage semantics."""
    tail: dict[str, Any] = {"usage": None} if usage is not None else {}
    events = [_sse({**head, "choices": choices, **tail}) for choices in choice_lists]
    if malformed:
        events.insert(len(events) // 2, _MALFORMED_EVENT)
    if usage is not None:
        events.append(_sse({**head, "choices": [], "usage": usage}))
    events.append(_DONE)
    return events


def _stream_usage(body: dict[str, Any], ctx: RequestContext) -> bool:
    options = body.get("stream_options")
    return ctx.with_usage and isinstance(options, dict) and options.get("include_usage") is True


def _chat_message_choice(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}


def _chat_chunk_choice(delta: dict[str, Any], finish: str | None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


def _chat_choice_lists(deltas: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
    yield _chat_chunk_choice({"role": "assistant", "content": "", "refusal": None}, None)
    for delta in deltas:
        yield _chat_chunk_choice({"content": delta}, None)
    yield _chat_chunk_choice({}, "stop")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request[CONTEXT]
    body = await read_json(request)
    prompt = chat_prompt_tokens(body.get("messages"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    tokens = token_counts(request, prompt, reply_length(request, limit))
    count_in_usage_api(request, body, tokens)
    head = {
        "id": f"chatcmpl-fake{ctx.n}",
        "object": "chat.completion",
        "created": answer_time(request),
        "model": body.get("model"),
    }
    if body.get("stream") is True:
        return await _chat_stream(request, ctx, body, head, tokens)
    result: dict[str, Any] = {**head, "choices": [_chat_message_choice(reply_text(tokens.reply))]}
    if ctx.with_usage:
        result["usage"] = chat_usage(tokens)
    result["service_tier"] = "default"
    result["system_fingerprint"] = "fp_fake"
    return json_response(request, result)


async def _chat_stream(
    request: web.Request,
    ctx: RequestContext,
    body: dict[str, Any],
    head: dict[str, Any],
    tokens: Tokens,
) -> web.StreamResponse:
    head = {
        **head,
        "object": "chat.completion.chunk",
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    usage = chat_usage(tokens) if _stream_usage(body, ctx) else None
    choices = _chat_choice_lists(reply_deltas(tokens.reply, chunk_words(request)))
    events = _data_events(head, choices, usage, "malformed_sse" in ctx.faults)
    return await stream_chunks(request, events, _SSE_TYPE)


def _text_choice(text: str, finish: str | None) -> list[dict[str, Any]]:
    return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request[CONTEXT]
    body = await read_json(request)
    prompt = sum(item_tokens(item) for item in token_items(body.get("prompt"), "prompt"))
    tokens = token_counts(request, prompt, reply_length(request, body.get("max_tokens")))
    count_in_usage_api(request, body, tokens)
    head = {
        "id": f"cmpl-fake{ctx.n}",
        "object": "text_completion",
        "created": answer_time(request),
        "model": body.get("model"),
    }
    if body.get("stream") is True:
        usage = legacy_usage(tokens) if _stream_usage(body, ctx) else None
        deltas = reply_deltas(tokens.reply, chunk_words(request))
        choices = [*(_text_choice(delta, None) for delta in deltas), _text_choice("", "stop")]
        events = _data_events(head, choices, usage, "malformed_sse" in ctx.faults)
        return await stream_chunks(request, events, _SSE_TYPE)
    result: dict[str, Any] = {**head, "choices": _text_choice(reply_text(tokens.reply), "stop")}
    if ctx.with_usage:
        result["usage"] = legacy_usage(tokens)
    return json_response(request, result)


@dataclass(frozen=True, slots=True)
class _ResponseInfo:
    n: int
    id: str
    created: int
    body: dict[str, Any]
    tokens: Tokens
    with_usage: bool

    @property
    def item_id(self) -> str:
        return f"msg_fake{self.n}"


def _output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(info: _ResponseInfo, done: bool) -> dict[str, Any]:
    content = [_output_text_part(reply_text(info.tokens.reply))] if done else []
    return {
        "type": "message",
        "id": info.item_id,
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": content,
    }


def _response_object(info: _ResponseInfo, done: bool) -> dict[str, Any]:
    instructions = info.body.get("instructions")
    result: dict[str, Any] = {
        "id": info.id,
        "object": "response",
        "created_at": info.created,
        "status": "completed" if done else "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": info.body.get("max_output_tokens"),
        "model": info.body.get("model"),
        "output": [_message_item(info, True)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": info.body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": info.body.get("store") is not False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
    }
    if info.with_usage:
        result["usage"] = responses_usage(info.tokens) if done else None
    result["user"] = None
    result["metadata"] = {}
    return result


def _response_event_fields(info: _ResponseInfo, group: int) -> Iterator[tuple[str, dict[str, Any]]]:
    pending = _response_object(info, False)
    text = reply_text(info.tokens.reply)
    where = {"item_id": info.item_id, "output_index": 0, "content_index": 0}
    yield "response.created", {"response": pending}
    yield "response.in_progress", {"response": pending}
    yield "response.output_item.added", {"output_index": 0, "item": _message_item(info, False)}
    yield "response.content_part.added", {**where, "part": _output_text_part("")}
    for delta in reply_deltas(info.tokens.reply, group):
        yield "response.output_text.delta", {**where, "delta": delta, "logprobs": []}
    yield "response.output_text.done", {**where, "text": text, "logprobs": []}
    yield "response.content_part.done", {**where, "part": _output_text_part(text)}
    yield "response.output_item.done", {"output_index": 0, "item": _message_item(info, True)}
    yield "response.completed", {"response": _response_object(info, True)}


def response_events(
    response_id: str, created: int, body: dict[str, Any], tokens: Tokens
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A streamed response's events (kind, fields), usage included: what the WebSocket mode
    of the Responses API sends for a `response.create`."""
    number = int("".join(c for c in response_id if c.isdigit()) or 0)
    return _response_event_fields(
        _ResponseInfo(number, response_id, created, body, tokens, True), 1
    )


async def responses(request: web.Request) -> web.StreamResponse:
    ctx = request[CONTEXT]
    body = await read_json(request)
    reply = reply_length(request, body.get("max_output_tokens"))
    tokens = token_counts(request, responses_input_tokens(body.get("input")), reply)
    objects = request.app[FAKE_STATE].objects
    _check_context(objects, body)
    count_in_usage_api(request, body, tokens)
    response_id = objects.new_id("response")
    info = _ResponseInfo(ctx.n, response_id, answer_time(request), body, tokens, ctx.with_usage)
    objects.store_response(_response_object(info, True), message_items(objects, body.get("input")))
    if body.get("stream") is not True:
        return json_response(request, _response_object(info, True))
    fields = _response_event_fields(info, chunk_words(request))
    events = [_named_sse(kind, seq, data) for seq, (kind, data) in enumerate(fields)]
    return await stream_chunks(request, events, _SSE_TYPE)


def _check_context(objects: FakeObjects, body: dict[str, Any]) -> None:
    """A previous response or conversation named must exist, as OpenAI checks."""
    previous = body.get("previous_response_id")
    if previous is not None and previous not in objects.store["response"]:
        message = f"Previous response with id '{previous}' not found."
        code = "previous_response_not_found"
        raise ApiError(400, message, param="previous_response_id", code=code)
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and conversation not in objects.store["conversation"]:
        message = f"Conversation with id '{conversation}' not found."
        raise ApiError(404, message, param="conversation")

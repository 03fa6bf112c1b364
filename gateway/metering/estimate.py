"""The offline estimate of a call whose upstream reported no usage, and the text it counts.

The prompt is counted from the request body (`gateway.metering.tokens`), the output from the
text the answer carries: a JSON answer's choices and output items, or a stream's deltas
(`text_of_sse`, also what a stream budget counts as delivered).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering import tokens
from gateway.metering.recorder import BodyRecorder
from gateway.metering.requests import RequestFacts
from gateway.metering.usage import Usage


def estimate_usage(facts: RequestFacts, recorder: BodyRecorder | None, is_sse: bool) -> Usage:
    """Offline token counts for a call whose upstream reported no usage."""
    input_tokens = (
        tokens.estimate_prompt_tokens("/v1" + facts.api_path, facts.json_body)
        if facts.json_body
        else 0
    )
    output_tokens = 0
    if recorder is not None and recorder.total and facts.api_path != "/embeddings":
        head = recorder.head()
        text = text_of_sse(head) if is_sse else _text_of_json(head)
        output_tokens = tokens.count_text(facts.model, text)
        if not recorder.complete and len(head):
            # Only the head was kept: scale its count to the whole body.
            output_tokens = output_tokens * recorder.total // len(head)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, estimated=True)


def text_of_sse(raw: bytes) -> str:
    parts: list[str] = []
    for line in raw.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            parts.extend(event_texts(event))
    return "".join(parts)


def _text_of_json(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    return "".join(_body_texts(body)) if isinstance(body, dict) else ""


def event_texts(event: dict[str, Any]) -> list[str]:
    kind = event.get("type")
    if isinstance(kind, str):  # Responses API stream events
        delta = event.get("delta")
        return [delta] if kind.endswith(".delta") and isinstance(delta, str) else []
    texts = []
    for choice in _list(event.get("choices")):
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            texts.extend(_message_texts(delta))
        elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    return texts


def _body_texts(body: dict[str, Any]) -> list[str]:
    texts = []
    for choice in _list(body.get("choices")):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("message"), dict):
            texts.extend(_message_texts(choice["message"]))
        elif isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    for item in _list(body.get("output")):
        for part in _list(item.get("content") if isinstance(item, dict) else None):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    if isinstance(body.get("text"), str):  # transcriptions
        texts.append(body["text"])
    return texts


def _message_texts(message: dict[str, Any]) -> list[str]:
    texts = [message[k] for k in ("content", "refusal") if isinstance(message.get(k), str)]
    for call in _list(message.get("tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return texts


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

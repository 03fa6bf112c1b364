"""What the gateway reads of a WebSocket session's events: which client event asks for a
response (and what it reserves), which server event starts one and which ends it, with its
usage. Only the events that can matter are parsed; every other frame passes unread."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.metering.usage import Usage, usage_of_object

REALTIME = "realtime"
RESPONSES = "responses"
# The server events that end a response, per protocol (SPEC "Every OpenAI surface").
_ENDINGS = {
    REALTIME: frozenset({"response.done"}),
    RESPONSES: frozenset({"response.completed", "response.incomplete", "response.failed"}),
}
# A server event worth parsing names one of these types. Spacing does not matter: the type's
# quoted name is the same whatever the JSON's layout.
_SERVER_TYPES = re.compile(r'"(?:response\.(?:created|done|completed|incomplete|failed)|error)"')


def parse(text: str | bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return event if type(event) is dict else None


def client_create(text: str) -> dict[str, Any] | None:
    """The client's `response.create` event, else None. A frame is parsed only when it names
    `response.create` or holds an escape (which could spell it)."""
    if "response.create" not in text and "\\u" not in text:
        return None
    event = parse(text)
    return event if event is not None and event.get("type") == "response.create" else None


def server_event(text: str) -> dict[str, Any] | None:
    """A server event that starts or ends a response, or an error; else None (unparsed)."""
    if _SERVER_TYPES.search(text) is None:
        return None
    return parse(text)


def is_ending(protocol: str, kind: Any) -> bool:
    return kind in _ENDINGS[protocol]


def max_output_tokens(protocol: str, event: dict[str, Any]) -> int:
    """The output a `response.create` may produce, to reserve (0: unbounded or unsaid)."""
    options: Any = event
    if protocol == REALTIME:
        options = event.get("response")
        if type(options) is not dict:
            return 0
        value = options.get("max_output_tokens", options.get("max_response_output_tokens"))
    else:
        value = options.get("max_output_tokens")
    return value if type(value) is int and value > 0 else 0


def requested_model(protocol: str, event: dict[str, Any]) -> tuple[bool, str | None]:
    """(names a model, that model) of a Responses `response.create`; Realtime's model is the
    connection's. A model that is not a string counts as named, and is refused."""
    if protocol == REALTIME or "model" not in event:
        return False, None
    model = event["model"]
    return True, model if type(model) is str else None


def response_id(event: dict[str, Any]) -> str | None:
    response = event.get("response")
    if type(response) is dict and type(response.get("id")) is str:
        return response["id"]
    return None


def error_of(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the client event it answers, its code) of an `error` event."""
    error = event.get("error")
    if type(error) is not dict:
        return None, None
    answers, code = error.get("event_id"), error.get("code")
    return (answers if type(answers) is str else None, code if type(code) is str else None)


@dataclass(frozen=True, slots=True)
class Ending:
    """A response's end as its row records it."""

    response_id: str | None
    status: int
    error_code: str | None
    usage: Usage | None
    model: str | None


def ending(protocol: str, event: dict[str, Any]) -> Ending:
    """The row's status, error code, usage and model from a response's last event. A failed
    response is the upstream's error: 400 for a request error, 429 for a rate limit, else 500."""
    response = event.get("response")
    response = response if type(response) is dict else {}
    status, code = 200, None
    failed = event.get("type") == "response.failed" or response.get("status") == "failed"
    if failed:
        error: Any = response.get("error")
        if protocol == REALTIME:
            details = response.get("status_details")
            error = details.get("error") if type(details) is dict else None
        error = error if type(error) is dict else {}
        code = error.get("code") if type(error.get("code")) is str else "response_failed"
        kind = error.get("type")
        status = (
            429 if "rate_limit" in str(code) else 400 if kind == "invalid_request_error" else 500
        )
    model = response.get("model")
    return Ending(
        response_id(event),
        status,
        code,
        usage_of_object(event),
        model if type(model) is str else None,
    )


def error_event(kind_type: str, code: str | None, message: str, answers: Any) -> str:
    """The gateway's own `error` event (SPEC: `{"type": "error", "error": {"type", "code",
    "message"}}`), naming the client event it answers as Realtime's errors do."""
    error: dict[str, Any] = {"type": kind_type, "code": code, "message": message, "param": None}
    if type(answers) is str:
        error["event_id"] = answers
    return orjson.dumps({"type": "error", "error": error}).decode()

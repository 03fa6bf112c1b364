"""One call as it goes through the pipeline, and how it ended.

`Call` carries what each stage found; each field is set once, by the stage named beside it.
`conclude` is the one place that decides a call's status, outcome and error code from how it
ended; `answer_for` is the one place that turns an ending into what the client gets.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import (
    GATEWAY_FAULT,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    ErrorKind,
    GatewayError,
    Outcome,
    error_body,
)
from gateway.ledger.writer import CallRecord
from gateway.metering.recorder import BodyRecorder
from gateway.metering.requests import RequestFacts
from gateway.metering.usage import Usage
from gateway.upstream.forward import RelayResult

if TYPE_CHECKING:
    from gateway.access.auth import Caller
    from gateway.limits.store import Admission
    from gateway.pipeline.intake import BodyWatch
    from gateway.pipeline.object_ids import ObjectRoute
    from gateway.pipeline.reading import Outgoing

_ID_PREFIX = "req_" + secrets.token_hex(8)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes and restarts (a random prefix), cheap within one."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@dataclass
class Answer:
    """What came back from the upstream, and how far it got to the client (the relay stage)."""

    response: web.StreamResponse  # prepared and streamed, or `held` to go out on return
    relayed: RelayResult = field(default_factory=RelayResult)
    recorder: BodyRecorder | None = None  # the bytes kept for metering and object claims
    is_sse: bool = False
    held: bool = False  # read whole: it goes out when the handler returns, cost header and all
    billed: Usage | None = None  # a stream cut by its budget: billed as delivered, not as told
    cut: bool = False


@dataclass
class Call:
    request: web.Request
    record: CallRecord
    started: float  # perf_counter at arrival
    target: str = ""  # intake: the path after /v1 and the query, as the upstream gets them
    caller: Caller | None = None  # authenticate
    objects: ObjectRoute | None = None  # authorize: what the call does to a team's objects
    body_decoded: bool = False  # read: aiohttp decoded a compressed body; it goes up decoded
    body_watch: BodyWatch | None = None  # read: the timer on a body still arriving
    facts: RequestFacts | None = None  # read: path, model, stream, parsed JSON
    outgoing: Outgoing | None = None  # read: the body as it goes upstream
    admission: Admission | None = None  # admit
    answer: Answer | None = None  # relay

    @classmethod
    def start(cls, request: web.Request) -> Call:
        return cls(
            request=request,
            record=CallRecord(
                request_id=new_request_id(),
                started_at=time.time(),
                method=request.method,
                path=request.path,
            ),
            started=time.perf_counter(),
        )


# ---------------------------------------------------------------- endings


@dataclass(frozen=True, slots=True)
class Ending:
    """How the stages ended: ANSWERED, REFUSED (with the gateway's error), CLIENT_LEFT, FAULT."""

    kind: str
    error: GatewayError | None = None


ANSWERED = Ending("answered")
CLIENT_LEFT = Ending("client_left")
FAULT = Ending("fault")


def refused(error: GatewayError) -> Ending:
    return Ending("refused", error)


def conclude(call: Call, ending: Ending) -> None:
    """Status, outcome and error code of the ledger row, decided once from the ending."""
    record, answer = call.record, call.answer
    if ending.kind == "refused":
        assert ending.error is not None
        kind = ending.error.kind
        record.status, record.outcome = kind.status, kind.outcome.value
        record.error_code = kind.code
        record.rejected_by = ending.error.limit
        return
    if ending.kind == "fault":
        record.outcome, record.error_code = Outcome.GATEWAY_ERROR.value, GATEWAY_FAULT.code
        if not _sent(call):
            record.status = GATEWAY_FAULT.status
        return
    if ending.kind == "client_left":
        # A body cut short was never counted: record what did arrive.
        received = call.request.content.total_bytes
        record.request_bytes = max(record.request_bytes, received)
        if answer is None or not (answer.relayed.delivered or stream_ended(answer)):
            if answer is not None:
                answer.relayed.client_gone = True
                _account(record, answer)
            record.outcome = Outcome.CLIENT_DISCONNECT.value
            if not record.status:
                record.status = 499  # nginx's code for "client closed request"
            return
        # It left after the whole answer had gone out: a complete call.
    if answer is not None:
        _account(record, answer)


def _account(record: CallRecord, answer: Answer) -> None:
    result = answer.relayed
    record.response_bytes = result.response_bytes
    record.ttfb_ms = result.ttfb_s * 1000 if result.ttfb_s is not None else None
    if result.client_gone:
        record.outcome = Outcome.CLIENT_DISCONNECT.value
    elif result.upstream_broke or record.status >= 400:
        record.outcome = Outcome.UPSTREAM_ERROR.value
    else:
        record.outcome = Outcome.OK.value
    if answer.cut:
        record.error_code = "insufficient_quota_mid_stream"
    if result.upstream_broke:
        record.error_code = "upstream_stream_broken"


def stream_ended(answer: Answer) -> bool:
    """The stream's last event already passed (a client may hang up on `[DONE]` before the
    upstream's own end of body arrives)."""
    if answer.recorder is None or not answer.is_sse:
        return False
    tail = answer.recorder.tail().rstrip()
    return tail.endswith(b"data: [DONE]") or b'"type":"response.completed"' in tail[-65536:]


def _sent(call: Call) -> bool:
    return call.answer is not None and call.answer.response.prepared


# ---------------------------------------------------------------- what the client gets


def answer_for(call: Call, ending: Ending) -> web.StreamResponse:
    """The response for an ending: the answer, or the gateway's error in OpenAI's shape. An
    error after the answer began to go out cannot be told: the connection is dropped."""
    answer = call.answer
    if answer is not None and (ending.kind in ("answered", "client_left") or _sent(call)):
        if ending.kind in ("refused", "fault") and call.request.transport is not None:
            call.request.transport.close()
        return answer.response
    if ending.kind == "client_left":
        return web.Response(status=499)  # nobody reads it: the client is gone
    if ending.kind == "fault":
        return error_response(
            GATEWAY_FAULT, "The gateway failed to handle this request. It has been logged."
        )
    assert ending.error is not None
    error = ending.error
    response = error_response(error.kind, error.message, error.param)
    if error.retry_after_s is not None:
        response.headers["retry-after"] = str(error.retry_after_s)
    if error.kind in (REQUEST_TOO_LARGE, REQUEST_TIMEOUT):
        # The rest of the body is never read, so the connection cannot be reused.
        response.force_close()
    return response


def error_response(kind: ErrorKind, message: str, param: str | None = None) -> web.Response:
    return web.Response(
        status=kind.status,
        body=error_body(kind, message, param),
        content_type="application/json",
    )


def apply_usage(record: CallRecord, usage: Usage) -> None:
    record.input_tokens = usage.input_tokens
    record.cached_input_tokens = usage.cached_input_tokens
    record.output_tokens = usage.output_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    record.tokens_estimated = int(usage.estimated)
    record.cache_write_tokens = usage.cache_write_tokens
    record.audio_input_tokens = usage.audio_input_tokens
    record.audio_output_tokens = usage.audio_output_tokens
    record.image_input_tokens = usage.image_input_tokens
    record.image_output_tokens = usage.image_output_tokens
    record.rejected_prediction_tokens = usage.rejected_prediction_tokens
    record.web_search_calls = usage.web_search_calls
    record.file_search_calls = usage.file_search_calls
    record.audio_seconds = usage.audio_seconds
    record.service_tier = usage.service_tier

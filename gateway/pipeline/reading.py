"""The read stage: what the client sent, as it will go upstream.

A JSON body is read whole (it is small and must be parsed: model, stream, tokens); any other
body streams through, counted as it passes, with a multipart upload's `model` field checked on
the way. Framing, size and timeouts are `gateway.pipeline.intake`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import REQUEST_TOO_LARGE, GatewayError
from gateway.metering.requests import (
    RequestFacts,
    inject_include_usage,
    input_characters,
    wants_usage_injection,
)
from gateway.pipeline.call import Call
from gateway.pipeline.intake import (
    BodyWatch,
    body_was_decoded,
    model_of,
    parse_json_object,
    read_whole_body,
)
from gateway.pipeline.multipart import MultipartModelParser
from gateway.upstream.forward import stream_request_body

# Endpoints that take only JSON: their body is read as JSON whatever its Content-Type says (a
# label could otherwise hide its model from the allow-list and its tokens from the limits).
JSON_ONLY_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/moderations",
        "/images/generations",
        "/audio/speech",
    }
)


@dataclass
class Outgoing:
    """The body as it goes upstream."""

    body: bytes | AsyncIterator[bytes] | None
    length: int | None  # what the upstream is told; None: chunked, or no body
    json: bytes | None = None  # a JSON body as the client sent it, for cheap byte scans
    passed: list[int] | None = None  # a streamed body: the bytes that have passed so far

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)


def start_reading(call: Call, max_body: int, body_timeout_s: float) -> None:
    """Refuse a declared size over the limit; note a decoded body; time a body still coming."""
    request = call.request
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise GatewayError(
            REQUEST_TOO_LARGE,
            f"The request body ({declared} bytes) is larger than the limit of "
            f"{max_body} bytes.",
        )
    call.body_decoded = body_was_decoded(request)
    if request.body_exists and not request.content.is_eof():
        # (A body that came whole with the headers, as small ones do, cannot stall.)
        call.body_watch = BodyWatch(request.content, body_timeout_s)


def is_json(request: web.Request) -> bool:
    content_type = request.content_type
    return content_type == "application/json" or content_type.endswith("+json")


async def read_json(call: Call, api_path: str, max_body: int) -> Outgoing:
    """The whole JSON body, parsed into the call's facts."""
    try:
        body = await read_whole_body(call.request.content, max_body, call.body_watch)
    except GatewayError:
        call.record.request_bytes = call.request.content.total_bytes  # read before the 413
        raise
    record = call.record
    record.request_bytes = len(body)
    facts = call.facts = RequestFacts(api_path=api_path)
    if body:
        facts.json_body = parse_json_object(body)
        facts.model = model_of(facts.json_body)
        facts.stream = facts.json_body.get("stream") is True
    record.model, record.stream = facts.model, int(facts.stream)
    if api_path == "/audio/speech":
        record.input_characters = input_characters(facts.json_body)
    return Outgoing(body, len(body), json=body)


def with_usage_requested(call: Call, outgoing: Outgoing) -> Outgoing:
    """A stream that did not ask for its usage is asked for it (and the usage chunk is
    stripped from the answer again): streams are then metered from the upstream's count."""
    facts = call.facts
    assert facts is not None and isinstance(outgoing.body, bytes)
    if not wants_usage_injection(facts):
        return outgoing
    assert facts.json_body is not None
    body = inject_include_usage(outgoing.body, facts.json_body)
    facts.usage_injected = True
    return Outgoing(body, len(body), json=outgoing.json)


def read_streamed(
    call: Call, api_path: str, max_body: int, allow_model: Callable[[str | None], None]
) -> Outgoing:
    """A body that streams through as it arrives. A multipart upload's `model` is checked
    (`allow_model`) as soon as it has passed, and again before the last piece goes up."""
    request = call.request
    facts = call.facts = RequestFacts(api_path=api_path)
    if not request.body_exists:
        return Outgoing(None, None)
    fields = (
        MultipartModelParser(request.headers.get("Content-Type", ""))
        if request.content_type.startswith("multipart/")
        else None
    )

    def watch(chunk: bytes) -> None:
        assert fields is not None
        fields.feed(chunk)
        if fields.model is not None and facts.model is None:
            # Known before the answer is metered and priced.
            facts.model = call.record.model = fields.model
            # Stops the upload mid-way (the upstream discards a cut request).
            allow_model(fields.model)

    def before_last_piece() -> None:
        assert fields is not None
        fields.finish()
        allow_model(fields.model)

    # A decoded body's length is known only once it has all passed: it goes chunked.
    outgoing = Outgoing(None, None if call.body_decoded else request.content_length, passed=[0])
    body = stream_request_body(
        request.content,
        max_body,
        outgoing.passed,
        watch if fields else None,
        call.body_watch,
        outgoing.length,
    )
    if fields is not None:
        # The upstream never holds a complete upload the gateway would refuse.
        body = last_piece_after(body, before_last_piece)
    outgoing.body = body
    return outgoing


async def last_piece_after(
    body: AsyncIterator[bytes], check: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Forward a body one piece behind and run `check` before its last piece, so the
    upstream never holds a complete request that the check would refuse."""
    held = None
    async for piece in body:
        if held is not None:
            yield held
        held = piece
    check()
    if held is not None:
        yield held

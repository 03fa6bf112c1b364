"""The relay stage: the upstream's answer to the client, byte for byte.

A small answer that is metered or names objects is read whole first (its cost then goes in a
header and its objects are the caller's before the caller sees their ids) and is held, to go
out when the handler returns. Any other answer streams through as it arrives, with the usage
chunk the gateway asked for stripped again and a `cut` team's budget applied.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import UPSTREAM_AUTH_FAILED, GatewayError
from gateway.limits.budget import StreamBudget
from gateway.metering.recorder import BodyRecorder
from gateway.metering.sse import UsageChunkStripper
from gateway.metering.usage import Usage
from gateway.pipeline.call import Answer, Call
from gateway.pipeline.walls import ClaimingStream, Walls, claims_objects
from gateway.upstream.client import UpstreamResponse
from gateway.upstream.forward import SMALL_BODY, client_response_headers, read_answer, relay

log = logging.getLogger("gateway.handler")

# (the budget, the prompt's estimated tokens) for a `cut` team's stream, else None
BudgetFor = Callable[[Call], Awaitable[tuple[StreamBudget, int] | None]]
# Told of each batch object a 2xx answer holds (`gateway.batches`)
BatchSeen = Callable[[Call, dict[str, Any]], Awaitable[None]]


class Relay:
    def __init__(
        self,
        walls: Walls,
        budget_for: BudgetFor,
        add_headers: Callable[[Call, web.StreamResponse], None],
        batch_seen: BatchSeen,
    ) -> None:
        self.walls = walls
        self.budget_for = budget_for
        self.add_headers = add_headers
        self.batch_seen = batch_seen

    async def answer(self, call: Call, upstream: UpstreamResponse) -> None:
        """Relay the upstream's answer; `call.answer` tells how far it got, even on failure."""
        facts, record = call.facts, call.record
        assert facts is not None
        record.status = upstream.status
        record.upstream_request_id = upstream.headers.get("x-request-id")
        if upstream.status == 401:
            refuse_upstream_auth(call, upstream)
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason or None,
            headers=client_response_headers(upstream),
        )
        self.add_headers(call, response)
        is_sse = upstream.content_type == "text/event-stream"
        stripper = (
            UsageChunkStripper() if facts.usage_injected and is_sse and upstream.ok else None
        )
        if stripper is None and upstream.content_length is not None:
            response.content_length = upstream.content_length
        claims = claims_objects(call, upstream)
        recorder = None
        if (facts.metered or claims) and upstream.ok:
            recorder = BodyRecorder(upstream.headers.get("Content-Encoding"))
        answer = call.answer = Answer(response, recorder=recorder, is_sse=is_sse)
        small = upstream.content_length is not None and upstream.content_length <= SMALL_BODY
        if recorder is not None and not is_sse and (claims or small):
            await self._read_whole(call, answer, upstream)
        else:
            await self._stream(call, answer, upstream, stripper, claims)

    async def _read_whole(self, call: Call, answer: Answer, upstream: UpstreamResponse) -> None:
        assert answer.recorder is not None
        # A break here: the upstream took the prompt, whose tokens are then estimated.
        body = await read_answer(upstream)
        answer.recorder.feed(body)
        call.record.response_bytes = len(body)
        if call.objects is not None:
            described = await self.walls.claim_answer(call, answer)
            if described is not None and call.objects.kind == "batch":
                await self.batch_seen(call, described)
        headers = answer.response.headers
        headers.popall("Content-Length", None)
        whole = web.Response(
            status=answer.response.status, reason=answer.response.reason, headers=headers
        )
        whole.body = body
        answer.response, answer.held = whole, True
        answer.relayed.ttfb_s = time.perf_counter() - call.started
        answer.relayed.response_bytes = len(body)

    async def _stream(
        self,
        call: Call,
        answer: Answer,
        upstream: UpstreamResponse,
        stripper: UsageChunkStripper | None,
        claims: bool,
    ) -> None:
        source: UpstreamResponse = upstream
        if claims and answer.is_sse:
            source = ClaimingStream(upstream, lambda ids: self.walls.claim(call, ids))  # type: ignore[assignment]
        transform = stripper.feed if stripper else None
        flush = stripper.finish if stripper else None
        budgeted = await self.budget_for(call) if answer.is_sse and upstream.ok else None
        if budgeted is not None:
            transform, flush = _through_budget(budgeted[0], stripper)
        response = answer.response
        result = answer.relayed
        await relay(
            source,
            response,
            call.request,
            call.started,
            result,
            transform,
            flush,
            answer.recorder.feed if answer.recorder else None,
        )
        if not (result.client_gone or result.upstream_broke):
            result.delivered = True
            await _finish_body(response)
        if budgeted is not None and budgeted[0].cut:
            # Billed as what the client received: the upstream's usage never reached us.
            budget, prompt_tokens = budgeted
            answer.cut = True
            answer.billed = Usage(
                input_tokens=prompt_tokens,
                output_tokens=budget.delivered_tokens(),
                estimated=True,
            )
        await self.walls.after_stream(call, answer, claims, upstream.ok)


def refuse_upstream_auth(call: Call, upstream: UpstreamResponse) -> None:
    """The client's key never goes upstream: a 401 is about the gateway's own key."""
    upstream.close()
    log.error(
        "the upstream refused the credentials of team %r (401, request %s): check its "
        "upstream key",
        call.caller.team.name if call.caller else None,
        upstream.headers.get("x-request-id"),
    )
    raise GatewayError(
        UPSTREAM_AUTH_FAILED,
        "The upstream API refused the gateway's own credentials. This is not a problem "
        "with your key: the gateway's operator must check its upstream key.",
    )


def _through_budget(
    budget: StreamBudget, stripper: UsageChunkStripper | None
) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """The relay's transform and flush with the budget after the usage stripper, if any."""
    if stripper is None:
        return budget.feed, budget.finish
    return (
        lambda chunk: budget.feed(stripper.feed(chunk)),
        lambda: budget.feed(stripper.finish()) + budget.finish(),
    )


async def _finish_body(response: web.StreamResponse) -> None:
    """End the body now, before metering, so the client is not kept waiting for it."""
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await response.write_eof()

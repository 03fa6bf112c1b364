"""The forward stage: the call sent upstream with the real key, paced by the shared key's
own rate limit; a queueing team waits out the upstream's 429 once instead of passing it on."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import QUEUE_TIMEOUT, GatewayError
from gateway.pipeline.call import Call
from gateway.pipeline.reading import Outgoing
from gateway.pipeline.relaying import refuse_upstream_auth
from gateway.upstream.client import UpstreamResponse
from gateway.upstream.forward import UpstreamClient, read_answer
from gateway.upstream.pacing import UpstreamPacer, parse_reset


class Forwarder:
    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream
        self.pacer = UpstreamPacer()

    async def send(self, call: Call, outgoing: Outgoing) -> UpstreamResponse:
        facts, caller = call.facts, call.caller
        assert facts is not None and caller is not None
        headers = self.upstream.upstream_headers(
            call.request.headers,
            outgoing.length,
            facts.metered or call.objects is not None,  # answers read: readable encodings
            caller.team.name,
        )
        upstream = await self._send_paced(call, headers, outgoing.body)
        if upstream.status == 429 and self._may_retry(call, outgoing):
            wait = _retry_after_s(upstream.headers)
            await upstream.read()
            self.finished(call, upstream)
            await asyncio.sleep(wait)
            upstream = await self._send_paced(call, headers, outgoing.body)
        return upstream

    def page_fetcher(self, call: Call) -> Callable[[dict[str, str]], Awaitable[tuple[int, bytes]]]:
        """Reads one page of an upstream list at a time (the pages are filtered here)."""
        assert call.caller is not None
        team = call.caller.team.name
        headers = self.upstream.upstream_headers(call.request.headers, None, False, team)
        headers["Accept-Encoding"] = "identity"
        path = call.target.partition("?")[0]

        async def fetch_page(query: dict[str, str]) -> tuple[int, bytes]:
            target = path + ("?" + urlencode(query) if query else "")
            upstream = await self._send_paced(call, headers, None, target)
            try:
                if upstream.status == 401:
                    refuse_upstream_auth(call, upstream)
                call.record.upstream_request_id = upstream.headers.get("x-request-id")
                body = await read_answer(upstream)
            finally:
                self.finished(call, upstream)
            return upstream.status, body

        return fetch_page

    @staticmethod
    def finished(call: Call, upstream: UpstreamResponse) -> None:
        """Count the exchange's time waiting on the upstream, and give its connection back."""
        record = call.record
        record.upstream_ms = (record.upstream_ms or 0.0) + upstream.waited_s * 1000
        upstream.release()

    async def _send_paced(
        self,
        call: Call,
        headers: CIMultiDict[str],
        body: object,
        target: str | None = None,
    ) -> UpstreamResponse:
        """Send once the shared upstream key has budget left (queueing teams wait for it)."""
        assert call.caller is not None
        team = call.caller.team
        deadline = call.started + team.queue.max_wait_s
        while (wait := self.pacer.wait_needed()) > 0:
            if team.on_limit != "queue":
                self.pacer.take_anyway()
                break
            if time.perf_counter() + wait > deadline:
                raise GatewayError(
                    QUEUE_TIMEOUT,
                    "The upstream's own rate limit would not reset within the queue's "
                    f"{team.queue.max_wait_s:g}s.",
                    retry_after_s=max(1, math.ceil(wait)),
                )
            await asyncio.sleep(wait)
            call.record.queued_ms = (time.perf_counter() - call.started) * 1000
        answered: UpstreamResponse | None = None
        try:
            answered = await self.upstream.send(
                call.request.method,
                call.target if target is None else target,
                headers,
                body,  # type: ignore[arg-type]
            )
            return answered
        finally:
            self.pacer.answered(answered.headers if answered is not None else None)

    def _may_retry(self, call: Call, outgoing: Outgoing) -> bool:
        assert call.caller is not None
        team = call.caller.team
        return (
            team.on_limit == "queue"
            and outgoing.replayable
            and time.perf_counter() + 1 < call.started + team.queue.max_wait_s
        )


def _retry_after_s(headers: CIMultiDictProxy[str]) -> float:
    value = headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        reset = parse_reset(headers.get("x-ratelimit-reset-requests", ""))
        return min(reset, 60.0) if reset is not None else 1.0

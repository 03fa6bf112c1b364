"""The `/v1/*` request path: authenticate → read → authorize → forward → meter → record.

Each stage lives in its own module; this one only wires them and makes sure that, whatever
happens, the call ends with exactly one ledger row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import metering, tokens
from gateway.auth import Authenticator, Caller, authorize, ensure_not_expired
from gateway.budget import StreamBudget, output_budget
from gateway.config import GatewayConfig
from gateway.errors import (
    GATEWAY_FAULT,
    INVALID_JSON,
    NOT_FOUND,
    QUEUE_TIMEOUT,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_CONTENT_TYPE,
    UPSTREAM_UNAVAILABLE,
    ErrorKind,
    GatewayError,
    Outcome,
    error_body,
)
from gateway.keys import today_in
from gateway.ledger import CallRecord, LedgerWriter
from gateway.limits import SPEND, TOKENS, Admission, Draw, Limiter, rate_headers
from gateway.logs import CallLog
from gateway.metering import BodyRecorder, RequestFacts, Usage, UsageChunkStripper
from gateway.pacing import UpstreamPacer, parse_reset
from gateway.pricing import format_usd
from gateway.proxy import (
    SMALL_BODY,
    RelayResult,
    UpstreamClient,
    client_response_headers,
    read_small_body,
    relay,
    stream_request_body,
)
from gateway.upstream import UpstreamError, UpstreamResponse
from gateway.web.metrics import CallStats

log = logging.getLogger("gateway.handler")

REQUEST_ID_HEADER = "x-gateway-request-id"
KEY_EXPIRES_HEADER = "x-gateway-key-expires-in"
COST_HEADER = "x-gateway-cost-usd"
BYTES_PER_TOKEN = 4
# `/v1/../x`, `/v1/a/./b`, their percent-encoded forms, encoded slashes, backslashes and
# NULs, and any of these encoded twice (`%252e`), for an upstream that would decode twice.
_UNSAFE_PATH = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)|%(25)*(2f|5c|00)|%(25)+2e|\\", re.IGNORECASE)
# Endpoints that take only JSON: a body labelled otherwise could hide its model from the
# allow-list and its tokens from the limits, so it is refused as OpenAI itself refuses it.
_JSON_ONLY_PATHS = frozenset(
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


_ID_PREFIX = "req_" + secrets.token_hex(8)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes and restarts (a random prefix), cheap within one."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@dataclass
class CallContext:
    """State one call carries through the stages."""

    request: web.Request
    record: CallRecord
    started: float
    caller: Caller | None = None
    facts: RequestFacts | None = None
    response: web.StreamResponse | None = None
    relayed: RelayResult | None = None
    admission: Admission | None = None
    recorder: BodyRecorder | None = None
    is_sse: bool = False
    metered: bool = False
    prompt_tokens: int = 0


class ProxyHandler:
    def __init__(
        self,
        config: GatewayConfig,
        upstream: UpstreamClient,
        ledger: LedgerWriter,
        limiter: Limiter,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.ledger = ledger
        self.limiter = limiter
        self.pacer = UpstreamPacer()
        self.authenticator = Authenticator(config)
        self._max_body = config.listen.max_request_body
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stats = CallStats()
        self.call_log = CallLog()
        self._unpriced_models: set[str | None] = set()

    def reconfigure(self, config: GatewayConfig) -> None:
        self.config = config
        self.limiter.apply(config)
        self.authenticator = Authenticator(config)
        self._max_body = config.listen.max_request_body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = CallContext(
            request=request,
            record=CallRecord(
                request_id=new_request_id(),
                started_at=time.time(),
                method=request.method,
                path=request.path,
            ),
            started=time.perf_counter(),
        )
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self._serve(call)
        except GatewayError as error:
            return self._refuse(call, error)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away.
            await self._client_left(call)
            raise
        except Exception:
            log.exception("gateway fault on %s %s", request.method, request.path)
            return self._fail(call)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
            self._record(call)

    # ------------------------------------------------------------ stages

    async def _serve(self, call: CallContext) -> web.StreamResponse:
        request = call.request
        raw_path = request.raw_path.split("?", 1)[0]
        # An absolute-form target (`GET http://h/v1/x`) or an encoded `/v1` would be forwarded
        # as another path than the one authorized.
        if not raw_path.startswith("/v1/") or _UNSAFE_PATH.search(raw_path):
            raise GatewayError(
                NOT_FOUND, f"Unknown request URL: {request.method} {request.path}."
            )
        caller = self.authenticator.authenticate(
            request.headers.get("Authorization"), today_in(self.config.limits_timezone)
        )
        call.caller = caller
        call.record.team, call.record.key_id = caller.team.name, caller.key.id
        ensure_not_expired(caller)
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise GatewayError(
                REQUEST_TOO_LARGE,
                f"The request body ({declared} bytes) is larger than the limit of "
                f"{self._max_body} bytes.",
            )
        api_path = request.path[3:]
        if _is_json(request):
            return await self._forward_json(call, api_path)
        if request.body_exists and api_path in _JSON_ONLY_PATHS:
            raise GatewayError(
                UNSUPPORTED_CONTENT_TYPE,
                f"Unsupported content type: '{request.content_type}'. {request.path} only "
                "accepts 'application/json' requests.",
            )
        return await self._forward_streamed(call, api_path)

    async def _forward_json(self, call: CallContext, api_path: str) -> web.StreamResponse:
        try:
            body = await read_small_body(call.request.content, self._max_body)
        except GatewayError:
            call.record.request_bytes = call.request.content.total_bytes  # read before the 413
            raise
        call.record.request_bytes = len(body)
        facts = RequestFacts(api_path=api_path)
        call.facts = facts
        if body:
            facts.json_body = _parse_json_object(body)
            model = facts.json_body.get("model")
            facts.model = model if isinstance(model, str) else None
            facts.stream = facts.json_body.get("stream") is True
        call.record.model, call.record.stream = facts.model, int(facts.stream)
        assert call.caller is not None
        authorize(call.caller.team, api_path, facts.model)
        if metering.wants_usage_injection(facts):
            assert facts.json_body is not None
            body = metering.inject_include_usage(body, facts.json_body)
            facts.usage_injected = True
        return await self._exchange(call, body, len(body))

    async def _forward_streamed(self, call: CallContext, api_path: str) -> web.StreamResponse:
        request = call.request
        facts = RequestFacts(api_path=api_path)
        call.facts = facts
        assert call.caller is not None
        authorize(call.caller.team, api_path, None)
        if not request.body_exists:
            return await self._exchange(call, None, None)
        team = call.caller.team
        scanner = (
            metering.MultipartModelScanner()
            if request.content_type.startswith("multipart/")
            else None
        )

        def watch(chunk: bytes) -> None:
            assert scanner is not None
            scanner.feed(chunk)
            if scanner.model is not None:
                # Stops the upload mid-way (the upstream discards a cut request).
                authorize(team, api_path, scanner.model)

        counter = [0]
        body = stream_request_body(
            request.content, self._max_body, counter, watch if scanner else None
        )
        if scanner is not None and team.models is not None:
            body = _last_piece_after(body, lambda: authorize(team, api_path, scanner.model))
        try:
            return await self._exchange(call, body, request.content_length)
        finally:
            call.record.request_bytes = counter[0]
            if scanner is not None and scanner.model:
                facts.model = call.record.model = scanner.model

    async def _exchange(
        self, call: CallContext, body: object, body_length: int | None
    ) -> web.StreamResponse:
        request, facts = call.request, call.facts
        assert facts is not None
        await self._admit(call, body_length or request.content_length or 0)
        headers = self.upstream.upstream_headers(request.headers, body_length, facts.metered)
        upstream = await self._send_paced(call, headers, body)
        if upstream.status == 429 and self._may_retry(call, body):
            # A queueing team waits out the upstream's 429 once instead of passing it on.
            wait = _retry_after_s(upstream.headers)
            await upstream.read()
            upstream.release()
            await asyncio.sleep(wait)
            upstream = await self._send_paced(call, headers, body)
        try:
            return await self._relay(call, upstream)
        finally:
            upstream.release()

    async def _send_paced(
        self, call: CallContext, headers: CIMultiDict[str], body: object
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
                call.request.raw_path[3:],
                headers,
                body,  # type: ignore[arg-type]
            )
            return answered
        finally:
            self.pacer.answered(answered.headers if answered is not None else None)

    def _may_retry(self, call: CallContext, body: object) -> bool:
        assert call.caller is not None
        team = call.caller.team
        return (
            team.on_limit == "queue"
            and (body is None or isinstance(body, bytes))
            and time.perf_counter() + 1 < call.started + team.queue.max_wait_s
        )

    async def _relay(
        self, call: CallContext, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        facts = call.facts
        assert facts is not None
        record = call.record
        record.status = upstream.status
        record.upstream_request_id = upstream.headers.get("x-request-id")
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason or None,
            headers=client_response_headers(upstream),
        )
        self._add_gateway_headers(call, response)
        call.is_sse = upstream.content_type == "text/event-stream"
        stripper = (
            UsageChunkStripper() if facts.usage_injected and call.is_sse and upstream.ok else None
        )
        if stripper is None and upstream.content_length is not None:
            response.content_length = upstream.content_length
        if facts.metered and upstream.ok:
            call.recorder = BodyRecorder(upstream.headers.get("Content-Encoding"))
        call.response = response
        call.relayed = RelayResult()
        if (
            call.recorder is not None
            and not call.is_sse
            and upstream.content_length is not None
            and upstream.content_length <= SMALL_BODY
        ):
            return await self._relay_priced(call, upstream, response)
        transform = stripper.feed if stripper else None
        flush = stripper.finish if stripper else None
        budget = self._stream_budget(call) if call.is_sse and upstream.ok else None
        if budget is not None:
            transform, flush = _through_budget(budget, stripper)
        await response.prepare(call.request)
        await relay(
            upstream,
            response,
            call.request,
            call.started,
            call.relayed,
            transform,
            flush,
            call.recorder.feed if call.recorder else None,
        )
        if not (call.relayed.client_gone or call.relayed.upstream_broke):
            call.relayed.delivered = True
            await _finish_body(response)
        if budget is not None and budget.cut:
            self._bill_cut_stream(call, budget)
        await self._settle(call)
        return response

    def _stream_budget(self, call: CallContext) -> StreamBudget | None:
        """For `cut` teams, the output this stream may still produce under their quotas."""
        facts, admission = call.facts, call.admission
        assert call.caller is not None and facts is not None
        if (
            call.caller.team.on_budget_exhausted_mid_stream != "cut"
            or admission is None
            or facts.json_body is None
            or not any(q.kind in (TOKENS, SPEND) for m in admission.meters for q in m.quotas)
        ):
            return None
        call.prompt_tokens = tokens.estimate_prompt_tokens("/v1" + facts.api_path, facts.json_body)
        allowed = output_budget(
            admission,
            self.limiter.calendar,
            self.limiter.wall_clock(),
            self.config.team_prices(call.caller.team.name),
            facts.model,
            call.prompt_tokens,
        )
        return StreamBudget(facts.model, allowed) if allowed is not None else None

    def _bill_cut_stream(self, call: CallContext, budget: StreamBudget) -> None:
        """Bill exactly what the client received: the upstream's usage never reached us."""
        call.metered = True
        _apply_usage(
            call.record,
            Usage(
                input_tokens=call.prompt_tokens,
                output_tokens=budget.delivered_tokens(),
                estimated=True,
            ),
        )
        call.record.error_code = "insufficient_quota_mid_stream"

    async def _relay_priced(
        self, call: CallContext, upstream: UpstreamResponse, response: web.StreamResponse
    ) -> web.Response:
        """A small answer is read whole first, so its cost can go in a header; it then goes
        out in one write."""
        assert call.recorder is not None and call.relayed is not None
        try:
            body = await upstream.read()
        except (UpstreamError, TimeoutError, OSError) as exc:
            await self._meter(call)  # the upstream took the prompt: its tokens are estimated
            raise GatewayError(
                UPSTREAM_UNAVAILABLE, "The upstream API broke off its answer."
            ) from exc
        call.recorder.feed(body)
        call.record.response_bytes = len(body)
        await self._meter(call)
        self._price(call)
        headers = response.headers
        headers[COST_HEADER] = format_usd(call.record.cost_nanousd)
        headers.popall("Content-Length", None)
        whole = web.Response(status=response.status, reason=response.reason, headers=headers)
        whole.body = body
        call.response = whole
        result = call.relayed
        result.ttfb_s = time.perf_counter() - call.started
        result.response_bytes = len(body)
        self._account(call)
        return whole

    async def _settle(self, call: CallContext) -> None:
        """Fill the record from what was relayed: bytes, timing, outcome, tokens."""
        if call.relayed is None:
            return
        self._account(call)
        await self._meter(call)

    def _account(self, call: CallContext) -> None:
        record, result = call.record, call.relayed
        assert result is not None
        record.response_bytes = result.response_bytes
        record.ttfb_ms = result.ttfb_s * 1000 if result.ttfb_s is not None else None
        record.outcome = _outcome(record.status, result.client_gone, result.upstream_broke)
        if result.upstream_broke:
            record.error_code = "upstream_stream_broken"

    async def _meter(self, call: CallContext) -> None:
        if call.recorder is None or call.facts is None or call.metered:
            return
        call.metered = True
        usage = metering.usage_in_tail(call.recorder.tail())
        if usage is None:
            usage = await _estimate(call.facts, call.recorder, call.is_sse)
        _apply_usage(call.record, usage)

    async def _admit(self, call: CallContext, request_bytes: int) -> None:
        """Take the call's reservation from its key's and team's limits (may queue)."""
        caller, facts = call.caller, call.facts
        assert caller is not None and facts is not None
        meters = self.limiter.meters_for(caller.key, caller.team)
        if not meters:
            return
        draw = Draw(bytes=request_bytes)
        if facts.json_body is not None:
            # A tokenizer pass over every prompt would cost more than the rest of the call;
            # about 4 bytes of JSON per token is close enough for a reservation, which is
            # settled to the upstream's real count when the call ends.
            draw.tokens = request_bytes // BYTES_PER_TOKEN + (
                tokens.max_output_tokens(facts.json_body) or 0
            )
        try:
            call.admission = await self.limiter.admit(caller.team, meters, draw)
        except GatewayError:
            call.record.queued_ms = (time.perf_counter() - call.started) * 1000
            raise
        call.record.queued_ms = call.admission.queued_ms
        call.record.shadow_rejected_by = call.admission.shadow_rejected_by

    def _add_gateway_headers(self, call: CallContext, response: web.StreamResponse) -> None:
        response.headers[REQUEST_ID_HEADER] = call.record.request_id
        if call.caller is not None:
            rate_headers(
                response.headers,
                self.limiter.meters_for(call.caller.key, call.caller.team),
                self.limiter.clock(),
            )
        caller = call.caller
        if (
            caller is not None
            and caller.days_left is not None
            and 0 <= caller.days_left <= self.config.renew_warning_days
        ):
            response.headers[KEY_EXPIRES_HEADER] = f"{caller.days_left}d"

    # ------------------------------------------------------------ endings

    def _refuse(self, call: CallContext, error: GatewayError) -> web.StreamResponse:
        record = call.record
        record.status = error.kind.status
        record.outcome = error.kind.outcome.value
        record.error_code = error.kind.code
        if call.response is not None and call.response.prepared:
            _drop_connection(call.request)
            return call.response
        response = _error_response(error.kind, error.message, error.param)
        if error.retry_after_s is not None:
            response.headers["retry-after"] = str(error.retry_after_s)
        if error.kind.status == REQUEST_TOO_LARGE.status:
            # The rest of the body is never read, so the connection cannot be reused.
            response.force_close()
        self._add_gateway_headers(call, response)
        return response

    async def _client_left(self, call: CallContext) -> None:
        # A body cut short was never counted: record what did arrive.
        received = call.request.content.total_bytes
        call.record.request_bytes = max(call.record.request_bytes, received)
        if call.relayed is not None and (call.relayed.delivered or _stream_ended(call)):
            # It left after the whole answer had gone out: a complete call.
            await self._settle(call)
            return
        if call.relayed is not None:
            call.relayed.client_gone = True
            await self._settle(call)
        call.record.outcome = Outcome.CLIENT_DISCONNECT.value
        if not call.record.status:
            call.record.status = 499  # nginx's code for "client closed request"

    def _fail(self, call: CallContext) -> web.StreamResponse:
        record = call.record
        record.outcome = Outcome.GATEWAY_ERROR.value
        record.error_code = GATEWAY_FAULT.code
        if call.response is not None and call.response.prepared:
            _drop_connection(call.request)
            return call.response
        record.status = GATEWAY_FAULT.status
        response = _error_response(
            GATEWAY_FAULT, "The gateway failed to handle this request. It has been logged."
        )
        self._add_gateway_headers(call, response)
        return response

    def _record(self, call: CallContext) -> None:
        """Price, settle and append the call's row; the row is appended whatever fails."""
        record = call.record
        record.finished_at = time.time()
        record.latency_ms = (time.perf_counter() - call.started) * 1000
        try:
            if record.pricing_hash is None:
                self._price(call)
            if call.admission is not None:
                self.limiter.settle(
                    call.admission,
                    Draw(
                        tokens=record.input_tokens + record.output_tokens,
                        bytes=record.request_bytes + record.response_bytes,
                        spend=record.cost_nanousd,
                    ),
                )
        except Exception:
            log.exception("could not price or settle %s", record.request_id)
            record.error_code = record.error_code or GATEWAY_FAULT.code
        finally:
            self.ledger.append(record)
        self.stats.observe(record)
        if self.config.log_calls and self.call_log.enabled:
            self.call_log.add(record)

    def _price(self, call: CallContext) -> None:
        record = call.record
        prices = self.config.team_prices(record.team)
        record.cost_nanousd, priced = prices.cost_nanousd(
            record.model,
            input_tokens=record.input_tokens,
            cached_input_tokens=record.cached_input_tokens,
            output_tokens=record.output_tokens,
            request_bytes=record.request_bytes,
            response_bytes=record.response_bytes,
            billable=200 <= record.status < 300,
        )
        record.price_unknown = int(not priced)
        record.pricing_hash = prices.content_hash
        if not priced:
            self._warn_unpriced(record.model)

    def _warn_unpriced(self, model: str | None) -> None:
        if model not in self._unpriced_models:
            self._unpriced_models.add(model)
            log.warning("model %r has no price in the price table: its calls cost 0", model)


# ---------------------------------------------------------------- helpers


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


def _stream_ended(call: CallContext) -> bool:
    """The stream's last event already passed (a client may hang up on `[DONE]` before the
    upstream's own end of body arrives)."""
    if call.recorder is None or not call.is_sse:
        return False
    tail = call.recorder.tail().rstrip()
    return tail.endswith(b"data: [DONE]") or b'"type":"response.completed"' in tail[-65536:]


def _retry_after_s(headers: CIMultiDictProxy[str]) -> float:
    value = headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        reset = parse_reset(headers.get("x-ratelimit-reset-requests", ""))
        return min(reset, 60.0) if reset is not None else 1.0


def _is_json(request: web.Request) -> bool:
    content_type = request.content_type
    return content_type == "application/json" or content_type.endswith("+json")


def _parse_json_object(body: bytes) -> dict:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            INVALID_JSON,
            "We could not parse the JSON body of your request. The body must be a JSON "
            f"object ({exc.msg} at byte {exc.pos}).",
        ) from None
    if not isinstance(parsed, dict):
        raise GatewayError(INVALID_JSON, "The JSON body of your request must be an object.")
    return parsed


def _outcome(status: int, client_gone: bool, upstream_broke: bool) -> str:
    if client_gone:
        return Outcome.CLIENT_DISCONNECT.value
    if upstream_broke or status >= 400:
        return Outcome.UPSTREAM_ERROR.value
    return Outcome.OK.value


def _apply_usage(record: CallRecord, usage: Usage) -> None:
    record.input_tokens = usage.input_tokens
    record.cached_input_tokens = usage.cached_input_tokens
    record.output_tokens = usage.output_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    record.tokens_estimated = int(usage.estimated)


async def _estimate(facts: RequestFacts, recorder: BodyRecorder, is_sse: bool) -> Usage:
    if recorder.total <= SMALL_BODY:
        return metering.estimate_usage(facts, recorder, is_sse)
    # Tokenizing up to a megabyte would stall the event loop: do it in a thread.
    return await asyncio.to_thread(metering.estimate_usage, facts, recorder, is_sse)


async def _last_piece_after(
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


async def _finish_body(response: web.StreamResponse) -> None:
    """End the body now, before metering, so the client is not kept waiting for it."""
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await response.write_eof()


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _error_response(kind: ErrorKind, message: str, param: str | None = None) -> web.Response:
    return web.Response(
        status=kind.status,
        body=error_body(kind, message, param),
        content_type="application/json",
    )

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
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.auth import (
    Authenticator,
    Caller,
    authorize_endpoint,
    authorize_model,
    ensure_not_expired,
)
from gateway.access.keys import today_in
from gateway.config.loader import GatewayConfig, TeamConfig
from gateway.errors import (
    GATEWAY_FAULT,
    MODEL_NOT_PRICED,
    OBJECT_NOT_FOUND,
    QUEUE_TIMEOUT,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_CONTENT_TYPE,
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_UNAVAILABLE,
    ErrorKind,
    GatewayError,
    Outcome,
    error_body,
)
from gateway.ledger.writer import CallRecord, LedgerWriter
from gateway.limits.admission import SPEND, TOKENS, Admission, Draw, Limiter, rate_headers
from gateway.limits.budget import StreamBudget, output_budget
from gateway.logs import CallLog
from gateway.metering import meter as metering
from gateway.metering import tokens
from gateway.metering.meter import BodyRecorder, RequestFacts, Usage, UsageChunkStripper
from gateway.pipeline import objects
from gateway.pipeline.intake import (
    BodyWatch,
    body_was_decoded,
    canonical_target,
    model_of,
    parse_json_object,
    read_whole_body,
    unknown_url,
)
from gateway.pipeline.multipart import MultipartModelParser
from gateway.pricing.table import format_usd
from gateway.upstream.client import UpstreamError, UpstreamResponse
from gateway.upstream.forward import (
    SMALL_BODY,
    RelayResult,
    UpstreamClient,
    client_response_headers,
    relay,
    stream_request_body,
)
from gateway.upstream.pacing import UpstreamPacer, parse_reset
from gateway.web.metrics import CallStats

log = logging.getLogger("gateway.handler")

REQUEST_ID_HEADER = "x-gateway-request-id"
KEY_EXPIRES_HEADER = "x-gateway-key-expires-in"
COST_HEADER = "x-gateway-cost-usd"
BYTES_PER_TOKEN = 4
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
    target: str = ""  # the path after /v1 and the query, as the upstream gets them
    body_decoded: bool = False  # aiohttp decoded a compressed body: it goes up decoded
    body_watch: BodyWatch | None = None
    objects: objects.ObjectRoute | None = None  # what the call does to a team's objects


class ProxyHandler:
    def __init__(
        self,
        config: GatewayConfig,
        upstream: UpstreamClient,
        ledger: LedgerWriter,
        limiter: Limiter,
        object_store: objects.ObjectStore,
    ) -> None:
        self.config = config
        self.object_store = object_store
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
        self.upstream.use_credentials(config)

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
            if call.body_watch is not None:
                call.body_watch.stop()
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
            self._record(call)

    # ------------------------------------------------------------ stages

    async def _serve(self, call: CallContext) -> web.StreamResponse:
        request = call.request
        api_path, call.target = canonical_target(request)
        call.record.path = "/v1" + api_path
        caller = self.authenticator.authenticate(
            request.headers.get("Authorization"), today_in(self.config.limits_timezone)
        )
        call.caller = caller
        call.record.team, call.record.key_id = caller.team.name, caller.key.id
        ensure_not_expired(caller)
        if api_path == "/organization" or api_path.startswith("/organization/"):
            # The upstream's admin surface answers to the operator's key, never a team's.
            raise unknown_url(request.method, "/v1" + api_path)
        authorize_endpoint(caller.team, request.method, api_path)
        call.objects = _object_route(request.method, api_path)
        if call.objects is not None and call.objects.action == "use":
            await self._check_owned(call, call.objects.referenced)
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise GatewayError(
                REQUEST_TOO_LARGE,
                f"The request body ({declared} bytes) is larger than the limit of "
                f"{self._max_body} bytes.",
            )
        call.body_decoded = body_was_decoded(request)
        if request.body_exists and not request.content.is_eof():
            # (A body that came whole with the headers, as small ones do, cannot stall.)
            call.body_watch = BodyWatch(request.content, self.config.listen.body_timeout_s)
        if call.objects is not None and call.objects.action == "list":
            return await self._forward_list(call, api_path, call.objects.kind)
        if _is_json(request):
            return await self._forward_json(call, api_path)
        if request.body_exists and api_path in _JSON_ONLY_PATHS:
            raise GatewayError(
                UNSUPPORTED_CONTENT_TYPE,
                f"Unsupported content type: '{request.content_type}'. /v1{api_path} only "
                "accepts 'application/json' requests.",
            )
        return await self._forward_streamed(call, api_path)

    async def _forward_json(self, call: CallContext, api_path: str) -> web.StreamResponse:
        try:
            body = await read_whole_body(call.request.content, self._max_body, call.body_watch)
        except GatewayError:
            call.record.request_bytes = call.request.content.total_bytes  # read before the 413
            raise
        call.record.request_bytes = len(body)
        facts = RequestFacts(api_path=api_path)
        call.facts = facts
        if body:
            facts.json_body = parse_json_object(body)
            facts.model = model_of(facts.json_body)
            facts.stream = facts.json_body.get("stream") is True
        call.record.model, call.record.stream = facts.model, int(facts.stream)
        if api_path == "/audio/speech":
            call.record.input_characters = metering.input_characters(facts.json_body)
        assert call.caller is not None
        self._allow_model(call.caller.team, facts.model)
        if facts.json_body is not None:
            call.objects = _created_by_body(call.objects, api_path, facts.json_body)
            if _may_name_objects(api_path, body):
                await self._check_owned(call, objects.referenced_ids(facts.json_body))
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
        if not request.body_exists:
            return await self._exchange(call, None, None)
        team = call.caller.team
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
                self._allow_model(team, fields.model)

        def before_last_piece() -> None:
            assert fields is not None
            fields.finish()
            self._allow_model(team, fields.model)

        counter = [0]
        # A decoded body's length is known only once it has all passed: it goes chunked.
        length = None if call.body_decoded else request.content_length
        body = stream_request_body(
            request.content,
            self._max_body,
            counter,
            watch if fields else None,
            call.body_watch,
            length,
        )
        if fields is not None:
            # The upstream never holds a complete upload the gateway would refuse.
            body = _last_piece_after(body, before_last_piece)
        try:
            return await self._exchange(call, body, length)
        finally:
            call.record.request_bytes = counter[0]

    async def _exchange(
        self, call: CallContext, body: object, body_length: int | None
    ) -> web.StreamResponse:
        request, facts = call.request, call.facts
        assert facts is not None
        assert call.caller is not None
        await self._admit(call, body_length or request.content_length or 0)
        headers = self.upstream.upstream_headers(
            request.headers,
            body_length,
            facts.metered or call.objects is not None,  # answers read: readable encodings
            call.caller.team.name,
        )
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
        self,
        call: CallContext,
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
        if upstream.status == 401:
            self._refuse_upstream_auth(call, upstream)
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
        claims = _claims_objects(call, upstream)
        if (facts.metered or claims) and upstream.ok:
            call.recorder = BodyRecorder(upstream.headers.get("Content-Encoding"))
        call.response = response
        call.relayed = RelayResult()
        small = upstream.content_length is not None and upstream.content_length <= SMALL_BODY
        if call.recorder is not None and not call.is_sse and (claims or small):
            return await self._relay_whole(call, upstream, response)
        if claims and call.is_sse:
            upstream = _ClaimingStream(upstream, lambda ids: self._claim(call, ids))  # type: ignore[assignment]
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
        if call.objects is not None and call.objects.deletes and upstream.ok:
            assert call.objects.object_id is not None
            await self.object_store.mark_deleted(call.objects.object_id)
        if claims and call.is_sse and call.recorder is not None:
            await self._claim(call, objects.created_ids_in_stream_tail(call.recorder.tail()))
        await self._settle(call)
        return response

    def _allow_model(self, team: TeamConfig, model: str | None) -> None:
        """The team's model allow-list, then (with `pricing.unknown_model: reject`) refusal
        of a model without a price: neither is ever forwarded."""
        authorize_model(team, model)
        prices = self.config.team_prices(team.name)
        if model is not None and prices.unknown_model == "reject" and not prices.is_priced(model):
            raise GatewayError(
                MODEL_NOT_PRICED,
                f"The model '{model[:100]}' has no price in this gateway's price table, and "
                "the gateway is set to refuse unpriced models.",
                param="model",
            )

    def _refuse_upstream_auth(self, call: CallContext, upstream: UpstreamResponse) -> None:
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

    async def _relay_whole(
        self, call: CallContext, upstream: UpstreamResponse, response: web.StreamResponse
    ) -> web.Response:
        """A small answer is read whole first, so its cost can go in a header (and the objects
        it creates are the caller's before it sees their ids); it then goes out in one write."""
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
        if call.objects is not None:
            await self._claim_answer(call)
        headers = response.headers
        if call.facts is not None and call.facts.metered:
            await self._meter(call)
            self._price(call)
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
        usage = metering.usage_of_recording(call.recorder, call.is_sse)
        if usage is None:
            usage = await _estimate(call.facts, call.recorder, call.is_sse)
        _apply_usage(call.record, usage)

    # ------------------------------------------------------------ teams' objects

    async def _check_owned(self, call: CallContext, ids: list[str] | tuple[str, ...]) -> None:
        """404, never forwarded, unless every object the call names is the caller team's."""
        if not ids:
            return
        assert call.caller is not None
        team = call.caller.team.name
        owners = await self.object_store.owners(ids)
        for object_id in ids:
            owner = owners.get(object_id)
            if owner is None or owner.team != team:
                raise GatewayError(
                    OBJECT_NOT_FOUND,
                    f"No such {_object_name(object_id)}object: {object_id[:200]}",
                    param="id",
                )

    async def _claim(self, call: CallContext, ids: list[tuple[str, str]]) -> None:
        assert call.caller is not None
        await self.object_store.record(ids, call.caller.team.name, call.caller.key.id)

    async def _claim_answer(self, call: CallContext) -> None:
        """Make the caller's team the owner of what a 2xx JSON answer created."""
        route, recorder = call.objects, call.recorder
        assert route is not None and recorder is not None and call.facts is not None
        if call.record.status >= 300 or not recorder.complete:
            return
        if route.deletes:
            assert route.object_id is not None
            await self.object_store.mark_deleted(route.object_id)
            return
        try:
            answer = orjson.loads(recorder.head())
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict):
            await self._claim(call, objects.created_ids(route.kind, call.facts.api_path, answer))

    async def _forward_list(
        self, call: CallContext, api_path: str, kind: str
    ) -> web.StreamResponse:
        """A list of a kind of objects, filtered to the caller's team (paging the upstream)."""
        assert call.caller is not None
        call.facts = RequestFacts(api_path=api_path)
        await self._admit(call, 0)
        request, team = call.request, call.caller.team.name
        headers = self.upstream.upstream_headers(request.headers, None, False, team)
        headers["Accept-Encoding"] = "identity"  # the pages are read and filtered here
        path = call.target.partition("?")[0]
        last: list[UpstreamResponse] = []

        async def fetch_page(query: dict[str, str]) -> tuple[int, bytes]:
            target = path + ("?" + urlencode(query) if query else "")
            upstream = await self._send_paced(call, headers, None, target)
            try:
                if upstream.status == 401:
                    self._refuse_upstream_auth(call, upstream)
                last[:] = [upstream]
                body = await upstream.read()
            except (UpstreamError, TimeoutError, OSError) as exc:
                raise GatewayError(
                    UPSTREAM_UNAVAILABLE, "The upstream API broke off its answer."
                ) from exc
            finally:
                upstream.release()
            return upstream.status, body

        default_limit, max_limit = objects.list_limits(kind)
        status, body = await objects.collect_list(
            fetch_page,
            dict(request.query),
            lambda ids: self.object_store.visible_to(team, ids),
            default_limit=default_limit,
            max_limit=max_limit,
        )
        record = call.record
        record.status, record.response_bytes = status, len(body)
        record.outcome = _outcome(status, False, False)
        record.ttfb_ms = (time.perf_counter() - call.started) * 1000
        if last:
            record.upstream_request_id = last[0].headers.get("x-request-id")
        response = web.Response(status=status, body=body, content_type="application/json")
        self._add_gateway_headers(call, response)
        return response

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
            draw.tokens = request_bytes // BYTES_PER_TOKEN + tokens.reserved_output_tokens(
                facts.json_body
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
        if error.kind is UPSTREAM_UNAVAILABLE and call.relayed is None and call.admission:
            # The upstream never answered: no call happened that a rate limit should count.
            self.limiter.return_rates(call.admission)
        response = _error_response(error.kind, error.message, error.param)
        if error.retry_after_s is not None:
            response.headers["retry-after"] = str(error.retry_after_s)
        if error.kind in (REQUEST_TOO_LARGE, REQUEST_TIMEOUT):
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
        # At the prices in force when the call started, for the tier that served it.
        record.cost_nanousd, priced = prices.cost_of(
            record,
            model=record.model,
            at=record.started_at,
            service_tier=record.service_tier,
            batch=bool(record.batch),
            billable=200 <= record.status < 300,
        )
        record.price_unknown = int(not priced)
        record.pricing_hash = prices.content_hash
        if not priced:
            self._warn_unpriced(record.model, prices.unknown_model)

    def _warn_unpriced(self, model: str | None, policy: str) -> None:
        # Model names come from clients: the set and the line are bounded.
        if model not in self._unpriced_models and len(self._unpriced_models) < 1000:
            self._unpriced_models.add(model)
            shown = model if model is None or len(model) <= 100 else model[:100] + "..."
            how = (
                "its calls are priced as the nearest model of its family (price_unknown = 1)"
                if policy == "estimate"
                else "its calls cost 0 (price_unknown = 1)"
            )
            log.warning("model %r has no price in the price table: %s", shown, how)


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


_OBJECT_NAMES = (
    ("file-", "File"), ("upload_", "Upload"), ("batch_", "Batch"), ("vs_", "VectorStore"),
    ("resp_", "Response"), ("ftjob-", "FineTuningJob"), ("cntr_", "Container"),
    ("conv_", "Conversation"), ("chatcmpl-", "ChatCompletion"),
)  # fmt: skip


def _object_name(object_id: str) -> str:
    """OpenAI's name for the kind of object an id names, as its own 404 says it."""
    return next((name + " " for prefix, name in _OBJECT_NAMES if object_id.startswith(prefix)), "")


# Hot JSON calls that name no object in their path (a stored chat completion is a create,
# decided by its body: `_created_by_body`), and those whose bodies cannot name one either.
_POSTS_ON_NO_OBJECT = frozenset(
    {"/chat/completions", "/completions", "/embeddings", "/moderations", "/audio/speech",
     "/images/generations"}
)  # fmt: skip
_BODIES_NAMING_NO_OBJECT = _POSTS_ON_NO_OBJECT - {"/chat/completions"}


def _may_name_objects(api_path: str, body: bytes) -> bool:
    """Cheap look at the raw body before the walk of `objects.referenced_ids`; a chat body
    names objects only as content parts' `file_id` (an escaped key goes to the walk too)."""
    if api_path == "/chat/completions":
        return b"file" in body or b"\\u" in body
    return api_path not in _BODIES_NAMING_NO_OBJECT and objects.may_reference(body)


def _object_route(method: str, api_path: str) -> objects.ObjectRoute | None:
    if method == "POST" and api_path in _POSTS_ON_NO_OBJECT:
        return None
    route = objects.route(method, api_path)
    if route is not None and route.kind == "chat_completion" and route.action == "create":
        return None  # a create only when its body stores it: `_created_by_body`
    return route


def _created_by_body(
    route: objects.ObjectRoute | None, api_path: str, body: dict
) -> objects.ObjectRoute | None:
    """A JSON create whose body says it stores nothing creates no object."""
    if api_path == "/chat/completions" and route is None:
        if objects.creates_stored_chat_completion(body):
            return objects.ObjectRoute("create", "chat_completion")
        return None
    if api_path == "/responses" and route is not None and body.get("store") is False:
        return None
    return route


def _claims_objects(call: CallContext, upstream: UpstreamResponse) -> bool:
    """Whether this answer is read for the objects it creates (or the one it deletes).
    A file's content is never read: it can be large and is no object's description."""
    route = call.objects
    return (
        route is not None
        and route.action != "list"
        and upstream.ok
        and (upstream.content_type in ("application/json", "text/event-stream") or route.deletes)
        and not call.facts.api_path.endswith("/content")  # type: ignore[union-attr]
    )


class _ClaimingStream:
    """An upstream stream that claims the object its first event names before that event
    is passed on, so the caller can use the object as soon as it has seen its id."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        claim: Callable[[list[tuple[str, str]]], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._claim = claim
        self._head = b""

    async def readany(self) -> bytes:
        chunk = await self._upstream.readany()
        if self._claim is not None:
            self._head += chunk
            found = objects.created_ids_in_stream(self._head)
            if found or not chunk or len(self._head) > 65536 or b"\n\n" in self._head:
                claim, self._claim = self._claim, None
                if found:
                    await claim(found)
        return chunk

    def close(self) -> None:
        self._upstream.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._upstream, name)


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

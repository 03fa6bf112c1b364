"""The `/v1/*` request path, as its stages: authenticate → read → authorize → admit →
forward → relay → meter → price → record.

`Pipeline.handle` lists them in order; each is a call into the module that owns it. Whatever
happens, a call ends in `_end`, which meters, prices, concludes (`gateway.pipeline.call`),
answers and records it: exactly one ledger row per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.access.auth import (
    Authenticator,
    KeyRevoked,
    authorize_endpoint,
    authorize_model,
    ensure_not_expired,
)
from gateway.access.keys import today_in
from gateway.access.keyset import ApiKeyIndex
from gateway.config.loader import GatewayConfig, TeamConfig
from gateway.errors import (
    GATEWAY_FAULT,
    MODEL_NOT_PRICED,
    UPSTREAM_UNAVAILABLE,
    GatewayError,
)
from gateway.ledger.object_store import ObjectStore
from gateway.ledger.writer import CallRecord, LedgerWriter
from gateway.limits.admission import Limiter
from gateway.limits.budget import StreamBudget, output_budget
from gateway.limits.report import rate_headers
from gateway.limits.store import Admission
from gateway.limits.windows import SPEND, TOKENS, Draw
from gateway.logs import CallLog
from gateway.metering import tokens
from gateway.metering.answers import usage_of_recording
from gateway.metering.estimate import estimate_usage
from gateway.metering.requests import RequestFacts
from gateway.metering.usage import Usage
from gateway.pipeline import object_ids
from gateway.pipeline.call import (
    ANSWERED,
    CLIENT_LEFT,
    FAULT,
    Answer,
    Call,
    Ending,
    answer_for,
    apply_usage,
    conclude,
    refused,
)
from gateway.pipeline.forwarding import Forwarder
from gateway.pipeline.intake import canonical_target, unknown_url
from gateway.pipeline.reading import (
    JSON_ONLY_PATHS,
    Outgoing,
    is_json,
    read_json,
    read_streamed,
    start_reading,
    with_usage_requested,
)
from gateway.pipeline.relaying import Relay
from gateway.pipeline.walls import Walls, created_by_body, may_name_objects, object_route
from gateway.pricing.arithmetic import format_usd
from gateway.upstream.forward import SMALL_BODY, RelayResult, UpstreamClient
from gateway.web.metrics import CallStats

if TYPE_CHECKING:
    from gateway.batches.watcher import BatchWatcher

log = logging.getLogger("gateway.handler")

REQUEST_ID_HEADER = "x-gateway-request-id"
KEY_EXPIRES_HEADER = "x-gateway-key-expires-in"
COST_HEADER = "x-gateway-cost-usd"
BYTES_PER_TOKEN = 4


class Pipeline:
    def __init__(
        self,
        config: GatewayConfig,
        upstream: UpstreamClient,
        ledger: LedgerWriter,
        limiter: Limiter,
        object_store: ObjectStore,
    ) -> None:
        self.config = config
        self.forwarder = Forwarder(upstream)
        self.ledger = ledger
        self.limiter = limiter
        self.walls = Walls(object_store)
        self.relay = Relay(
            self.walls, self._stream_budget, self._add_gateway_headers, self._batch_seen
        )
        self.batches: BatchWatcher | None = None  # set once the app has built it
        self.authenticator = Authenticator(config)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stats = CallStats()
        self.call_log = CallLog()
        self._unpriced_models: set[str | None] = set()

    @property
    def upstream(self) -> UpstreamClient:
        return self.forwarder.upstream

    @upstream.setter
    def upstream(self, client: UpstreamClient) -> None:
        self.forwarder.upstream = client

    def reconfigure(self, config: GatewayConfig, api_keys: ApiKeyIndex | None = None) -> None:
        self.config = config
        self.limiter.apply(config)
        self.authenticator = Authenticator(config, api_keys)
        self.upstream.use_credentials(config)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = Call.start(request)
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                await self._stages(call)
                ending = ANSWERED
            except GatewayError as error:
                ending = refused(error)
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client goes away.
                await self._end(call, CLIENT_LEFT)
                raise
            except Exception:
                log.exception("gateway fault on %s %s", request.method, request.path)
                ending = FAULT
            return await self._end(call, ending)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _stages(self, call: Call) -> None:
        api_path = self._authenticate(call)
        await self._authorize_path(call, api_path)
        outgoing = await self._read(call, api_path)
        if outgoing is None:  # a list of a team's objects: paged and filtered here
            call.answer = await self._forward_list(call)
            return
        await self._authorize_body(call, outgoing)
        await self._admit(call, outgoing)
        upstream = await self.forwarder.send(call, outgoing)
        try:
            await self.relay.answer(call, upstream)
        finally:
            self.forwarder.finished(call, upstream)

    # ------------------------------------------------------------ stages

    def _authenticate(self, call: Call) -> str:
        request = call.request
        api_path, call.target = canonical_target(request)
        call.record.path = "/v1" + api_path
        try:
            caller = self.authenticator.authenticate(
                request.headers.get("Authorization"), today_in(self.config.limits_timezone)
            )
        except KeyRevoked as revoked:
            call.record.team, call.record.key_id = revoked.team, revoked.key_id
            raise
        call.caller = caller
        call.record.team, call.record.key_id = caller.team.name, caller.key.id
        ensure_not_expired(caller)
        return api_path

    async def _authorize_path(self, call: Call, api_path: str) -> None:
        request, caller = call.request, call.caller
        assert caller is not None
        if api_path == "/organization" or api_path.startswith("/organization/"):
            # The upstream's admin surface answers to the operator's key, never a team's.
            raise unknown_url(request.method, "/v1" + api_path)
        authorize_endpoint(caller.team, request.method, api_path)
        call.objects = object_route(request.method, api_path)
        if call.objects is not None and call.objects.action == "use":
            await self.walls.check_owned(call, call.objects.referenced)

    async def _read(self, call: Call, api_path: str) -> Outgoing | None:
        max_body = self.config.listen.max_request_body
        start_reading(call, max_body, self.config.listen.body_timeout_s)
        if call.objects is not None and call.objects.action == "list":
            call.facts = RequestFacts(api_path=api_path)
            return None
        if is_json(call.request) or api_path in JSON_ONLY_PATHS:
            # A JSON-only endpoint's body is read as JSON whatever its label says, as the
            # upstream reads it: the allow-list and the metering see its model either way.
            call.outgoing = with_usage_requested(call, await read_json(call, api_path, max_body))
        else:
            assert call.caller is not None
            team = call.caller.team
            allow = lambda model: self.allow_model(team, model)  # noqa: E731
            call.outgoing = read_streamed(call, api_path, max_body, allow)
        return call.outgoing

    async def _authorize_body(self, call: Call, outgoing: Outgoing) -> None:
        """The model allow-list and price policy, and the objects a JSON body names."""
        facts, caller = call.facts, call.caller
        assert facts is not None and caller is not None
        if outgoing.json is None:
            return  # a streamed body is checked as it passes (`read_streamed`)
        self.allow_model(caller.team, facts.model)
        if facts.json_body is not None:
            call.objects = created_by_body(call.objects, facts.api_path, facts.json_body)
            if may_name_objects(facts.api_path, outgoing.json):
                await self.walls.check_owned(call, object_ids.referenced_ids(facts.json_body))

    def allow_model(self, team: TeamConfig, model: str | None) -> None:
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

    async def _admit(self, call: Call, outgoing: Outgoing | None) -> None:
        """Take the call's reservation from its key's and team's limits (may queue)."""
        caller, facts = call.caller, call.facts
        assert caller is not None and facts is not None
        meters = self.limiter.meters_for(caller.key, caller.team)
        if not meters:
            return
        request_bytes = 0
        if outgoing is not None:
            request_bytes = outgoing.length or call.request.content_length or 0
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

    async def _forward_list(self, call: Call) -> Answer:
        """A list of a kind of objects, filtered to the caller's team (paging the upstream)."""
        assert call.caller is not None and call.objects is not None
        await self._admit(call, None)
        fetch_page = self.forwarder.page_fetcher(call)
        status, body = await self.walls.filtered_list(call, call.objects.kind, fetch_page)
        call.record.status = status
        response = web.Response(status=status, body=body, content_type="application/json")
        self._add_gateway_headers(call, response)
        took = time.perf_counter() - call.started
        return Answer(response, RelayResult(response_bytes=len(body), ttfb_s=took), held=True)

    async def _stream_budget(self, call: Call) -> tuple[StreamBudget, int] | None:
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
        await tokens.load_off_the_loop(facts.model)
        prompt_tokens = tokens.estimate_prompt_tokens("/v1" + facts.api_path, facts.json_body)
        allowed = output_budget(
            admission,
            self.limiter.calendar,
            self.limiter.wall_clock(),
            self.config.team_prices(call.caller.team.name),
            facts.model,
            prompt_tokens,
        )
        return (StreamBudget(facts.model, allowed), prompt_tokens) if allowed is not None else None

    async def _batch_seen(self, call: Call, batch: dict[str, Any]) -> None:
        """A batch created (remembered, to bill when it ends) or fetched (billed if it ended)."""
        if self.batches is None or call.caller is None or call.objects is None:
            return
        if call.objects.action == "create":
            await self.batches.created(call.caller.team.name, call.caller.key.id, batch)
        else:
            self.batches.fetched(batch)

    # ------------------------------------------------------------ the end of every call

    async def _end(self, call: Call, ending: Ending) -> web.StreamResponse:
        """Conclude, meter, price, answer and record: every call, however it ended. The row
        is appended whatever fails here (and even if the client's leaving cancels it)."""
        if call.body_watch is not None:
            call.body_watch.stop()
        record = call.record
        if call.outgoing is not None and call.outgoing.passed is not None:
            record.request_bytes = call.outgoing.passed[0]  # as much of the body as went up
        try:
            try:
                conclude(call, ending)
                await self._meter(call)
                self.price(call.record)
            except Exception:
                log.exception("could not meter or price %s", record.request_id)
                record.error_code = record.error_code or GATEWAY_FAULT.code
            return self._answer(call, ending)
        finally:
            self._record(call)

    def _answer(self, call: Call, ending: Ending) -> web.StreamResponse:
        answer, error = call.answer, ending.error
        if error and error.kind is UPSTREAM_UNAVAILABLE and not answer and call.admission:
            # The upstream never answered: no call happened that a rate limit should count.
            self.limiter.return_rates(call.admission)
        response = answer_for(call, ending)
        if answer is not None and response is answer.response:
            # Its headers went on when it was made; a held one gets its cost now.
            facts = call.facts
            if answer.held and ending is ANSWERED and answer.recorder and facts and facts.metered:
                response.headers[COST_HEADER] = format_usd(call.record.cost_nanousd)
        else:
            self._add_gateway_headers(call, response)
        return response

    async def _meter(self, call: Call) -> None:
        answer, facts = call.answer, call.facts
        if answer is None or answer.recorder is None or facts is None or not facts.metered:
            # An object's answer (a batch, a stored response) states a usage that was billed
            # where it was made: fetching it costs nothing.
            return
        usage: Usage | None = answer.billed
        if usage is None:
            usage = usage_of_recording(answer.recorder, answer.is_sse)
        if usage is None:
            usage = await _estimate(facts, answer, answer.recorder.total <= SMALL_BODY)
        apply_usage(call.record, usage)

    def price(self, record: CallRecord) -> None:
        """The row's cost at the prices in force when it started (`cost_nanousd`,
        `price_unknown`, `pricing_hash`)."""
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

    def _record(self, call: Call) -> None:
        record = call.record
        record.finished_at = time.time()
        record.latency_ms = (time.perf_counter() - call.started) * 1000
        self.write_row(record, call.admission)

    def write_row(self, record: CallRecord, admission: Admission | None, slots: int = 1) -> None:
        """Settle the admission to what the row used and append the row; the row is appended
        whatever fails. `slots`: the concurrency slots the admission held."""
        try:
            if admission is not None:
                self.limiter.settle(
                    admission,
                    Draw(
                        tokens=record.input_tokens + record.output_tokens,
                        bytes=record.request_bytes + record.response_bytes,
                        spend=record.cost_nanousd,
                        slots=slots,
                    ),
                )
        except Exception:
            log.exception("could not settle %s", record.request_id)
            record.error_code = record.error_code or GATEWAY_FAULT.code
        finally:
            self.ledger.append(record)
        self.stats.observe(record)
        if self.config.log_calls and self.call_log.enabled:
            self.call_log.add(record)

    def _add_gateway_headers(self, call: Call, response: web.StreamResponse) -> None:
        response.headers[REQUEST_ID_HEADER] = call.record.request_id
        caller = call.caller
        if caller is None:
            return
        rate_headers(
            response.headers,
            self.limiter.meters_for(caller.key, caller.team),
            self.limiter.clock(),
        )
        if caller.days_left is not None and 0 <= caller.days_left <= self.config.renew_warning_days:
            response.headers[KEY_EXPIRES_HEADER] = f"{caller.days_left}d"

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


async def _estimate(facts: RequestFacts, answer: Answer, small: bool) -> Usage:
    assert answer.recorder is not None
    await tokens.load_off_the_loop(facts.model)
    if small:
        return estimate_usage(facts, answer.recorder, answer.is_sse)
    # Tokenizing up to a megabyte would stall the event loop: do it in a thread.
    return await asyncio.to_thread(estimate_usage, facts, answer.recorder, answer.is_sse)

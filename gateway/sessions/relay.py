"""WebSocket sessions through the gateway: `GET /v1/realtime?model=M` and `GET /v1/responses`
upgraded (SPEC "Every OpenAI surface").

The upgrade is checked like a call (key, endpoint, model, limits) and refused with an HTTP
error and a row before anything is upgraded; the session then holds one concurrency slot of its
key and team until it closes. Frames pass both ways as they come, each direction in a task of
its own. Each `response.create` the client sends is one request for the limits, admitted (or
answered with an `error` event and not forwarded) before it goes up; a response the upstream
begins on its own (voice activity detection) is admitted when it starts and cancelled upstream
when over a limit. Each response's last event writes its row: the usage it states, priced as
any call, with the bytes that passed since the previous row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from gateway.access.auth import Caller, KeyRevoked, authorize_endpoint, ensure_not_expired
from gateway.access.keys import today_in
from gateway.errors import (
    MODEL_NOT_ALLOWED,
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_UNAVAILABLE,
    ErrorKind,
    GatewayError,
    Outcome,
    error_body,
)
from gateway.ledger.writer import CallRecord
from gateway.limits.store import Admission
from gateway.limits.windows import Draw
from gateway.pipeline.call import apply_usage, new_request_id
from gateway.pipeline.handler import BYTES_PER_TOKEN
from gateway.sessions import events
from gateway.sessions.events import REALTIME, RESPONSES

if TYPE_CHECKING:
    from gateway.pipeline.handler import Pipeline

log = logging.getLogger("gateway.sessions")

PATHS = {"/v1/realtime": REALTIME, "/v1/responses": RESPONSES}
SESSION_HEADER = "x-gateway-request-id"
CLOSE_GOING_AWAY = 1001
_KEY_PROTOCOL = "openai-insecure-api-key."  # a browser's way to send its key
_session_ids = itertools.count(1)
_SESSION_PREFIX = "sess_" + secrets.token_hex(6)


def is_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and request.path in PATHS
    )


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


@dataclass
class _Pending:
    """A response asked for or begun: its admission, when it started, what its row needs."""

    admission: Admission | None
    started_at: float
    started: float  # perf_counter
    model: str | None
    client_event_id: str | None = None
    queued_ms: float = 0.0
    first_event: float | None = None


class Sessions:
    """Every open session, the upstream WebSocket client, and the drain on SIGTERM."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.open: set[Session] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self._client: aiohttp.ClientSession | None = None
        self._closed_bytes = [0, 0]  # up, down: of the sessions that ended

    def totals(self) -> tuple[int, int, int]:
        """Open sessions, and the frame bytes relayed up and down by every session so far."""
        up = self._closed_bytes[0] + sum(session.bytes_up for session in self.open)
        down = self._closed_bytes[1] + sum(session.bytes_down for session in self.open)
        return len(self.open), up, down

    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            upstream = self.pipeline.config.upstream
            timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s)
            self._client = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._client

    async def close(self) -> None:
        for session in list(self.open):
            await session.close(CLOSE_GOING_AWAY, b"gateway stopping")
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def drain(self) -> None:
        """No new response from now on; each session closes once its responses are done."""
        self.draining = True
        for session in list(self.open):
            session.close_when_quiet()
        await self.idle.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        protocol = PATHS[request.path]
        session = Session(self, request, protocol)
        try:
            await session.connect()
        except GatewayError as error:
            return session.refuse_connect(error)
        self.open.add(session)
        self.idle.clear()
        try:
            await session.run()
        finally:
            self.open.discard(session)
            self._closed_bytes[0] += session.bytes_up
            self._closed_bytes[1] += session.bytes_down
            if not self.open:
                self.idle.set()
        return session.client_ws  # type: ignore[return-value]


class Session:
    def __init__(self, sessions: Sessions, request: web.Request, protocol: str) -> None:
        self.sessions = sessions
        self.pipeline = sessions.pipeline
        self.request = request
        self.protocol = protocol
        self.path = request.path
        self.id = f"{_SESSION_PREFIX}{next(_session_ids):06x}"
        self.model: str | None = request.query.get("model") if protocol == REALTIME else None
        self.caller: Caller | None = None
        self.admission: Admission | None = None  # the session's slot
        self.client_ws: web.WebSocketResponse | None = None
        self.upstream_ws: aiohttp.ClientWebSocketResponse | None = None
        self.asked: deque[_Pending] = deque()  # response.create sent up, no response.created yet
        self.running: dict[str, _Pending] = {}  # by response id
        self.bytes_up = self.bytes_down = 0
        self.billed_up = self.billed_down = 0
        self._who: tuple[str, str] | None = None  # a revoked key's team and id, for its row
        self._quiet_close = False
        self._closing: asyncio.Future[None] | None = None
        self._gateway_events = itertools.count(1)

    # ------------------------------------------------------------ connect

    async def connect(self) -> None:
        """Check the upgrade like a call, take the session's slot, open the upstream socket,
        then upgrade the client's connection."""
        pipeline, request = self.pipeline, self.request
        if self.sessions.draining:
            raise GatewayError(UPSTREAM_UNAVAILABLE, "The gateway is shutting down.")
        authorization, protocols = _credentials(request)
        try:
            caller = pipeline.authenticator.authenticate(
                authorization, today_in(pipeline.config.limits_timezone)
            )
        except KeyRevoked as revoked:
            self._who = (revoked.team, revoked.key_id)
            raise
        self.caller = caller
        ensure_not_expired(caller)
        authorize_endpoint(caller.team, "GET", self.path[3:])
        if self.protocol == REALTIME:
            self._allow_model(self.model)
        meters = pipeline.limiter.meters_for(caller.key, caller.team)
        if meters:
            # The connect consumes no request; it refuses when a limit is already used up.
            self.admission = await pipeline.limiter.admit(
                caller.team, meters, Draw(requests=0, slots=1)
            )
        try:
            await self._open_upstream(protocols)
        except BaseException:
            self._give_back_slot()
            raise
        assert self.upstream_ws is not None
        chosen = self.upstream_ws.protocol
        client_ws = web.WebSocketResponse(
            protocols=(chosen,) if chosen else (),
            max_msg_size=pipeline.config.listen.max_request_body,
            autoping=True,
        )
        client_ws.headers[SESSION_HEADER] = self.id
        try:
            await client_ws.prepare(request)
        except BaseException:
            await self.upstream_ws.close()
            self._give_back_slot()
            raise
        self.client_ws = client_ws

    def _allow_model(self, model: str | None) -> None:
        assert self.caller is not None
        team = self.caller.team
        if team.models is not None and model is None:
            raise GatewayError(
                MODEL_NOT_ALLOWED,
                f"Team '{team.name}' may use only the models of its list: name one.",
                param="model",
            )
        self.pipeline.allow_model(team, model)

    async def _open_upstream(self, protocols: list[str]) -> None:
        assert self.caller is not None
        upstream = self.pipeline.upstream
        headers = upstream.upstream_headers(
            self.request.headers, None, False, self.caller.team.name
        )
        for name in ("Accept-Encoding", "Content-Type", "Content-Length"):
            headers.popall(name, None)
        url = upstream.base.replace("http", "ws", 1) + self.path[3:]
        if self.request.query_string:
            url += "?" + self.request.query_string
        try:
            self.upstream_ws = await self.sessions.client().ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                max_msg_size=self.pipeline.config.listen.max_request_body,
                autoping=True,
                autoclose=False,
            )
        except aiohttp.WSServerHandshakeError as refused:
            if refused.status in (401, 403):
                log.error(
                    "the upstream refused the credentials of team %r for %s (%d)",
                    self.caller.team.name, self.path, refused.status,
                )  # fmt: skip
                raise GatewayError(
                    UPSTREAM_AUTH_FAILED,
                    "The upstream API refused the gateway's own credentials. This is not a "
                    "problem with your key: the gateway's operator must check its upstream key.",
                ) from None
            kind = ErrorKind(refused.status, "upstream_error", None, Outcome.UPSTREAM_ERROR)
            if refused.status < 400:
                kind = UPSTREAM_UNAVAILABLE
            raise GatewayError(
                kind, f"The upstream API refused the WebSocket ({refused.status})."
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise GatewayError(
                UPSTREAM_UNAVAILABLE,
                f"The upstream API could not be reached ({type(exc).__name__}).",
            ) from None

    def refuse_connect(self, error: GatewayError) -> web.Response:
        """The HTTP error before any upgrade, and its row."""
        record = self._new_record(time.time(), self.model)
        record.status, record.outcome = error.kind.status, error.kind.outcome.value
        record.error_code = error.kind.code or "upstream_refused"
        record.rejected_by = error.limit
        record.stream = 0
        if self.admission is not None and error.kind.outcome is Outcome.REJECTED:
            record.queued_ms = self.admission.queued_ms
        record.finished_at = time.time()
        self.pipeline.write_row(record, None)
        response = web.Response(
            status=error.kind.status,
            body=error_body(error.kind, error.message, error.param),
            content_type="application/json",
        )
        response.headers[SESSION_HEADER] = record.request_id
        if error.retry_after_s is not None:
            response.headers["retry-after"] = str(error.retry_after_s)
        return response

    def _give_back_slot(self) -> None:
        if self.admission is not None:
            self.pipeline.limiter.settle(self.admission, Draw(requests=0, slots=1))
            self.admission = None

    # ------------------------------------------------------------ the relay

    async def run(self) -> None:
        assert self.client_ws is not None and self.upstream_ws is not None
        up = asyncio.create_task(self._client_to_upstream(), name=f"{self.id}-up")
        down = asyncio.create_task(self._upstream_to_client(), name=f"{self.id}-down")
        try:
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self.close_soon(1000, b"")
            await asyncio.shield(self._closing)  # type: ignore[arg-type]
            await self._end()

    async def _client_to_upstream(self) -> None:
        client, upstream = self.client_ws, self.upstream_ws
        assert client is not None and upstream is not None
        async for message in client:
            if message.type is WSMsgType.TEXT:
                text: str = message.data
                self.bytes_up += _size(text)
                create = events.client_create(text)
                if create is not None and not await self._admit_create(create, text):
                    continue
                await upstream.send_str(text)
            elif message.type is WSMsgType.BINARY:
                self.bytes_up += len(message.data)
                await upstream.send_bytes(message.data)
            else:
                break
        code = client.close_code
        await self.close(code if code and code != 1006 else 1000, b"")

    async def _upstream_to_client(self) -> None:
        client, upstream = self.client_ws, self.upstream_ws
        assert client is not None and upstream is not None
        async for message in upstream:
            if message.type is WSMsgType.TEXT:
                text: str = message.data
                self.bytes_down += _size(text)
                event = events.server_event(text)
                with contextlib.suppress(ConnectionError):
                    await client.send_str(text)
                if event is not None:
                    await self._on_server_event(event)
            elif message.type is WSMsgType.BINARY:
                self.bytes_down += len(message.data)
                await client.send_bytes(message.data)
            else:
                break
        code = upstream.close_code
        await self.close(code if code and code != 1006 else 1011, b"")

    async def close(self, code: int, reason: bytes) -> None:
        """Close both sockets with `code` (the first close asked for wins), the client's first."""
        self.close_soon(code, reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    def close_soon(self, code: int, reason: bytes) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_both(code, reason))

    async def _close_both(self, code: int, reason: bytes) -> None:
        for ws in (self.client_ws, self.upstream_ws):
            if ws is not None and not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=code, message=reason), 2.0)

    def close_when_quiet(self) -> None:
        self._quiet_close = True
        if not self.asked and not self.running:
            self.close_soon(CLOSE_GOING_AWAY, b"gateway stopping")

    # ------------------------------------------------------------ responses

    async def _admit_create(self, event: dict[str, Any], text: str) -> bool:
        """Admit a client's `response.create`; False: refused with an error event."""
        caller, pipeline = self.caller, self.pipeline
        assert caller is not None and self.client_ws is not None
        started_at, started = time.time(), time.perf_counter()
        named, model = events.requested_model(self.protocol, event)
        model = model if named else self.model
        client_event = event.get("event_id")
        client_event = client_event if type(client_event) is str else None
        admission = None
        try:
            if self.sessions.draining or self._quiet_close:
                raise GatewayError(UPSTREAM_UNAVAILABLE, "The gateway is shutting down: reconnect.")
            if named and model is None:
                raise GatewayError(MODEL_NOT_ALLOWED, "The model must be a string.", param="model")
            if named:
                self._allow_model(model)
            meters = pipeline.limiter.meters_for(caller.key, caller.team)
            if meters:
                reserved = len(text) // BYTES_PER_TOKEN + events.max_output_tokens(
                    self.protocol, event
                )
                admission = await pipeline.limiter.admit(
                    caller.team, meters, Draw(tokens=reserved, slots=0)
                )
        except GatewayError as error:
            await self._refused(error, model, started_at, started, _size(text), client_event)
            return False
        pending = _Pending(admission, started_at, started, model, client_event)
        if admission is not None:
            pending.queued_ms = admission.queued_ms
        self.asked.append(pending)
        return True

    async def _refused(
        self,
        error: GatewayError,
        model: str | None,
        started_at: float,
        started: float,
        size: int,
        client_event: str | None,
    ) -> None:
        assert self.client_ws is not None
        record = self._new_record(started_at, model)
        record.status, record.outcome = error.kind.status, error.kind.outcome.value
        record.error_code = error.kind.code
        record.rejected_by = error.limit
        record.request_bytes = size
        self.billed_up += size
        record.finished_at = time.time()
        record.latency_ms = (time.perf_counter() - started) * 1000
        self.pipeline.write_row(record, None)
        message = events.error_event(error.kind.type, error.kind.code, error.message, client_event)
        self.bytes_down += len(message)
        self.billed_down += len(message)
        await self._send_to_client(message)

    async def _send_to_client(self, text: str) -> None:
        if self.client_ws is not None and not self.client_ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.client_ws.send_str(text)

    async def _on_server_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("response.created",):
            await self._started(event)
        elif events.is_ending(self.protocol, kind):
            self._ended(event)
        elif kind == "error":
            answers, _ = events.error_of(event)
            for pending in list(self.asked):
                if answers is not None and pending.client_event_id == answers:
                    self.asked.remove(pending)  # the upstream refused it: no response
                    self._settle_unanswered(pending)
                    break
            self._close_if_quiet()

    async def _started(self, event: dict[str, Any]) -> None:
        response = events.response_id(event)
        if response is None:
            return
        if self.asked:
            pending = self.asked.popleft()
        else:
            pending = await self._admit_server_response(response)
        pending.first_event = time.perf_counter()
        self.running[response] = pending

    async def _admit_server_response(self, response: str) -> _Pending:
        """A response the upstream began on its own: admitted now, or cancelled upstream."""
        caller, pipeline = self.caller, self.pipeline
        assert caller is not None and self.upstream_ws is not None
        pending = _Pending(None, time.time(), time.perf_counter(), self.model)
        meters = pipeline.limiter.meters_for(caller.key, caller.team)
        if not meters:
            return pending
        try:
            pending.admission = await pipeline.limiter.admit_now(caller.team, meters, Draw(slots=0))
        except GatewayError as error:
            log.info("session %s: response %s over a limit: cancelled", self.id, response)
            cancel = orjson.dumps({"type": "response.cancel", "response_id": response}).decode()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.upstream_ws.send_str(cancel)
            message = events.error_event(error.kind.type, error.kind.code, error.message, None)
            self.bytes_down += len(message)
            await self._send_to_client(message)
        return pending

    def _ended(self, event: dict[str, Any]) -> None:
        ending = events.ending(self.protocol, event)
        pending = self.running.pop(ending.response_id or "", None)
        if pending is None:
            pending = self.asked.popleft() if self.asked else None
        if pending is None:
            pending = _Pending(None, time.time(), time.perf_counter(), self.model)
        record = self._new_record(pending.started_at, pending.model or ending.model)
        record.status = ending.status
        record.outcome = Outcome.OK.value if ending.status < 400 else Outcome.UPSTREAM_ERROR.value
        record.error_code = ending.error_code
        record.upstream_request_id = ending.response_id
        record.queued_ms = pending.queued_ms
        if ending.usage is not None:
            apply_usage(record, ending.usage)
        self._write(record, pending)
        self._close_if_quiet()

    def _write(self, record: CallRecord, pending: _Pending) -> None:
        record.request_bytes = self.bytes_up - self.billed_up
        record.response_bytes = self.bytes_down - self.billed_down
        self.billed_up, self.billed_down = self.bytes_up, self.bytes_down
        now = time.perf_counter()
        record.finished_at = time.time()
        record.latency_ms = (now - pending.started) * 1000
        if pending.first_event is not None:
            record.ttfb_ms = (pending.first_event - pending.started) * 1000
        try:
            self.pipeline.price(record)
        except Exception:
            log.exception("could not price %s", record.request_id)
            record.error_code = record.error_code or "gateway_error"
        self.pipeline.write_row(record, pending.admission, slots=0)

    def _settle_unanswered(self, pending: _Pending) -> None:
        if pending.admission is not None:
            self.pipeline.limiter.settle(pending.admission, Draw(requests=0, slots=0))

    def _close_if_quiet(self) -> None:
        if self._quiet_close and not self.asked and not self.running:
            self.close_soon(CLOSE_GOING_AWAY, b"gateway stopping")

    async def _end(self) -> None:
        """The session is over: a response still running gets its row (what passed, no usage
        stated), what was asked and never begun gives its reservation back, the slot is freed."""
        client_left = self.client_ws is not None and self.client_ws.closed and not self._quiet_close
        for pending in self.asked:
            self._settle_unanswered(pending)
        self.asked.clear()
        for response, pending in list(self.running.items()):
            record = self._new_record(pending.started_at, pending.model)
            record.upstream_request_id = response
            if client_left:
                record.status, record.outcome = 499, Outcome.CLIENT_DISCONNECT.value
            else:
                record.status, record.outcome = 502, Outcome.UPSTREAM_ERROR.value
                record.error_code = "upstream_stream_broken"
            self._write(record, pending)
        self.running.clear()
        self._give_back_slot()
        log.info(
            "session %s (%s, team %s) closed: %d bytes up, %d down",
            self.id, self.path, self.caller.team.name if self.caller else None,
            self.bytes_up, self.bytes_down,
        )  # fmt: skip

    def _new_record(self, started_at: float, model: str | None) -> CallRecord:
        record = CallRecord(
            request_id=new_request_id(),
            started_at=started_at,
            method="GET",
            path=self.path,
            model=model,
            stream=1,
            ws_session_id=self.id,
        )
        if self.caller is not None:
            record.team, record.key_id = self.caller.team.name, self.caller.key.id
        elif self._who is not None:
            record.team, record.key_id = self._who
        return record


def _credentials(request: web.Request) -> tuple[str | None, list[str]]:
    """The gateway key (the Authorization header, or a browser's key subprotocol) and the
    subprotocols to offer upstream (never the key's)."""
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    protocols = [p for p in offered if not p.startswith(_KEY_PROTOCOL)]
    authorization = request.headers.get("Authorization")
    if authorization is None:
        key = next((p[len(_KEY_PROTOCOL) :] for p in offered if p.startswith(_KEY_PROTOCOL)), None)
        if key:
            authorization = f"Bearer {key}"
    return authorization, protocols

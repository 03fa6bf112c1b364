"""The fake upstream's WebSocket endpoints: Realtime (`GET /v1/realtime?model=M`) and the
Responses API over WebSocket (`GET /v1/responses` with `Upgrade: websocket`).

Counts are deterministic, like the HTTP fake's:
- text tokens are whitespace-separated words (of conversation items, and of replies);
- input audio is 1 token per started 4,800 bytes of decoded PCM (0.1 s of 24 kHz pcm16) of each
  committed buffer; a reply with audio output has 2 audio tokens per word;
- a Realtime response's input is the whole conversation so far, and the input of the previous
  response counts again as cached (`cached_tokens_details` split as text and audio);
- a reply has 12 words, or `max_output_tokens` when fewer (status `incomplete` then).
With `turn_detection: {type: server_vad}` a buffer of only zero bytes appended after sound is
the end of speech: the fake commits the buffer and starts a response on its own, as
OpenAI's voice activity detection does. The `chunk_delay_ms` fault paces reply deltas, so a
`response.cancel` can arrive while a response runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from gateway.devtools.fake_chat import response_events
from gateway.devtools.fake_http import CONTEXT, FAKE_STATE, ApiError, answer_time
from gateway.devtools.fake_tokens import DEFAULT_REPLY_WORDS, Tokens, reply_deltas

AUDIO_BYTES_PER_TOKEN = 4800
AUDIO_TOKENS_PER_WORD = 2
MAX_MESSAGE = 32 << 20


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _reply_words(limit: Any) -> tuple[int, bool]:
    """Words of a reply and whether `limit` cut it (incomplete)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < DEFAULT_REPLY_WORDS:
        return max(limit, 0), True
    return DEFAULT_REPLY_WORDS, False


def _text_words(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    words = 0
    for part in content:
        if isinstance(part, dict):
            for name in ("text", "transcript"):
                text = part.get(name)
                if isinstance(text, str):
                    words += len(text.split())
    return words


@dataclass
class _Realtime:
    model: str | None
    delay_s: float
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    session: dict[str, Any] = field(default_factory=dict)
    text_tokens: int = 0  # the conversation's, so far
    audio_tokens: int = 0
    buffer: int = 0  # bytes appended and not yet committed
    heard_sound: bool = False
    previous_input: tuple[int, int] = (0, 0)  # (text, audio) of the last response's input
    running: asyncio.Task[None] | None = None
    cancelled: bool = False

    def event_id(self) -> str:
        return f"event_fake{next(self.ids)}"

    def event(self, kind: str, **fields: Any) -> str:
        return orjson.dumps({"type": kind, "event_id": self.event_id(), **fields}).decode()


async def realtime(request: web.Request) -> web.StreamResponse:
    if not _is_upgrade(request):
        raise ApiError(400, "The Realtime API is served over WebSocket only.")
    ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    ctx = request[CONTEXT]
    state = _Realtime(request.query.get("model"), (ctx.fault_int("chunk_delay_ms") or 0) / 1000)
    state.session = {"id": "sess_fake1", "object": "realtime.session", "model": state.model,
                     "type": "realtime", "output_modalities": ["audio"], "audio": {}}  # fmt: skip
    await ws.send_str(state.event("session.created", session=state.session))
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            continue
        try:
            event = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            await _send_error(ws, state, "invalid_request_error", "Invalid JSON.", None)
            continue
        if isinstance(event, dict):
            await _on_realtime_event(ws, state, event)
    if state.running is not None:
        state.running.cancel()
    return ws


async def _send_error(
    ws: web.WebSocketResponse, state: _Realtime, kind: str, message: str, event_id: Any
) -> None:
    error = {"type": kind, "code": None, "message": message, "param": None, "event_id": event_id}
    await ws.send_str(state.event("error", error=error))


async def _on_realtime_event(
    ws: web.WebSocketResponse, state: _Realtime, event: dict[str, Any]
) -> None:
    kind = event.get("type")
    if kind == "session.update" and isinstance(event.get("session"), dict):
        state.session.update(event["session"])
        await ws.send_str(state.event("session.updated", session=state.session))
    elif kind == "conversation.item.create" and isinstance(event.get("item"), dict):
        item = {"id": f"item_fake{next(state.ids)}", **event["item"]}
        state.text_tokens += _text_words(item.get("content"))
        await ws.send_str(state.event("conversation.item.created", item=item))
    elif kind == "input_audio_buffer.append":
        audio = base64.b64decode(str(event.get("audio", "")))
        state.buffer += len(audio)
        if audio.strip(b"\0"):
            state.heard_sound = True
        elif state.heard_sound and _server_vad(state):
            state.heard_sound = False
            await ws.send_str(state.event("input_audio_buffer.speech_stopped"))
            await _commit(ws, state)
            await _start_response(ws, state, {}, None)
    elif kind == "input_audio_buffer.commit":
        await _commit(ws, state)
    elif kind == "response.create":
        if state.running is not None and not state.running.done():
            message = "Conversation already has an active response in progress."
            await _send_error(ws, state, "invalid_request_error", message, event.get("event_id"))
            return
        options = event.get("response") if isinstance(event.get("response"), dict) else {}
        await _start_response(ws, state, options, event.get("event_id"))
    elif kind == "response.cancel":
        state.cancelled = True


def _server_vad(state: _Realtime) -> bool:
    detection = state.session.get("turn_detection")
    audio = state.session.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("input"), dict):
        detection = audio["input"].get("turn_detection", detection)
    return isinstance(detection, dict) and detection.get("type") == "server_vad"


async def _commit(ws: web.WebSocketResponse, state: _Realtime) -> None:
    state.audio_tokens += -(-state.buffer // AUDIO_BYTES_PER_TOKEN)
    state.buffer = 0
    await ws.send_str(state.event("input_audio_buffer.committed", item_id="item_fake_audio"))


async def _start_response(
    ws: web.WebSocketResponse, state: _Realtime, options: dict[str, Any], event_id: Any
) -> None:
    state.cancelled = False
    state.running = asyncio.create_task(_run_response(ws, state, options))


async def _run_response(ws: web.WebSocketResponse, state: _Realtime, options: dict) -> None:
    number = next(state.ids)
    modalities = options.get("output_modalities") or state.session.get("output_modalities")
    audio_out = "audio" in (modalities or ["audio"])
    words, cut = _reply_words(options.get("max_output_tokens"))
    response = {"object": "realtime.response", "id": f"resp_fake{number}", "status": "in_progress",
                "status_details": None, "output": [], "conversation_id": "conv_fake1",
                "output_modalities": ["audio" if audio_out else "text"], "usage": None}  # fmt: skip
    await ws.send_str(state.event("response.created", response=response))
    sent = 0
    for delta in reply_deltas(words, 1):
        if state.cancelled:
            break
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        where = {"response_id": response["id"], "item_id": f"item_fake{number}",
                 "output_index": 0, "content_index": 0}  # fmt: skip
        if audio_out:
            await ws.send_str(state.event("response.output_audio_transcript.delta", **where,
                                          delta=delta))  # fmt: skip
            audio = base64.b64encode(b"\0" * 480).decode()
            await ws.send_str(state.event("response.output_audio.delta", **where, delta=audio))
        else:
            await ws.send_str(state.event("response.output_text.delta", **where, delta=delta))
        sent += 1
    text_in, audio_in = state.text_tokens, state.audio_tokens
    cached_text, cached_audio = state.previous_input
    state.previous_input = (text_in, audio_in)
    state.text_tokens += sent  # the reply is part of the conversation from now on
    output_audio = sent * AUDIO_TOKENS_PER_WORD if audio_out else 0
    status = "cancelled" if state.cancelled else "incomplete" if cut else "completed"
    response.update(
        status=status,
        status_details={"type": status, "reason": "client_cancelled"}
        if state.cancelled
        else {"type": status, "reason": "max_output_tokens"}
        if cut
        else None,
        usage={
            "total_tokens": text_in + audio_in + sent + output_audio,
            "input_tokens": text_in + audio_in,
            "output_tokens": sent + output_audio,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": sent, "audio_tokens": output_audio},
        },
    )
    with contextlib.suppress(ConnectionError):
        await ws.send_str(state.event("response.done", response=response))
        limits = [
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.01},
            {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5},
        ]
        await ws.send_str(state.event("rate_limits.updated", rate_limits=limits))


async def responses_socket(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses` upgraded: each `response.create` (its fields at the top level)
    answers with the events a streamed `POST /v1/responses` sends, as WebSocket messages."""
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    objects = request.app[FAKE_STATE].objects
    delay = (request[CONTEXT].fault_int("chunk_delay_ms") or 0) / 1000
    sequence = itertools.count()
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            continue
        try:
            event = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or event.get("type") != "response.create":
            error = {
                "type": "invalid_request_error",
                "code": "unknown_event",
                "message": "Only response.create is understood here.",
                "param": "type",
            }
            await ws.send_str(orjson.dumps({"type": "error", "error": error}).decode())
            continue
        body = {key: value for key, value in event.items() if key != "type"}
        words, _ = _reply_words(body.get("max_output_tokens"))
        prompt = _input_words(body.get("input"))
        tokens = Tokens(prompt, words, 0, 0)
        response_id = objects.new_id("response")
        for kind, fields in response_events(response_id, answer_time(request), body, tokens):
            if delay and kind == "response.output_text.delta":
                await asyncio.sleep(delay)
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            await ws.send_str(orjson.dumps(payload).decode())
    return ws


def _input_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(
            _text_words(item.get("content")) if isinstance(item.get("content"), list)
            else len(str(item.get("content", "")).split())
            for item in value
            if isinstance(item, dict)
        )  # fmt: skip
    return 0

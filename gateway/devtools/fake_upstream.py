"""An OpenAI-compatible fake upstream for tests, demos and benchmarks: the app and its routes.

Token counts are deterministic: the tokens of a text are its whitespace-separated
words (``gateway.devtools.fake_tokens``). Behaviour can be bent per request with the
``x-fake-*`` headers or globally through ``FakeState.faults`` (see
``gateway.devtools.fake_faults.FAULT_NAMES``). The endpoints: text
(``gateway.devtools.fake_chat``), embeddings, files and audio (``gateway.devtools.fake_media``),
the Usage and Costs APIs (``gateway.devtools.fake_usage``), Realtime and Responses over
WebSocket (``gateway.devtools.fake_sockets``). Files, uploads, batches, vector
stores, stored responses, fine-tuning jobs, containers and conversations live in
``FakeState.objects`` (``gateway.devtools.fake_objects``).
"""

from __future__ import annotations

import argparse
import itertools
import os

import orjson
from aiohttp import web

from gateway.devtools.fake_chat import chat_completions, completions, responses
from gateway.devtools.fake_faults import (
    add_common_headers,
    clear_faults,
    clear_received,
    fake_middleware,
    list_received,
    set_faults,
)
from gateway.devtools.fake_http import (
    FAKE_STATE,
    MAX_JSON_BODY,
    RUNTIME,
    ApiError,
    FakeState,
    Runtime,
    answer_time,
    json_bytes_response,
    json_response,
    read_form,
    read_json,
)
from gateway.devtools.fake_media import (
    download,
    embeddings,
    file_content,
    speech,
    transcribe,
    upload_file,
)
from gateway.devtools.fake_object_store import Call, ObjectError
from gateway.devtools.fake_objects import COLLECTIONS, handle_object_call
from gateway.devtools.fake_sockets import realtime, responses_socket
from gateway.devtools.fake_usage import usage_handlers
from gateway.loop import new_event_loop

__all__ = ["build_fake_app", "run_fake_upstream"]

_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small", "whisper-1", "tts-1")
_MODEL_BODIES = {
    model: orjson.dumps(
        {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
    )
    for model in _MODEL_IDS
}
_MODEL_LIST_BODY = b'{"object":"list","data":[' + b",".join(_MODEL_BODIES.values()) + b"]}"


async def _list_models(request: web.Request) -> web.Response:
    return json_bytes_response(request, _MODEL_LIST_BODY)


async def _get_model(request: web.Request) -> web.Response:
    model = request.match_info["model_id"]
    body = _MODEL_BODIES.get(model)
    if body is None:
        message = f"The model '{model}' does not exist or you do not have access to it."
        raise ApiError(404, message, code="model_not_found", param="model")
    return json_bytes_response(request, body)


async def _objects(request: web.Request) -> web.Response:
    """Files (but their upload and content), uploads, batches, vector stores, stored responses,
    fine-tuning jobs, containers, conversations: `gateway.devtools.fake_objects`."""
    segments = request.path.split("/")[2:]
    call = Call(request.method, segments, dict(request.query), {}, answer_time(request))
    if request.method == "POST" and request.body_exists:
        if request.content_type.startswith("multipart/"):
            call.data = (await read_form(request, keep_file=True, file_field="data")).content
        else:
            call.body = await read_json(request)
    try:
        payload = handle_object_call(request.app[FAKE_STATE].objects, call)
    except ObjectError as error:
        raise ApiError(error.status, error.message, param=error.param, code=error.code) from None
    except LookupError:
        return await _unknown(request)
    return json_response(request, payload)


async def _responses_get(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await responses_socket(request)
    return await _objects(request)


async def _unknown(request: web.Request) -> web.Response:
    message = f"Invalid URL ({request.method} {request.path})"
    raise ApiError(404, message, code="unknown_url")


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/responses", responses)
    router.add_get("/v1/responses", _responses_get)
    router.add_get("/v1/realtime", realtime)
    router.add_post("/v1/embeddings", embeddings)
    router.add_get("/v1/models", _list_models)
    router.add_get("/v1/models/{model_id}", _get_model)
    router.add_post("/v1/files", upload_file)
    router.add_get("/v1/files/{file_id}/content", file_content)
    router.add_post("/v1/audio/transcriptions", transcribe)
    router.add_post("/v1/audio/speech", speech)
    router.add_get("/v1/fake/download", download)
    router.add_get("/v1/organization/usage/completions", _org_usage)
    router.add_get("/v1/organization/costs", _org_costs)
    for collection in COLLECTIONS:
        router.add_route("*", f"/v1/{collection}", _objects)
        router.add_route("*", f"/v1/{collection}/{{rest:.*}}", _objects)
    router.add_route("*", "/v1/{tail:.*}", _unknown)
    router.add_post("/_fake/faults", set_faults)
    router.add_delete("/_fake/faults", clear_faults)
    router.add_get("/_fake/received", list_received)
    router.add_delete("/_fake/received", clear_received)


async def _org_usage(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    return await usage_handlers(state.usage, state.prices)[0](request)


async def _org_costs(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    return await usage_handlers(state.usage, state.prices)[1](request)


def build_fake_app(state: FakeState | None = None) -> web.Application:
    """Build the fake upstream; FAKE_UPSTREAM_KEY (if set now) becomes the only valid key."""
    state = FakeState() if state is None else state
    app = web.Application(middlewares=[fake_middleware], client_max_size=MAX_JSON_BODY)
    app[FAKE_STATE] = state
    api_key = os.environ.get("FAKE_UPSTREAM_KEY") or None
    app[RUNTIME] = Runtime(state, api_key, itertools.count(1))
    app.on_response_prepare.append(add_common_headers)
    _add_routes(app.router)
    return app


def run_fake_upstream(host: str = "127.0.0.1", port: int = 9797) -> None:
    """Serve the fake upstream until interrupted."""
    loop = new_event_loop()
    web.run_app(build_fake_app(), host=host, port=port, access_log=None, loop=loop, backlog=1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9797)
    args = parser.parse_args(argv)
    run_fake_upstream(args.host, args.port)


if __name__ == "__main__":
    main()

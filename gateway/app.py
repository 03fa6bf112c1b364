"""Builds the aiohttp application: routes, stages and the resources they share.

Startup and shutdown of the upstream pool and the ledger live in one cleanup context, so a
graceful stop always flushes the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.config.loader import GatewayConfig
from gateway.errors import NOT_FOUND, error_body
from gateway.ledger.storage import make_ledger
from gateway.ledger.writer import LedgerWriter
from gateway.limits.admission import Limiter, Usage, window_usage
from gateway.limits.redis import RedisLimiter
from gateway.pipeline.handler import Pipeline
from gateway.pipeline.objects import ObjectStore, make_object_store
from gateway.upstream.forward import UpstreamClient
from gateway.web.api import UsageApi
from gateway.web.metrics import GatewayCollector, metrics_handler
from gateway.web.security import security_headers

log = logging.getLogger("gateway")

CONFIG = web.AppKey("config", GatewayConfig)
LEDGER = web.AppKey("ledger", LedgerWriter)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
HANDLER = web.AppKey("handler", Pipeline)
LIMITER = web.AppKey("limiter", Limiter)
OBJECTS = web.AppKey("objects", ObjectStore)
READY = web.AppKey("ready", asyncio.Event)


def build_app(config: GatewayConfig) -> web.Application:
    app = web.Application(client_max_size=config.listen.max_request_body)
    ledger = make_ledger(config.storage)
    upstream = UpstreamClient(config)
    limiter = make_limiter(config)
    object_store = make_object_store(config.storage)
    handler = Pipeline(config, upstream, ledger, limiter, object_store)
    app[CONFIG], app[LEDGER], app[UPSTREAM], app[HANDLER] = config, ledger, upstream, handler
    app[LIMITER] = limiter
    app[OBJECTS] = object_store
    app[READY] = asyncio.Event()
    ledger.on_flush.append(handler.call_log.flush)  # call log lines go out on the same beat
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    usage_api = UsageApi(lambda: handler.config, limiter, ledger.flush, ledger.reader)
    app.router.add_routes(usage_api.routes())
    collector = GatewayCollector(
        handler.stats, lambda: handler.config, limiter, ledger, lambda: handler.in_flight
    )
    app.router.add_get("/metrics", metrics_handler(collector))
    app.router.add_get("/portal", _to_portal)
    app.router.add_get("/portal/", _portal_index)
    app.router.add_static("/portal/", STATIC_DIR)
    app.router.add_route("*", "/v1/{tail:.*}", handler.handle)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def make_limiter(config: GatewayConfig) -> Limiter:
    """Limits in this process, or shared by every replica through Redis."""
    if config.limits_backend.backend == "redis":
        return RedisLimiter(config)
    return Limiter(config)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    await app[LEDGER].open()
    await app[OBJECTS].open()  # after the ledger: its table is in the ledger's schema
    limiter, ledger = app[LIMITER], app[LEDGER]

    async def usage() -> Usage:
        await ledger.flush()
        return await window_usage(limiter, ledger.reader)

    await limiter.start(usage)
    await app[UPSTREAM].start()
    app[READY].set()
    try:
        yield
    finally:
        await app[UPSTREAM].close()
        await app[LIMITER].close()
        await app[OBJECTS].close()
        await app[LEDGER].close()
        await app[HANDLER].call_log.flush()


STATIC_DIR = Path(__file__).parent / "web" / "static"


async def _to_portal(request: web.Request) -> web.Response:
    raise web.HTTPFound("/portal/")


async def _portal_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    ready = request.app[READY].is_set() and ledger.writable
    return web.json_response(
        {"ready": ready, "ledger_pending_rows": ledger.pending},
        status=200 if ready else 503,
    )


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(
        status=404,
        body=error_body(NOT_FOUND, f"Unknown request URL: {request.method} {request.path}."),
        content_type="application/json",
    )

"""Builds the aiohttp application: routes, stages and the resources they share.

Each resource starts and stops in a cleanup context of its own, so a graceful stop, or a
failed start, always closes what had started and flushes the ledger. `Runtime` applies a
reloaded config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.access.keyset import with_api_keys
from gateway.access.store import StoredKey, make_key_store
from gateway.access.sync import KeySync
from gateway.batches.store import make_batch_store
from gateway.batches.watcher import BatchWatcher
from gateway.config.loader import GatewayConfig
from gateway.errors import NOT_FOUND, error_body
from gateway.export.exporter import Exporter, make_exporters
from gateway.ledger.object_store import ObjectStore, make_object_store
from gateway.ledger.sealer import RollupSealer
from gateway.ledger.storage import make_ledger
from gateway.ledger.writer import LedgerWriter
from gateway.limits.admission import Limiter
from gateway.limits.rebuild import window_usage
from gateway.limits.redis import RedisStore
from gateway.limits.store import Usage
from gateway.notify.notifier import Notifier
from gateway.notify.outbox import make_outbox
from gateway.pipeline.handler import Pipeline
from gateway.sessions.relay import Sessions, is_upgrade
from gateway.upstream.forward import UpstreamClient
from gateway.web.api import UsageApi
from gateway.web.keys_api import KeysApi
from gateway.web.metrics import GatewayCollector, metrics_handler
from gateway.web.portal_api import PortalApi
from gateway.web.security import security_headers

log = logging.getLogger("gateway")

CONFIG = web.AppKey("config", GatewayConfig)
LEDGER = web.AppKey("ledger", LedgerWriter)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
HANDLER = web.AppKey("handler", Pipeline)
LIMITER = web.AppKey("limiter", Limiter)
OBJECTS = web.AppKey("objects", ObjectStore)
READY = web.AppKey("ready", asyncio.Event)


class Runtime:
    """What a reload or a change of the API's keys changes, applied in one place: the upstream
    pool (when its settings changed; calls under way keep the old pool until they end), then
    the pipeline's keys (the file's with the API's merged in), limits and prices."""

    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self.config = config  # the file's
        self.pipeline = pipeline
        self.api_keys: list[StoredKey] = []

    def use_api_keys(self, keys: list[StoredKey]) -> None:
        self.api_keys = keys
        self.pipeline.reconfigure(*with_api_keys(self.config, keys))

    async def apply(self, config: GatewayConfig) -> None:
        pipeline = self.pipeline
        if config.upstream != self.config.upstream:
            old = pipeline.upstream
            fresh = UpstreamClient(config)
            await fresh.start()
            pipeline.upstream = fresh
            asyncio.get_running_loop().call_later(
                config.shutdown_grace_s + config.upstream.timeout_s,
                lambda: asyncio.ensure_future(old.close()),
            )
        self.config = config
        pipeline.reconfigure(*with_api_keys(config, self.api_keys))


RUNTIME = web.AppKey("runtime", Runtime)
KEY_SYNC = web.AppKey("key_sync", KeySync)
NOTIFIER = web.AppKey("notifier", Notifier)
SESSIONS = web.AppKey("sessions", Sessions)
BATCHES = web.AppKey("batches", BatchWatcher)
SEALER = web.AppKey("sealer", RollupSealer)
EXPORTERS = web.AppKey("exporters", list[Exporter])


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
    app[SEALER] = RollupSealer(config.storage)
    runtime = app[RUNTIME] = Runtime(config, handler)
    key_sync = app[KEY_SYNC] = KeySync(make_key_store(config.storage), runtime.use_api_keys)
    ledger.on_flush.append(handler.call_log.flush)  # call log lines go out on the same beat
    app.cleanup_ctx.extend(RESOURCES)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    usage_api = UsageApi(
        lambda: handler.config, limiter, ledger.flush, ledger.reader, lambda: handler.authenticator
    )
    app.router.add_routes(usage_api.routes())
    app.router.add_routes(KeysApi(usage_api, lambda: runtime.config, key_sync).routes())
    app.router.add_routes(PortalApi(usage_api).routes())
    notifier = app[NOTIFIER] = Notifier(
        lambda: handler.config, limiter, make_outbox(config.storage)
    )
    sessions = app[SESSIONS] = Sessions(handler)
    app[EXPORTERS] = make_exporters(config)
    collector = GatewayCollector(
        handler.stats, lambda: handler.config, limiter, ledger, lambda: handler.in_flight, notifier,
        sessions.totals, app[EXPORTERS],
    )  # fmt: skip
    app.router.add_get("/metrics", metrics_handler(collector))
    app.router.add_get("/portal", _to_portal)
    app.router.add_get("/portal/", _portal_index)
    app.router.add_static("/portal/", STATIC_DIR)
    batch_store = make_batch_store(config.storage)
    handler.batches = app[BATCHES] = BatchWatcher(
        handler, batch_store, config.batches.poll_interval_s
    )

    async def sockets_or_calls(request: web.Request) -> web.StreamResponse:
        if is_upgrade(request):
            return await sessions.handle(request)
        return await handler.handle(request)

    app.router.add_get("/v1/realtime", sockets_or_calls)
    app.router.add_get("/v1/responses", sockets_or_calls)
    app.router.add_route("*", "/v1/{tail:.*}", handler.handle)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def make_limiter(config: GatewayConfig) -> Limiter:
    """Limits in this process, or shared by every replica through Redis."""
    if config.limits_backend.backend == "redis":
        return Limiter(config, RedisStore)
    return Limiter(config)


# One cleanup context per resource, started in this order and closed in the reverse one:
# when one fails to start, the ones already started are still closed (the ledger flushed).
async def _call_log(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[HANDLER].call_log.flush()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    await app[LEDGER].open()
    yield
    await app[LEDGER].close()


async def _rollups(app: web.Application) -> AsyncIterator[None]:
    await app[SEALER].start()  # after the ledger: its tables are in the ledger's schema
    yield
    await app[SEALER].close()


async def _object_store(app: web.Application) -> AsyncIterator[None]:
    await app[OBJECTS].open()  # after the ledger: its table is in the ledger's schema
    yield
    await app[OBJECTS].close()


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    limiter, ledger = app[LIMITER], app[LEDGER]

    async def usage() -> Usage:
        await ledger.flush()
        return await window_usage(limiter, ledger.reader)

    await limiter.start(usage)
    yield
    await limiter.close()


async def _api_keys(app: web.Application) -> AsyncIterator[None]:
    sync = app[KEY_SYNC]
    await sync.store.open()  # after the ledger: its table is in the ledger's schema
    try:
        await sync.start()
        yield
    finally:
        await sync.close()
        await sync.store.close()


async def _notifications(app: web.Application) -> AsyncIterator[None]:
    notifier = app[NOTIFIER]
    await notifier.outbox.open()  # after the limits: budget alerts read their windows
    await notifier.start()
    try:
        yield
    finally:
        await notifier.close()
        await notifier.outbox.close()


async def _batches(app: web.Application) -> AsyncIterator[None]:
    watcher = app[BATCHES]
    await watcher.store.open()  # after the ledger: its table is in the ledger's schema
    await watcher.start()
    try:
        yield
    finally:
        await watcher.close()
        await watcher.store.close()


async def _exports(app: web.Application) -> AsyncIterator[None]:
    exporters = app[EXPORTERS]
    if exporters:
        await exporters[0].store.open()  # after the ledger: its tables are in its schema
    try:
        for exporter in exporters:
            await exporter.start()
        yield
    finally:
        for exporter in exporters:
            await exporter.close()
        if exporters:
            await exporters[0].store.close()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    await app[UPSTREAM].start()
    yield
    await app[SESSIONS].close()  # each open session's sockets, then its client
    await app[HANDLER].upstream.close()  # the pool in use now: a reload may have replaced it


async def _readiness(app: web.Application) -> AsyncIterator[None]:
    app[READY].set()
    yield
    app[READY].clear()


RESOURCES = (
    _call_log, _ledger, _rollups, _object_store, _api_keys, _limiter, _notifications, _upstream,
    _batches, _exports, _readiness,
)  # fmt: skip


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

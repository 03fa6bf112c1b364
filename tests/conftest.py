"""Real parts for every test: the fake upstream and the gateway on 127.0.0.1 sockets, a real
SQLite ledger in a temp dir, and the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import HANDLER, LEDGER, build_app
from gateway.config.loader import GatewayConfig, load_config
from gateway.devtools.fake_http import FakeState
from gateway.devtools.fake_upstream import build_fake_app
from gateway.front.server import GatewayServer
from gateway.server import KEEPALIVE_TIMEOUT_S
from tests.services import PostgresServer

# The compiled price database goes to a folder of this run's, not the user's ~/.cache.
os.environ.setdefault("GATEWAY_CACHE_DIR", tempfile.mkdtemp(prefix="gateway-cache-"))

UPSTREAM_KEY = "sk-upstream-real-key-never-leaks-0123456789"
RESEARCH_KEY = "mgw-test-research-secret"
PRODUCT_KEY = "mgw-test-product-secret"
EXPIRED_KEY = "mgw-test-expired-secret"
SOON_KEY = "mgw-test-soon-secret"


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Fake:
    server: TestServer
    state: FakeState

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))


@dataclass
class Gateway:
    server: GatewayServer
    app: web.Application
    config: GatewayConfig
    ledger_path: Path
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    def client(self, key: str = RESEARCH_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)
        self.clients.append(client)
        return client

    async def rows(self) -> list[dict[str, Any]]:
        """Every ledger row, once calls still finishing have recorded theirs."""
        handler = self.app[HANDLER]
        for _ in range(500):
            if handler.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        await self.app[LEDGER].flush()
        with sqlite3.connect(self.ledger_path) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY started_at")]

    async def row(self, request_id: str) -> dict[str, Any]:
        rows = [r for r in await self.rows() if r["request_id"] == request_id]
        assert len(rows) == 1, f"expected one ledger row for {request_id}, found {len(rows)}"
        return rows[0]


@pytest.fixture(autouse=True)
def _upstream_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", UPSTREAM_KEY)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package) on 127.0.0.1, shared by the session's tests;
    each test takes a database of its own (`PostgresServer.new_database`)."""
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    state = FakeState(deterministic=True)
    server = TestServer(build_fake_app(state), host="127.0.0.1")
    await server.start_server()
    yield Fake(server=server, state=state)
    await server.close()


SOON_EXPIRY = datetime.now(UTC).date() + timedelta(days=3)
DEFAULT_TEAMS = f"""
  research:
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
      - id: research-old
        sha256: {sha(EXPIRED_KEY)}
        expires: 2020-01-31
      - id: research-soon
        sha256: {sha(SOON_KEY)}
        expires: {SOON_EXPIRY.isoformat()}
  product:
    models: [gpt-4o-mini, text-embedding-3-small]
    endpoints: [/v1/chat/completions, /v1/embeddings]
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""

PRICING = """
  currency: USD
  source: test prices
  transfer_per_mb: 0.0
  per_request: 0.0
  models:
    gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}
    text-embedding-3-small: {input: 0.02}
"""

GatewayFactory = Callable[..., Awaitable[Gateway]]
STORAGE_LINE = "\n" + " " * 18  # a line of the `storage:` block below, before dedent


@pytest.fixture
async def make_gateway(tmp_path: Path, fake: Fake) -> AsyncIterator[GatewayFactory]:
    servers: list[GatewayServer] = []
    gateways: list[Gateway] = []

    async def start(
        teams: str = DEFAULT_TEAMS,
        upstream_url: str | None = None,
        extra_yaml: str = "",
        timeout_s: float = 5,
        max_request_body: str = "64MB",
        renew_warning_days: int = 7,
        ledger_path: Path | None = None,
        body_timeout_s: float = 60,
        pricing: str | None = PRICING,  # None: no `pricing` key, the builtin price database
        storage_extra: tuple[str, ...] = (),  # more `storage:` settings: `backend: postgres`
    ) -> Gateway:
        ledger_path = ledger_path or tmp_path / f"ledger-{len(servers)}.sqlite3"
        config_path = tmp_path / f"gateway-{len(servers)}.yaml"
        config_path.write_text(
            textwrap.dedent(
                f"""\
                listen: {{host: 127.0.0.1, port: 8787, max_request_body: {max_request_body},
                          body_timeout_s: {body_timeout_s}}}
                upstream:
                  base_url: {upstream_url or fake.base_url}
                  api_key_env: TEST_UPSTREAM_KEY
                  forward_headers: ["x-fake-*"]
                  connect_timeout_s: 2
                  timeout_s: {timeout_s}
                storage:
                  sqlite_path: {ledger_path}
                  flush_interval_ms: 20
                  {STORAGE_LINE.join(storage_extra)}
                renew_warning_days: {renew_warning_days}
                """
            )
            + extra_yaml
            + ("pricing:" + pricing if pricing is not None else "")
            + "teams:"
            + teams
        )
        config = load_config(config_path)
        app = build_app(config)
        server = GatewayServer(app, app[HANDLER].handle, KEEPALIVE_TIMEOUT_S)
        await server.setup()
        await server.listen("127.0.0.1", 0)
        servers.append(server)
        gateways.append(Gateway(server=server, app=app, config=config, ledger_path=ledger_path))
        return gateways[-1]

    yield start
    for started in gateways:
        for client in started.clients:
            await client.close()
    for server in servers:
        await server.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def direct_client(fake: Fake) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key=UPSTREAM_KEY, max_retries=0)


@pytest.fixture
async def direct(fake: Fake) -> AsyncIterator[openai.AsyncOpenAI]:
    client = direct_client(fake)
    yield client
    await client.close()

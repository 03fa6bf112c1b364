"""Several replicas sharing their limits through a real Redis (Debian's redis-server on
127.0.0.1): exact limits across processes, quotas that survive restarts, and the outage
policy, with the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest
import redis.asyncio as redis_client
import yaml

from gateway.config.loader import load_config
from gateway.limits import redis as redis_limits
from gateway.limits.redis_client import RedisAddress
from tests.conftest import RESEARCH_KEY, GatewayFactory, sha
from tests.processes import free_port, start_gateway_process, stop_process
from tests.services import PostgresServer, RedisServer

UPSTREAM_KEY = "sk-scale-out-upstream"
REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
async def _empty_redis(redis_server: RedisServer) -> AsyncIterator[None]:
    async with redis_client.Redis.from_url(redis_server.url) as client:
        await client.flushall()
    yield


class Replicas:
    """A fake upstream and N `serve` processes with one config, sharing Redis."""

    def __init__(
        self, tmp_path: Path, redis_url: str, pg_dsn: str, team_limits: str, count: int = 3
    ) -> None:
        self.tmp_path = tmp_path
        self.env = {**os.environ, "SO_UPSTREAM_KEY": UPSTREAM_KEY,
                    "FAKE_UPSTREAM_KEY": UPSTREAM_KEY, "SO_PG_DSN": pg_dsn}  # fmt: skip
        fake_port = free_port()
        self.fake = self._start("fake", ["fake-upstream", "--port", str(fake_port)], fake_port)
        self.ports = [free_port() for _ in range(count)]
        self.request_ids: list[str] = []
        self.processes: list[subprocess.Popen] = []
        for index, port in enumerate(self.ports):
            config = tmp_path / f"replica-{index}.yaml"
            config.write_text(
                textwrap.dedent(
                    f"""\
                    listen: {{host: 127.0.0.1, port: {port}}}
                    upstream:
                      base_url: http://127.0.0.1:{fake_port}/v1
                      api_key_env: SO_UPSTREAM_KEY
                      forward_headers: ["x-fake-*"]
                    storage: {{backend: postgres, dsn_env: SO_PG_DSN, flush_interval_ms: 50}}
                    limits: {{backend: redis, redis_url: "{redis_url}"}}
                    pricing: {{models: {{gpt-4o-mini: {{input: 0.15, output: 0.60}}}}}}
                    teams:
                      research:
                        limits: {team_limits}
                        keys:
                          - id: research-dev
                            sha256: {sha(RESEARCH_KEY)}
                    """
                )
            )
            self.processes.append(self._serve(index))

    def _serve(self, index: int) -> subprocess.Popen:
        args = ["serve", "--config", str(self.tmp_path / f"replica-{index}.yaml")]
        return self._start(f"replica-{index}", args, self.ports[index])

    def _start(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        return start_gateway_process(args, port, self.env, self.tmp_path / f"{name}.log")

    def restart(self, index: int) -> None:
        stop_process(self.processes[index])
        self.processes[index] = self._serve(index)

    def client(self, index: int) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.ports[index]}/v1",
            api_key=RESEARCH_KEY,
            max_retries=0,
        )

    async def call(self, index: int) -> int:
        """One chat call through replica `index`; its HTTP status."""
        async with self.client(index) as client:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MESSAGES
                )
            except openai.APIStatusError as exc:
                self.request_ids.append(exc.response.headers["x-gateway-request-id"])
                return exc.status_code
        self.request_ids.append(raw.headers["x-gateway-request-id"])
        return 200

    def stop(self) -> None:
        for process in [*self.processes, self.fake]:
            stop_process(process)

    async def ledger(self) -> list[tuple[int, str, str]]:
        """(status, outcome, request_id) of every row in the shared Postgres ledger."""
        connection = await asyncpg.connect(self.env["SO_PG_DSN"])
        try:
            rows = await connection.fetch("SELECT status, outcome, request_id FROM requests")
        finally:
            await connection.close()
        return [tuple(row) for row in rows]


@pytest.fixture
def replicas(
    tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer
) -> Iterator[object]:
    """Starts three replicas on the shared Redis and a new Postgres database."""
    started: list[Replicas] = []
    with postgres_server.new_database() as dsn:

        def start(team_limits: str) -> Replicas:
            started.append(Replicas(tmp_path, redis_server.url, dsn, team_limits))
            return started[-1]

        yield start
        for stack in started:
            stack.stop()


async def test_three_replicas_let_exactly_the_per_minute_limit_through(replicas) -> None:
    stack = replicas("{requests_per_minute: 30}")
    # 90 calls at once, 30 to each replica: the team's 30 per minute hold across all three.
    statuses = await asyncio.gather(*(stack.call(i % 3) for i in range(90)))
    assert Counter(statuses) == {200: 30, 429: 60}
    stack.stop()  # SIGTERM: each replica flushes what it still holds
    rows = await stack.ledger()
    assert sorted(request_id for _, _, request_id in rows) == sorted(stack.request_ids)
    assert Counter((status, outcome) for status, outcome, _ in rows) == {
        (200, "ok"): 30,
        (429, "rejected"): 60,
    }


async def test_a_daily_quota_survives_restarting_any_replica(replicas) -> None:
    stack = replicas("{requests_per_day: 10}")
    assert [await stack.call(0) for _ in range(4)] == [200] * 4
    assert [await stack.call(1) for _ in range(3)] == [200] * 3
    stack.restart(0)
    stack.restart(2)
    assert [await stack.call(2) for _ in range(5)] == [200, 200, 200, 429, 429]
    assert await stack.call(0) == 429
    assert await stack.call(1) == 429
    stack.stop()
    rows = await stack.ledger()
    assert len(rows) == 4 + 3 + 5 + 2 == len(stack.request_ids)
    assert Counter(status for status, _, _ in rows) == {200: 10, 429: 4}


async def test_quotas_come_back_from_the_shared_ledger_when_redis_restarts_empty(
    replicas, redis_server: RedisServer
) -> None:
    stack = replicas("{requests_per_day: 10}")
    assert [await stack.call(i % 3) for i in range(6)] == [200] * 6
    await asyncio.sleep(0.2)  # the rows reach Postgres (flushed every 50 ms)
    redis_server.restart()  # same port, empty: the counters are gone
    await asyncio.sleep(1.2)  # each replica tries Redis again after its pause
    statuses = [await stack.call(i % 3) for i in range(6)]
    assert statuses == [200] * 4 + [429] * 2


async def test_max_concurrent_holds_across_replicas(replicas) -> None:
    stack = replicas("{max_concurrent: 2}")

    async def slow_call(index: int) -> int:
        async with stack.client(index) as client:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,
                    extra_headers={"x-fake-fault": "latency_ms=1000"},
                )
            except openai.APIStatusError as exc:
                return exc.status_code
        return 200

    statuses = await asyncio.gather(*(slow_call(i % 3) for i in range(6)))
    assert Counter(statuses) == {200: 2, 429: 4}
    # The slots were given back when the calls ended, on whichever replica they ran.
    assert Counter(await asyncio.gather(*(slow_call(i) for i in (1, 2)))) == {200: 2}


# ------------------------------------------------------------ in-process replicas


def shared_limits(url: str, policy: str = "fail_closed") -> str:
    return f'limits: {{backend: redis, redis_url: "{url}", on_backend_error: {policy}}}\n'


def teams(limits: str) -> str:
    return f"""
  research:
    limits: {limits}
    keys:
      - id: research-dev
        sha256: {sha(RESEARCH_KEY)}
"""


async def chat(gateway) -> openai.types.chat.ChatCompletion:
    return await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_rate_headers_show_what_every_replica_used(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    shared = shared_limits(redis_server.url)
    limits = "{requests_per_minute: 30, requests_per_day: 100}"
    first = await make_gateway(teams=teams(limits), extra_yaml=shared)
    second = await make_gateway(teams=teams(limits), extra_yaml=shared)
    for _ in range(5):
        await chat(first)
    raw = await second.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "30"
    assert raw.headers["x-ratelimit-remaining-requests"] == "24"
    # /gateway/me on the first replica asks Redis, so it counts the call the second made.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            str(first.server.make_url("/gateway/me")),
            headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
        ) as response,
    ):
        limits = (await response.json())["limits"]
    assert limits["requests_per_day"] == {
        "limit": 100,
        "used": 6,
        "remaining": 94,
        "resets_at": limits["requests_per_day"]["resets_at"],
    }


async def test_a_batch_billed_when_it_ends_is_counted_in_redis(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    from tests.test_batches import BATCH_COST, INPUT, OUTPUT, batch_rows, create_batch

    gateway = await make_gateway(
        teams=teams("{tokens_per_day: 100000, spend_per_day_usd: 10}"),
        extra_yaml=shared_limits(redis_server.url) + "batches: {poll_interval_s: 0.1}\n",
    )
    async with redis_client.Redis.from_url(redis_server.url) as client:
        await client.flushdb()  # the counters of earlier tests gone
    await create_batch(gateway)
    (row,) = await batch_rows(gateway)
    await asyncio.sleep(0.1)  # the charge is sent just after the row
    async with redis_client.Redis.from_url(redis_server.url) as client:
        tokens_key = (await client.keys("mgw:team:research:tokens_per_day:*"))[0]
        spend_key = (await client.keys("mgw:team:research:spend_per_day_nanousd:*"))[0]
        assert int(await client.get(tokens_key)) == INPUT + OUTPUT
        assert int(await client.get(spend_key)) == row["cost_nanousd"] == BATCH_COST
        assert 0 < await client.ttl(spend_key) <= 2 * 86_400


async def test_quotas_settle_to_the_tokens_and_cost_really_used(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = await make_gateway(
        teams=teams("{tokens_per_day: 100000, spend_per_day_usd: 10}"),
        extra_yaml=shared_limits(redis_server.url),
    )
    await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=500
    )
    (row,) = await gateway.rows()
    await asyncio.sleep(0.1)  # the settle runs just after the row is appended
    async with redis_client.Redis.from_url(redis_server.url) as client:
        tokens_key = (await client.keys("mgw:team:research:tokens_per_day:*"))[0]
        spend_key = (await client.keys("mgw:team:research:spend_per_day_nanousd:*"))[0]
        assert int(await client.get(tokens_key)) == row["input_tokens"] + row["output_tokens"]
        assert int(await client.get(spend_key)) == row["cost_nanousd"] > 0
        # The counter expires an hour after its day ends, not before.
        assert 3600 < await client.ttl(tokens_key) <= 86400 + 3600 + 3600


async def test_fail_closed_refuses_with_503_while_redis_is_down_and_recovers(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        gateway = await make_gateway(
            teams=teams("{requests_per_day: 100}"), extra_yaml=shared_limits(server.url)
        )
        await chat(gateway)
        server.kill()
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as refused:
                await chat(gateway)
            assert refused.value.status_code == 503
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body == {
                "message": "The gateway cannot reach its limits backend, so it cannot check "
                "this call's limits; the call was not forwarded. Please retry shortly.",
                "type": "server_error",
                "param": None,
                "code": "limits_unavailable",
            }
        metrics = await _metrics(gateway)
        assert "gateway_limits_backend_up 0.0" in metrics
        assert "gateway_limits_backend_refused_total 3.0" in metrics
        outage_logs = [r for r in caplog.records if "limits backend unreachable" in r.message]
        assert len(outage_logs) == 1

        server.restart()
        await asyncio.sleep(1.1)  # the pause before Redis is tried again
        await chat(gateway)
        assert "gateway_limits_backend_up 1.0" in await _metrics(gateway)
        assert any("limits backend reachable again" in r.message for r in caplog.records)
        rows = await gateway.rows()
        assert [(r["status"], r["outcome"], r["error_code"]) for r in rows] == [
            (200, "ok", None),
            *[(503, "rejected", "limits_unavailable")] * 3,
            (200, "ok", None),
        ]
    finally:
        server.stop()


async def test_fail_open_lets_calls_through_unlimited_while_redis_is_down(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        gateway = await make_gateway(
            teams=teams("{requests_per_day: 1}"),
            extra_yaml=shared_limits(server.url, "fail_open"),
        )
        await chat(gateway)
        with pytest.raises(openai.RateLimitError):
            await chat(gateway)
        server.kill()
        for _ in range(2):
            await chat(gateway)
        metrics = await _metrics(gateway)
        assert "gateway_limits_backend_up 0.0" in metrics
        assert "gateway_limits_backend_let_through_total 2.0" in metrics
        # Back: the day's counter was lost with Redis's memory; the quota starts again from
        # what this replica's ledger says was used today (1 call admitted, 2 let through).
        server.restart()
        await asyncio.sleep(1.1)
        with pytest.raises(openai.RateLimitError):
            await chat(gateway)
    finally:
        server.stop()


async def _metrics(gateway) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(str(gateway.server.make_url("/metrics"))) as response,
    ):
        return await response.text()


async def test_a_slot_is_held_while_its_call_runs_and_freed_when_its_replica_dies(
    make_gateway: GatewayFactory, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_limits, "LEASE_S", 1)
    shared = shared_limits(redis_server.url)
    first = await make_gateway(teams=teams("{max_concurrent: 1}"), extra_yaml=shared)
    second = await make_gateway(teams=teams("{max_concurrent: 1}"), extra_yaml=shared)
    # A call longer than the lease keeps its slot: its replica renews the lease meanwhile.
    slow = asyncio.create_task(
        first.client().chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-fake-fault": "latency_ms=2500"},
        )
    )
    await asyncio.sleep(2)
    with pytest.raises(openai.RateLimitError, match="Too many concurrent requests"):
        await chat(second)
    await slow
    await asyncio.sleep(0.1)  # its settle frees the slot
    await chat(second)
    # A lease left by a replica that died mid-call runs out on its own.
    async with redis_client.Redis.from_url(redis_server.url) as client:
        (seconds, micros) = await client.time()  # a lease that runs out in exactly 1 s
        expiry = seconds + micros / 1_000_000 + 1
        await client.zadd("mgw:team:research:max_concurrent", {"dead-replica-call": expiry})
        with pytest.raises(openai.RateLimitError):
            await chat(second)
        await asyncio.sleep(1.2)
        await chat(second)


def test_the_replicas_compose_file_shares_redis_and_postgres(tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.replicas.yml").read_text())
    services = compose["services"]
    gateways = [name for name in services if name.startswith("gateway-")]
    assert len(gateways) == 3
    for name in gateways:
        service = services[name]
        assert service["networks"]["default"]["aliases"] == ["gateway"]
        assert set(service["depends_on"]) == {"redis", "postgres"}
        assert service["environment"]["GATEWAY_PG_DSN"].startswith("postgresql://gateway:")
    content = compose["configs"]["gateway_config"]["content"]
    content = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", content)  # compose's defaults
    pricing = REPO / "config" / "pricing.yaml"
    content = content.replace("/etc/metering-gateway/pricing.yaml", str(pricing))
    (tmp_path / "gateway.yaml").write_text(content)
    config = load_config(tmp_path / "gateway.yaml")
    assert config.storage.backend == "postgres"
    assert config.limits_backend.backend == "redis"
    assert config.limits_backend.redis_url == "redis://redis:6379/0"
    assert config.teams["app"].limits.requests_per_minute == 60


async def test_queued_calls_wait_for_a_slot_freed_on_another_replica(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    limits = "{max_concurrent: 1}\n    on_limit: queue\n    queue: {max_wait_s: 5}"
    replicas = [
        await make_gateway(teams=teams(limits), extra_yaml=shared_limits(redis_server.url))
        for _ in range(3)
    ]
    started = asyncio.get_running_loop().time()
    replies = await asyncio.gather(
        *(
            gateway.client().chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"x-fake-fault": "latency_ms=300"},
            )
            for gateway in replicas
        )
    )
    elapsed = asyncio.get_running_loop().time() - started
    assert [reply.http_response.status_code for reply in replies] == [200, 200, 200]
    assert elapsed >= 0.9  # one at a time, across three replicas
    rows = [row for gateway in replicas for row in await gateway.rows()]
    queued = sorted(row["queued_ms"] for row in rows)
    assert queued[0] < 100 and 250 < queued[1] < 500 and 550 < queued[2] < 900


async def test_a_password_protected_redis_and_a_wrong_password(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer.start(tmp_path / "redis", None, "--requirepass", "s3cret-pass")
    try:
        good = f"redis://:s3cret-pass@127.0.0.1:{server.port}/2"
        gateway = await make_gateway(
            teams=teams("{requests_per_day: 5}"), extra_yaml=shared_limits(good)
        )
        await chat(gateway)
        async with redis_client.Redis.from_url(good) as client:
            assert await client.keys("mgw:team:research:requests_per_day:*")  # in db 2

        wrong = f"redis://:not-the-password@127.0.0.1:{server.port}/0"
        refused = await make_gateway(
            teams=teams("{requests_per_day: 5}"), extra_yaml=shared_limits(wrong)
        )
        with pytest.raises(openai.APIStatusError) as error:
            await chat(refused)
        assert error.value.status_code == 503
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert "WRONGPASS" in logged
        assert "not-the-password" not in logged and "s3cret-pass" not in logged
    finally:
        server.stop()


def test_redis_urls() -> None:
    assert RedisAddress.parse("redis://127.0.0.1:6380/3") == RedisAddress(
        "127.0.0.1", 6380, 3, None, None, False
    )
    assert RedisAddress.parse("rediss://app:p%40ss@cache.internal") == RedisAddress(
        "cache.internal", 6379, 0, "app", "p@ss", True
    )
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        RedisAddress.parse("http://127.0.0.1:6379")


async def test_a_shadow_team_is_never_refused_even_while_redis_is_down(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    server = RedisServer.start(tmp_path / "redis")
    shadow = teams("{requests_per_day: 1}").replace(
        "    limits:", "    enforce: false\n    limits:"
    )
    gateway = await make_gateway(teams=shadow, extra_yaml=shared_limits(server.url))
    await chat(gateway)
    await chat(gateway)  # over the quota: let through, marked
    server.kill()
    await chat(gateway)  # limits unknown: let through, unmarked
    rows = await gateway.rows()
    assert [(r["status"], r["shadow_rejected_by"]) for r in rows] == [
        (200, None),
        (200, "requests_per_day"),
        (200, None),
    ]


async def test_a_call_the_upstream_never_answered_takes_nothing_from_the_shared_rates(
    make_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    closed = socket.socket()  # bound, never listening: every connection is refused
    closed.bind(("127.0.0.1", 0))
    gateway = await make_gateway(
        teams=teams("{requests_per_minute: 3, requests_per_day: 100}"),
        extra_yaml=shared_limits(redis_server.url),
        upstream_url=f"http://127.0.0.1:{closed.getsockname()[1]}/v1",
    )
    codes = []
    for _ in range(5):
        with pytest.raises(openai.APIStatusError) as caught:
            await chat(gateway)
        codes.append(caught.value.status_code)
    closed.close()
    assert codes == [502] * 5  # never 429: the settles gave the rate back in Redis
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            str(gateway.server.make_url("/gateway/me")),
            headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
        ) as response,
    ):
        limits = (await response.json())["limits"]
    assert limits["requests_per_minute"]["remaining"] == 3
    assert limits["requests_per_day"]["used"] == 5


async def _admin(port: int, method: str, path: str, body: object = None) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, f"http://127.0.0.1:{port}{path}", json=body,
            headers={"Authorization": f"Bearer {KEYS_ADMIN}"},
        ) as answer,
    ):  # fmt: skip
        assert answer.status < 300, await answer.text()
        return await answer.json()


async def _status(port: int, secret: str) -> tuple[int, str | None]:
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0
    ) as client:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIStatusError as exc:
            return exc.status_code, exc.code
    return 200, None


async def _me(port: int, secret: str) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{port}/gateway/me", headers={"Authorization": f"Bearer {secret}"}
        ) as answer,
    ):
        return await answer.json()


async def _within_2_s(port: int, secret: str, wanted: int) -> None:
    started = time.monotonic()
    while (seen := await _status(port, secret))[0] != wanted:
        assert time.monotonic() - started < 2.0, f"replica :{port} answers {seen}, not {wanted}"
        await asyncio.sleep(0.05)


KEYS_ADMIN = "mgw-scale-out-admin"


async def test_api_keys_and_their_limits_hold_across_replicas_on_postgres_and_redis(
    replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", KEYS_ADMIN)
    stack = replicas("{}")
    one, two, three = stack.ports
    created = await _admin(
        one, "POST", "/gateway/keys",
        {"team": "research", "id": "shared", "limits": {"requests_per_day": 3}},
    )  # fmt: skip
    secret = created["key"]
    for port in (two, three, one):  # each replica's first 200 is one of the key's 3 a day
        await _within_2_s(port, secret, 200)
    assert await _status(two, secret) == (429, "insufficient_quota")  # one count in Redis
    await _admin(three, "PATCH", "/gateway/keys/shared", {"limits": {"requests_per_day": 5}})
    for port in (one, two, three):  # the new limit in force everywhere (a read counts nothing)
        started = time.monotonic()
        while (await _me(port, secret))["limits"]["requests_per_day"]["limit"] != 5:
            assert time.monotonic() - started < 2.0, f"replica :{port} still has the old limit"
            await asyncio.sleep(0.05)
    assert await _status(one, secret) == (200, None)  # the 4th
    assert await _status(two, secret) == (200, None)
    assert await _status(three, secret) == (429, "insufficient_quota")
    await _admin(two, "DELETE", "/gateway/keys/shared")
    await _within_2_s(one, secret, 401)
    await _within_2_s(three, secret, 401)
    assert await _status(one, secret) == (401, "key_revoked")
    stack.restart(2)
    assert await _status(three, secret) == (401, "key_revoked")
    await asyncio.sleep(0.3)  # two flush intervals: every replica's rows are in Postgres
    rows = [row for row in await stack.ledger() if row[1] == "ok"]
    assert len(rows) == 5

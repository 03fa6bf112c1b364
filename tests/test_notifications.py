"""Key reminders and budget alerts to a local webhook receiver on a real socket: exactly one
`key_expiring` per key per day and one `key_expired`, each budget share once per window, the
same id on every retry, nothing twice after a restart, signed bodies, Slack's format, and a
receiver that hangs never slowing a proxied call."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gateway.app import NOTIFIER
from gateway.notify import notifier as notifier_module
from tests.conftest import DEFAULT_TEAMS, SOON_EXPIRY, Gateway, GatewayFactory

SECRET = "webhook-signing-secret"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]}


@dataclass
class Receiver:
    server: TestServer | None = None
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    fail_next: int = 0
    fail_each: int = 0  # the first attempts of each event at /json that fail
    hang: asyncio.Event | None = None  # answers wait for it
    attempts: Counter[bytes] = field(default_factory=Counter)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((request.path, dict(request.headers), body))
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500)
        if request.path == "/json" and self.fail_each:
            self.attempts[body] += 1
            if self.attempts[body] <= self.fail_each:
                return web.Response(status=503)
        return web.Response(status=204)

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def events(self, path: str = "/json") -> list[dict[str, Any]]:
        return [orjson.loads(body) for at, _, body in self.received if at == path]


@pytest.fixture
async def receiver():
    found = Receiver()
    app = web.Application()
    app.router.add_post("/{kind}", found.handle)
    found.server = TestServer(app, host="127.0.0.1")
    await found.server.start_server()
    yield found
    await found.server.close()


def notifications_yaml(receiver: Receiver, limits: str = "") -> str:
    return (
        "notifications:\n"
        "  check_interval_s: 3600\n"
        "  budget_thresholds: [0.5, 0.8, 1.0]\n"
        "  webhooks:\n"
        f"    - {{url: '{receiver.url('/json')}', secret_env: TEST_WEBHOOK_SECRET}}\n"
        f"    - {{url: '{receiver.url('/slack')}', format: slack, events: [key_expiring]}}\n"
    )


@pytest.fixture(autouse=True)
def _webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)


async def settle(gateway: Gateway, receiver: Receiver, count: int) -> None:
    """Deliver until the receiver has had `count` requests (5 s at most)."""
    notifier = gateway.app[NOTIFIER]
    deadline = time.monotonic() + 5
    while len(receiver.received) < count:
        assert time.monotonic() < deadline, f"{len(receiver.received)} of {count} received"
        await notifier.deliver_due()
        await asyncio.sleep(0.02)


async def test_each_key_reminder_is_sent_once_a_day_signed_and_in_slacks_format(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gateway = await make_gateway(extra_yaml=notifications_yaml(receiver))
    notifier = gateway.app[NOTIFIER]
    await settle(gateway, receiver, 3)  # research-soon: expiring (json, slack); research-old
    for _ in range(3):  # checks later the same day find nothing new
        assert await notifier.check() == 0
        await notifier.deliver_due()
    assert len(receiver.received) == 3
    events = receiver.events("/json")
    by_type = {event["type"]: event for event in events}
    assert sorted(by_type) == ["key_expired", "key_expiring"]
    expiring = by_type["key_expiring"]
    assert (expiring["team"], expiring["key_id"]) == ("research", "research-soon")
    assert expiring["data"] == {"expires": SOON_EXPIRY.isoformat(), "days_left": 3}
    assert expiring["id"].startswith("evt_") and expiring["created_at"].endswith("Z")
    assert by_type["key_expired"]["data"] == {"expires": "2020-01-31"}
    assert by_type["key_expired"]["key_id"] == "research-old"
    for path, headers, body in receiver.received:
        if path == "/json":
            expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["x-gateway-signature"] == expected
            assert headers["Content-Type"] == "application/json"
        else:
            assert "x-gateway-signature" not in headers
            text = orjson.loads(body)["text"]
            assert "`research-soon`" in text and "in 3 days" in text
    assert notifier.sent == 3 and notifier.failed == 0 and notifier.pending == 0
    async with ClientSession() as http, http.get(str(gateway.server.make_url("/metrics"))) as got:
        metrics = await got.text()
    assert "gateway_notifications_sent_total 3.0" in metrics
    assert "gateway_notifications_failed_total 0.0" in metrics
    assert "gateway_notifications_pending 0.0" in metrics


BUDGET_TEAMS = DEFAULT_TEAMS.replace(
    "  research:\n", "  research:\n    limits: {requests_per_day: 10}\n", 1
)


async def test_each_budget_share_is_sent_once_per_window(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gateway = await make_gateway(teams=BUDGET_TEAMS, extra_yaml=notifications_yaml(receiver))
    notifier = gateway.app[NOTIFIER]
    await settle(gateway, receiver, 3)  # the key reminders of the first check
    receiver.received.clear()
    client = gateway.client()
    for sent in range(1, 11):
        await client.chat.completions.create(**CHAT)
        await notifier.check()
        await notifier.deliver_due()
        shares = [
            e["data"]["threshold"] for e in receiver.events() if e["type"] == "budget_threshold"
        ]
        expected = [share for share in (0.5, 0.8, 1.0) if sent >= share * 10]
        assert shares == expected, sent
    [full] = [e for e in receiver.events() if e["data"].get("threshold") == 1.0]
    assert (full["team"], full["key_id"]) == ("research", None)
    assert full["data"]["limit"] == "requests_per_day"
    assert (full["data"]["used"], full["data"]["limit_value"]) == (10, 10)
    assert full["data"]["window_start"].endswith("T00:00:00Z")


async def test_a_receiver_outage_is_retried_with_the_same_id_and_nothing_twice_after_a_restart(
    make_gateway: GatewayFactory, receiver: Receiver, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier_module, "MAX_BACKOFF_S", 0.0)  # retry at once
    ledger = tmp_path / "shared.sqlite3"
    receiver.fail_each = 2  # the json hook's two events: two attempts fail, the third is taken
    first = await make_gateway(ledger_path=ledger, extra_yaml=notifications_yaml(receiver))
    await settle(first, receiver, 3 + 4)
    notifier = first.app[NOTIFIER]
    assert notifier.failed == 4 and notifier.sent == 3 and notifier.pending == 0
    ids = Counter(event["id"] for event in receiver.events())
    assert sorted(ids.values()) == [3, 3]  # two failures, then the delivery: the same id
    await first.server.close()

    second = await make_gateway(ledger_path=ledger, extra_yaml=notifications_yaml(receiver))
    await second.app[NOTIFIER].check()
    await second.app[NOTIFIER].deliver_due()
    await asyncio.sleep(0.2)
    assert len(receiver.received) == 7, "nothing sent again after the restart"


async def test_an_event_never_acknowledged_is_sent_after_a_restart(
    make_gateway: GatewayFactory, receiver: Receiver, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier_module, "MAX_BACKOFF_S", 0.0)
    ledger = tmp_path / "shared.sqlite3"
    receiver.fail_next = 10**6  # down
    first = await make_gateway(ledger_path=ledger, extra_yaml=notifications_yaml(receiver))
    await settle(first, receiver, 3)
    await first.server.close()
    failed_ids = {event["id"] for event in receiver.events()}
    receiver.received.clear()
    receiver.fail_next = 0  # back
    second = await make_gateway(ledger_path=ledger, extra_yaml=notifications_yaml(receiver))
    await settle(second, receiver, 3)
    await asyncio.sleep(0.2)
    await second.app[NOTIFIER].deliver_due()
    assert {event["id"] for event in receiver.events()} == failed_ids
    assert len(receiver.received) == 3


async def test_a_receiver_that_hangs_never_slows_a_proxied_call(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    receiver.hang = asyncio.Event()
    gateway = await make_gateway(extra_yaml=notifications_yaml(receiver))
    deadline = time.monotonic() + 5
    while not receiver.received:  # a delivery is under way, and hangs
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    client = gateway.client()
    started = time.monotonic()
    for _ in range(5):
        await client.chat.completions.create(**CHAT)
    assert time.monotonic() - started < 2.0
    assert len(await gateway.rows()) == 5
    assert gateway.app[NOTIFIER].sent == 0  # still waiting on the receiver
    receiver.hang.set()


async def test_the_outbox_on_postgres_sends_each_reminder_once_across_two_replicas(
    make_gateway: GatewayFactory, receiver: Receiver, postgres_server, monkeypatch
) -> None:
    with postgres_server.new_database() as dsn:
        monkeypatch.setenv("TEST_NOTIFY_PG_DSN", dsn)
        storage = ("backend: postgres", "dsn_env: TEST_NOTIFY_PG_DSN")
        one = await make_gateway(extra_yaml=notifications_yaml(receiver), storage_extra=storage)
        two = await make_gateway(extra_yaml=notifications_yaml(receiver), storage_extra=storage)
        for gateway in (one, two, one, two):  # both replicas check and deliver, twice
            await gateway.app[NOTIFIER].check()
            await gateway.app[NOTIFIER].deliver_due()
        await settle(one, receiver, 3)
        await asyncio.sleep(0.2)
        for gateway in (one, two):
            await gateway.app[NOTIFIER].deliver_due()
        assert len(receiver.received) == 3
        assert sorted(e["type"] for e in receiver.events()) == ["key_expired", "key_expiring"]
        assert one.app[NOTIFIER].pending == 0 and two.app[NOTIFIER].pending == 0
        await one.server.close()
        await two.server.close()

"""The local billing fakes themselves: strict where their services are, deduplicating as they
do, and their faults (real sockets, aiohttp's client)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.devtools.fake_billing import FakeBilling, build_fake_billing_app

STRIPE = {"Authorization": "Bearer sk_test_1"}
FORM = {"event_name": "llm_spend", "payload[stripe_customer_id]": "cus_1",
        "payload[value]": "25", "identifier": "spend:req_1"}  # fmt: skip


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeBilling, str, aiohttp.ClientSession]]:
    state = FakeBilling(api_keys={"stripe": "sk_test_1", "lago": "lago_1", "openmeter": None},
                        value_property="total_tokens", webhook_secret="s")  # fmt: skip
    server = TestServer(build_fake_billing_app(state), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield state, str(server.make_url("")).rstrip("/"), http
    await server.close()


async def test_stripe_stores_an_event_refuses_bad_fields_and_a_known_identifier(fake):
    state, url, http = fake
    events = f"{url}/v1/billing/meter_events"
    async with http.post(events, data=FORM, headers=STRIPE) as answer:
        assert answer.status == 200
        assert (await answer.json())["payload"] == {"stripe_customer_id": "cus_1", "value": "25"}
    for field, value, param in (("payload[value]", "1.5", "payload[value]"),
                                ("timestamp", str(int(time.time()) - 36 * 86400), "timestamp"),
                                ("payload[stripe_customer_id]", "acme", None)):  # fmt: skip
        bad = {**FORM, field: value, "identifier": f"other-{field}"}
        async with http.post(events, data=bad, headers=STRIPE) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"].get("param") == (param or field)
    async with http.post(events, data=FORM, headers=STRIPE) as answer:
        assert answer.status == 400 and answer.headers["Stripe-Should-Retry"] == "false"
        assert (await answer.json())["error"]["message"] == (
            "An event already exists with identifier spend:req_1."
        )
    async with http.post(events, data=FORM, headers={"Authorization": "Bearer sk_wrong"}) as a:
        assert a.status == 401 and "sk_wrong" not in await a.text()
    assert [(e.id, e.customer, e.value) for e in state.events("stripe")] == [
        ("spend:req_1", "cus_1", 25)
    ]


async def test_stripe_replays_an_idempotency_key_and_cancels_once(fake):
    state, url, http = fake
    headers = {**STRIPE, "Idempotency-Key": "k1"}
    async with http.post(f"{url}/v1/billing/meter_events", data=FORM, headers=headers) as first:
        body = await first.read()
    async with http.post(f"{url}/v1/billing/meter_events", data=FORM, headers=headers) as again:
        assert (again.status, await again.read()) == (200, body)
        assert again.headers["Idempotent-Replayed"] == "true"
    cancel = {"event_name": "llm_spend", "type": "cancel", "cancel[identifier]": "spend:req_1"}
    adjustments = f"{url}/v1/billing/meter_event_adjustments"
    async with http.post(adjustments, data=cancel, headers=STRIPE) as answer:
        assert answer.status == 200
    async with http.post(adjustments, data=cancel, headers=STRIPE) as answer:
        assert answer.status == 400 and "already" in (await answer.json())["error"]["message"]
    assert state.cancelled == ["spend:req_1"] and state.events("stripe") == []


async def test_openmeter_refuses_a_batch_with_one_bad_event_and_drops_known_ids(fake):
    state, url, http = fake
    good = {"specversion": "1.0", "id": "a", "source": "gw", "type": "t", "subject": "s",
            "time": "2026-12-02T10:00:00.250Z", "data": {"total_tokens": 12}}  # fmt: skip
    bad = {**good, "id": "b", "data": {"total_tokens": "12"}}
    batch = {"Content-Type": "application/cloudevents-batch+json"}
    async with http.post(f"{url}/api/v1/events", data=orjson.dumps([good, bad]),
                         headers=batch) as answer:  # fmt: skip
        assert answer.status == 400 and "event 1" in (await answer.json())["detail"]
    assert state.events("openmeter") == []
    for _ in range(2):
        async with http.post(f"{url}/api/v1/events", data=orjson.dumps([good]),
                             headers=batch) as answer:  # fmt: skip
            assert answer.status == 204
    (event,) = state.events("openmeter")
    assert (event.id, event.value, event.timestamp) == ("a", 12, 1796205600.25)


async def test_lago_refuses_the_whole_batch_naming_each_bad_index(fake):
    state, url, http = fake
    event = {"transaction_id": "t1", "external_subscription_id": "sub", "code": "c",
             "timestamp": 1796205600, "properties": {"total_tokens": 3}}  # fmt: skip
    headers = {"Authorization": "Bearer lago_1"}
    body = {"events": [event, {**event, "transaction_id": "t2", "properties": {}}, event]}
    async with http.post(f"{url}/api/v1/events/batch", json=body, headers=headers) as answer:
        assert answer.status == 422
        assert (await answer.json())["error_details"] == {
            "1": {"properties": ["invalid_value"]},
            "2": {"transaction_id": ["value_already_exist"]},
        }
    assert state.events("lago") == []
    async with http.post(f"{url}/api/v1/events/batch", json={"events": [event]},
                         headers=headers) as answer:  # fmt: skip
        assert answer.status == 200
    async with http.post(f"{url}/api/v1/events/batch", json={"events": [event]},
                         headers=headers) as answer:  # fmt: skip
        assert answer.status == 422
    assert [(e.id, e.customer, e.value) for e in state.events("lago")] == [("t1", "sub", 3)]


async def test_the_webhook_wants_its_signature_and_drops_known_ids(fake):
    import hashlib
    import hmac

    state, url, http = fake
    raw = orjson.dumps({"events": [{"id": "h1", "team": "t", "key_id": None, "model": None,
                                    "started_at": 1.5, "value": 2}]})  # fmt: skip
    signed = {"x-gateway-signature": hmac.new(b"s", raw, hashlib.sha256).hexdigest()}
    async with http.post(f"{url}/webhook", data=raw, headers={"x-gateway-signature": "0"}) as a:
        assert a.status == 401
    for received in (1, 0):
        async with http.post(f"{url}/webhook", data=raw, headers=signed) as answer:
            assert (await answer.json()) == {"received": received}
    assert [(e.id, e.value, e.timestamp) for e in state.events("webhook")] == [("h1", 2, 1.5)]


async def test_faults_outage_rate_limit_lost_answer_and_down(fake):
    state, url, http = fake
    state.outage("stripe", 1)
    state.rate_limit("stripe", 1, retry_after_s=1.5)
    state.lose_answers("stripe", 1)
    events = f"{url}/v1/billing/meter_events"
    async with http.post(events, data=FORM, headers=STRIPE) as answer:
        assert answer.status == 503
    async with http.post(events, data=FORM, headers=STRIPE) as answer:
        assert (answer.status, answer.headers["Retry-After"]) == (429, "2")
    with pytest.raises(aiohttp.ClientError):
        async with http.post(events, data=FORM, headers=STRIPE) as answer:
            await answer.read()
    assert [e.id for e in state.events("stripe")] == ["spend:req_1"]  # stored all the same
    state.down("webhook")
    async with http.post(f"{url}/webhook", data=b"{}") as answer:
        assert answer.status == 503
    state.up("webhook")
    async with http.post(f"{url}/webhook", data=b"{}") as answer:
        assert answer.status == 401  # up again: its own checks answer
    assert state.requests == [("stripe", 503), ("stripe", 429), ("stripe", 0),
                              ("webhook", 503), ("webhook", 401)]  # fmt: skip

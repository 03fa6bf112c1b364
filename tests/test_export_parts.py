"""The billing exports' parts: what each service is sent and what its answers mean, the
ledger's change sequence, and the exports' store (cursor, lease, fenced progress)."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import urllib.parse
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict

from gateway.config.loader import StorageConfig
from gateway.config.schema import ExportConfig
from gateway.export.services import (
    SIGNATURE_HEADER,
    Event,
    Lago,
    OpenMeter,
    Stripe,
    Webhook,
    rfc3339,
)
from gateway.export.store import SENT, DoneRow, make_export_store
from gateway.ledger.writer import CallRecord, Ledger

STARTED = 1_796_200_000.987654  # 2026-12-02T08:26:40.987654Z, a float start as in the ledger
EVENT = Event(
    id="spend:req_1", request_id="req_1", customer="cus_123", value=188_640, started_at=STARTED,
    team="research", key_id="research-dev", model="gpt-4o-mini",
)  # fmt: skip


def config(kind: str, **extra: object) -> ExportConfig:
    return ExportConfig(
        kind=kind, name="spend", event_name="llm_spend", customers={"research": "cus_123"}, **extra
    )  # type: ignore[arg-type]


def test_stripe_gets_one_form_encoded_meter_event_with_its_identifier_as_idempotency_key():
    outgoing = Stripe(config("stripe")).request([EVENT], "sk_test_abc")
    assert outgoing.url == "https://api.stripe.com/v1/billing/meter_events"
    assert outgoing.headers == {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": "Bearer sk_test_abc",
        "Idempotency-Key": "spend:req_1",
    }
    assert dict(urllib.parse.parse_qsl(outgoing.body.decode())) == {
        "event_name": "llm_spend",
        "payload[stripe_customer_id]": "cus_123",
        "payload[value]": "188640",
        "identifier": "spend:req_1",
        "timestamp": "1796200000",
    }


def test_stripe_answers_a_duplicate_identifier_is_delivered_other_400s_are_refusals():
    stripe = Stripe(config("stripe"))
    duplicate = orjson.dumps(
        {
            "error": {
                "type": "invalid_request_error",
                "message": "An event already exists with identifier x.",
            }
        }
    )
    assert stripe.answer(400, {}, duplicate, [EVENT]).delivered == {"spend:req_1"}
    no_customer = orjson.dumps({"error": {"message": "No such customer: 'cus_123'"}})
    assert stripe.answer(400, {}, no_customer, [EVENT]).refused == {
        "spend:req_1": "No such customer: 'cus_123'"
    }
    limited = stripe.answer(429, CIMultiDict({"Retry-After": "2"}), b"{}", [EVENT])
    assert (limited.outage, limited.retry_after_s, limited.delivered) == ("HTTP 429", 2.0, set())
    assert stripe.answer(401, {}, b"{}", [EVENT]).outage == "HTTP 401"  # a key problem: retried
    cancel = stripe.cancel("spend:req_1", "sk_test_abc")
    assert cancel.url.endswith("/v1/billing/meter_event_adjustments")
    assert dict(urllib.parse.parse_qsl(cancel.body.decode())) == {
        "event_name": "llm_spend", "type": "cancel", "cancel[identifier]": "spend:req_1",
    }  # fmt: skip
    assert cancel.headers["Idempotency-Key"] == "cancel:spend:req_1"


def test_openmeter_gets_a_cloudevents_batch_and_a_refused_batch_is_split():
    service = OpenMeter(config("openmeter", value="total_tokens", url="http://127.0.0.1:1"))
    outgoing = service.request([EVENT, EVENT], None)
    assert outgoing.url == "http://127.0.0.1:1/api/v1/events"
    assert outgoing.headers == {"Content-Type": "application/cloudevents-batch+json"}
    first = orjson.loads(outgoing.body)[0]
    assert first == {
        "specversion": "1.0", "id": "spend:req_1", "source": "metering-gateway",
        "type": "llm_spend", "subject": "cus_123", "time": rfc3339(STARTED),
        "data": {"total_tokens": 188_640, "model": "gpt-4o-mini"},
    }  # fmt: skip
    assert rfc3339(STARTED) == "2026-12-02T08:26:40.987Z"
    assert service.answer(400, {}, b"{}", [EVENT, EVENT]).split
    assert service.answer(204, {}, b"", [EVENT]).delivered == {"spend:req_1"}


def test_lago_422_tells_duplicates_refusals_and_the_events_refused_only_with_them():
    service = Lago(config("lago", value="input_tokens"))
    events = [
        EVENT,
        Event("spend:req_2", "req_2", "sub_1", 3, STARTED, "research", None, None),
        Event("spend:req_3", "req_3", "sub_1", 4, STARTED, "research", None, None),
    ]
    body = orjson.loads(service.request(events, "lago_key").body)
    assert body["events"][0] == {
        "transaction_id": "spend:req_1", "external_subscription_id": "cus_123",
        "code": "llm_spend", "timestamp": 1796200000,
        "properties": {"input_tokens": 188_640, "model": "gpt-4o-mini"},
    }  # fmt: skip
    answer = service.answer(422, {}, orjson.dumps({"status": 422, "error_details": {
        "0": {"transaction_id": ["value_already_exist"]},
        "2": {"external_subscription_id": ["value_is_mandatory"]},
    }}), events)  # fmt: skip
    assert answer.delivered == {"spend:req_1"}
    assert set(answer.refused) == {"spend:req_3"}
    assert [event.id for event in answer.resend] == ["spend:req_2"]
    assert service.answer(422, {}, b"not json", events).outage == "HTTP 422"


def test_a_webhook_body_is_signed_and_a_correction_names_the_event_it_corrects():
    service = Webhook(config("webhook", url="http://127.0.0.1:1/hook"), secret="s3cret")
    delta = Event("spend:req_1:7", "req_1", "research", -40, STARTED, "research", "k", "m",
                  adjusts="spend:req_1")  # fmt: skip
    outgoing = service.request([EVENT, delta], None)
    assert (
        outgoing.headers[SIGNATURE_HEADER]
        == hmac.new(b"s3cret", outgoing.body, hashlib.sha256).hexdigest()
    )
    events = orjson.loads(outgoing.body)["events"]
    assert events[0] == {
        "id": "spend:req_1",
        "team": "research",
        "key_id": "research-dev",
        "model": "gpt-4o-mini",
        "started_at": STARTED,
        "value": 188_640,
    }
    assert (events[1]["value"], events[1]["adjusts"]) == (-40, "spend:req_1")


async def test_every_ledger_commit_and_every_changed_reprice_row_moves_the_change_clock(
    tmp_path: Path,
):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, flush_interval_ms=60_000)
    await ledger.open()
    for batch in (["a", "b"], ["c"]):
        for request_id in batch:
            ledger.append(CallRecord(request_id, started_at=1.0, status=200))
        await ledger.flush()
    ledger.append(CallRecord("a", started_at=1.0, status=200, cost_nanousd=5))  # rewritten
    await ledger.flush()
    await ledger.close()
    with sqlite3.connect(path) as db:
        seqs = dict(db.execute("SELECT request_id, change_seq FROM requests"))
        (clock,) = db.execute("SELECT seq FROM change_clock").fetchone()
    assert seqs == {"a": 3, "b": 1, "c": 2}
    assert clock == 3


async def test_the_store_starts_a_new_export_after_the_rows_already_written_and_fences_progress(
    tmp_path: Path,
):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, flush_interval_ms=60_000)
    await ledger.open()
    ledger.append(CallRecord("old", started_at=1.0, status=200))
    await ledger.flush()
    store = make_export_store(StorageConfig(sqlite_path=path))
    await store.open()
    try:
        await store.ensure("spend", "stripe", 10.0)
        await store.ensure("spend", "stripe", 11.0)  # a second start changes nothing
        state = await store.state("spend")
        assert state is not None and state.cursor == (2, "")  # after change 1, the old row
        ledger.append(CallRecord("new", started_at=2.0, status=200))
        ledger.append(CallRecord("failed", started_at=2.0, status=500))
        await ledger.flush()
        assert [row.request_id for row in await store.rows_after(state.cursor, 10)] == ["new"]
        assert await store.lag(state.cursor, ["(no team)"]) == 0
        assert await store.lag(state.cursor, None) == 1

        assert await store.take_lease("spend", "one", now=20.0, until=50.0)
        assert not await store.take_lease("spend", "two", now=30.0, until=60.0)
        done = [DoneRow("new", "spend:new", 0, SENT, 31.0)]
        assert not await store.progress("spend", "two", done, (2, "new"), 1, 31.0, 61.0)
        assert (await store.state("spend")).cursor == (2, "")  # type: ignore[union-attr]
        assert await store.take_lease("spend", "two", now=51.0, until=90.0)  # "one" expired
        assert not await store.progress("spend", "one", done, (2, "new"), 1, 52.0, 80.0)
        assert await store.progress("spend", "two", done, (2, "new"), 1, 52.0, 90.0)
        state = await store.state("spend")
        assert state is not None and (state.cursor, state.delivered) == ((2, "new"), 1)
        assert await store.done("spend", ["new", "old"]) == {"new": done[0]}
        assert await store.rows_after(state.cursor, 10) == []
    finally:
        await store.close()
        await ledger.close()


@pytest.mark.parametrize("kind", ["stripe", "lago"])
def test_a_kind_that_needs_an_api_key_is_refused_without_one(kind: str, tmp_path: Path):
    from gateway.config.loader import ConfigError, parse_config

    text = (
        Path("config/gateway.yaml").read_text()
        + f"export:\n  - {{kind: {kind}, event_name: e, customers: {{research: c}}}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, tmp_path / "gateway.yaml")
    assert raised.value.problems[-1].endswith(f"a {kind} export needs api_key_env")

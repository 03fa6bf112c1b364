"""Local fakes of the billing systems the exports send to (SPEC "Billing export"): Stripe's v1
billing meter events (and their cancelling adjustments), OpenMeter's CloudEvents ingestion,
Lago's event batches and a webhook receiver, in one aiohttp application for the tests and
`demo`.

Each is strict about the fields its service documents (what the real one would refuse, this
one refuses, in the real one's error shape) and deduplicates on the idempotency id as the real
one does: Stripe answers a known `identifier` with 400 "An event already exists ..." and
replays an answer for a known `Idempotency-Key`; OpenMeter drops a known (source, id)
silently; Lago refuses the whole batch with `value_already_exist` at the index of a known
`transaction_id`; the webhook ignores a known event id. Faults model the outages an exporter
must live through: error answers, 429 with `Retry-After`, a service down, and an answer lost
after the events were stored.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

SERVICES = ("stripe", "openmeter", "lago", "webhook")
STRIPE_MAX_AGE_S = 35 * 86400
STRIPE_MAX_AHEAD_S = 300
LAGO_MAX_BATCH = 100
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_CLOUDEVENT_ATTRIBUTES = {"specversion", "id", "source", "type", "subject", "time", "data",
                          "datacontenttype", "dataschema"}  # fmt: skip


@dataclass
class Accepted:
    """One event a fake service stored."""

    service: str
    id: str  # the idempotency id
    customer: str
    name: str  # Stripe event_name / CloudEvent type / Lago code ("" for the webhook)
    value: int | None
    timestamp: float  # seconds since the epoch
    body: dict[str, Any]  # the event as received (Stripe: its form fields)


@dataclass
class FakeBilling:
    """What the fakes hold: keys they require, what they stored, what they answered."""

    api_keys: dict[str, str | None] = field(default_factory=dict)  # None: no auth
    value_property: str = "cost_nanousd"  # OpenMeter data / Lago properties key of the value
    webhook_secret: str | None = None
    accepted: list[Accepted] = field(default_factory=list)
    requests: list[tuple[str, int]] = field(default_factory=list)  # (service, status; 0: lost)
    cancelled: list[str] = field(default_factory=list)
    _faults: dict[str, list[tuple[str, int, float]]] = field(default_factory=dict)
    _down: set[str] = field(default_factory=set)
    _replays: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    _seen: set[tuple[str, ...]] = field(default_factory=set)

    def events(self, service: str) -> list[Accepted]:
        return [
            event for event in self.accepted
            if event.service == service
            and not (service == "stripe" and event.id in self.cancelled)
        ]  # fmt: skip

    def outage(self, service: str, count: int, status: int = 503) -> None:
        self._faults.setdefault(service, []).extend([("status", status, 0.0)] * count)

    def rate_limit(self, service: str, count: int, retry_after_s: float = 1) -> None:
        self._faults.setdefault(service, []).extend([("status", 429, retry_after_s)] * count)

    def lose_answers(self, service: str, count: int) -> None:
        self._faults.setdefault(service, []).extend([("lose", 0, 0.0)] * count)

    def down(self, service: str) -> None:
        self._down.add(service)

    def up(self, service: str) -> None:
        self._down.discard(service)

    def _next_fault(self, service: str) -> tuple[str, int, float] | None:
        if service in self._down:
            return ("status", 503, 0.0)
        queued = self._faults.get(service)
        return queued.pop(0) if queued else None

    def _known(self, *key: str) -> bool:
        """Is an event of this dedup key stored: (service, what the service dedups on)."""
        return key in self._seen

    def _keep(self, event: Accepted, *key: str) -> None:
        self.accepted.append(event)
        self._seen.add(key)


class Refused(Exception):
    """An answer in the service's own error shape."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


# ---------------------------------------------------------------- error shapes per service


def _stripe_error(status: int, message: str, param: str | None = None, **extra: str) -> Refused:
    error: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if param:
        error["param"] = param
    return Refused(status, {"error": error}, extra.get("headers"))  # type: ignore[arg-type]


def _problem(status: int, title: str, detail: str) -> Refused:
    return Refused(status, {"type": "about:blank", "title": title, "status": status,
                            "detail": detail})  # fmt: skip


def _fault_answer(service: str, status: int, retry_after_s: float) -> web.Response:
    headers = {"Retry-After": str(math.ceil(retry_after_s))} if status == 429 else {}
    if service == "stripe":
        kind = "rate_limit_error" if status == 429 else "api_error"
        body: dict[str, Any] = {"error": {"type": kind, "message": f"fake outage ({status})"}}
    elif service == "openmeter":
        body = {"type": "about:blank", "title": "Unavailable", "status": status,
                "detail": f"fake outage ({status})"}  # fmt: skip
    elif service == "lago":
        body = {"status": status, "error": "Too Many Requests" if status == 429 else "Unavailable"}
    else:
        body = {"error": f"fake outage ({status})"}
    return web.Response(status=status, body=orjson.dumps(body), headers=headers,
                        content_type="application/json")  # fmt: skip


# ---------------------------------------------------------------- the middleware


def _service_of(path: str) -> str | None:
    if path.startswith("/v1/billing/"):
        return "stripe"
    if path == "/api/v1/events":
        return "openmeter"
    if path.startswith("/api/v1/events/batch"):
        return "lago"
    if path == "/webhook":
        return "webhook"
    return None


@web.middleware
async def _faults_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    state: FakeBilling = request.app[STATE]
    service = _service_of(request.path)
    if service is None:
        return await handler(request)
    fault = state._next_fault(service)
    if fault is not None and fault[0] == "status":
        state.requests.append((service, fault[1]))
        return _fault_answer(service, fault[1], fault[2])
    try:
        response = await handler(request)
    except Refused as refused:
        response = web.Response(
            status=refused.status,
            body=orjson.dumps(refused.body),
            headers=refused.headers,
            content_type="application/json",
        )
    if fault is not None:  # processed, then the answer is lost
        state.requests.append((service, 0))
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the fake lost its answer")
    state.requests.append((service, response.status))
    return response


# ---------------------------------------------------------------- Stripe


def _bearer(request: web.Request, expected: str | None) -> bool:
    return expected is None or request.headers.get("Authorization") == f"Bearer {expected}"


async def _stripe(request: web.Request, operation: Any) -> web.Response:
    state: FakeBilling = request.app[STATE]
    if not _bearer(request, state.api_keys.get("stripe")):
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        raise _stripe_error(401, f"Invalid API Key provided: {given[:7]}*")
    if not request.content_type == "application/x-www-form-urlencoded":
        raise _stripe_error(400, "Invalid request: the body must be form-encoded")
    key = request.headers.get("Idempotency-Key")
    if key and key in state._replays:
        status, body = state._replays[key]
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})  # fmt: skip
    form = {name: str(value) for name, value in (await request.post()).items()}
    try:
        status, answer = 200, operation(state, form)
        headers: dict[str, str] = {}
    except Refused as refused:
        status, answer, headers = refused.status, refused.body, refused.headers
    body = orjson.dumps(answer)
    if key:
        state._replays[key] = (status, body)
    return web.Response(status=status, body=body, headers=headers,
                        content_type="application/json")  # fmt: skip


def _meter_event(state: FakeBilling, form: dict[str, str]) -> dict[str, Any]:
    allowed = {"event_name", "payload[stripe_customer_id]", "payload[value]", "identifier",
               "timestamp"}  # fmt: skip
    for name in form:
        if name not in allowed:
            raise _stripe_error(400, f"Received unknown parameter: {name}", name)
    event_name = form.get("event_name", "")
    if not 1 <= len(event_name) <= 100:
        raise _stripe_error(400, "Missing required param: event_name.", "event_name")
    customer = form.get("payload[stripe_customer_id]", "")
    if not customer.startswith("cus_"):
        raise _stripe_error(400, f"No such customer: '{customer}'", "payload[stripe_customer_id]")
    value = form.get("payload[value]", "")
    if not value.isdigit():
        raise _stripe_error(400, "Invalid payload value: must be a whole number.",
                            "payload[value]")  # fmt: skip
    identifier = form.get("identifier") or f"fake_{uuid.uuid4().hex}"
    if len(identifier) > 100:
        raise _stripe_error(400, "identifier: at most 100 characters", "identifier")
    now = time.time()
    timestamp = int(form.get("timestamp") or now) if form.get("timestamp", "0").isdigit() else -1
    if not now - STRIPE_MAX_AGE_S <= timestamp <= now + STRIPE_MAX_AHEAD_S:
        raise _stripe_error(400, "Timestamp must be within the past 35 calendar days or up to"
                            " 5 minutes in the future.", "timestamp")  # fmt: skip
    if state._known("stripe", identifier):
        raise _stripe_error(
            400,
            f"An event already exists with identifier {identifier}.",
            headers={"Stripe-Should-Retry": "false"},
        )  # type: ignore[arg-type]
    state._keep(Accepted("stripe", identifier, customer, event_name, int(value),
                                   float(timestamp), dict(form)), "stripe", identifier)  # fmt: skip
    return {"object": "billing.meter_event", "created": int(now), "event_name": event_name,
            "identifier": identifier, "livemode": False,
            "payload": {"stripe_customer_id": customer, "value": value},
            "timestamp": timestamp}  # fmt: skip


def _adjustment(state: FakeBilling, form: dict[str, str]) -> dict[str, Any]:
    event_name, identifier = form.get("event_name", ""), form.get("cancel[identifier]", "")
    if not event_name:
        raise _stripe_error(400, "Missing required param: event_name.", "event_name")
    if form.get("type") != "cancel":
        raise _stripe_error(400, "type: must be cancel", "type")
    stored = [e for e in state.accepted if e.service == "stripe" and e.id == identifier
              and e.name == event_name]  # fmt: skip
    if not stored:
        raise _stripe_error(400, f"No meter event with identifier {identifier}.",
                            "cancel[identifier]")  # fmt: skip
    if identifier in state.cancelled:
        raise _stripe_error(400, f"The meter event {identifier} is already canceled.")
    state.cancelled.append(identifier)
    return {
        "object": "billing.meter_event_adjustment",
        "livemode": False,
        "status": "pending",
        "event_name": event_name,
        "type": "cancel",
        "cancel": {"identifier": identifier},
    }


async def _stripe_events(request: web.Request) -> web.Response:
    return await _stripe(request, _meter_event)


async def _stripe_adjustments(request: web.Request) -> web.Response:
    return await _stripe(request, _adjustment)


# ---------------------------------------------------------------- OpenMeter


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cloudevent_problem(event: object, value_property: str) -> str | None:
    if not isinstance(event, dict):
        return "an event must be an object"
    if event.get("specversion") != "1.0":
        return "specversion must be 1.0"
    for name in ("id", "source", "type", "subject"):
        if not isinstance(event.get(name), str) or not event[name]:
            return f"{name} is required"
    for name in event:
        if name not in _CLOUDEVENT_ATTRIBUTES and not _EXTENSION_NAME.match(name):
            return f"{name} is not a CloudEvents attribute name"
    if "time" in event:
        try:
            datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
        except ValueError:
            return "time must be RFC 3339"
    data = event.get("data")
    if not isinstance(data, dict) or not _integer(data.get(value_property)):
        return f"data.{value_property} must be an integer (the meter's value property)"
    return None


async def _openmeter(request: web.Request) -> web.Response:
    state: FakeBilling = request.app[STATE]
    if not _bearer(request, state.api_keys.get("openmeter")):
        raise _problem(401, "Unauthorized", "a valid API token is required")
    raw = await request.read()
    if request.content_type == "application/cloudevents-batch+json":
        events = _loads(raw)
        if not isinstance(events, list):
            raise _problem(400, "Bad Request", "a batch must be a JSON array of events")
    elif request.content_type == "application/cloudevents+json":
        events = [_loads(raw)]
    else:
        raise _problem(415, "Unsupported Media Type", "send application/cloudevents+json")
    for index, event in enumerate(events):
        problem = _cloudevent_problem(event, state.value_property)
        if problem is not None:
            raise _problem(400, "Bad Request", f"event {index}: {problem}")
    for event in events:
        if state._known("openmeter", event["source"], event["id"]):
            continue  # deduplicated on (source, id), silently
        moment = event.get("time")
        timestamp = (datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
                     if moment else time.time())  # fmt: skip
        state._keep(
            Accepted("openmeter", event["id"], event["subject"], event["type"],
                     event["data"][state.value_property], timestamp, event),
            "openmeter", event["source"], event["id"],
        )  # fmt: skip
    return web.Response(status=204)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _problem(400, "Bad Request", "the body is not JSON") from None


# ---------------------------------------------------------------- Lago


def _lago_errors(event: object, state: FakeBilling, seen: set[tuple[str, str]]) -> dict:
    if not isinstance(event, dict):
        return {"event": ["invalid_value"]}
    errors: dict[str, list[str]] = {}
    for name in ("transaction_id", "external_subscription_id", "code"):
        if not isinstance(event.get(name), str) or not event[name]:
            errors[name] = ["value_is_mandatory"]
    timestamp = event.get("timestamp")
    seconds = isinstance(timestamp, str) and re.fullmatch(r"\d+(\.\d+)?", timestamp)
    if timestamp is not None and not _integer(timestamp) and not seconds:
        errors["timestamp"] = ["invalid_value"]
    properties = event.get("properties")
    if not isinstance(properties, dict) or not _integer(properties.get(state.value_property)):
        errors["properties"] = ["invalid_value"]
    if not errors:
        key = (event["transaction_id"], event["external_subscription_id"])
        if key in seen or state._known("lago", *key):
            errors["transaction_id"] = ["value_already_exist"]
        seen.add(key)
    return errors


async def _lago(request: web.Request) -> web.Response:
    state: FakeBilling = request.app[STATE]
    if not _bearer(request, state.api_keys.get("lago")):
        raise Refused(401, {"status": 401, "error": "Unauthorized"})
    body = _loads(await request.read())
    events = body.get("events") if isinstance(body, dict) else None
    invalid = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
    if not isinstance(events, list) or not events:
        raise Refused(422, {**invalid, "error_details": {"events": ["value_is_mandatory"]}})
    if len(events) > LAGO_MAX_BATCH:
        raise Refused(422, {**invalid, "error_details": {"events": ["too_many_events"]}})
    seen: set[tuple[str, str]] = set()
    details = {}
    for index, event in enumerate(events):
        errors = _lago_errors(event, state, seen)
        if errors:
            details[str(index)] = errors
    if details:
        raise Refused(422, {**invalid, "error_details": details})  # nothing is stored
    now = datetime.now(UTC).isoformat()
    stored = []
    for event in events:
        timestamp = float(event.get("timestamp") or time.time())
        state._keep(Accepted(
            "lago", event["transaction_id"], event["external_subscription_id"], event["code"],
            event["properties"][state.value_property], timestamp, event,
        ), "lago", event["transaction_id"], event["external_subscription_id"])  # fmt: skip
        stored.append(
            {
                "lago_id": str(uuid.uuid4()),
                **event,
                "created_at": now,
                "timestamp": datetime.fromtimestamp(timestamp, UTC).isoformat(),
            }
        )
    return web.json_response({"events": stored})


# ---------------------------------------------------------------- the webhook


def _webhook_problem(event: object) -> str | None:
    if not isinstance(event, dict):
        return "an event must be an object"
    missing = {"id", "team", "key_id", "model", "started_at", "value"} - set(event)
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if set(event) - {"id", "team", "key_id", "model", "started_at", "value", "adjusts"}:
        return "unknown fields"
    if not (isinstance(event["id"], str) and event["id"] and isinstance(event["team"], str)
            and event["team"]):  # fmt: skip
        return "id and team must be non-empty strings"
    if not all(event[name] is None or isinstance(event[name], str) for name in ("key_id", "model")):
        return "key_id and model must be strings or null"
    started = event["started_at"]
    if isinstance(started, bool) or not isinstance(started, int | float):
        return "started_at must be a number"
    if not _integer(event["value"]):
        return "value must be an integer"
    if "adjusts" in event and not isinstance(event["adjusts"], str):
        return "adjusts must be a string"
    return None


async def _webhook(request: web.Request) -> web.Response:
    state: FakeBilling = request.app[STATE]
    raw = await request.read()
    if state.webhook_secret is not None:
        expected = hmac.new(state.webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("x-gateway-signature", ""), expected):
            raise Refused(401, {"error": "bad signature"})
    body = _loads(raw)
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        raise Refused(400, {"error": 'the body must be {"events": [...]}'})
    for event in events:
        problem = _webhook_problem(event)
        if problem is not None:
            raise Refused(400, {"error": problem})
    new = 0
    for event in events:
        if state._known("webhook", event["id"]):
            continue
        stored = Accepted("webhook", event["id"], event["team"], "", event["value"],
                          float(event["started_at"]), event)  # fmt: skip
        state._keep(stored, "webhook", event["id"])
        new += 1
    return web.json_response({"received": new})


async def _accepted(request: web.Request) -> web.Response:
    state: FakeBilling = request.app[STATE]
    service = request.query.get("service")
    events = [event.__dict__ for event in state.accepted if service in (None, event.service)]
    return web.Response(body=orjson.dumps(events), content_type="application/json")


STATE = web.AppKey("fake_billing", FakeBilling)


def build_fake_billing_app(state: FakeBilling) -> web.Application:
    app = web.Application(middlewares=[_faults_and_errors])
    app[STATE] = state
    app.router.add_post("/v1/billing/meter_events", _stripe_events)
    app.router.add_post("/v1/billing/meter_event_adjustments", _stripe_adjustments)
    app.router.add_post("/api/v1/events", _openmeter)
    app.router.add_post("/api/v1/events/batch", _lago)
    app.router.add_post("/webhook", _webhook)
    app.router.add_get("/_fake/accepted", _accepted)
    return app


async def start_fake_billing(
    state: FakeBilling, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the fakes; the runner (to clean up) and the base URL."""
    runner = web.AppRunner(build_fake_billing_app(state))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}"


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.devtools.fake_billing --port P`: the fakes as a process (benchmarks);
    Stripe and Lago take the key in $FAKE_BILLING_KEY."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9898)
    args = parser.parse_args(argv)
    key = os.environ.get("FAKE_BILLING_KEY", "sk_test_fake_billing")
    state = FakeBilling(api_keys={"stripe": key, "lago": key})
    web.run_app(build_fake_billing_app(state), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

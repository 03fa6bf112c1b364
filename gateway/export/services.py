"""What each billing system's API asks for and answers (SPEC "Billing export"): the request an
export sends for a batch of events, and what the answer means for each of them.

- Stripe v1 billing meter events: one form-encoded event per request; the event's
  `identifier` is also the request's `Idempotency-Key` (a retry within 24 h replays the first
  answer), and "An event already exists with identifier ..." after that counts as delivered.
  A repriced event is cancelled (`meter_event_adjustments`, within 24 h of its sending) and
  sent again under a new identifier.
- OpenMeter: CloudEvents in batches (`application/cloudevents-batch+json`); the service
  drops an (source, id) it already holds. A batch refused as a whole is sent again one event
  at a time, to tell the refused event from the others.
- Lago: `events/batch`, up to 100 events; a 422 names each refused event by its index, and
  `value_already_exist` on `transaction_id` means that one is already there.
- Webhook: the gateway's own shape, signed like the notification webhooks.

Every other answer (429, 5xx, 401, a timeout) is an outage: nothing is taken as delivered and
the batch is sent again later, with the same ids.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.config.schema import ExportConfig

SIGNATURE_HEADER = "x-gateway-signature"
CLOUDEVENTS_SOURCE = "metering-gateway"
STRIPE_DUPLICATE = "an event already exists with identifier"


@dataclass(frozen=True, slots=True)
class Event:
    """One billable row as a billing system's event (or a correction of one)."""

    id: str  # the idempotency id
    request_id: str
    customer: str
    value: int
    started_at: float
    team: str | None
    key_id: str | None
    model: str | None
    adjusts: str | None = None  # a webhook's correction: the id of the event it corrects


@dataclass(frozen=True, slots=True)
class Outgoing:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Answer:
    """What one answer says about the events of its request."""

    delivered: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # event id -> the service's reason
    resend: list[Event] = field(default_factory=list)  # not stored; may go again at once
    split: bool = False  # refused as a whole: send each event alone to find which
    outage: str | None = None  # the service is not taking events now (retried later)
    retry_after_s: float | None = None


def retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _outage(status: int, headers: Any) -> Answer:
    return Answer(outage=f"HTTP {status}", retry_after_s=retry_after(headers))


class Service:
    """A billing system's request and answer shapes; `api_key` comes from the export's env var
    at each send (never logged, never in an error message)."""

    batch_size = 100
    parallel = 4  # requests in flight at once
    corrects = False  # can a sent event be corrected (cancelled and sent again)?

    def __init__(self, config: ExportConfig) -> None:
        self.config = config

    def request(self, events: list[Event], api_key: str | None) -> Outgoing:
        raise NotImplementedError

    def answer(self, status: int, headers: Any, body: bytes, events: list[Event]) -> Answer:
        raise NotImplementedError

    def cancel(self, event_id: str, api_key: str | None) -> Outgoing:
        raise NotImplementedError

    def cancelled(self, status: int, headers: Any, body: bytes) -> Answer:
        raise NotImplementedError

    def _bearer(self, api_key: str | None, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers


class Stripe(Service):
    batch_size = 1
    parallel = 32  # one event a request: latency, not Stripe's 1,000/s, is the limit
    corrects = True

    def request(self, events: list[Event], api_key: str | None) -> Outgoing:
        (event,) = events
        fields = {
            "event_name": self.config.event_name or "",
            "payload[stripe_customer_id]": event.customer,
            "payload[value]": str(event.value),
            "identifier": event.id,
            "timestamp": str(int(event.started_at)),
        }
        return self._form("/v1/billing/meter_events", fields, event.id, api_key)

    def answer(self, status: int, headers: Any, body: bytes, events: list[Event]) -> Answer:
        (event,) = events
        if 200 <= status < 300:
            return Answer(delivered={event.id})
        message = _stripe_message(body)
        if status == 400 and STRIPE_DUPLICATE in message.lower():
            return Answer(delivered={event.id})  # it holds this identifier already
        if status in (400, 404):
            return Answer(refused={event.id: message or f"HTTP {status}"})
        return _outage(status, headers)

    def cancel(self, event_id: str, api_key: str | None) -> Outgoing:
        fields = {
            "event_name": self.config.event_name or "",
            "type": "cancel",
            "cancel[identifier]": event_id,
        }
        return self._form("/v1/billing/meter_event_adjustments", fields, f"cancel:{event_id}",
                          api_key)  # fmt: skip

    def cancelled(self, status: int, headers: Any, body: bytes) -> Answer:
        if 200 <= status < 300:
            return Answer(delivered={"cancel"})
        message = _stripe_message(body)
        if status == 400 and "already" in message.lower():
            return Answer(delivered={"cancel"})
        if status in (400, 404):
            return Answer(refused={"cancel": message or f"HTTP {status}"})
        return _outage(status, headers)

    def _form(
        self, path: str, fields: dict[str, str], idempotency_key: str, api_key: str | None
    ) -> Outgoing:
        headers = self._bearer(api_key, "application/x-www-form-urlencoded")
        headers["Idempotency-Key"] = idempotency_key
        body = urllib.parse.urlencode(fields).encode()
        return Outgoing("POST", self.config.base_url + path, headers, body)


def _stripe_message(body: bytes) -> str:
    parsed = _json(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message") or "")[:300]
    return ""


class OpenMeter(Service):
    def request(self, events: list[Event], api_key: str | None) -> Outgoing:
        batch = [
            {
                "specversion": "1.0",
                "id": event.id,
                "source": CLOUDEVENTS_SOURCE,
                "type": self.config.event_name,
                "subject": event.customer,
                "time": rfc3339(event.started_at),
                "data": _properties(self.config.value, event),
            }
            for event in events
        ]
        headers = self._bearer(api_key, "application/cloudevents-batch+json")
        return Outgoing("POST", self.config.base_url + "/api/v1/events", headers,
                        orjson.dumps(batch))  # fmt: skip

    def answer(self, status: int, headers: Any, body: bytes, events: list[Event]) -> Answer:
        if 200 <= status < 300:
            return Answer(delivered={event.id for event in events})
        if status == 400:
            if len(events) > 1:
                return Answer(split=True)
            parsed = _json(body)
            detail = parsed.get("detail") if isinstance(parsed, dict) else None
            return Answer(refused={events[0].id: str(detail or "HTTP 400")[:300]})
        return _outage(status, headers)


class Lago(Service):
    def request(self, events: list[Event], api_key: str | None) -> Outgoing:
        batch = [
            {
                "transaction_id": event.id,
                "external_subscription_id": event.customer,
                "code": self.config.event_name,
                "timestamp": int(event.started_at),
                "properties": _properties(self.config.value, event),
            }
            for event in events
        ]
        headers = self._bearer(api_key, "application/json")
        return Outgoing("POST", self.config.base_url + "/api/v1/events/batch", headers,
                        orjson.dumps({"events": batch}))  # fmt: skip

    def answer(self, status: int, headers: Any, body: bytes, events: list[Event]) -> Answer:
        if 200 <= status < 300:
            return Answer(delivered={event.id for event in events})
        parsed = _json(body)
        details = parsed.get("error_details") if isinstance(parsed, dict) else None
        if status != 422 or not isinstance(details, dict):
            return _outage(status, headers)
        answer = Answer()
        for index, event in enumerate(events):
            errors = details.get(str(index))
            if not errors:
                answer.resend.append(event)  # refused only with the others: nothing stored
            elif errors == {"transaction_id": ["value_already_exist"]}:
                answer.delivered.add(event.id)
            else:
                answer.refused[event.id] = orjson.dumps(errors).decode()[:300]
        if not answer.delivered and not answer.refused:
            return Answer(outage=f"HTTP 422: {orjson.dumps(details).decode()[:200]}")
        return answer


class Webhook(Service):
    corrects = True  # a correction is an event of its own, with the difference as its value

    def __init__(self, config: ExportConfig, secret: str | None = None) -> None:
        super().__init__(config)
        self.secret = secret

    def request(self, events: list[Event], api_key: str | None) -> Outgoing:
        batch = []
        for event in events:
            item: dict[str, Any] = {
                "id": event.id, "team": event.team, "key_id": event.key_id,
                "model": event.model, "started_at": event.started_at, "value": event.value,
            }  # fmt: skip
            if event.adjusts is not None:
                item["adjusts"] = event.adjusts
            batch.append(item)
        body = orjson.dumps({"events": batch})
        headers = self._bearer(api_key, "application/json")
        if self.secret:
            headers[SIGNATURE_HEADER] = hmac.new(
                self.secret.encode(), body, hashlib.sha256
            ).hexdigest()
        return Outgoing("POST", self.config.base_url, headers, body)

    def answer(self, status: int, headers: Any, body: bytes, events: list[Event]) -> Answer:
        if 200 <= status < 300:
            return Answer(delivered={event.id for event in events})
        return _outage(status, headers)


def _properties(value_name: str, event: Event) -> dict[str, Any]:
    properties: dict[str, Any] = {value_name: event.value}
    if event.model is not None:
        properties["model"] = event.model
    return properties


def rfc3339(timestamp: float) -> str:
    """`2026-12-02T10:04:35.123Z` (milliseconds, truncated: never after the call started)."""
    moment = datetime.fromtimestamp(math.floor(timestamp * 1000) / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def service_for(config: ExportConfig, secret: str | None = None) -> Service:
    if config.kind == "stripe":
        return Stripe(config)
    if config.kind == "openmeter":
        return OpenMeter(config)
    if config.kind == "lago":
        return Lago(config)
    return Webhook(config, secret)

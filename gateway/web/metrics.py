"""`GET /metrics` in Prometheus' text format.

The request path only bumps plain dict counters (`CallStats.observe`); Prometheus metric
families are built from them when scraped, so metering costs no locks or label lookups.

Label values are bounded: a client chooses its model's name, so a model the config does not
name (in a price table or a team's `models`) is counted as `model="other"`; a dated snapshot
of a priced model (`gpt-4o-mini-2024-07-18`) keeps its own name, up to `MAX_SNAPSHOT_LABELS`
of them.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.access.keys import days_left, today_in
from gateway.config.loader import GatewayConfig
from gateway.export.exporter import Exporter
from gateway.ledger.writer import CallRecord, LedgerWriter
from gateway.limits.admission import Limiter
from gateway.notify.notifier import Notifier
from gateway.pricing.names import base_model_name

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_KINDS = ("input", "cached_input", "output", "reasoning")
OTHER_MODEL = "other"
# Dated snapshots of priced models counted under their own names; later ones are `other`.
MAX_SNAPSHOT_LABELS = 500
# Models classified and remembered (their names are at most a known name plus a date long).
LABEL_CACHE_SIZE = 4096
_DATE_SUFFIX_LEN = len("-2024-07-18")


# The gateway's own time per call: from a tenth of a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1)  # fmt: skip


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def family_buckets(self) -> list[tuple[str, float]]:
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
        return buckets


def _raw_model_label(model: str | None) -> str:
    return model or ""


class ModelLabels:
    """A call's `model` label: its own name when the config knows the model (a price table
    names it or its base name, or a team's `models` lists it), else `other`.

    Each distinct model is classified once per config object (`config` is a getter: a reload
    starts a fresh cache); a name longer than every known name is `other` without a lookup
    and never remembered, so neither the cache nor the labels hold client-sized strings.
    """

    def __init__(self, config: Callable[[], GatewayConfig]) -> None:
        self._config = config
        self._for: GatewayConfig | None = None
        self._cache: dict[str, str] = {}
        self._named: frozenset[str] = frozenset()
        self._priced: tuple[frozenset[str], ...] = ()
        self._longest = 0
        self._snapshots: set[str] = set()  # kept across reloads: their series live on

    def __call__(self, model: str | None) -> str:
        if not model:
            return ""
        config = self._config()
        if config is not self._for:
            self._reset(config)
        label = self._cache.get(model)
        return label if label is not None else self._classify(model)

    def _reset(self, config: GatewayConfig) -> None:
        tables = [config.pricing, *(t.pricing for t in config.teams.values() if t.pricing)]
        self._priced = tuple({table.known_models() for table in tables})
        allowed = (t.models for t in config.teams.values() if t.models)
        self._named = frozenset().union(*self._priced, *allowed)
        self._longest = max(map(len, self._named), default=0) + _DATE_SUFFIX_LEN
        self._cache = {}
        self._for = config

    def _classify(self, model: str) -> str:
        if len(model) > self._longest:
            return OTHER_MODEL
        label = OTHER_MODEL
        if model in self._named:
            label = model
        else:
            base = base_model_name(model)
            if (
                base != model
                and any(base in priced for priced in self._priced)
                and (model in self._snapshots or len(self._snapshots) < MAX_SNAPSHOT_LABELS)
            ):
                self._snapshots.add(model)
                label = model
        if len(self._cache) >= LABEL_CACHE_SIZE:
            self._cache = {}
        self._cache[model] = label
        return label


class CallStats:
    """Running totals of every recorded call."""

    def __init__(self) -> None:
        # Replaced by the collector with a `ModelLabels` that knows the config.
        self.model_label: Callable[[str | None], str] = _raw_model_label
        self.requests: dict[tuple, int] = defaultdict(int)
        self.tokens: dict[tuple, int] = defaultdict(int)
        self.bytes: dict[tuple, int] = defaultdict(int)
        self.cost: dict[tuple, int] = defaultdict(int)
        self.unpriced: dict[tuple, int] = defaultdict(int)  # calls with price_unknown = 1
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttfb: dict[str, Histogram] = defaultdict(Histogram)
        self.overhead: dict[str, Histogram] = defaultdict(lambda: Histogram(OVERHEAD_BUCKETS))

    def observe(self, record: CallRecord) -> None:
        team, model = record.team or "", self.model_label(record.model)
        self.requests[(team, model, str(record.status), record.outcome)] += 1
        if record.input_tokens or record.output_tokens:
            for kind, value in zip(
                _TOKEN_KINDS,
                (record.input_tokens, record.cached_input_tokens, record.output_tokens,
                 record.reasoning_tokens),
                strict=True,
            ):  # fmt: skip
                self.tokens[(team, model, kind)] += value
        self.bytes[(team, "in")] += record.request_bytes
        self.bytes[(team, "out")] += record.response_bytes
        if record.cost_nanousd:
            self.cost[(team, model)] += record.cost_nanousd
        if record.price_unknown:
            self.unpriced[(team, model)] += 1
        if record.status and record.outcome != "rejected":
            self.latency[team].observe(record.latency_ms / 1000)
            if record.ttfb_ms is not None:
                self.ttfb[team].observe(record.ttfb_ms / 1000)
            if record.upstream_ms is not None:
                overhead = max(record.latency_ms - record.upstream_ms, 0.0) / 1000
                self.overhead[team].observe(overhead)


class GatewayCollector(Collector):
    def __init__(
        self,
        stats: CallStats,
        config: Callable[[], GatewayConfig],
        limiter: Limiter,
        ledger: LedgerWriter,
        in_flight: Callable[[], int],
        notifier: Notifier | None = None,
        sessions: Callable[[], tuple[int, int, int]] | None = None,
        exporters: Sequence[Exporter] = (),
    ) -> None:
        self.stats, self.config, self.limiter = stats, config, limiter
        self.ledger, self.in_flight = ledger, in_flight
        self.notifier = notifier
        self.sessions = sessions  # (open WebSocket sessions, bytes up, bytes down)
        self.exporters = exporters
        stats.model_label = ModelLabels(config)

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._histograms()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        stats = self.stats
        requests = CounterMetricFamily(
            "gateway_requests", "Calls by team, model, status and outcome",
            labels=["team", "model", "status", "outcome"],
        )  # fmt: skip
        for labels, value in stats.requests.items():
            requests.add_metric(list(labels), value)
        tokens = CounterMetricFamily(
            "gateway_tokens", "Tokens by kind", labels=["team", "model", "kind"]
        )
        for labels, value in stats.tokens.items():
            tokens.add_metric(list(labels), value)
        moved = CounterMetricFamily(
            "gateway_body_bytes", "Body bytes by direction (in = from clients)",
            labels=["team", "direction"],
        )  # fmt: skip
        for labels, value in stats.bytes.items():
            moved.add_metric(list(labels), value)
        cost = CounterMetricFamily(
            "gateway_cost_usd", "Cost of calls in USD", labels=["team", "model"]
        )
        for labels, value in stats.cost.items():
            cost.add_metric(list(labels), value / 1e9)
        unpriced = CounterMetricFamily(
            "gateway_unpriced_calls",
            "Calls of a model without a price of its own (estimated, or 0 with "
            "pricing.unknown_model: zero)",
            labels=["team", "model"],
        )
        for labels, value in stats.unpriced.items():
            unpriced.add_metric(list(labels), value)
        yield from (requests, tokens, moved, cost, unpriced)

    def _histograms(self) -> Iterator[Metric]:
        for name, help_text, source in (
            ("gateway_request_duration_seconds", "Call latency, first byte in to last out",
             self.stats.latency),
            ("gateway_ttfb_seconds", "Time to the first response byte", self.stats.ttfb),
            ("gateway_overhead_seconds", "A call's time minus its time waiting on the upstream",
             self.stats.overhead),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, help_text, labels=["team"])
            for team, histogram in source.items():
                family.add_metric([team], histogram.family_buckets(), histogram.total)
            yield family

    def _notifications(self) -> Iterator[Metric]:
        notifier = self.notifier
        if notifier is None:
            return
        yield CounterMetricFamily(
            "gateway_notifications_sent", "Notifications a webhook acknowledged (2xx)",
            value=notifier.sent,
        )  # fmt: skip
        yield CounterMetricFamily(
            "gateway_notifications_failed", "Notification attempts that failed (retried)",
            value=notifier.failed,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "gateway_notifications_pending", "Notifications in the outbox not yet acknowledged",
            value=notifier.pending,
        )  # fmt: skip

    def _exports(self) -> Iterator[Metric]:
        if not self.exporters:
            return
        lag = GaugeMetricFamily(
            "gateway_export_lag_rows", "Billable rows a billing export has not had acknowledged",
            labels=["export"],
        )  # fmt: skip
        errors = CounterMetricFamily(
            "gateway_export_errors", "Requests to a billing system that failed or were refused",
            labels=["export"],
        )  # fmt: skip
        for exporter in self.exporters:
            lag.add_metric([exporter.label], exporter.lag)
            errors.add_metric([exporter.label], exporter.errors)
        yield from (lag, errors)

    def _gauges(self) -> Iterator[Metric]:
        yield from self._notifications()
        yield from self._exports()
        queued = GaugeMetricFamily("gateway_queue_depth", "Calls waiting", labels=["team"])
        for team, queue in self.limiter.queues.items():
            queued.add_metric([team], len(queue))
        yield queued
        yield GaugeMetricFamily("gateway_in_flight", "Calls being served", value=self.in_flight())
        if self.sessions is not None:
            open_sessions, up, down = self.sessions()
            yield GaugeMetricFamily(
                "gateway_websocket_sessions", "WebSocket sessions open", value=open_sessions
            )
            frames = CounterMetricFamily(
                "gateway_websocket_bytes",
                "Frame bytes relayed in WebSocket sessions (up: client to upstream)",
                labels=["direction"],
            )
            frames.add_metric(["up"], up)
            frames.add_metric(["down"], down)
            yield frames
        yield GaugeMetricFamily(
            "gateway_ledger_pending_rows", "Rows not yet committed", value=self.ledger.pending
        )
        yield GaugeMetricFamily(
            "gateway_ledger_write_lag_seconds",
            "Age of the oldest row not yet committed",
            value=self.ledger.write_lag(),
        )
        yield from self._limits_backend()
        config = self.config()
        today = today_in(config.limits_timezone)
        expiry = GaugeMetricFamily(
            "gateway_key_days_left", "Days until a key expires (0 on its last day)",
            labels=["team", "key"],
        )  # fmt: skip
        for team in config.teams.values():
            for key in team.keys:
                left = days_left(key, today)
                if left is not None:
                    expiry.add_metric([team.name, key.id], left)
        yield expiry

    def _limits_backend(self) -> Iterator[Metric]:
        status = self.limiter.backend_status()
        if status is None:
            return
        yield GaugeMetricFamily(
            "gateway_limits_backend_up", "1 while the shared limits backend (Redis) answers",
            value=1 if status["up"] else 0,
        )  # fmt: skip
        for name, help_text, key in (
            ("gateway_limits_backend_errors", "Failed calls to the limits backend", "errors"),
            ("gateway_limits_backend_outages", "Times the limits backend became unreachable",
             "outages"),
            ("gateway_limits_backend_let_through", "Calls admitted without limits during "
             "an outage (fail_open)", "let_through"),
            ("gateway_limits_backend_refused", "Calls refused with 503 during an outage "
             "(fail_closed)", "refused"),
        ):  # fmt: skip
            yield CounterMetricFamily(name, help_text, value=status[key])


def metrics_handler(collector: GatewayCollector) -> Callable:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    return metrics

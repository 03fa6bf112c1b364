"""One export's delivery loop, beside the request path (SPEC "Billing export").

A pass takes the export's lease, reads the billable rows after its cursor in pages, turns each
row of a team with a customer into an event, sends the events and records the outcome with
the cursor in one fenced transaction (`ExportStore.progress`). Delivery is at least once; the
idempotency id (`<name>:<request_id>`) makes a resend a no-op at the billing system, so a
crash between sending and recording, a lost answer or a lease taken over costs nothing. A
page that meets an outage (429, 5xx, a timeout) keeps what was delivered, leaves the cursor
where it was and is tried again after a backoff (or the service's `Retry-After`).

A row already sent whose value has since changed (a reprice) is corrected where the service
can take a correction (Stripe: cancelled within 24 h and sent again under a new identifier; a
webhook: an event carrying the difference), else listed by `export --status`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import aiohttp

from gateway.config.schema import ExportConfig, GatewayConfig
from gateway.export.services import Answer, Event, Outgoing, service_for
from gateway.export.store import (
    REFUSED,
    SENT,
    SKIPPED,
    DoneRow,
    ExportStore,
    ExportUnavailable,
    LedgerRow,
    make_export_store,
)
from gateway.loop import cancel_and_wait, pause

log = logging.getLogger("gateway.export")

PAGE_ROWS = 500
SEND_TIMEOUT_S = 20.0
MIN_LEASE_S = 30.0
LAG_REFRESH_S = 1.0
REFUSAL_LOG_EVERY_S = 60.0
# Live traffic first (`Exporter._headroom`): a page waits while the process uses more than this
# share of a core, measured over the probe, for at most MAX_YIELD_S.
BUSY_CORE_SHARE = 0.8
HEADROOM_PROBE_S = 0.25
MAX_YIELD_S = 5.0
MAX_BACKOFF_S = 300.0
STRIPE_MAX_AGE_S = 35 * 86400 - 300  # Stripe takes events of the past 35 days
STRIPE_CANCEL_WINDOW_S = 23 * 3600  # and cancels them within 24 h of receiving them


def value_of(kind: str, row: LedgerRow) -> int:
    if kind == "requests":
        return 1
    if kind == "total_tokens":
        return row.input_tokens + row.output_tokens
    return int(getattr(row, kind))


@dataclass(slots=True)
class PassResult:
    """What one pass over the rows did."""

    sent: int = 0  # events the billing system took (corrections included)
    refused: int = 0
    skipped: int = 0
    would_send: int = 0  # a dry run's count
    outage: str | None = None
    held_elsewhere: bool = False
    lost_lease: bool = False

    @property
    def complete(self) -> bool:
        return self.outage is None and not self.held_elsewhere and not self.lost_lease


@dataclass(slots=True)
class _Page:
    """A page's events to send, and what is already decided about its other rows."""

    events: list[Event] = field(default_factory=list)
    corrections: list[tuple[Event, DoneRow]] = field(default_factory=list)  # new event, prior
    decided: list[DoneRow] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)  # request id -> the ledger's value


class Exporter:
    def __init__(
        self,
        config: ExportConfig,
        store: ExportStore,
        clock: Callable[[], float] = time.time,
        holder: str | None = None,
    ) -> None:
        self.config = config
        self.label = config.label
        self.store = store
        self.service = service_for(config, _env(config.secret_env))
        self.prefix = f"{config.name}:" if config.name else ""
        self.clock = clock
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_s = max(MIN_LEASE_S, 3 * config.interval_s)
        self.errors = 0  # failed requests (gateway_export_errors_total)
        self.lag = 0  # billable rows not yet acknowledged (gateway_export_lag_rows)
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned_teams: set[str | None] = set()
        self._failing_since: float | None = None
        self._failed_requests = 0
        self._backoff_s = 0.0
        self._retry_after_s: float | None = None
        self._lease_until = 0.0
        self._lag_at = 0.0
        self._refusal_logged_at = -REFUSAL_LOG_EVERY_S
        self._refusals_unlogged = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self, loop_forever: bool = True) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))
        await self.store.ensure(self.label, self.config.kind, self.clock())
        if loop_forever:
            self._task = asyncio.create_task(self._loop(), name=f"export-{self.label}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _loop(self) -> None:
        while True:
            wait = self.config.interval_s
            try:
                result = await self.deliver_pending()
                if result.outage is not None:
                    wait = self._next_backoff()
            except ExportUnavailable as error:
                log.error("export %s: the ledger's database is not answering: %s",
                          self.label, error)  # fmt: skip
            except Exception:
                log.exception("export %s: pass failed", self.label)
            await pause(wait)

    # ------------------------------------------------------------ passes

    async def deliver_pending(self) -> PassResult:
        """Send the rows after the cursor, page after page, until none is left or the service
        stops taking them; the cursor moves with each page fully done."""
        result = PassResult()
        if not await self._take_lease():
            result.held_elsewhere = True
            await self.refresh_lag()
            return result
        pages = 0
        try:
            await self.refresh_lag()
            while result.complete:
                state = await self.store.state(self.label)
                assert state is not None
                rows = await self.store.rows_after(state.cursor, PAGE_ROWS)
                if not rows:
                    break
                await self._headroom()
                await self._page(rows, result, cursor=state.cursor, advance=True, resend=False)
                pages += 1
                if self.clock() - self._lag_at >= LAG_REFRESH_S:  # a long pass: keep it true
                    await self.refresh_lag()
        finally:
            await self._release()
        if pages:
            await self.refresh_lag()
        return result

    async def backfill(self, since: float, resend: bool = False) -> PassResult:
        """Send the billable rows started at or after `since` that the export has not
        delivered (with `resend`, those too, under their ids: the service drops what it
        holds). The cursor stays where it is."""
        result = PassResult()
        if not await self._take_lease():
            result.held_elsewhere = True
            return result
        position: tuple[float, str] = (since, "")
        try:
            while result.complete:
                rows = await self.store.rows_since(position, PAGE_ROWS)
                if not rows:
                    break
                position = (rows[-1].started_at, rows[-1].request_id)
                state = await self.store.state(self.label)
                assert state is not None
                await self._page(rows, result, cursor=state.cursor, advance=False, resend=resend)
        finally:
            await self._release()
        await self.refresh_lag()
        return result

    async def dry_run(self, since: float | None) -> PassResult:
        """Count what a pass (or a backfill from `since`) would send; nothing is sent."""
        result = PassResult()
        state = await self.store.state(self.label)
        assert state is not None
        cursor, position = state.cursor, (since or 0.0, "")
        while True:
            if since is None:
                rows = await self.store.rows_after(cursor, PAGE_ROWS)
            else:
                rows = await self.store.rows_since(position, PAGE_ROWS)
            if not rows:
                return result
            cursor, position = rows[-1].position, (rows[-1].started_at, rows[-1].request_id)
            page = await self._plan(rows, resend=False)
            result.would_send += len(page.events) + len(page.corrections)
            result.skipped += sum(row.state == SKIPPED for row in page.decided)

    async def refresh_lag(self) -> int:
        self._lag_at = self.clock()
        state = await self.store.state(self.label)
        if state is None:
            return self.lag
        teams = None if self.config.customers is None else list(self.config.customers)
        refused = await self.store.count_listed(self.label, REFUSED)
        self.lag = await self.store.lag(state.cursor, teams) + refused
        return self.lag

    async def _headroom(self) -> None:
        """Let live traffic go first: while this process is using most of a core (calls being
        served), wait, but no longer than `MAX_YIELD_S` a page, so a busy gateway still
        exports a page every few seconds and catches up when the load eases. Billing can wait
        seconds; a call should not."""
        deadline = time.monotonic() + MAX_YIELD_S
        while time.monotonic() < deadline:
            wall, cpu = time.monotonic(), time.process_time()
            await asyncio.sleep(HEADROOM_PROBE_S)
            busy = (time.process_time() - cpu) / max(time.monotonic() - wall, 1e-6)
            if busy < BUSY_CORE_SHARE:
                return
        await self._renew_lease()

    # ------------------------------------------------------------ one page

    async def _page(
        self,
        rows: list[LedgerRow],
        result: PassResult,
        *,
        cursor: tuple[int, str],
        advance: bool,
        resend: bool,
    ) -> None:
        page = await self._plan(rows, resend)
        done = list(page.decided)
        result.skipped += sum(row.state == SKIPPED for row in page.decided)
        outage = await self._send_events(page.events, page.values, done, result)
        if outage is None:
            outage = await self._send_corrections(page, done, result)
        if outage is not None:
            result.outage = outage
        moved = rows[-1].position if advance and outage is None else cursor
        delivered = sum(row.state == SENT for row in done[len(page.decided) :])
        now = self.clock()
        kept = await self.store.progress(
            self.label, self.holder, done, moved, delivered, now, now + self.lease_s
        )
        if not kept:
            result.lost_lease = True
            log.warning("export %s: the lease passed to another exporter; this one stops",
                        self.label)  # fmt: skip
            return
        self._lease_until = now + self.lease_s
        result.sent += delivered
        refused = [row for row in done if row.state == REFUSED]
        if outage is not None or refused:
            error = outage or f"row {refused[-1].request_id} refused: {refused[-1].note}"
            await self.store.note_error(self.label, self.holder, error, now)

    async def _plan(self, rows: Iterable[LedgerRow], resend: bool) -> _Page:
        rows = list(rows)
        now = self.clock()
        prior_rows = await self.store.done(self.label, [row.request_id for row in rows])
        page = _Page()
        for row in rows:
            customer = self.config.customer_of(row.team)
            if customer is None:
                self._warn_unmapped(row.team)
                continue
            value = value_of(self.config.value, row)
            page.values[row.request_id] = value
            event = Event(
                id=self.prefix + row.request_id, request_id=row.request_id, customer=customer,
                value=value, started_at=row.started_at, team=row.team, key_id=row.key_id,
                model=row.model,
            )  # fmt: skip
            prior = prior_rows.get(row.request_id)
            if prior is None or prior.state == REFUSED:
                self._new_event(event, now, page)
            elif prior.state == SENT and prior.value != value:
                self._correction(event, row, prior, now, page)
            elif prior.state == SENT and prior.ledger_value is not None:
                # repriced back to what the service holds: nothing to list any more
                page.decided.append(replace(prior, ledger_value=None))
            elif prior.state == SENT and resend:
                page.events.append(_with_id(event, prior.event_id))
        return page

    def _new_event(self, event: Event, now: float, page: _Page) -> None:
        if self.config.kind == "stripe" and event.started_at < now - STRIPE_MAX_AGE_S:
            log.warning("export %s: row %s is older than Stripe's 35 days: skipped (listed by"
                        " export --status)", self.label, event.request_id)  # fmt: skip
            page.decided.append(DoneRow(event.request_id, event.id, event.value, SKIPPED, now,
                                        "older than Stripe's 35 days"))  # fmt: skip
            return
        page.events.append(event)

    def _correction(
        self, event: Event, row: LedgerRow, prior: DoneRow, now: float, page: _Page
    ) -> None:
        assert prior.value is not None
        corrected_id = f"{self.prefix}{row.request_id}:{row.change_seq}"
        if self.config.kind == "stripe" and now - prior.at < STRIPE_CANCEL_WINDOW_S:
            page.corrections.append((_with_id(event, corrected_id), prior))
        elif self.config.kind == "webhook":
            delta = Event(
                id=corrected_id, request_id=row.request_id, customer=event.customer,
                value=event.value - prior.value, started_at=event.started_at, team=event.team,
                key_id=event.key_id, model=event.model, adjusts=prior.event_id,
            )  # fmt: skip
            page.corrections.append((delta, prior))
        elif prior.ledger_value != event.value:
            log.warning("export %s: row %s was repriced after it was sent (%d -> %d); %s takes"
                        " no correction: listed by export --status", self.label,
                        row.request_id, prior.value, event.value, self.config.kind)  # fmt: skip
            page.decided.append(replace(prior, ledger_value=event.value))

    # ------------------------------------------------------------ sending

    async def _send_events(
        self, events: list[Event], values: dict[str, int], done: list[DoneRow],
        result: PassResult,
    ) -> str | None:  # fmt: skip
        """Send `events` in the service's batches; what each became is added to `done`. The
        first outage stops the sending (the rest waits for the next try)."""
        size = self.service.batch_size
        batches = [events[i : i + size] for i in range(0, len(events), size)]
        parallel = self.service.parallel
        for start in range(0, len(batches), parallel):
            group = batches[start : start + parallel]
            answers = await asyncio.gather(*(self._exchange(batch) for batch in group))
            outage = None
            for batch, answer in zip(group, answers, strict=True):
                outage = await self._settle(batch, answer, values, done, result) or outage
            if outage is not None:
                return outage
            await self._renew_lease()
        return None

    async def _settle(
        self, batch: list[Event], answer: Answer, values: dict[str, int], done: list[DoneRow],
        result: PassResult,
    ) -> str | None:  # fmt: skip
        now = self.clock()
        for event in batch:
            if event.id in answer.delivered:
                done.append(DoneRow(event.request_id, event.id, values[event.request_id], SENT,
                                    now))  # fmt: skip
            elif event.id in answer.refused:
                reason = answer.refused[event.id]
                result.refused += 1
                self._log_refusal(event.request_id, reason)
                done.append(DoneRow(event.request_id, event.id, event.value, REFUSED, now,
                                    reason))  # fmt: skip
        if answer.split:
            for event in batch:
                single = await self._exchange([event])
                outage = await self._settle([event], single, values, done, result)
                if outage is not None:
                    return outage
        if answer.resend:
            again = await self._exchange(answer.resend)
            if again.resend:  # refused with others twice: an outage of sorts, tried later
                return "events refused together twice"
            return await self._settle(answer.resend, again, values, done, result)
        return answer.outage

    async def _send_corrections(
        self, page: _Page, done: list[DoneRow], result: PassResult
    ) -> str | None:
        for event, prior in page.corrections:
            if self.config.kind == "stripe":
                answer = await self._cancel(prior.event_id)
                if answer.outage is not None:
                    return answer.outage
                if answer.refused:
                    reason = answer.refused["cancel"]
                    log.warning(
                        "export %s: the correction of row %s was refused (%s): listed"
                        " by export --status",
                        self.label,
                        event.request_id,
                        reason,
                    )
                    done.append(replace(prior, ledger_value=event.value, note=reason))
                    continue
            answer = await self._exchange([event])
            if event.id in answer.delivered:
                total = page.values[event.request_id]
                event_id = event.id if self.config.kind == "stripe" else prior.event_id
                done.append(DoneRow(event.request_id, event_id, total, SENT, self.clock()))
                continue
            if answer.outage is not None:
                return answer.outage
            reason = answer.refused.get(event.id, "refused")
            done.append(replace(prior, ledger_value=page.values[event.request_id], note=reason))
            result.refused += 1
        return None

    async def _exchange(self, batch: list[Event]) -> Answer:
        outgoing = self.service.request(batch, _env(self.config.api_key_env))
        return await self._post(outgoing, lambda s, h, b: self.service.answer(s, h, b, batch))

    async def _cancel(self, event_id: str) -> Answer:
        outgoing = self.service.cancel(event_id, _env(self.config.api_key_env))
        return await self._post(outgoing, self.service.cancelled)

    async def _post(self, outgoing: Outgoing, read: Callable[..., Answer]) -> Answer:
        assert self._http is not None, "the exporter is not started"
        try:
            async with self._http.request(
                outgoing.method, outgoing.url, data=outgoing.body, headers=outgoing.headers
            ) as response:
                body = await response.read()
                answer = read(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            answer = Answer(outage=type(exc).__name__)
        if answer.outage is not None or answer.refused:
            self.errors += 1
        if answer.outage is not None:
            self._outage_began(answer)
        else:
            self._outage_ended()
        return answer

    # ------------------------------------------------------------ outages, leases, warnings

    def _outage_began(self, answer: Answer) -> None:
        self._failed_requests += 1
        self._retry_after_s = answer.retry_after_s
        if self._failing_since is None:
            self._failing_since = self.clock()
            log.warning("export %s: %s is not taking events (%s); rows wait and are retried",
                        self.label, _host(self.config.base_url), answer.outage)  # fmt: skip

    def _outage_ended(self) -> None:
        if self._failing_since is None:
            return
        log.info("export %s: %s takes events again after %.0f s (%d failed request(s))",
                 self.label, _host(self.config.base_url), self.clock() - self._failing_since,
                 self._failed_requests)  # fmt: skip
        self._failing_since = None
        self._failed_requests = 0
        self._backoff_s = 0.0

    def _next_backoff(self) -> float:
        """The interval, doubled after each failed pass up to 5 minutes (or Retry-After)."""
        self._backoff_s = min(MAX_BACKOFF_S, max(self.config.interval_s, self._backoff_s * 2))
        if self._retry_after_s is not None:
            return min(MAX_BACKOFF_S, max(self._retry_after_s, 0.1))
        return self._backoff_s

    async def _take_lease(self) -> bool:
        now = self.clock()
        if await self.store.take_lease(self.label, self.holder, now, now + self.lease_s):
            self._lease_until = now + self.lease_s
            return True
        return False

    async def _renew_lease(self) -> None:
        if self._lease_until - self.clock() < self.lease_s * 2 / 3:
            await self._take_lease()

    async def _release(self) -> None:
        try:
            await self.store.release(self.label, self.holder)
        except ExportUnavailable as error:
            log.warning("export %s: lease not released (it expires): %s", self.label, error)

    def _log_refusal(self, request_id: str, reason: str) -> None:
        """One line a minute at most: a mapping gone wrong refuses every row."""
        self._refusals_unlogged += 1
        now = self.clock()
        if now - self._refusal_logged_at < REFUSAL_LOG_EVERY_S:
            return
        more = self._refusals_unlogged - 1
        log.warning("export %s: %s refused row %s: %s%s (listed by export --status)",
                    self.label, self.config.kind, request_id, reason,
                    f"; and {more} more since the last such line" if more else "")  # fmt: skip
        self._refusal_logged_at, self._refusals_unlogged = now, 0

    def _warn_unmapped(self, team: str | None) -> None:
        if team not in self._warned_teams:
            self._warned_teams.add(team)
            log.warning("export %s: team %s has no customer in export.customers: its rows are"
                        " not sent", self.label, team or "(none)")  # fmt: skip


def _with_id(event: Event, event_id: str) -> Event:
    return replace(event, id=event_id)


def _env(name: str | None) -> str | None:
    """An env var's value (None: unset or empty); read at each use, so a rotated key is
    picked up without a restart."""
    return (os.environ.get(name) or None) if name else None


def _host(url: str) -> str:
    return url.split("//", 1)[-1].split("/", 1)[0]


def make_exporters(config: GatewayConfig) -> list[Exporter]:
    """One exporter per `export:` entry, sharing one connection to the ledger's database."""
    if not config.export:
        return []
    store = make_export_store(config.storage)
    return [Exporter(export, store) for export in config.export]

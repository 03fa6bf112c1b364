"""Looks for events every `notifications.check_interval_s` and delivers the outbox: each due
row is claimed, POSTed (signed when its webhook has a secret) with a 10 s timeout, and marked
delivered on a 2xx or retried with backoff (2 s, 4 s, ... up to 5 minutes) with the same body,
so the same event id. It all runs beside the request path: a receiver that hangs holds one
delivery task, never a call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable

import aiohttp

from gateway.access.keys import today_in
from gateway.config.loader import GatewayConfig
from gateway.limits.admission import Limiter
from gateway.limits.windows import Meter
from gateway.loop import pause
from gateway.notify.events import body_for, budget_events, key_events
from gateway.notify.outbox import Outbox, OutboxUnavailable, Pending

log = logging.getLogger("gateway.notify")

SEND_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 300.0
DELIVERY_POLL_S = 1.0
BATCH = 50
PARALLEL_SENDS = 8
SIGNATURE_HEADER = "x-gateway-signature"


class Notifier:
    def __init__(
        self,
        config: Callable[[], GatewayConfig],
        limiter: Limiter,
        outbox: Outbox,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config  # the keys in force: the file's and the API's
        self._limiter = limiter
        self.outbox = outbox
        self._clock = clock
        self.sent = 0
        self.failed = 0
        self.pending = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._sends = asyncio.Semaphore(PARALLEL_SENDS)

    @property
    def enabled(self) -> bool:
        return bool(self._config().notifications.webhooks)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))
        self._tasks = [
            asyncio.create_task(self._checking(), name="notify-check"),
            asyncio.create_task(self._delivering(), name="notify-deliver"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------ finding events

    async def check(self) -> int:
        """Put every event found now into the outbox; the number new there."""
        config = self._config()
        webhooks = config.notifications.webhooks
        if not webhooks:
            return 0
        now = self._clock()
        events = key_events(config, today_in(config.limits_timezone), now)
        meters = self._meters(config)
        if meters:
            await self._limiter.refresh(tuple(meter for _, _, meter in meters))
            events += budget_events(
                meters, config.notifications.budget_thresholds, self._limiter.calendar, now
            )
        rows = [
            (f"{event.id} {hook.url}", event.id, hook.url, body_for(event, hook.format).decode(),
             now, 0, now, None, None)
            for event in events
            for hook in webhooks
            if event.type in hook.events
        ]  # fmt: skip
        added = await self.outbox.put(rows) if rows else 0
        if added:
            self._wake.set()
        return added

    def _meters(self, config: GatewayConfig) -> list[tuple[str, str | None, Meter]]:
        found: list[tuple[str, str | None, Meter]] = []
        for team in config.teams.values():
            meter = self._limiter.teams.get(team.name)
            if meter is not None and meter.quotas:
                found.append((team.name, None, meter))
            for key in team.keys:
                meter = self._limiter.keys.get(key.id)
                if meter is not None and meter.quotas:
                    found.append((team.name, key.id, meter))
        return found

    async def _checking(self) -> None:
        while True:
            try:
                await self.check()
            except OutboxUnavailable as error:
                log.error("notifications not checked: %s", error)
            except Exception:
                log.exception("notifications not checked")
            await pause(self._config().notifications.check_interval_s)

    # ------------------------------------------------------------ delivering

    async def deliver_due(self) -> None:
        now = self._clock()
        due = await self.outbox.due(now, BATCH)
        await asyncio.gather(*(self._deliver(row, now) for row in due))
        self.pending = await self.outbox.pending_count()

    async def _deliver(self, row: Pending, now: float) -> None:
        if not await self.outbox.claim(row.id, now, now + SEND_TIMEOUT_S + 5):
            return  # another replica has it
        async with self._sends:
            error = await self._post(row)
        if error is None:
            self.sent += 1
            await self.outbox.delivered(row.id, self._clock())
            return
        self.failed += 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** (row.attempts + 1))
        await self.outbox.failed(row.id, self._clock() + backoff, error)
        if row.attempts == 0:
            log.warning(
                "notification %s to %s failed (retried): %s",
                row.event_id,
                _host(row.webhook),
                error,
            )

    async def _post(self, row: Pending) -> str | None:
        assert self._http is not None
        body = row.body.encode()
        headers = {"Content-Type": "application/json"}
        secret = self._secret_of(row.webhook)
        if secret:
            headers[SIGNATURE_HEADER] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            async with self._http.post(row.webhook, data=body, headers=headers) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__

    def _secret_of(self, url: str) -> str | None:
        for hook in self._config().notifications.webhooks:
            if hook.url == url and hook.secret_env:
                return os.environ.get(hook.secret_env) or None
        return None

    async def _delivering(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DELIVERY_POLL_S)
            self._wake.clear()
            try:
                await self.deliver_due()
            except OutboxUnavailable as error:
                log.error("notifications not delivered now: %s", error)
            except Exception:
                log.exception("notifications not delivered now")


def _host(url: str) -> str:
    """The receiver, without a path that may hold a token (Slack's does)."""
    return url.split("//", 1)[-1].split("/", 1)[0]

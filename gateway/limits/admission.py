"""The admission policy: a call is admitted only when every window of its key and its team
has room, waits in its team's FIFO queue, or is refused with the SPEC's 429; `enforce: false`
teams are let through and marked instead.

The windows themselves live in a `WindowStore` given to the `Limiter`: `MemoryStore` (this
process, the default) or `RedisStore` (shared by every replica). The store takes a call's
reservation from all of them at once and settles it to the real usage when the call ends;
the policy decides what a refusal means for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable

from gateway.config.loader import GatewayConfig, KeyConfig, TeamConfig
from gateway.errors import QUEUE_FULL, QUEUE_TIMEOUT, GatewayError
from gateway.limits import report
from gateway.limits.memory import MemoryStore
from gateway.limits.refusals import limit_error
from gateway.limits.store import Admission, StoreFactory, UsageSource
from gateway.limits.windows import Calendar, Draw, Meter, MeterRegistry


class Limiter:
    """Every key's and team's meters over a window store, and the per-team queues."""

    def __init__(
        self,
        config: GatewayConfig,
        store: StoreFactory = MemoryStore,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = MeterRegistry(config, clock, wall_clock)
        self.store = store(self.registry, config)
        self.queues: dict[str, deque[object]] = {}
        self._changes: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------ the meters

    @property
    def clock(self) -> Callable[[], float]:
        return self.registry.clock

    @property
    def wall_clock(self) -> Callable[[], float]:
        return self.registry.wall_clock

    @property
    def calendar(self) -> Calendar:
        return self.registry.calendar

    @property
    def teams(self) -> dict[str, Meter]:
        return self.registry.teams

    @property
    def keys(self) -> dict[str, Meter]:
        return self.registry.keys

    def apply(self, config: GatewayConfig) -> None:
        """(Re)build meters from config, keeping what is already used."""
        self.registry.apply(config)
        self.store.apply(config)

    def meters_for(self, key: KeyConfig, team: TeamConfig) -> tuple[Meter, ...]:
        return self.registry.meters_for(key, team)

    def remaining(self, key: KeyConfig, team: TeamConfig) -> dict[str, dict[str, object]]:
        """Every configured limit of a key and its team; where both set one, the tighter."""
        meters = (self.registry.keys.get(key.id), self.registry.teams.get(team.name))
        return report.remaining(meters, self.registry)

    # ------------------------------------------------------------ the store

    async def start(self, usage: UsageSource) -> None:
        """Start the store; its quotas begin from what the ledger says (`usage`)."""
        await self.store.start(usage)

    async def close(self) -> None:
        await self.store.close()

    async def refresh(self, meters: tuple[Meter, ...]) -> None:
        """Bring `meters` up to date before reporting them."""
        await self.store.refresh(meters)

    def backend_status(self) -> dict[str, object] | None:
        """A shared backend's health for metrics; None for in-process limits."""
        return self.store.status()

    def settle(self, admission: Admission, actual: Draw) -> None:
        """Replace the reservation with what the call really used; free its slot."""
        if admission.settled:
            return
        admission.settled = True
        self.store.settle(admission, actual)
        self._notify(admission.team)

    def charge(self, team: TeamConfig, key: KeyConfig, used: Draw) -> None:
        """Count a usage the gateway learns of after the fact against the key's and team's
        windows (a batch's tokens and cost when it ends); nothing is refused."""
        meters = self.meters_for(key, team)
        if meters:
            self.store.charge(meters, used)
            self._notify(team.name)

    def return_rates(self, admission: Admission) -> None:
        """A call the upstream never answered gives back all it reserved from the per-minute
        rates (calendar quotas still count it when it settles, as the ledger's rebuild does)."""
        if admission.settled or admission.rates_returned:
            return
        admission.rates_returned = True
        if self.store.return_rates(admission):
            self._notify(admission.team)

    # ------------------------------------------------------------ admission and the queue

    async def admit(self, team: TeamConfig, meters: tuple[Meter, ...], draw: Draw) -> Admission:
        """Admit now, wait in the team's FIFO queue, or raise the SPEC's 429."""
        if not team.enforce:
            return await self._admit_in_shadow(team, meters, draw)
        started = self.clock()
        queue = self.queues.setdefault(team.name, deque())
        if not queue:
            refusal, ticket = await self.store.take(meters, draw)
            if refusal is None:
                return Admission(team.name, meters, draw, ticket=ticket)
            if team.on_limit != "queue" or refusal.queue_wait_s > team.queue.max_wait_s:
                raise limit_error(refusal)
        if len(queue) >= team.queue.max_depth:
            raise GatewayError(
                QUEUE_FULL,
                f"The queue of team '{team.name}' is full ({team.queue.max_depth} waiting).",
                retry_after_s=1,
                limit="queue",
            )
        place = object()
        queue.append(place)
        try:
            ticket = await self._wait_turn(
                team, meters, draw, place, started + team.queue.max_wait_s
            )
        finally:
            queue.remove(place)
            self._notify(team.name)
        queued_ms = (self.clock() - started) * 1000
        return Admission(team.name, meters, draw, queued_ms=queued_ms, ticket=ticket)

    async def admit_now(self, team: TeamConfig, meters: tuple[Meter, ...], draw: Draw) -> Admission:
        """Admit now or raise the SPEC's 429, whatever the team's `on_limit`: for what cannot
        wait in a queue (a response the upstream began on its own)."""
        if not team.enforce:
            return await self._admit_in_shadow(team, meters, draw)
        refusal, ticket = await self.store.take(meters, draw)
        if refusal is not None:
            raise limit_error(refusal)
        return Admission(team.name, meters, draw, ticket=ticket)

    async def _admit_in_shadow(
        self, team: TeamConfig, meters: tuple[Meter, ...], draw: Draw
    ) -> Admission:
        """`enforce: false`: let every call through, but account exactly as a rejecting team
        would: a call that would have been refused takes nothing and is marked instead."""
        try:
            refusal, ticket = await self.store.take(meters, draw)
        except GatewayError:
            # A shared backend that cannot be reached refuses nothing in shadow mode either.
            return Admission(team.name, (), draw)
        if refusal is None:
            return Admission(team.name, meters, draw, ticket=ticket)
        return Admission(team.name, (), draw, shadow_rejected_by=refusal.window)

    async def _wait_turn(
        self,
        team: TeamConfig,
        meters: tuple[Meter, ...],
        draw: Draw,
        place: object,
        deadline: float,
    ) -> object:
        """Wait for the head of the queue and room in every window; the take's ticket."""
        queue = self.queues[team.name]
        while True:
            retry_after = math.inf
            if queue[0] is place:
                refusal, ticket = await self.store.take(meters, draw)
                if refusal is None:
                    return ticket
                retry_after = refusal.queue_wait_s or self.store.poll_interval_s
            left = deadline - self.clock()
            if left <= 0 or retry_after > left and math.isfinite(retry_after):
                raise GatewayError(
                    QUEUE_TIMEOUT,
                    f"Waited in the queue of team '{team.name}' past its limit of "
                    f"{team.queue.max_wait_s:g}s.",
                    retry_after_s=max(1, math.ceil(retry_after))
                    if math.isfinite(retry_after)
                    else 1,
                    limit="queue",
                )
            changed = self._changes.setdefault(team.name, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, retry_after))

    def _notify(self, team: str) -> None:
        """Wake the team's waiters: a slot was freed or the head of the queue moved."""
        changed = self._changes.pop(team, None)
        if changed is not None:
            changed.set()

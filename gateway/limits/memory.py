"""Windows kept in this process (`limits.backend: memory`, the default).

All counters live in one event loop: `try_admit` checks every window of a call's key and team
and takes its reservation with no `await` in between, so admission is atomic without locks.
"""

from __future__ import annotations

import math

from gateway.config.loader import GatewayConfig
from gateway.limits.refusals import Refusal, concurrency_refusal, quota_refusal, rate_refusal
from gateway.limits.store import Admission, UsageSource
from gateway.limits.windows import NOTHING, Draw, Meter, MeterRegistry


class MemoryStore:
    """The registry's meters are the windows themselves."""

    # Every call's end is local and wakes the queue: no need to look again by time.
    poll_interval_s = math.inf

    def __init__(self, registry: MeterRegistry, config: GatewayConfig | None = None) -> None:
        # `config`: every store is built as `store(registry, config)`; this one needs none.
        self.registry = registry

    async def start(self, usage: UsageSource) -> None:
        """Start the quotas from what the ledger says their windows have used, so a restart
        never hands out a fresh quota."""
        for (scope, name), used in (await usage()).items():
            self.seed_usage(scope, name, used)

    async def close(self) -> None:
        """Nothing to release."""

    def apply(self, config: GatewayConfig) -> None:
        """Nothing beyond the registry's own rebuild."""

    def seed_usage(self, scope: str, name: str, used: dict[str, Draw]) -> None:
        """Start a meter's quotas from the ledger: used[period] is that window's total."""
        meter = self.registry.find(scope, name)
        if meter is None:
            return
        now = self.registry.wall_clock()
        for quota in meter.quotas:
            quota.roll(self.registry.calendar, now)
            if quota.period in used:
                quota.used = used[quota.period].of(quota.kind)

    async def take(self, meters: tuple[Meter, ...], draw: Draw) -> tuple[Refusal | None, object]:
        return self.try_admit(meters, draw), None

    def try_admit(self, meters: tuple[Meter, ...], draw: Draw) -> Refusal | None:
        """Take `draw` from every meter, or say which window refused and for how long."""
        now, wall = self.registry.clock(), self.registry.wall_clock()
        for meter in meters:
            refusal = self._check(meter, draw, now, wall)
            if refusal is not None:
                return refusal
        for meter in meters:
            for bucket in meter.rates:
                bucket.take(draw.of(bucket.kind))
            for quota in meter.quotas:
                quota.used += draw.of(quota.kind)
            meter.active += draw.slots
        return None

    def _check(self, meter: Meter, draw: Draw, now: float, wall: float) -> Refusal | None:
        if draw.slots and meter.max_concurrent is not None and meter.active >= meter.max_concurrent:
            return concurrency_refusal(meter)
        for bucket in meter.rates:
            wait = bucket.wait_for(draw.of(bucket.kind), now)
            if wait > 0:
                return rate_refusal(meter, bucket, draw.of(bucket.kind), wait)
        calendar = self.registry.calendar
        for quota in meter.quotas:
            quota.roll(calendar, wall)
            if not quota.fits(draw.of(quota.kind)):
                return quota_refusal(meter, quota, quota.window_end - wall, calendar.zone)
        return None

    def settle(self, admission: Admission, actual: Draw) -> None:
        """Each window gets back what was reserved but not used, or gives what was used
        beyond it (a bucket into debt); quotas whose window has ended since keep nothing."""
        wall = self.registry.wall_clock()
        for meter in admission.meters:
            meter.active -= admission.reserved.slots
            for bucket in () if admission.rates_returned else meter.rates:
                difference = admission.reserved.of(bucket.kind) - actual.of(bucket.kind)
                if difference > 0:
                    bucket.give_back(difference)
                else:
                    bucket.take(-difference)
            for quota in meter.quotas:
                if wall < quota.window_end:
                    quota.used += actual.of(quota.kind) - admission.reserved.of(quota.kind)

    def charge(self, meters: tuple[Meter, ...], used: Draw) -> None:
        self.settle(Admission("", meters, NOTHING), used)

    def return_rates(self, admission: Admission) -> bool:
        """Calendar quotas still count the call when it settles, as the ledger's rebuild
        does; only the per-minute rates get their reservation back, now."""
        for meter in admission.meters:
            for bucket in meter.rates:
                bucket.give_back(admission.reserved.of(bucket.kind))
        return True

    async def refresh(self, meters: tuple[Meter, ...]) -> None:
        """The meters are the windows: always up to date."""

    def status(self) -> None:
        return None

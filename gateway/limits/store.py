"""Where the windows live: the interface the admission policy (`admission.Limiter`) draws
through. `memory.MemoryStore` keeps them in this process; `redis.RedisStore` in Redis, shared
by every replica. The policy owns the queue, shadow mode and the client's errors; a store
owns only "does this draw fit every window, and if so take it", and settling it later."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config.loader import GatewayConfig
from gateway.limits.refusals import Refusal
from gateway.limits.windows import Draw, Meter, MeterRegistry

# What each (scope, name) used in each current period ("hour", "day", "month").
Usage = dict[tuple[str, str], dict[str, Draw]]
UsageSource = Callable[[], Awaitable[Usage]]


@dataclass(slots=True)
class Admission:
    """A call let through: what it reserved, to settle when it ends."""

    team: str
    meters: tuple[Meter, ...]
    reserved: Draw
    queued_ms: float = 0.0
    settled: bool = False
    rates_returned: bool = False  # the upstream never answered: per-minute rates given back
    shadow_rejected_by: str | None = None  # shadow mode: the limit that would have refused
    ticket: object = None  # what the store needs to settle the call


class WindowStore(Protocol):
    """The windows of every meter in a `MeterRegistry`, wherever they are kept."""

    # How often the head of a queue looks again for a freed concurrency slot when no local
    # call's end can tell it (inf where every end is local and wakes the queue).
    poll_interval_s: float

    async def start(self, usage: UsageSource) -> None:
        """Begin: quotas start from what the ledger says their windows have used."""

    async def close(self) -> None:
        """Release what the store holds (connections, tasks)."""

    def apply(self, config: GatewayConfig) -> None:
        """The registry was just rebuilt from `config`."""

    async def take(self, meters: tuple[Meter, ...], draw: Draw) -> tuple[Refusal | None, object]:
        """Take `draw` from every window of `meters` at once, or take nothing and say which
        window refused; the second value is the ticket for settling the call."""
        ...

    def settle(self, admission: Admission, actual: Draw) -> None:
        """Replace an admission's reservation with what the call used; free its slots (the
        policy calls this once per admission)."""

    def charge(self, meters: tuple[Meter, ...], used: Draw) -> None:
        """Count a usage that took no reservation (a batch billed when it completes): the
        windows take it even past their limits, as a call's settle can."""

    def return_rates(self, admission: Admission) -> bool:
        """The upstream never answered: the per-minute rates get back all it reserved (the
        policy has marked it `rates_returned`). True if room was freed now, so the queue
        should look again; False if that happens at `settle`."""
        ...

    async def refresh(self, meters: tuple[Meter, ...]) -> None:
        """Bring the local meters up to date before they are reported."""

    def status(self) -> dict[str, object] | None:
        """The backend's health for metrics; None where there is no backend to lose."""


# A store is built over the registry it keeps the windows of, with the gateway's config.
StoreFactory = Callable[[MeterRegistry, GatewayConfig], WindowStore]

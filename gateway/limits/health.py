"""Whether the shared limits backend answers, and what `on_backend_error` did while it did
not: one error line when an outage starts, one warning when it ends, counts for metrics, and
a pause before the next try so calls do not each wait for a backend that is down."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("gateway.limits")

# While the backend is down it is tried again this often.
RETRY_AFTER_S = 1.0


@dataclass
class BackendHealth:
    """Whether Redis answers, and what the outage policy did while it did not."""

    policy: str
    up: bool = True
    errors: int = 0
    outages: int = 0
    let_through: int = 0  # fail_open: calls admitted without limits
    refused: int = 0  # fail_closed: calls refused with 503
    down_since: float = 0.0
    retry_at: float = 0.0
    _at_outage_start: tuple[int, int] = (0, 0)  # (let_through, refused) when it began

    def worth_trying(self, now: float) -> bool:
        return self.up or now >= self.retry_at

    def failed(self, error: BaseException, now: float) -> None:
        self.errors += 1
        self.retry_at = now + RETRY_AFTER_S
        if self.up:
            self.up, self.down_since = False, now
            self.outages += 1
            self._at_outage_start = (self.let_through, self.refused)
            if self.policy == "fail_closed":
                action = "refusing calls (503)"
            else:
                action = "letting calls through without limits"
            log.error(
                "limits backend unreachable (%s): %s, as on_backend_error: %s says",
                _describe(error), action, self.policy,
            )  # fmt: skip

    def succeeded(self, now: float) -> None:
        if self.up:
            return
        self.up = True
        log.warning(
            "limits backend reachable again after %.1fs; meanwhile %d calls were let through "
            "without limits and %d refused",
            now - self.down_since,
            self.let_through - self._at_outage_start[0],
            self.refused - self._at_outage_start[1],
        )

    def status(self) -> dict[str, object]:
        return {
            "up": self.up,
            "errors": self.errors,
            "outages": self.outages,
            "let_through": self.let_through,
            "refused": self.refused,
        }


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__

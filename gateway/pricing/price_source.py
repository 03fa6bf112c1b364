"""What both price sources, a `PriceTable` alone and a `PriceBook`, answer the same way.

`PricesByCounts` is their common base: the cost of a call known only by its classic counts
(tokens and bytes), and the per-token rates a stream budget needs before the call is made,
from the one thing each source says for itself: the rates a standard call pays.
"""

from __future__ import annotations

import time

from gateway.metering.usage import CallUsage
from gateway.pricing.arithmetic import UnitRates, rate_at


class PricesByCounts:
    """`cost_nanousd` and `token_rates_picousd` on any price source with a `cost_of` and a
    `_standard_rates`."""

    def cost_nanousd(
        self,
        model: str | None,
        *,
        input_tokens: int,
        cached_input_tokens: int,
        output_tokens: int,
        request_bytes: int,
        response_bytes: int,
        billable: bool,
        at: float | None = None,
    ) -> tuple[int, bool]:
        """(cost, priced) of a call with only these counts, at `at` (None: now), standard."""
        usage = CallUsage(
            input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens,
            output_tokens=output_tokens,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
        )
        when = at if at is not None else time.time()
        return self.cost_of(usage, model=model, at=when, billable=billable)  # type: ignore[attr-defined]

    def token_rates_picousd(
        self, model: str | None, *, at: float | None = None, input_tokens: int = 0
    ) -> tuple[int, int] | None:
        """(input, output) pico-USD per token a standard call would pay (its family's for an
        estimate), or None without a price: for budgets before the call is made."""
        rates = self._standard_rates(model, at)
        if rates is None:
            return None
        return rate_at(rates.input, 0, input_tokens), rate_at(rates.output, 0, input_tokens)

    def _standard_rates(self, model: str | None, at: float | None) -> UnitRates | None:
        """The rates a standard call to `model` pays at `at` (None: now), or None without a
        price (an estimate pays its family's)."""
        raise NotImplementedError

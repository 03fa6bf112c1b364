"""Budgets enforced during a stream (`on_budget_exhausted_mid_stream: cut`).

A stream's output is counted as its events pass, with the offline tokenizer. When the team's
remaining daily tokens or spend would be crossed, the stream ends cleanly: a final SSE event
with OpenAI's `insufficient_quota` error, then `[DONE]`, and the call is billed for exactly
the text the client received.
"""

from __future__ import annotations

from gateway.limits.store import Admission
from gateway.limits.windows import SPEND, TOKENS, Calendar
from gateway.metering import tokens
from gateway.metering.estimate import text_of_sse
from gateway.metering.sse import last_event_end, split_events
from gateway.pricing.arithmetic import PICO_PER_NANO
from gateway.pricing.book import PriceBook
from gateway.upstream.forward import StopRelay


def output_budget(
    admission: Admission,
    calendar: Calendar,
    now: float,
    prices: PriceBook,
    model: str | None,
    prompt_tokens: int,
) -> int | None:
    """Output tokens the call may still produce under its token and spend quotas (spend at the
    standard prices in force now, in pico-USD per token)."""
    budgets = []
    rates = prices.token_rates_picousd(model, at=now, input_tokens=prompt_tokens)
    for meter in admission.meters:
        for quota in meter.quotas:
            quota.roll(calendar, now)
            available = quota.limit - (quota.used - admission.reserved.of(quota.kind))
            if quota.kind == TOKENS:
                budgets.append(available - prompt_tokens)
            elif quota.kind == SPEND and rates is not None and rates[1] > 0:
                input_rate, output_rate = rates
                prompt_cost = prompt_tokens * input_rate
                budgets.append((available * PICO_PER_NANO - prompt_cost) // output_rate)
    return max(0, min(budgets)) if budgets else None


_CUT_EVENT = (
    b'data: {"error":{"message":"The team\'s budget was used up during this answer; it was '
    b'ended here.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}\n\n'
    b"data: [DONE]\n\n"
)


class StreamBudget:
    """Passes whole SSE events through while their text fits `allowed` output tokens."""

    def __init__(self, model: str | None, allowed: int) -> None:
        self.model = model
        self.allowed = allowed
        self.counted = 0
        self.delivered: list[str] = []
        self._held = b""
        self.cut = False

    def feed(self, data: bytes) -> bytes:
        data = self._held + data if self._held else data
        end = last_event_end(data)
        if end == -1:
            self._held = data
            return b""
        complete, self._held = data[:end], data[end:]
        return self._pass(complete)

    def _pass(self, complete: bytes) -> bytes:
        passed = []
        for event in split_events(complete):
            if not event.strip():
                continue
            text = text_of_sse(event)
            if text:
                self.counted += tokens.count_text(self.model, text)
                if self.counted > self.allowed and self.delivered:
                    self.cut = True
                    raise StopRelay(b"".join(passed) + _CUT_EVENT)
                self.delivered.append(text)
            passed.append(event)
        return b"".join(passed)

    def finish(self) -> bytes:
        """The rest, counted like any event (a stream may end without a blank line)."""
        held, self._held = self._held, b""
        return self._pass(held) if held else b""

    def delivered_tokens(self) -> int:
        """Exact count of the text the client received (one pass over all of it)."""
        return tokens.count_text(self.model, "".join(self.delivered))

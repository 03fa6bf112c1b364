"""The integer arithmetic every price uses: nano- and pico-USD, `UnitRates`, a call's cost.

No float ever takes part in money arithmetic. The cost of a call's usage is computed in
`usage_cost_nanousd` from `UnitRates`: integer pico-USD (1e-12 USD) per token, per character
and per tool call, per hour of audio. The exact sum is rounded once, half up, to whole
nano-USD (a batch call's half of it likewise, once); transfer and per-call fees, whole
nano-USD already, are added after (`call_fees`). A unit without a price of its own is billed
at its parent's rate: cached input, cache writes, audio and image input at the input rate;
audio and image output at the output rate; reasoning and rejected-prediction tokens are
output (OpenAI counts both inside `completion_tokens` and bills them as output).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from gateway.metering.usage import USAGE_FIELDS

NANO_PER_USD = 10**9
# USD per 10^6 units (tokens or bytes) → nano-USD per unit.
NANO_PER_UNIT_PER_USD_PER_MILLION = NANO_PER_USD // 10**6
PICO_PER_NANO = 1000
PICO_PER_USD = 10**12
MS_PER_HOUR = 3_600_000
_PRICED_UNITS = tuple(name for name in USAGE_FIELDS if not name.endswith("_bytes"))


class UsageLike(Protocol):
    """What a call used, counted as OpenAI reports it: `input_tokens` includes the cached,
    cache-write, audio and image input tokens; `output_tokens` includes the reasoning, audio,
    image and rejected-prediction tokens. `gateway.metering.usage.Usage` and
    `gateway.ledger.writer.CallRecord` have these fields; a missing or NULL field counts 0."""

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    request_bytes: int
    response_bytes: int


@dataclass(frozen=True, slots=True)
class Tiered:
    """A long-context price: `base` until the prompt's input tokens exceed a tier's start, then
    that tier's price for every token of the call (genai-prices' and OpenAI's "cliff")."""

    base: int
    tiers: tuple[tuple[int, int], ...]  # (start, rate), ascending starts

    def at(self, input_tokens: int) -> int:
        rate = self.base
        for start, price in self.tiers:
            if input_tokens > start:
                rate = price
        return rate


Rate = int | Tiered


@dataclass(frozen=True, slots=True)
class UnitRates:
    """A model's prices as they apply to one call, in integer pico-USD (1e-12 USD): per token,
    per character, per tool call, per hour of audio. None: no price of its own (the parent's
    rate applies; a unit without a parent then costs nothing)."""

    input: Rate | None = None
    cached_input: Rate | None = None
    cache_write: Rate | None = None
    output: Rate | None = None
    audio_input: Rate | None = None
    audio_output: Rate | None = None
    image_input: Rate | None = None
    image_output: Rate | None = None
    web_search: int | None = None
    file_search: int | None = None
    audio_hour: int | None = None
    input_character: int | None = None

    def over(self, base: UnitRates) -> UnitRates:
        """These rates where set, else `base`'s (a tier's or batch's partial prices)."""
        return UnitRates(
            *(
                mine if (mine := getattr(self, name)) is not None else getattr(base, name)
                for name in RATE_FIELDS
            )
        )

    def tier_starts(self) -> tuple[int, ...]:
        return tuple(
            sorted(
                {
                    start
                    for name in RATE_FIELDS
                    if isinstance(rate := getattr(self, name), Tiered)
                    for start, _ in rate.tiers
                }
            )
        )


RATE_FIELDS = tuple(f.name for f in fields(UnitRates))


def _count(usage: object, name: str) -> int:
    value = getattr(usage, name, 0)
    return value if value and value > 0 else 0


def rate_at(rate: Rate | None, parent: int, input_tokens: int) -> int:
    """The rate a call with `input_tokens` pays: `rate`'s (its tier's), else its parent's."""
    if rate is None:
        return parent
    return rate if type(rate) is int else rate.at(input_tokens)  # type: ignore[union-attr]


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator to the nearest integer, halves up (both non-negative)."""
    return (2 * numerator + denominator) // (2 * denominator)


def usage_cost_nanousd(rates: UnitRates, usage: object, *, halve: bool = False) -> int:
    """The exact cost of a call's usage, rounded once, half up, to whole nano-USD; `halve`
    takes 50% of the exact cost before that one rounding (batch without a batch price).

    The parts of input (cached, cache write, audio, image) are taken out of it in that order,
    each at most what is left, so a reply that over-reports a part is never billed twice; the
    rest is billed at the input rate. Output likewise (audio, image; reasoning and rejected
    predictions stay at the output rate). Integers only, but for `audio_seconds`, which is
    taken to the millisecond first.
    """
    n = _count(usage, "input_tokens")
    input_rate = rate_at(rates.input, 0, n)
    pico = _parts_of(usage, n, input_rate, n, (
        ("cached_input_tokens", rates.cached_input),
        ("cache_write_tokens", rates.cache_write),
        ("audio_input_tokens", rates.audio_input),
        ("image_input_tokens", rates.image_input),
    ))  # fmt: skip
    output_rate = rate_at(rates.output, 0, n)
    pico += _parts_of(usage, _count(usage, "output_tokens"), output_rate, n, (
        ("audio_output_tokens", rates.audio_output),
        ("image_output_tokens", rates.image_output),
    ))  # fmt: skip

    if calls := _count(usage, "web_search_calls"):
        pico += calls * (rates.web_search or 0)
    if calls := _count(usage, "file_search_calls"):
        pico += calls * (rates.file_search or 0)
    if characters := _count(usage, "input_characters"):
        pico += characters * (rates.input_character or 0)
    denominator = PICO_PER_NANO * (2 if halve else 1)
    seconds = getattr(usage, "audio_seconds", 0)
    if seconds and seconds > 0 and rates.audio_hour:
        # An hour's price over whole milliseconds: exact with the denominator scaled to match.
        scaled = pico * MS_PER_HOUR + round(seconds * 1000) * rates.audio_hour
        return round_half_up(scaled, denominator * MS_PER_HOUR)
    return round_half_up(pico, denominator)


def _parts_of(
    usage: object,
    total: int,
    parent_rate: int,
    input_tokens: int,
    parts: tuple[tuple[str, Rate | None], ...],
) -> int:
    """pico-USD of `total` tokens: each part (a field of `usage` and its rate) taken out in
    order, at most what is left, at its own rate or else the parent's; the rest at the
    parent's."""
    pico = 0
    for unit, rate in parts:
        if count := min(_count(usage, unit), total):
            total -= count
            pico += count * rate_at(rate, parent_rate, input_tokens)
    return pico + total * parent_rate


def has_usage(usage: object) -> bool:
    """Whether the call used anything a price could apply to (tokens, calls, seconds...)."""
    return any((getattr(usage, name, 0) or 0) > 0 for name in _PRICED_UNITS)


def call_fees(usage: object, transfer_nanousd_per_byte: int, per_request_nanousd: int) -> int:
    """Transfer (request + response body bytes) and the flat fee, in nano-USD."""
    moved = _count(usage, "request_bytes") + _count(usage, "response_bytes")
    return moved * transfer_nanousd_per_byte + per_request_nanousd


def format_usd(nanousd: int) -> str:
    """Exact decimal USD: at most 9 decimals, trailing zeros trimmed down to 2."""
    sign = "-" if nanousd < 0 else ""
    whole, fraction = divmod(abs(nanousd), NANO_PER_USD)
    decimals = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"

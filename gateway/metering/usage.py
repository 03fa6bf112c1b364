"""What a call used (`Usage`), and the usage an OpenAI answer states, parsed from its JSON.

`Usage` is what an answer states (`usage_from_mapping`, `usage_of_object`), what the offline
estimate and a cut stream's bill build; `CallUsage` adds the units the gateway counts itself,
as the ledger holds them, for pricing (`PriceBook.cost_of`, repricing a ledger row). Reading
an answer's bytes without parsing all of them is `gateway.metering.answers`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(slots=True)
class Usage:
    """What a call used, in the units it is billed in, counted as the upstream reports them.

    The token kinds are subsets of the column they name, as OpenAI counts them:
    `cached_input_tokens`, `cache_write_tokens`, `audio_input_tokens`, `image_input_tokens`
    are part of `input_tokens`; `reasoning_tokens`, `audio_output_tokens`,
    `image_output_tokens`, `rejected_prediction_tokens` part of `output_tokens` (each capped
    at its parent). `service_tier` is the tier the answer says served the call (None where the
    endpoint reports none); `audio_seconds` is the duration a transcription is billed by.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    cache_write_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    rejected_prediction_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
    audio_seconds: float = 0.0
    service_tier: str | None = None


@dataclass(slots=True)
class CallUsage(Usage):
    """One call's usage, with the ledger's unit names (nested as in `Usage`): what the
    answer stated, and what the gateway counts itself: the request's characters
    (character-priced speech) and the body bytes (transfer). A ledger row read back leaves
    `estimated` and `service_tier` unset: a price takes the tier as its own argument."""

    input_characters: int = 0
    request_bytes: int = 0
    response_bytes: int = 0

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> CallUsage:
        """From a ledger row read as a dict: absent columns and NULLs count 0."""
        return cls(**{name: row.get(name) or 0 for name in USAGE_FIELDS})


# The ledger's columns of billed units (`gateway.ledger.writer.CallRecord` names them alike):
# every field but the two facts an answer states beside its counts.
_ANSWER_FACTS = ("estimated", "service_tier")
USAGE_FIELDS = tuple(f.name for f in fields(CallUsage) if f.name not in _ANSWER_FACTS)


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# Chat/completions, then Responses and images, then transcriptions and Realtime spellings.
_INPUT_DETAILS = ("prompt_tokens_details", "input_tokens_details", "input_token_details")
_OUTPUT_DETAILS = ("completion_tokens_details", "output_tokens_details", "output_token_details")


def _details(usage: dict[str, Any], names: tuple[str, str, str]) -> dict[str, Any] | None:
    first, second, third = names
    value = usage.get(first) or usage.get(second) or usage.get(third)
    return value if type(value) is dict else None


def usage_from_mapping(usage: Any) -> Usage | None:
    """An OpenAI usage object, in any endpoint's naming, → Usage (its own fields only).

    - chat/completions: `prompt_tokens`, `completion_tokens`, `prompt_tokens_details`
      {cached, cache_write, audio, image}, `completion_tokens_details` {reasoning, audio,
      rejected_prediction};
    - Responses: `input_tokens`, `output_tokens`, `input_tokens_details` {cached,
      cache_write}, `output_tokens_details` {reasoning};
    - embeddings: `prompt_tokens` alone;
    - images: `input_tokens_details` {text, image} and no output details, or output details
      {text, image}: with no output details every output token is an image token;
    - transcriptions: `type: "tokens"` with `input_token_details` {text, audio}, or
      `type: "duration"` with `seconds`; Realtime: `input_token_details` /
      `output_token_details` {text, audio, image, cached}.
    """
    if type(usage) is not dict:
        return None
    if "type" in usage and usage["type"] == "duration":  # a transcription billed by seconds
        seconds = _seconds(usage.get("seconds"))
        return None if seconds is None else Usage(audio_seconds=seconds)
    input_tokens = usage.get("prompt_tokens")
    if input_tokens is None:
        input_tokens = usage.get("input_tokens")
    output_tokens = usage.get("completion_tokens")
    if output_tokens is None:
        output_tokens = usage.get("output_tokens")
    if input_tokens is None and output_tokens is None:
        return None
    inputs = input_tokens if type(input_tokens) is int and input_tokens > 0 else 0
    outputs = output_tokens if type(output_tokens) is int and output_tokens > 0 else 0
    # Chat's spelling, then Responses' and images', then transcriptions' and Realtime's.
    ins = (
        usage.get("prompt_tokens_details")
        or usage.get("input_tokens_details")
        or usage.get("input_token_details")
    )
    outs = (
        usage.get("completion_tokens_details")
        or usage.get("output_tokens_details")
        or usage.get("output_token_details")
    )
    cached, cache_write, audio_in, image_in = _subsets(ins, _INPUT_PARTS, inputs)
    reasoning, audio_out, image_out, rejected = _subsets(outs, _OUTPUT_PARTS, outputs)
    if not outs and type(ins) is dict and _is_images_usage(usage, ins):
        image_out = outputs  # an images usage without output details: all of it is image
    return Usage(
        inputs,
        cached,
        outputs,
        reasoning,
        False,
        cache_write,
        audio_in,
        audio_out,
        image_in,
        image_out,
        rejected,
    )


# Where each detail goes in the lists `_subsets` returns.
_INPUT_PARTS = {"cached_tokens": 0, "cache_write_tokens": 1, "audio_tokens": 2, "image_tokens": 3}
_OUTPUT_PARTS = {
    "reasoning_tokens": 0,
    "audio_tokens": 1,
    "image_tokens": 2,
    "rejected_prediction_tokens": 3,
}


_NO_PARTS = (0, 0, 0, 0)


def _subsets(details: dict[str, Any] | None, parts: dict[str, int], parent: int) -> Sequence[int]:
    """The counts of a details object named in `parts`, each capped at its parent's count."""
    if type(details) is not dict or not any(details.values()):  # usually all zero
        return _NO_PARTS
    counts = [0, 0, 0, 0]
    for key, value in details.items():
        if type(value) is int and value > 0:  # not a bool, whose type is bool
            index = parts.get(key)
            if index is not None:
                counts[index] = value if value < parent else parent
    return counts


def _is_images_usage(usage: dict[str, Any], input_details: dict[str, Any]) -> bool:
    """The usage of `/images/*` (and their stream events): `input_tokens` naming, no `type`,
    `input_tokens_details` with `image_tokens`, output details (if any) with `image_tokens`."""
    if "image_tokens" not in input_details or "prompt_tokens" in usage or "type" in usage:
        return False
    outs = _details(usage, _OUTPUT_DETAILS)
    return outs is None or "image_tokens" in outs


def says_all(usage: dict[str, Any]) -> bool:
    """True for the usage of an answer that states nothing billable beside it: embeddings
    (no output count), images, transcriptions (a `type`). Chat and Responses answers have a
    `service_tier`, and Responses ones tool calls, outside their usage."""
    if "type" in usage:
        return True
    if "completion_tokens" in usage:
        return False
    if "output_tokens" not in usage:
        return True
    ins = _details(usage, _INPUT_DETAILS)
    return ins is not None and _is_images_usage(usage, ins)


def usage_of_object(answer: Any) -> Usage | None:
    """A parsed answer or stream event → its Usage, with the facts stated beside `usage`.

    A Responses event (`response.completed`, `.incomplete`, `.failed`; Realtime's
    `response.done`) is read through its `response` object. `service_tier` is the object's
    own; `web_search_calls` / `file_search_calls` count its `output` items of those types,
    unless `tool_usage.web_search.num_requests` (the billable searches) says otherwise. A
    verbose transcription without `usage` is billed by its `duration`. None: no usage stated.
    """
    if type(answer) is not dict:
        return None
    if "response" in answer:
        kind, response = answer.get("type"), answer["response"]
        if type(kind) is str and kind.startswith("response.") and type(response) is dict:
            answer = response
    usage = usage_from_mapping(answer.get("usage"))
    if usage is None:
        seconds = _seconds(answer.get("duration"))
        if seconds is None or type(answer.get("text")) is not str:
            return None
        usage = Usage(audio_seconds=seconds)  # whisper-1 verbose_json before `usage` existed
    tier = answer.get("service_tier")
    if type(tier) is str:
        usage.service_tier = tier
    output = answer.get("output")
    if type(output) is list:
        web = files = 0
        for item in output:
            if type(item) is dict:
                item_type = item.get("type")
                if item_type == "web_search_call":
                    web += 1
                elif item_type == "file_search_call":
                    files += 1
        usage.web_search_calls, usage.file_search_calls = web, files
    if "tool_usage" in answer:
        billed = billed_web_searches(answer["tool_usage"])
        if billed is not None:
            usage.web_search_calls = billed
    return usage


def billed_web_searches(tool_usage: Any) -> int | None:
    """The billable web searches a `tool_usage` object states (`web_search.num_requests`)."""
    web_search = tool_usage.get("web_search") if isinstance(tool_usage, dict) else None
    requests = web_search.get("num_requests") if isinstance(web_search, dict) else None
    if isinstance(requests, int) and not isinstance(requests, bool) and requests >= 0:
        return requests
    return None

"""`StreamBudget` (`gateway/limits/budget.py`) on its own: whole SSE events pass byte for byte
while their text fits the allowed output tokens; the event that would cross it is replaced by
the `insufficient_quota` event and `[DONE]`, at the same place however the stream is split,
and what was delivered is counted exactly."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from gateway.limits import budget as budget_module
from gateway.limits.budget import StreamBudget
from gateway.metering import tokens
from gateway.upstream.forward import StopRelay

REPLAY = Path("/work/shared/replay")
MODEL = "gpt-4o-mini"  # o200k_base

CUT = (
    b'data: {"error":{"message":"The team\'s budget was used up during this answer; it was '
    b'ended here.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}\n\n'
    b"data: [DONE]\n\n"
)


def body_of(name: str) -> bytes:
    return json.loads((REPLAY / f"{name}.json").read_text())["response"]["body_text"].encode()


def events_of(body: bytes) -> list[bytes]:
    """Each event with its blank line."""
    return [event + b"\n\n" for event in body.split(b"\n\n")[:-1]]


def relay(budget: StreamBudget, pieces: Iterable[bytes]) -> tuple[bytes, bool]:
    """What the client is sent through the budget, and whether the stream was cut."""
    out = []
    try:
        for piece in pieces:
            out.append(budget.feed(piece))
        out.append(budget.finish())  # as the relay's flush: it may cut too
    except StopRelay as stop:
        return b"".join(out) + stop.final, True
    return b"".join(out), False


def chunk(text: str | None) -> bytes:
    delta = {} if text is None else {"content": text}
    return (
        b"data: "
        + json.dumps({"choices": [{"index": 0, "delta": delta}]}, separators=(",", ":")).encode()
        + b"\n\n"
    )


def test_the_cut_event_is_openais_insufficient_quota_error_then_done():
    assert budget_module._CUT_EVENT == CUT


# ---------------------------------------------------------------- a real chat stream

# llm-chat-stream-text-usage: 28 events; events 1..24 each carry one token of text (24 in all),
# event 0 is the role chunk, 25 the finish chunk, 26 the usage chunk, 27 [DONE].
CHAT = "llm-chat-stream-text-usage"


def test_the_recorded_chat_stream_carries_24_one_token_texts():
    events = events_of(body_of(CHAT))
    assert len(events) == 28
    texts = [json.loads(e[6:])["choices"] for e in events[:-1]]
    contents = [c[0]["delta"].get("content") for c in texts if c]
    assert [tokens.count_text(MODEL, text or "") for text in contents] == [0] + [1] * 24 + [0]


def test_a_stream_that_uses_exactly_its_budget_passes_byte_for_byte():
    body = body_of(CHAT)
    budget = StreamBudget(MODEL, 24)
    assert relay(budget, [body]) == (body, False)
    assert (budget.cut, budget.counted, len(budget.delivered)) == (False, 24, 24)
    assert budget.delivered_tokens() == 24


def test_one_token_less_ends_the_stream_before_its_last_text_event():
    body = body_of(CHAT)
    events = events_of(body)
    budget = StreamBudget(MODEL, 23)
    assert relay(budget, [body]) == (b"".join(events[:24]) + CUT, True)
    assert budget.cut
    assert budget.delivered_tokens() == 23 and len(budget.delivered) == 23
    assert budget.counted == 24  # the event that crossed is counted, never delivered


@pytest.mark.parametrize("allowed", [1, 23])
def test_every_split_point_cuts_at_the_same_event(allowed: int):
    body = body_of(CHAT)
    expected = b"".join(events_of(body)[: allowed + 1]) + CUT  # the role chunk + `allowed`
    for at in range(len(body) + 1):
        budget = StreamBudget(MODEL, allowed)
        assert relay(budget, [body[:at], body[at:]]) == (expected, True), at
        assert budget.delivered_tokens() == allowed, at


def test_a_stream_within_budget_passes_byte_for_byte_at_every_split_point_and_byte_by_byte():
    body = body_of(CHAT)
    pieces = [body[i : i + 1] for i in range(len(body))]
    assert relay(StreamBudget(MODEL, 24), pieces) == (body, False)
    stream = b"".join(SEVERAL) + chunk(None) + b"data: [DONE]\n\n"
    for at in range(len(stream) + 1):
        budget = StreamBudget(MODEL, 7)
        assert relay(budget, [stream[:at], stream[at:]]) == (stream, False), at
        assert budget.delivered_tokens() == 7, at


def test_a_stream_fed_byte_by_byte_is_cut_at_the_same_event():
    body = body_of(CHAT)
    pieces = [body[i : i + 1] for i in range(len(body))]
    budget = StreamBudget(MODEL, 10)
    assert relay(budget, pieces) == (b"".join(events_of(body)[:11]) + CUT, True)
    assert budget.delivered_tokens() == 10


# ---------------------------------------------------------------- events of several tokens

# 2 + 3 + 2 tokens; the three texts together are 7 tokens too.
SEVERAL = [chunk("Hello world"), chunk(" how are you"), chunk(" today?")]


def test_the_texts_have_the_token_counts_the_cases_assume():
    assert [tokens.count_text(MODEL, t) for t in ("Hello world", " how are you", " today?")] == [
        2,
        3,
        2,
    ]


@pytest.mark.parametrize(
    ("allowed", "delivered", "counted"),
    [(2, 1, 5), (4, 1, 5), (5, 2, 7), (6, 2, 7), (7, 3, 7), (100, 3, 7)],
)
def test_an_event_passes_only_when_all_its_tokens_fit(allowed: int, delivered: int, counted: int):
    budget = StreamBudget(MODEL, allowed)
    out, cut = relay(budget, [b"".join(SEVERAL) + chunk(None) + b"data: [DONE]\n\n"])
    if delivered < 3:
        assert (out, cut) == (b"".join(SEVERAL[:delivered]) + CUT, True)
    else:
        assert (out, cut) == (b"".join(SEVERAL) + chunk(None) + b"data: [DONE]\n\n", False)
    assert (len(budget.delivered), budget.counted) == (delivered, counted)
    assert budget.delivered_tokens() == [0, 2, 5, 7][delivered]


def test_the_first_text_event_passes_even_over_a_zero_budget():
    budget = StreamBudget(MODEL, 0)
    role = chunk("")
    out, cut = relay(budget, [role + b"".join(SEVERAL)])
    assert (out, cut) == (role + SEVERAL[0] + CUT, True)
    assert budget.delivered_tokens() == 2


def test_events_without_text_are_never_counted():
    stream = chunk("") + chunk(None) + b'data: {"choices":[],"usage":{"prompt_tokens":5}}\n\n'
    stream += b": keep-alive comment\n\ndata: [DONE]\n\n"
    budget = StreamBudget(MODEL, 0)
    assert relay(budget, [stream]) == (stream, False)
    assert (budget.counted, budget.delivered, budget.delivered_tokens()) == (0, [], 0)


def test_an_unfinished_event_is_held_until_its_blank_line_or_the_end():
    budget = StreamBudget(MODEL, 100)
    first = SEVERAL[0]
    assert budget.feed(first[:-1]) == b""
    assert budget.counted == 0
    assert budget.feed(first[-1:] + SEVERAL[1][:10]) == first
    assert budget.counted == 2
    assert budget.finish() == SEVERAL[1][:10]  # the body ended: passed on as it is
    assert budget.finish() == b""


def test_the_cut_drops_the_held_start_of_the_next_event():
    budget = StreamBudget(MODEL, 2)
    with pytest.raises(StopRelay) as stop:
        budget.feed(SEVERAL[0] + SEVERAL[1] + SEVERAL[2][:5])
    assert stop.value.final == SEVERAL[0] + CUT


# ---------------------------------------------------------------- a real Responses stream

# oll-resp-stream-long: `event:` + `data:` events; 79 `response.output_text.delta` events of
# one token each (gpt-4.1-nano, o200k_base).
RESPONSES = "oll-resp-stream-long"


def test_a_responses_stream_is_counted_by_its_text_deltas():
    body = body_of(RESPONSES)
    events = events_of(body)
    deltas = [i for i, e in enumerate(events) if e.startswith(b"event: response.output_text.delta")]
    assert (len(events), len(deltas)) == (87, 79)
    budget = StreamBudget("gpt-4.1-nano", 79)
    assert relay(budget, [body]) == (body, False)
    assert budget.delivered_tokens() == 79
    budget = StreamBudget("gpt-4.1-nano", 40)
    assert relay(budget, [body]) == (b"".join(events[: deltas[40]]) + CUT, True)
    assert budget.delivered_tokens() == 40


# ---------------------------------------------------------------- line endings


def test_a_crlf_stream_within_budget_passes_byte_for_byte():
    stream = b"".join(e.replace(b"\n\n", b"\r\n\r\n") for e in SEVERAL) + b"data: [DONE]\r\n\r\n"
    budget = StreamBudget(MODEL, 100)
    assert relay(budget, [stream]) == (stream, False)
    assert budget.delivered_tokens() == 7


def test_a_crlf_stream_is_cut_between_its_events():
    events = [e.replace(b"\n\n", b"\r\n\r\n") for e in SEVERAL]
    budget = StreamBudget(MODEL, 5)
    assert relay(budget, [b"".join(events)]) == (events[0] + events[1] + CUT, True)
    assert budget.delivered_tokens() == 5


def test_a_cr_only_stream_is_counted_and_cut_between_its_events_like_any_other():
    events = [e.replace(b"\n\n", b"\r\r") for e in SEVERAL]
    whole = b"".join(events) + b"data: [DONE]\r\r"
    budget = StreamBudget(MODEL, 100)
    assert relay(budget, [whole]) == (whole, False)
    assert budget.delivered_tokens() == 7
    budget = StreamBudget(MODEL, 5)
    assert relay(budget, [b"".join(events)]) == (events[0] + events[1] + CUT, True)
    assert budget.delivered_tokens() == 5

"""The metering hot path, part by part (`gateway/metering/`): `UsageChunkStripper`
hides the usage the gateway asked for from a client that did not, byte for byte at every read
boundary; `usage_in_tail` and `usage_of_answer` read real OpenAI recordings
(/work/shared/replay) to the token; `BodyRecorder` keeps bounded copies, gzip decoded."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from gateway.metering import sse
from gateway.metering.answers import usage_in_tail, usage_of_answer, usage_of_recording
from gateway.metering.recorder import HEAD_LIMIT, TAIL_LIMIT, BodyRecorder
from gateway.metering.sse import UsageChunkStripper
from gateway.metering.usage import Usage

REPLAY = Path("/work/shared/replay")


@cache
def recording(name: str) -> dict[str, Any]:
    return json.loads((REPLAY / f"{name}.json").read_text())


def body_of(name: str) -> bytes:
    """The response body exactly as recorded (decoded, for answers recorded gzip-compressed)."""
    return recording(name)["response"]["body_text"].encode()


def gzip_of(name: str) -> bytes:
    """The gzip bytes as they came from OpenAI."""
    return base64.b64decode(recording(name)["response"]["body_gzip_b64"])


def strip(pieces: Iterable[bytes]) -> bytes:
    stripper = UsageChunkStripper()
    out = b"".join(stripper.feed(piece) for piece in pieces)
    return out + stripper.finish()


def every_split(data: bytes) -> Iterator[list[bytes]]:
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def recorded(body: bytes, piece: int, encoding: str | None = None) -> BodyRecorder:
    recorder = BodyRecorder(encoding)
    for start in range(0, len(body), piece):
        recorder.feed(body[start : start + piece])
    return recorder


# ---------------------------------------------------------------- the usage chunk stripper

# A chat stream as OpenAI sends it when the gateway injected `include_usage`, and what the
# client would have received had it asked directly (no `"usage":null`, no usage-only chunk).
ROLE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""},"finish_reason":null}],"usage":null}'
)
TEXT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"content":"Hi \\"usage\\":{} there"},"finish_reason":null}],"usage":null}'
)
STOP = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}],"usage":null}'
)
USAGE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,'
    b'"completion_tokens":3,"total_tokens":12}}'
)
DONE = b"data: [DONE]"

ROLE_SEEN = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""},"finish_reason":null}]}'
)
TEXT_SEEN = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"content":"Hi \\"usage\\":{} there"},"finish_reason":null}]}'
)
STOP_SEEN = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}]}'
)


def stream(*events: bytes, end: bytes = b"\n\n") -> bytes:
    return b"".join(event + end for event in events)


UPSTREAM = stream(ROLE, TEXT, STOP, USAGE, DONE)
CLIENT_VIEW = stream(ROLE_SEEN, TEXT_SEEN, STOP_SEEN, DONE)


def test_the_usage_chunk_and_every_null_usage_are_removed_from_a_stream_read_whole():
    assert strip([UPSTREAM]) == CLIENT_VIEW
    assert len(UPSTREAM) - len(CLIENT_VIEW) == 3 * len(b',"usage":null') + len(USAGE) + 2


def test_every_split_point_of_a_stream_gives_the_client_the_same_bytes():
    for pieces in every_split(UPSTREAM):
        assert strip(pieces) == CLIENT_VIEW, pieces


def test_every_pair_of_split_points_around_the_usage_chunk_gives_the_same_bytes():
    tail = stream(STOP, USAGE, DONE)
    for first in range(len(tail) + 1):
        for second in range(first, len(tail) + 1):
            pieces = [tail[:first], tail[first:second], tail[second:]]
            assert strip(pieces) == stream(STOP_SEEN, DONE), (first, second)


def test_a_stream_fed_byte_by_byte_gives_the_client_the_same_bytes():
    assert strip(byte_by_byte(UPSTREAM)) == CLIENT_VIEW


def test_an_event_is_released_only_once_its_blank_line_has_arrived():
    stripper = UsageChunkStripper()
    first = stream(ROLE)
    assert stripper.feed(first[:-1]) == b""
    assert stripper.feed(first[-1:]) == stream(ROLE_SEEN)
    assert stripper.feed(stream(USAGE)[:-1]) == b""
    assert stripper.feed(b"\n") == b""  # the usage-only chunk, whole: dropped
    assert stripper.feed(stream(DONE)) == stream(DONE)
    assert stripper.finish() == b""


def test_data_lines_without_a_space_after_the_colon_are_stripped_too():
    bare = [event.replace(b"data: ", b"data:", 1) for event in (ROLE, STOP, USAGE, DONE)]
    seen = [event.replace(b"data: ", b"data:", 1) for event in (ROLE_SEEN, STOP_SEEN, DONE)]
    for pieces in every_split(stream(*bare)):
        assert strip(pieces) == stream(*seen)


def test_a_chunk_with_both_choices_and_a_usage_is_passed_on_whole():
    both = (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"!"}}],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
    )
    assert strip([stream(ROLE, both, DONE)]) == stream(ROLE_SEEN, both, DONE)


def test_a_stream_ending_without_a_blank_line_is_flushed_by_finish():
    stripper = UsageChunkStripper()
    assert stripper.feed(stream(ROLE) + STOP) == stream(ROLE_SEEN)
    assert stripper.finish() == STOP_SEEN
    assert stripper.finish() == b""


def test_an_unended_event_over_the_held_bound_is_released_as_it_is():
    bound = sse._MAX_HELD_EVENT  # 1 MiB
    assert bound == 1 << 20
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * (bound - 39)
    assert len(big) == bound
    stripper = UsageChunkStripper()
    assert stripper.feed(big) == b""  # exactly the bound: still held
    assert stripper.feed(b"x") == big + b"x"  # one byte over: released unedited
    rest = b'"}}],"usage":null}\n\n'
    assert stripper.feed(rest) == b'"}}]}\n\n'
    assert stripper.finish() == b""


def test_crlf_events_are_stripped_the_same_way_at_every_split_point():
    upstream = stream(ROLE, TEXT, STOP, USAGE, DONE, end=b"\r\n\r\n")
    client_view = stream(ROLE_SEEN, TEXT_SEEN, STOP_SEEN, DONE, end=b"\r\n\r\n")
    assert strip(byte_by_byte(upstream)) == client_view
    for pieces in every_split(upstream):
        assert strip(pieces) == client_view, pieces


LINE_ENDS = [b"\n", b"\r\n", b"\r"]


def framed(events: list[bytes], line_end: bytes) -> bytes:
    return b"".join(event + line_end * 2 for event in events)


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_every_line_end_the_sse_standard_allows_is_stripped_at_every_split_point(
    line_end: bytes,
):
    upstream = framed([ROLE, TEXT, STOP, USAGE, DONE], line_end)
    client_view = framed([ROLE_SEEN, TEXT_SEEN, STOP_SEEN, DONE], line_end)
    assert strip(byte_by_byte(upstream)) == client_view
    for pieces in every_split(upstream):
        assert strip(pieces) == client_view, pieces


def test_mixed_line_ends_within_one_stream_are_each_an_event_end():
    upstream = ROLE + b"\r\n\n" + STOP + b"\n\r\n" + USAGE + b"\r\r" + DONE + b"\n\r"
    client_view = ROLE_SEEN + b"\r\n\n" + STOP_SEEN + b"\n\r\n" + DONE + b"\n\r"
    for pieces in every_split(upstream):
        assert strip(pieces) == client_view, pieces


def _chunk(separators: tuple[str, str], **fields: object) -> bytes:
    return b"data: " + json.dumps(fields, separators=separators).encode()


# Python's default separators (`, ` and `: `), and a wider spacing some servers write.
SPACINGS = [(", ", ": "), (" , ", " : ")]


@pytest.mark.parametrize("separators", SPACINGS, ids=["python", "wide"])
@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_spaced_json_loses_its_usage_chunk_and_nulls_and_nothing_else(
    separators: tuple[str, str], line_end: bytes
):
    choice = {"index": 0, "delta": {"content": 'a "usage": null inside'}, "finish_reason": None}
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    upstream = framed(
        [
            _chunk(separators, id="c1", choices=[choice], usage=None),
            _chunk(separators, id="c1", choices=[choice], usage=None, obfuscation="x1"),
            _chunk(separators, usage=None, id="c1", choices=[choice]),
            _chunk(separators, id="c1", choices=[], usage=usage),
            DONE,
        ],
        line_end,
    )
    client_view = framed(
        [
            _chunk(separators, id="c1", choices=[choice]),
            _chunk(separators, id="c1", choices=[choice], obfuscation="x1"),
            _chunk(separators, id="c1", choices=[choice]),
            DONE,
        ],
        line_end,
    )
    assert strip([upstream]) == client_view
    for pieces in every_split(upstream):
        assert strip(pieces) == client_view, pieces


def test_a_usage_the_client_sees_in_a_chunk_with_choices_is_kept_whatever_the_spacing():
    both = _chunk(SPACINGS[0], id="c1", choices=[{"index": 0}], usage={"total_tokens": 1})
    assert strip([framed([both, DONE], b"\n")]) == framed([both, DONE], b"\n")


def test_an_event_that_is_not_json_is_passed_on_as_it_is():
    odd = b'data: {"usage": null, broken'
    assert strip([framed([odd, DONE], b"\n")]) == framed([odd, DONE], b"\n")


def client_view_of(body: bytes) -> bytes:
    """What a client that did not ask for usage is sent, derived event by event with json: the
    usage-only chunk left out, and each other chunk without its `"usage":null` key."""
    kept = []
    for event in body.split(b"\n\n")[:-1]:
        payload = event.removeprefix(b"data: ")
        if payload != b"[DONE]":
            chunk = json.loads(payload)
            if chunk["choices"] == [] and isinstance(chunk["usage"], dict):
                continue
            edited = event.replace(b',"usage":null', b"")
            assert json.loads(edited.removeprefix(b"data: ")) == {
                key: value for key, value in chunk.items() if key != "usage"
            }
            event = edited
        kept.append(event + b"\n\n")
    return b"".join(kept)


# (recording, its size, events, `"usage":null` keys, size the client sees)
INCLUDE_USAGE_STREAMS = [
    ("llm-chat-stream-text-usage", 8404, 28, 26, 7587),
    ("pyd-chat-stream-obfuscation-usage", 3222, 9, 7, 2626),  # `obfuscation` after `usage`
    ("dd-chat-stream-cached-usage", 31248, 104, 102, 29441),
]


@pytest.mark.parametrize(("name", "size", "events", "nulls", "seen"), INCLUDE_USAGE_STREAMS)
def test_a_recorded_stream_loses_only_its_usage_chunk_and_null_usages(
    name: str, size: int, events: int, nulls: int, seen: int
):
    body = body_of(name)
    assert (len(body), body.count(b"\n\n"), body.count(b',"usage":null')) == (size, events, nulls)
    expected = client_view_of(body)
    assert len(expected) == seen
    assert b'"usage"' not in expected and expected.endswith(b"data: [DONE]\n\n")
    assert strip([body]) == expected
    assert strip(byte_by_byte(body)) == expected
    assert strip(body[i : i + 1000] for i in range(0, len(body), 1000)) == expected


@pytest.mark.parametrize(
    "name", ["llm-chat-stream-text-usage", "pyd-chat-stream-obfuscation-usage"]
)
def test_every_split_point_of_a_recorded_stream_gives_the_same_bytes(name: str):
    body = body_of(name)
    expected = client_view_of(body)
    for pieces in every_split(body):
        assert strip(pieces) == expected, len(pieces[0])


def test_a_recorded_stream_without_usage_passes_byte_for_byte_at_every_split_point():
    body = body_of("lf-chat-stream-nousage")
    assert len(body) == 2534
    for pieces in every_split(body):
        assert strip(pieces) == body


# ---------------------------------------------------------------- usage_in_tail

TAIL_CASES = [
    # chat streams with include_usage: the usage-only chunk
    ("llm-chat-stream-text-usage", Usage(input_tokens=87, output_tokens=26)),
    ("pyd-chat-stream-obfuscation-usage", Usage(input_tokens=53, output_tokens=15)),
    (
        "dd-chat-stream-cached-usage",
        Usage(input_tokens=1420, cached_input_tokens=1280, output_tokens=100),
    ),
    # Responses streams: `response.completed`'s `response.usage`
    ("llm-resp-stream-basic", Usage(input_tokens=11, output_tokens=5)),
    ("pyd-resp-stream-reasoning", Usage(input_tokens=53, output_tokens=469, reasoning_tokens=448)),
    (
        "pyd-resp-stream-websearch-cached",
        Usage(input_tokens=9463, cached_input_tokens=8320, output_tokens=582, reasoning_tokens=512),
    ),
    (
        "pyd-resp-stream-image-273k",  # 273 kB: only its last 64 KiB are read
        Usage(input_tokens=2772, output_tokens=1166, reasoning_tokens=896),
    ),
    # whole JSON answers
    ("dd-resp-function-call", Usage(input_tokens=75, output_tokens=23)),  # `"usage": {` spaced
    ("oll-chat-reasoning-gzip", Usage(input_tokens=11, output_tokens=228, reasoning_tokens=192)),
    ("oll-chat-vision-usage-first-gzip", Usage(input_tokens=438, output_tokens=16)),
    ("dd-completions-legacy", Usage(input_tokens=2, output_tokens=12)),
    ("dd-emb-token-arrays-100k", Usage(input_tokens=9)),  # 100 kB of vectors before it
]


@pytest.mark.parametrize(("name", "usage"), TAIL_CASES)
def test_usage_in_tail_reads_a_recordings_last_usage_to_the_token(name: str, usage: Usage):
    assert usage_in_tail(body_of(name)[-TAIL_LIMIT:]) == usage


@pytest.mark.parametrize(
    "name", ["lf-chat-stream-nousage", "oll-chat-stream-nousage", "dd-err-401-chat"]
)
def test_usage_in_tail_of_a_recording_without_usage_is_none(name: str):
    assert usage_in_tail(body_of(name)) is None


def test_a_tail_that_starts_at_the_usage_key_still_has_it():
    body = body_of("llm-chat-stream-text-usage")
    tail = body[body.rfind(b'"usage":{') :]
    assert usage_in_tail(tail) == Usage(input_tokens=87, output_tokens=26)


def test_a_tail_cut_inside_the_usage_key_has_none_as_every_earlier_usage_is_null():
    body = body_of("llm-chat-stream-text-usage")
    assert usage_in_tail(body[body.rfind(b'"usage":{') + 1 :]) is None


def test_a_responses_tail_holding_only_the_end_of_response_completed_has_its_usage():
    body = body_of("pyd-resp-stream-image-273k")
    tail = body[body.rfind(b'"usage":{') - 10 :]
    assert tail.startswith(b'disabled","usage":{') and len(tail) == 202
    assert usage_in_tail(tail) == Usage(input_tokens=2772, output_tokens=1166, reasoning_tokens=896)


def test_a_usage_written_inside_a_json_string_is_never_taken():
    content = json.dumps({"usage": {"prompt_tokens": 999, "completion_tokens": 999}})
    fake = json.dumps({"choices": [{"delta": {"content": content}}], "usage": None})
    body = body_of("llm-chat-stream-text-usage") + b"data: " + fake.encode() + b"\n\n"
    assert b'\\"usage\\": {\\"prompt_tokens\\": 999' in body
    assert usage_in_tail(body) == Usage(input_tokens=87, output_tokens=26)


# ---------------------------------------------------------------- usage_of_answer

ANSWER_CASES = [
    ("llm-chat-stream-text-usage", Usage(87, 0, 26, service_tier="default")),
    ("dd-chat-stream-cached-usage", Usage(1420, 1280, 100, service_tier="default")),
    ("pyd-resp-stream-reasoning", Usage(53, 0, 469, 448, service_tier="flex")),
    (
        "pyd-resp-stream-websearch-cached",
        Usage(9463, 8320, 582, 512, web_search_calls=1, service_tier="default"),
    ),
    # its response.completed event (100,901 bytes) starts before the 64 KiB tail
    ("pyd-resp-stream-image-273k", Usage(2772, 0, 1166, 896, service_tier="default")),
    ("dd-resp-function-call", Usage(75, 0, 23, service_tier="default")),
    ("oll-chat-cached-gzip", Usage(1149, 1024, 353, service_tier="default")),
    ("dd-emb-token-arrays-100k", Usage(input_tokens=9)),  # over the whole-JSON limit
    ("dd-completions-legacy", Usage(2, 0, 12)),  # no service_tier in the answer
    ("lf-chat-stream-nousage", None),
    ("dd-err-400-responses", None),
]


@pytest.mark.parametrize(("name", "usage"), ANSWER_CASES)
def test_usage_of_answer_from_a_recorders_copies_of_a_recording(name: str, usage: Usage | None):
    is_sse = recording(name)["response"]["headers"]["content-type"].startswith("text/event-stream")
    recorder = recorded(body_of(name), 1000)
    assert recorder.complete
    head, tail = recorder.head(), recorder.tail()
    assert usage_of_answer(head, tail, True, is_sse) == usage
    assert usage_of_recording(recorder, is_sse) == usage


def test_a_websearch_streams_search_call_is_counted_once():
    body = body_of("pyd-resp-stream-websearch-cached")
    completed = [e for e in body.split(b"\n\n") if e.startswith(b"event: response.completed")]
    data = json.loads(completed[0].split(b"\ndata: ", 1)[1])
    types = [item["type"] for item in data["response"]["output"]]
    assert types == ["reasoning", "web_search_call", "reasoning", "message"]
    usage = usage_of_answer(body, body[-TAIL_LIMIT:], True, True)
    assert usage is not None and usage.web_search_calls == 1


def test_a_stream_cut_by_the_head_is_read_from_its_tail():
    body = body_of("pyd-resp-stream-image-273k")
    last_event = body[body.rfind(b"event: response.completed") :]
    assert len(last_event) == 100_903 and len(last_event) > TAIL_LIMIT
    expected = Usage(2772, 0, 1166, 896, service_tier="default")
    assert usage_of_answer(body[:1000], body[-TAIL_LIMIT:], False, True) == expected


def test_a_stream_whose_tail_shows_no_usage_and_whose_head_is_cut_has_none():
    body = body_of("llm-chat-stream-text-usage")
    tail = body[-len(b"data: [DONE]\n\n") :]
    assert usage_of_answer(body[:100], tail, False, True) is None


# ---------------------------------------------------------------- BodyRecorder


def long_body(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def test_a_long_body_keeps_exactly_its_first_head_limit_and_last_tail_limit_bytes():
    assert (HEAD_LIMIT, TAIL_LIMIT) == (1 << 20, 64 << 10)
    body = long_body(2 << 20)
    recorder = recorded(body, 4096)  # pieces that divide both limits
    assert recorder.total == 2 << 20
    assert recorder.head() == body[:HEAD_LIMIT]
    assert recorder.tail() == body[-TAIL_LIMIT:]
    assert not recorder.complete


def test_the_head_and_tail_keep_whole_pieces_up_to_the_first_that_reaches_the_limit():
    body = long_body(2_000_000)
    recorder = recorded(body, 1000)
    # The head takes pieces while it holds under HEAD_LIMIT: 1,049 of them (1,049,000 bytes,
    # the first count over 1,048,576). The tail drops its oldest piece while the rest would
    # still hold TAIL_LIMIT: 66 are left (65,000 < 65,536 <= 66,000).
    assert len(recorder.head()) == 1_049_000
    assert len(recorder.tail()) == 66_000
    assert recorder.head() == body[:1_049_000]
    assert recorder.tail() == body[-66_000:]
    assert recorder.total == 2_000_000 and not recorder.complete


def test_a_body_fed_byte_by_byte_keeps_exactly_tail_limit_bytes_of_tail():
    body = long_body(2 * TAIL_LIMIT + 7)
    recorder = BodyRecorder(None)
    for byte in byte_by_byte(body):
        recorder.feed(byte)
    assert recorder.tail() == body[-TAIL_LIMIT:]
    assert recorder.head() == body
    assert recorder.complete and recorder.total == 2 * TAIL_LIMIT + 7


def test_one_piece_larger_than_both_limits_is_kept_whole_as_head_and_tail():
    body = long_body(HEAD_LIMIT + 1)
    recorder = BodyRecorder(None)
    recorder.feed(body)
    assert recorder.head() == body and recorder.tail() == body
    assert recorder.complete  # the head holds the whole body
    recorder.feed(b"z")
    assert recorder.head() == body  # full: later pieces go to the tail only
    assert recorder.tail() == body + b"z"  # dropping the big piece would leave < TAIL_LIMIT
    assert (recorder.total, recorder.complete) == (HEAD_LIMIT + 2, False)


def test_a_body_under_the_head_limit_is_complete():
    body = body_of("dd-chat-stream-cached-usage")
    recorder = recorded(body, 4096)
    assert recorder.complete and recorder.total == 31248
    assert recorder.head() == body and recorder.tail() == body


def test_an_empty_body_is_complete_and_empty():
    recorder = BodyRecorder(None)
    assert (recorder.head(), recorder.tail(), recorder.total, recorder.complete) == (
        b"", b"", 0, True,
    )  # fmt: skip


def test_a_recorded_gzip_answer_is_recorded_decoded_at_every_split_point():
    compressed = gzip_of("llm-resp-basic-gzip")
    body = body_of("llm-resp-basic-gzip")
    assert (len(compressed), len(body)) == (666, 1584)
    for cut in range(len(compressed) + 1):
        recorder = BodyRecorder("gzip")
        recorder.feed(compressed[:cut])
        recorder.feed(compressed[cut:])
        assert (recorder.head(), recorder.total, recorder.complete) == (body, 1584, True), cut
    assert usage_of_recording(recorder, False) == Usage(11, 0, 5, service_tier="default")


def test_a_recorded_gzip_answer_fed_byte_by_byte_is_recorded_decoded():
    compressed = gzip_of("oll-emb-b64-gzip")
    recorder = BodyRecorder("gzip")
    for byte in byte_by_byte(compressed):
        recorder.feed(byte)
    assert recorder.head() == body_of("oll-emb-b64-gzip")
    assert usage_of_recording(recorder, False) == Usage(input_tokens=8)


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", " gzip "])
def test_the_gzip_labels_are_all_decoded(encoding: str):
    compressed = gzip_of("oll-chat-plain-gzip")
    recorder = recorded(compressed, 100, encoding)
    assert recorder.head() == body_of("oll-chat-plain-gzip")
    assert usage_of_recording(recorder, False) == Usage(15, 0, 31, service_tier="default")


def test_a_long_gzip_stream_keeps_bounded_decoded_copies_and_its_usage():
    body = body_of("pyd-resp-stream-image-273k")
    compressed = gzip.compress(body)
    recorder = recorded(compressed, 4096, "gzip")
    tail = recorder.tail()
    assert recorder.total == len(body) == 273_650
    assert recorder.head() == body and recorder.complete
    assert TAIL_LIMIT <= len(tail) < 2 * TAIL_LIMIT and body.endswith(tail)
    assert usage_of_recording(recorder, True) == Usage(2772, 0, 1166, 896, service_tier="default")


def test_a_deflate_body_in_zlib_format_is_decoded():
    body = body_of("dd-resp-function-call")
    recorder = recorded(zlib.compress(body), 10, "deflate")
    assert recorder.head() == body and recorder.total == 1826


def test_a_raw_deflate_body_is_not_recorded():
    # not yet: "deflate" sent as a raw RFC 1951 stream (no zlib header, as some servers do) is
    # not decoded: the recorder gives up at the first piece, which it drops.
    body = body_of("dd-resp-function-call")
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = packer.compress(body) + packer.flush()
    recorder = BodyRecorder("deflate")
    recorder.feed(raw)
    assert (recorder.head(), recorder.total) == (b"", 0)


@pytest.mark.parametrize("encoding", [None, "", "identity"])
def test_a_body_without_a_known_encoding_is_recorded_as_it_is(encoding: str | None):
    body = body_of("dd-resp-function-call")
    recorder = recorded(body, 10, encoding)
    assert recorder.head() == body and recorder.total == 1826

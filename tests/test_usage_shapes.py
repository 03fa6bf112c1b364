"""Every billable unit, read from every usage shape exactly as the upstream reports it.

Real answers come from /work/shared/replay (recorded OpenAI traffic, see its SOURCES.md).
Shapes no recording has (audio, predictions, images, transcriptions, search calls, flex and
priority tiers, incomplete and failed responses) are built here and checked against
openai-python's own types first, so each is an answer the API can give.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from openai.types import ImageGenCompletedEvent, ImagesResponse
from openai.types.audio import (
    Transcription,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    TranslationVerbose,
)
from openai.types.chat import ChatCompletion
from openai.types.realtime import ResponseDoneEvent
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
)

from gateway.metering.answers import usage_in_tail, usage_of_answer, usage_of_recording
from gateway.metering.recorder import HEAD_LIMIT, TAIL_LIMIT, BodyRecorder
from gateway.metering.requests import input_characters
from gateway.metering.usage import Usage, usage_from_mapping, usage_of_object

REPLAY = Path("/work/shared/replay")
needs_replays = pytest.mark.skipif(
    not REPLAY.is_dir(), reason="the recorded OpenAI answers live in /work/shared/replay"
)


def replay(name: str) -> bytes:
    """A recorded answer's body as OpenAI sent it (gzip recordings decompressed)."""
    response = json.loads((REPLAY / f"{name}.json").read_text())["response"]
    if response["content_encoding"] == "gzip":
        return gzip.decompress(base64.b64decode(response["body_gzip_b64"]))
    return response["body_text"].encode()


def replay_json(name: str) -> dict[str, Any]:
    return json.loads(replay(name))


def recorded(body: bytes, chunk: int) -> BodyRecorder:
    recorder = BodyRecorder(None)
    for start in range(0, len(body), chunk):
        recorder.feed(body[start : start + chunk])
    return recorder


def read(body: bytes, is_sse: bool, chunk: int = 4096) -> Usage | None:
    """What the handler reads from a recorder that saw `body` arrive in `chunk`-byte reads;
    the bytes-level API must say the same."""
    recorder = recorded(body, chunk)
    usage = usage_of_recording(recorder, is_sse)
    assert usage_of_answer(recorder.head(), recorder.tail(), recorder.complete, is_sse) == usage
    return usage


def sse(*events: tuple[str | None, dict[str, Any]], crlf: bool = False) -> bytes:
    """A stream of `event:` / `data:` events as OpenAI frames them."""
    parts = []
    for name, payload in events:
        lines = ([f"event: {name}"] if name else []) + [
            "data: " + json.dumps(payload, separators=(",", ":"))
        ]
        parts.append("\n".join(lines) + "\n\n")
    text = "".join(parts)
    return (text.replace("\n", "\r\n") if crlf else text).encode()


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ------------------------------------------------------------------------ built answers

CHAT_AUDIO = {  # gpt-4o-audio-preview: spoken question in, spoken answer out
    "id": "chatcmpl-BxAudio7f3k2",
    "object": "chat.completion",
    "created": 1753000000,
    "model": "gpt-4o-audio-preview-2025-06-03",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "audio": {
                    "id": "audio_687f0c2a5c4c8191",
                    "data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=",
                    "expires_at": 1753003600,
                    "transcript": "Sure: the sky looks blue because air scatters blue light most.",
                },
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 84,
        "completion_tokens": 352,
        "total_tokens": 436,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "audio_tokens": 69,
            "text_tokens": 15,
            "image_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 281,
            "text_tokens": 71,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_b0d2d1b3b6",
}


def chat(model: str, usage: dict[str, Any], tier: str, text: str = "Done.") -> dict[str, Any]:
    answer = copy.deepcopy(CHAT_AUDIO)
    answer["model"] = model
    answer["choices"][0]["message"] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": [],
    }
    answer["usage"] = usage
    answer["service_tier"] = tier
    return answer


CHAT_PREDICTION = chat(  # Predicted Outputs: 121 of the prediction kept, 37 thrown away
    "gpt-4o-mini-2024-07-18",
    {
        "prompt_tokens": 412,
        "completion_tokens": 190,
        "total_tokens": 602,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 121,
            "rejected_prediction_tokens": 37,
        },
    },
    "priority",
    "class User:\n    name: str\n    email: str\n",
)
CHAT_IMAGE_CACHE_WRITE = chat(  # an image in the prompt, the prompt written to the cache
    "gpt-5-2025-08-07",
    {
        "prompt_tokens": 2310,
        "completion_tokens": 301,
        "total_tokens": 2611,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 2048,
            "audio_tokens": 0,
            "image_tokens": 765,
            "text_tokens": 1545,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 256,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "flex",
)

RESPONSE_BASE_NAME = "llm-resp-basic-gzip"  # a real gpt-5.5 Responses answer to build on
WEB_SEARCH = {
    "id": "ws_68c9d30021d081a0962d80d50c12e317",
    "type": "web_search_call",
    "status": "completed",
    "action": {
        "type": "search",
        "query": "weather: San Francisco, CA",
        "sources": [{"type": "url", "url": "https://www.weather.gov/mtr/"}],
    },
}
OPEN_PAGE = {
    "id": "ws_68c9d30021d081a0962d80d50c12e318",
    "type": "web_search_call",
    "status": "completed",
    "action": {"type": "open_page", "url": "https://www.weather.gov/mtr/"},
}
FILE_SEARCH = {
    "id": "fs_68c9d30021d081a0962d80d50c12e319",
    "type": "file_search_call",
    "status": "completed",
    "queries": ["deep research report on coffee"],
    "results": None,
}
RESPONSE_USAGE = {
    "input_tokens": 9463,
    "input_tokens_details": {"cached_tokens": 8320, "cache_write_tokens": 0},
    "output_tokens": 582,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 10045,
}


def response(
    items: list[dict[str, Any]], usage: dict[str, Any], tier: str | None
) -> dict[str, Any]:
    """The real Responses answer with other output items, usage and tier."""
    answer = replay_json(RESPONSE_BASE_NAME)
    answer["output"] = [*items, *answer["output"]]
    answer["usage"] = usage
    answer["service_tier"] = tier
    return answer


def responses_stream(final: str, final_response: dict[str, Any]) -> bytes:
    """A Responses stream: created and in_progress (they echo the requested tier, `auto`,
    and carry `"usage": null`), two deltas, then the final event."""
    started = {**final_response, "status": "in_progress", "service_tier": "auto", "usage": None}
    started["output"] = []
    delta = {
        "type": "response.output_text.delta",
        "item_id": "msg_08ddf351",
        "output_index": 0,
        "content_index": 0,
        "logprobs": [],
    }
    return sse(
        (
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": started},
        ),
        (
            "response.in_progress",
            {"type": "response.in_progress", "sequence_number": 1, "response": started},
        ),
        ("response.output_text.delta", {**delta, "sequence_number": 2, "delta": "Par"}),
        ("response.output_text.delta", {**delta, "sequence_number": 3, "delta": "is"}),
        (final, {"type": final, "sequence_number": 4, "response": final_response}),
    )


IMAGE_B64 = base64.b64encode(bytes(range(256)) * 12).decode()  # a 3 kB stand-in picture


def images(usage: dict[str, Any], picture: str = IMAGE_B64) -> dict[str, Any]:
    return {
        "created": 1753000000,
        "background": "opaque",
        "data": [{"b64_json": picture}],
        "output_format": "png",
        "quality": "high",
        "size": "1024x1024",
        "usage": usage,
    }


IMAGE_GENERATION = images(  # gpt-image-1 text-to-image: its whole output is image tokens
    {
        "input_tokens": 50,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 50},
        "output_tokens": 4160,
        "total_tokens": 4210,
    }
)
IMAGE_EDIT_USAGE = {  # gpt-image-1 edit of one picture
    "input_tokens": 1048,
    "input_tokens_details": {"image_tokens": 1036, "text_tokens": 12},
    "output_tokens": 4160,
    "total_tokens": 5208,
}
IMAGE_SPLIT_OUTPUT = images(  # a model that also writes text splits its output tokens
    {
        "input_tokens": 230,
        "input_tokens_details": {"image_tokens": 194, "text_tokens": 36},
        "output_tokens": 1141,
        "output_tokens_details": {"image_tokens": 1056, "text_tokens": 85},
        "total_tokens": 1371,
    }
)
IMAGE_STREAM_DONE = {
    "type": "image_generation.completed",
    "b64_json": IMAGE_B64,
    "created_at": 1753000000,
    "background": "opaque",
    "output_format": "png",
    "quality": "low",
    "size": "1024x1024",
    "usage": {
        "input_tokens": 18,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 18},
        "output_tokens": 272,
        "total_tokens": 290,
    },
}

TRANSCRIPTION_TOKENS = {  # gpt-4o-transcribe
    "text": "Imagine the wildest idea that you've ever had, and you're curious about how it "
    "might scale to something that's a 100, a 1,000 times bigger.",
    "usage": {
        "type": "tokens",
        "input_tokens": 14,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
        "output_tokens": 45,
        "total_tokens": 59,
    },
}
TRANSCRIPTION_DURATION = {  # whisper-1, response_format json
    "text": "Imagine the wildest idea that you've ever had.",
    "usage": {"type": "duration", "seconds": 9},
}
SEGMENT = {
    "id": 0,
    "seek": 0,
    "start": 0.0,
    "end": 8.470000267028809,
    "text": " Imagine the wildest idea that you've ever had.",
    "tokens": [50364, 11739, 264, 49110, 1558, 300, 291, 600, 1562, 632, 13, 50788],
    "temperature": 0.0,
    "avg_logprob": -0.2860786020755768,
    "compression_ratio": 1.2363636493682861,
    "no_speech_prob": 0.00985979475080967,
}
TRANSCRIPTION_VERBOSE = {  # whisper-1, response_format verbose_json
    "task": "transcribe",
    "language": "english",
    "duration": 8.470000267028809,
    "text": "Imagine the wildest idea that you've ever had.",
    "segments": [SEGMENT],
    "usage": {"type": "duration", "seconds": 9},
}
TRANSLATION_VERBOSE = {  # whisper-1 translation, verbose_json: no usage, a duration
    "task": "translate",
    "language": "english",
    "duration": 12.34,
    "text": "Imagine the wildest idea that you've ever had.",
    "segments": [SEGMENT],
}
TRANSCRIPTION_STREAM = sse(  # gpt-4o-mini-transcribe, stream=True
    (None, {"type": "transcript.text.delta", "delta": "Imagine", "logprobs": None}),
    (None, {"type": "transcript.text.delta", "delta": " the wildest idea.", "logprobs": None}),
    (
        None,
        {
            "type": "transcript.text.done",
            "text": "Imagine the wildest idea.",
            "usage": {
                "type": "tokens",
                "input_tokens": 31,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 31},
                "output_tokens": 7,
                "total_tokens": 38,
            },
        },
    ),
)
REALTIME_DONE = {  # gpt-realtime: the Realtime API's `response.done`
    "type": "response.done",
    "event_id": "event_CCXHxcMy86rrKhBLDdqCh",
    "response": {
        "object": "realtime.response",
        "id": "resp_CCXHw3Gsr6vq8XQ3lLTWd",
        "status": "completed",
        "status_details": None,
        "output": [],
        "conversation_id": "conv_CCXHsurMKcaVxIZvaCI5m",
        "output_modalities": ["audio"],
        "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
        "usage": {
            "total_tokens": 253,
            "input_tokens": 132,
            "output_tokens": 121,
            "input_token_details": {
                "text_tokens": 119,
                "audio_tokens": 13,
                "image_tokens": 0,
                "cached_tokens": 64,
                "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": 30, "audio_tokens": 91},
        },
        "metadata": None,
    },
}


@needs_replays
def test_every_built_answer_is_what_openai_python_accepts() -> None:
    ChatCompletion.model_validate(CHAT_AUDIO)
    ChatCompletion.model_validate(CHAT_PREDICTION)
    ChatCompletion.model_validate(CHAT_IMAGE_CACHE_WRITE)
    Response.model_validate(response([WEB_SEARCH, OPEN_PAGE], RESPONSE_USAGE, "default"))
    Response.model_validate(response([FILE_SEARCH], RESPONSE_USAGE, "default"))
    Response.model_validate(with_tool_usage(1))
    ResponseIncompleteEvent.model_validate(last_event(incomplete_stream()))
    ResponseFailedEvent.model_validate(last_event(failed_stream()))
    ResponseCompletedEvent.model_validate(
        {"type": "response.completed", "sequence_number": 9, "response": with_tool_usage(1)}
    )
    ImagesResponse.model_validate(IMAGE_GENERATION)
    ImagesResponse.model_validate(IMAGE_SPLIT_OUTPUT)
    ImageGenCompletedEvent.model_validate(IMAGE_STREAM_DONE)
    Transcription.model_validate(TRANSCRIPTION_TOKENS)
    Transcription.model_validate(TRANSCRIPTION_DURATION)
    TranscriptionVerbose.model_validate(TRANSCRIPTION_VERBOSE)
    TranslationVerbose.model_validate(TRANSLATION_VERBOSE)
    TranscriptionTextDoneEvent.model_validate(last_event(TRANSCRIPTION_STREAM))
    ResponseDoneEvent.model_validate(REALTIME_DONE)


def last_event(stream: bytes) -> dict[str, Any]:
    return json.loads(stream.rstrip().rsplit(b"\n", 1)[1].removeprefix(b"data: "))


def with_tool_usage(billed_searches: int) -> dict[str, Any]:
    """A search and an opened page: the answer's `tool_usage` bills only the search."""
    answer = response([WEB_SEARCH, OPEN_PAGE], RESPONSE_USAGE, "default")
    answer["tool_usage"] = {
        "image_gen": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        },
        "web_search": {"num_requests": billed_searches},
    }
    return answer


def reasoning_response(status: str, tier: str, **extra: Any) -> dict[str, Any]:
    answer = response(
        [],
        {
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 16,
            "output_tokens_details": {"reasoning_tokens": 16},
            "total_tokens": 36,
        },
        tier,
    )
    answer.update(status=status, output=[], **extra)
    return answer


def incomplete_stream() -> bytes:
    """Stopped at max_output_tokens while still reasoning."""
    return responses_stream(
        "response.incomplete",
        reasoning_response(
            "incomplete", "priority", incomplete_details={"reason": "max_output_tokens"}
        ),
    )


def failed_stream() -> bytes:
    return responses_stream(
        "response.failed",
        reasoning_response(
            "failed", "default", error={"code": "server_error", "message": "The model failed."}
        ),
    )


# ------------------------------------------------------------------------ the table


CASES: list[tuple[str, Any, bool, Usage]] = [
    (
        "chat, 1152 of 1220 prompt tokens cached (replay)",
        lambda: replay("dd-chat-cached-gzip"),
        False,
        Usage(1220, 1152, 100, 0, service_tier="default"),
    ),
    (
        "chat, 192 of 228 output tokens reasoning (replay)",
        lambda: replay("oll-chat-reasoning-gzip"),
        False,
        Usage(11, 0, 228, 192, service_tier="default"),
    ),
    (
        "chat with audio in and out (gpt-4o-audio-preview)",
        lambda: compact(CHAT_AUDIO),
        False,
        Usage(
            84, 0, 352, 0, audio_input_tokens=69, audio_output_tokens=281, service_tier="default"
        ),
    ),
    (
        "chat with a prediction: the 37 rejected tokens are output, priority tier",
        lambda: compact(CHAT_PREDICTION),
        False,
        Usage(412, 0, 190, 0, rejected_prediction_tokens=37, service_tier="priority"),
    ),
    (
        "chat with an image, 2048 prompt tokens written to the cache, flex tier",
        lambda: compact(CHAT_IMAGE_CACHE_WRITE),
        False,
        Usage(
            2310, 0, 301, 256, cache_write_tokens=2048, image_input_tokens=765, service_tier="flex"
        ),
    ),
    (
        "chat stream with include_usage, 1280 cached (replay)",
        lambda: replay("dd-chat-stream-cached-usage"),
        True,
        Usage(1420, 1280, 100, 0, service_tier="default"),
    ),
    (
        "chat stream with include_usage, gpt-5 (replay)",
        lambda: replay("pyd-chat-stream-gpt5-usage"),
        True,
        Usage(13, 0, 11, 0, service_tier="default"),
    ),
    (
        "responses, 320 of 327 output tokens reasoning (replay)",
        lambda: replay("oll-resp-reasoning-gzip"),
        False,
        Usage(11, 0, 327, 320, service_tier="default"),
    ),
    (
        "responses, 1390 cached (replay)",
        lambda: replay("dd-resp-cached-gzip"),
        False,
        Usage(1515, 1390, 8, 0, service_tier="default"),
    ),
    (
        "responses with two web_search_call items",
        lambda: compact(response([WEB_SEARCH, OPEN_PAGE], RESPONSE_USAGE, "default")),
        False,
        Usage(9463, 8320, 582, 512, web_search_calls=2, service_tier="default"),
    ),
    (
        "responses with a file_search_call item",
        lambda: compact(response([FILE_SEARCH], RESPONSE_USAGE, "default")),
        False,
        Usage(9463, 8320, 582, 512, file_search_calls=1, service_tier="default"),
    ),
    (
        "responses whose tool_usage bills 1 of its 2 web_search_call items",
        lambda: compact(with_tool_usage(1)),
        False,
        Usage(9463, 8320, 582, 512, web_search_calls=1, service_tier="default"),
    ),
    (
        "responses with 1536 input tokens written to the cache",
        lambda: compact(
            response(
                [],
                {
                    **RESPONSE_USAGE,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1536},
                },
                "default",
            )
        ),
        False,
        Usage(9463, 0, 582, 512, cache_write_tokens=1536, service_tier="default"),
    ),
    (
        "responses stream completed, flex tier, 448 reasoning (replay)",
        lambda: replay("pyd-resp-stream-reasoning"),
        True,
        Usage(53, 0, 469, 448, service_tier="flex"),
    ),
    (
        "responses stream completed after one web search, 8320 cached (replay)",
        lambda: replay("pyd-resp-stream-websearch-cached"),
        True,
        Usage(9463, 8320, 582, 512, web_search_calls=1, service_tier="default"),
    ),
    (
        "responses stream whose created event said auto, completed default (replay)",
        lambda: replay("dd-resp-stream-cached"),
        True,
        Usage(1515, 1390, 8, 0, service_tier="default"),
    ),
    (
        "responses stream incomplete at max_output_tokens, priority tier",
        incomplete_stream,
        True,
        Usage(20, 0, 16, 16, service_tier="priority"),
    ),
    (
        "responses stream failed, with the usage it had",
        failed_stream,
        True,
        Usage(20, 0, 16, 16, service_tier="default"),
    ),
    (
        "embeddings, text-embedding-3-small (replay)",
        lambda: replay("lf-emb-3small-gzip"),
        False,
        Usage(1, 0, 0, 0),
    ),
    (
        "embeddings, 100 kB of vectors (replay)",
        lambda: replay("dd-emb-token-arrays-100k"),
        False,
        Usage(9, 0, 0, 0),
    ),
    (
        "images generation: all 4160 output tokens are image tokens",
        lambda: compact(IMAGE_GENERATION),
        False,
        Usage(50, 0, 4160, 0, image_output_tokens=4160),
    ),
    (
        "images edit: 1036 image and 12 text input tokens",
        lambda: compact(images(IMAGE_EDIT_USAGE)),
        False,
        Usage(1048, 0, 4160, 0, image_input_tokens=1036, image_output_tokens=4160),
    ),
    (
        "images whose output details split image and text tokens",
        lambda: compact(IMAGE_SPLIT_OUTPUT),
        False,
        Usage(230, 0, 1141, 0, image_input_tokens=194, image_output_tokens=1056),
    ),
    (
        "images stream's image_generation.completed event",
        lambda: sse(("image_generation.completed", IMAGE_STREAM_DONE)),
        True,
        Usage(18, 0, 272, 0, image_output_tokens=272),
    ),
    (
        "transcription billed by tokens, 14 of them audio",
        lambda: compact(TRANSCRIPTION_TOKENS),
        False,
        Usage(14, 0, 45, 0, audio_input_tokens=14),
    ),
    (
        "transcription billed by duration",
        lambda: compact(TRANSCRIPTION_DURATION),
        False,
        Usage(audio_seconds=9.0),
    ),
    (
        "verbose transcription: its usage's seconds, not its exact duration",
        lambda: compact(TRANSCRIPTION_VERBOSE),
        False,
        Usage(audio_seconds=9.0),
    ),
    (
        "verbose translation without usage: its duration",
        lambda: compact(TRANSLATION_VERBOSE),
        False,
        Usage(audio_seconds=12.34),
    ),
    (
        "transcription stream's transcript.text.done event",
        lambda: TRANSCRIPTION_STREAM,
        True,
        Usage(31, 0, 7, 0, audio_input_tokens=31),
    ),
]


@pytest.mark.parametrize(
    ("body", "is_sse", "expected"),
    [pytest.param(body, is_sse, expected, id=name) for name, body, is_sse, expected in CASES],
)
@needs_replays
def test_each_usage_shape_is_read_whole_unit_by_unit(
    body: Any, is_sse: bool, expected: Usage
) -> None:
    data = body()
    for chunk in (len(data), 4096, 997):
        assert read(data, is_sse, chunk) == expected


@needs_replays
def test_each_recorded_answer_meters_as_its_manifest_says_for_any_chunking() -> None:
    manifest = json.loads((REPLAY / "manifest.json").read_text())
    assert len(manifest) == 36
    for entry in manifest:
        recording = json.loads((REPLAY / f"{entry['id']}.json").read_text())
        body, is_sse = replay(entry["id"]), recording["expected"]["sse"]
        for chunk in (len(body) or 1, 4096, 997, 70_000):
            usage = read(body, is_sse, chunk)
            tokens = (
                None
                if usage is None
                else {
                    "input_tokens": usage.input_tokens,
                    "cached_input_tokens": usage.cached_input_tokens,
                    "output_tokens": usage.output_tokens,
                    "reasoning_tokens": usage.reasoning_tokens,
                }
            )
            assert tokens == entry["usage"], (entry["id"], chunk)


def test_realtime_response_done_reads_through_its_response_object() -> None:
    assert usage_of_object(REALTIME_DONE) == Usage(
        132, 64, 121, 0, audio_input_tokens=13, audio_output_tokens=91
    )


@needs_replays
def test_a_failed_response_without_usage_states_none() -> None:
    failed = reasoning_response(
        "failed", "default", error={"code": "server_error", "message": "The model failed."}
    )
    failed["usage"] = None
    assert read(responses_stream("response.failed", failed), True) is None


@needs_replays
def test_a_stream_cut_before_its_usage_chunk_states_none() -> None:
    body = replay("dd-chat-stream-cached-usage")
    cut = body[: body.rfind(b'data: {"id"')]
    assert read(cut, True) is None


# ------------------------------------------------------------------------ the tail path


def spellings(answer: dict[str, Any]) -> dict[str, bytes]:
    """One answer as different servers write it: spacing, indentation and key order."""

    def reordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: reordered(value[key]) for key in reversed(value)}
        if isinstance(value, list):
            return [reordered(item) for item in value]
        return value

    return {
        "compact": compact(answer),
        "python default": json.dumps(answer).encode(),
        "indented": json.dumps(answer, indent=2).encode(),
        "keys reordered": compact(reordered(answer)),
        "keys reordered, python default": json.dumps(reordered(answer)).encode(),
        "keys reordered, indented CRLF": json.dumps(reordered(answer), indent=1)
        .replace("\n", "\r\n")
        .encode(),
    }


SPELLED = [
    (
        "chat with audio",
        CHAT_AUDIO,
        Usage(
            84, 0, 352, 0, audio_input_tokens=69, audio_output_tokens=281, service_tier="default"
        ),
    ),
    (
        "chat with a prediction",
        CHAT_PREDICTION,
        Usage(412, 0, 190, 0, rejected_prediction_tokens=37, service_tier="priority"),
    ),
    (
        "images edit",
        images(IMAGE_EDIT_USAGE),
        Usage(1048, 0, 4160, 0, image_input_tokens=1036, image_output_tokens=4160),
    ),
    ("transcription by tokens", TRANSCRIPTION_TOKENS, Usage(14, 0, 45, 0, audio_input_tokens=14)),
    ("transcription by duration", TRANSCRIPTION_DURATION, Usage(audio_seconds=9.0)),
]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [pytest.param(answer, expected, id=name) for name, answer, expected in SPELLED],
)
def test_any_spacing_and_key_order_reads_the_same_whole_or_from_the_tail(
    answer: dict[str, Any], expected: Usage
) -> None:
    for spelling, body in spellings(answer).items():
        assert usage_of_answer(body, body, True, False) == expected, spelling
        assert usage_of_answer(b"", body, False, False) == expected, spelling  # tail only
        assert usage_in_tail(body) == Usage(**{**as_dict(expected), "service_tier": None}), spelling


@needs_replays
def test_a_responses_answer_reads_the_same_in_any_spelling_from_its_tail() -> None:
    answer = response([WEB_SEARCH, OPEN_PAGE, FILE_SEARCH], RESPONSE_USAGE, "flex")
    expected = Usage(
        9463, 8320, 582, 512, web_search_calls=2, file_search_calls=1, service_tier="flex"
    )
    for spelling, body in spellings(answer).items():
        assert usage_of_answer(body, body, True, False) == expected, spelling
        assert usage_of_answer(b"", body, False, False) == expected, spelling


def as_dict(usage: Usage) -> dict[str, Any]:
    return {name: getattr(usage, name) for name in Usage.__slots__}


@needs_replays
def test_both_sse_framings_and_data_without_its_space_read_the_same() -> None:
    for name, expected in (
        ("dd-chat-stream-cached-usage", Usage(1420, 1280, 100, 0, service_tier="default")),
        (
            "pyd-resp-stream-websearch-cached",
            Usage(9463, 8320, 582, 512, web_search_calls=1, service_tier="default"),
        ),
        ("pyd-resp-stream-reasoning", Usage(53, 0, 469, 448, service_tier="flex")),
    ):
        lf = replay(name)
        assert b"\r" not in lf
        crlf = lf.replace(b"\n", b"\r\n")
        bare = lf.replace(b"data: ", b"data:")
        for framing, body in (("LF", lf), ("CRLF", crlf), ("data: without space", bare)):
            for chunk in (len(body), 512, 4096):
                assert read(body, True, chunk) == expected, (name, framing, chunk)
            assert usage_of_answer(b"", body, False, True) == expected, (name, framing)


def test_an_event_whose_json_spans_two_data_lines_is_joined_as_sse_says() -> None:
    chunk = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "service_tier": "scale",
        "choices": [],
        "usage": CHAT_AUDIO["usage"],
    }
    expected = Usage(
        84, 0, 352, 0, audio_input_tokens=69, audio_output_tokens=281, service_tier="scale"
    )
    text = json.dumps(chunk, indent=1)
    body = ("data: " + text.replace("\n", "\ndata: ") + "\n\ndata: [DONE]\n\n").encode()
    assert read(body, True) == expected
    head, _, usage = compact(chunk).partition(b',"usage"')  # the usage on the last line
    for newline in (b"\n", b"\r\n"):
        body = b"data: " + head + b"," + newline + b'data: "usage"' + usage + newline * 2
        assert read(body, True) == expected


def test_a_usage_chunk_with_reordered_keys_and_spaces_reads_the_same() -> None:
    chunk = {
        "usage": CHAT_PREDICTION["usage"],
        "choices": [],
        "service_tier": "priority",
        "object": "chat.completion.chunk",
        "id": "chatcmpl-x",
    }
    for separators in ((",", ":"), (", ", ": ")):
        delta = json.dumps(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion.chunk",
                "service_tier": "priority",
                "choices": [{"index": 0, "delta": {"content": "x"}}],
                "usage": None,
            },
            separators=separators,
        )
        body = (
            f"data: {delta}\n\ndata: {json.dumps(chunk, separators=separators)}\n\ndata: [DONE]\n\n"
        ).encode()
        assert read(body, True) == Usage(
            412, 0, 190, 0, rejected_prediction_tokens=37, service_tier="priority"
        )


# ------------------------------------------------------------------------ bodies past the copies


@needs_replays
def test_a_final_event_longer_than_the_tail_is_read_again_from_the_whole_head() -> None:
    body = replay("pyd-resp-stream-image-273k")
    final = body[body.rfind(b"event: response.completed") :]
    assert len(final) > TAIL_LIMIT and len(body) < HEAD_LIMIT
    recorder = recorded(body, 4096)
    assert recorder.complete and not recorder.tail().startswith(b"event: response.completed")
    expected = Usage(2772, 0, 1166, 896, service_tier="default")
    assert usage_of_recording(recorder, True) == expected
    # Without the head, its usage and tier are still read from the part the tail holds.
    assert usage_of_answer(b"", recorder.tail(), False, True) == expected


def test_an_images_answer_bigger_than_the_head_is_read_from_its_tail() -> None:
    picture = base64.b64encode(bytes(range(256)) * 6000).decode()  # 2 MB of base64
    body = json.dumps(images(IMAGE_EDIT_USAGE, picture)).encode()
    recorder = recorded(body, 16384)
    assert not recorder.complete
    assert usage_of_recording(recorder, False) == Usage(
        1048, 0, 4160, 0, image_input_tokens=1036, image_output_tokens=4160
    )


@needs_replays
def test_a_whole_responses_answer_over_64_kb_counts_search_calls_the_tail_never_saw() -> None:
    answer = response([WEB_SEARCH, FILE_SEARCH, OPEN_PAGE], RESPONSE_USAGE, "default")
    answer["output"][-1]["content"][0]["text"] = "a long answer. " * 8000  # 120 kB
    body = compact(answer)
    recorder = recorded(body, 4096)
    assert recorder.complete and b"_search_call" not in recorder.tail()
    full = Usage(
        9463, 8320, 582, 512, web_search_calls=2, file_search_calls=1, service_tier="default"
    )
    assert usage_of_recording(recorder, False) == full
    # Cut (bigger than the head), only what its tail shows can be read: no search call.
    assert usage_of_answer(b"", recorder.tail(), False, False) == Usage(
        9463, 8320, 582, 512, service_tier="default"
    )


def test_a_whole_answer_whose_usage_comes_first_is_found_past_the_tail() -> None:
    answer = {"usage": CHAT_AUDIO["usage"], **copy.deepcopy(CHAT_AUDIO)}
    answer["choices"][0]["message"]["audio"]["data"] = "A" * 100_000
    body = compact(answer)
    recorder = recorded(body, 4096)
    assert recorder.complete and b'"usage"' not in recorder.tail()
    assert usage_of_recording(recorder, False) == Usage(
        84, 0, 352, 0, audio_input_tokens=69, audio_output_tokens=281, service_tier="default"
    )


# ------------------------------------------------------------------------ the usage object


def test_usage_in_tail_keeps_reading_the_last_usage_object_with_its_new_units() -> None:
    body = compact(CHAT_IMAGE_CACHE_WRITE)
    assert usage_in_tail(body) == Usage(
        2310, 0, 301, 256, cache_write_tokens=2048, image_input_tokens=765
    )


def test_each_subset_is_capped_at_its_parent_and_non_counts_are_zero() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": True, "image_tokens": -3},
        "completion_tokens_details": {"reasoning_tokens": 9, "rejected_prediction_tokens": "4"},
    }
    assert usage_from_mapping(usage) == Usage(10, 10, 5, 5)


def test_a_duration_usage_without_seconds_states_none() -> None:
    assert usage_from_mapping({"type": "duration"}) is None
    assert usage_from_mapping({"type": "duration", "seconds": True}) is None
    assert usage_from_mapping({"type": "duration", "seconds": 2.5}) == Usage(audio_seconds=2.5)


def test_a_new_usage_is_all_zero_with_no_tier() -> None:
    assert as_dict(Usage()) == {
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": False,
        "cache_write_tokens": 0,
        "audio_input_tokens": 0,
        "audio_output_tokens": 0,
        "image_input_tokens": 0,
        "image_output_tokens": 0,
        "rejected_prediction_tokens": 0,
        "web_search_calls": 0,
        "file_search_calls": 0,
        "audio_seconds": 0.0,
        "service_tier": None,
    }


# ------------------------------------------------------------------------ speech


@pytest.mark.parametrize(
    ("body", "characters"),
    [
        pytest.param({"model": "tts-1", "input": "Hello world!"}, 12, id="ascii"),
        pytest.param({"model": "tts-1", "input": "👋 héllo"}, 7, id="an emoji is one"),
        pytest.param({"model": "tts-1", "input": "he\u0301"}, 3, id="a combining mark is one"),
        pytest.param({"model": "tts-1-hd", "input": "你好，世界"}, 5, id="cjk"),
        pytest.param({"model": "tts-1", "input": ""}, 0, id="empty"),
        pytest.param({"model": "tts-1", "input": ["a", "b"]}, 0, id="not a string"),
        pytest.param({"model": "tts-1"}, 0, id="missing"),
        pytest.param(None, 0, id="no json body"),
    ],
)
def test_speech_is_billed_by_the_code_points_of_its_input(body: Any, characters: int) -> None:
    assert input_characters(body) == characters


def test_speech_characters_count_a_surrogate_pair_from_json_as_one() -> None:
    assert input_characters(json.loads('{"input": "\\ud83d\\udc4b"}')) == 1

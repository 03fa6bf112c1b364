"""The request side of metering: what the gateway learns from a request before forwarding it
(`RequestFacts`), whether its path is metered, the character count speech is billed by, and
asking a stream for its usage (`stream_options.include_usage`) spliced into the body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import INVALID_REQUEST, GatewayError

# Paths (after /v1) whose responses carry OpenAI usage, and so whose tokens are metered.
METERED_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/audio/transcriptions",
        "/audio/translations",
        "/images/generations",
        "/images/edits",
    }
)
# Streams whose usage OpenAI sends only when `stream_options.include_usage` is set.
USAGE_OPT_IN_PATHS = frozenset({"/chat/completions", "/completions"})


@dataclass(slots=True)
class RequestFacts:
    """What the gateway learnt from a request before forwarding it."""

    api_path: str  # the path after /v1, e.g. /chat/completions
    model: str | None = None
    stream: bool = False
    json_body: dict[str, Any] | None = None
    usage_injected: bool = False

    @property
    def metered(self) -> bool:
        return self.api_path in METERED_PATHS


def wants_usage_injection(facts: RequestFacts) -> bool:
    if not (facts.stream and facts.api_path in USAGE_OPT_IN_PATHS and facts.json_body):
        return False
    options = facts.json_body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def inject_include_usage(body: bytes, parsed: dict[str, Any]) -> bytes:
    """The body with `stream_options.include_usage` set, spliced in without re-encoding."""
    if "stream_options" not in parsed:
        end = body.rstrip().rfind(b"}")
        if end > 0:
            return body[:end] + b',"stream_options":{"include_usage":true}' + body[end:]
    options = parsed.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    edited = {**parsed, "stream_options": options}
    try:
        return orjson.dumps(edited)
    except orjson.JSONEncodeError:
        # orjson stops at 255 levels; the body parsed, so it is forwarded, re-encoded slower.
        try:
            return json.dumps(edited, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:
            raise GatewayError(
                INVALID_REQUEST, "The JSON body of your request is nested too deeply."
            ) from None


def input_characters(json_body: Any) -> int:
    """The billed unit of character-priced speech (`/audio/speech`, tts-1 / tts-1-hd): the
    Unicode code points of the request's `input`; 0 when `input` is not a string."""
    if isinstance(json_body, dict):
        text = json_body.get("input")
        if isinstance(text, str):
            return len(text)
    return 0

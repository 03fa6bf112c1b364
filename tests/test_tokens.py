"""Offline token counting: exact ids against tiktoken's published values, and no network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.metering import tokens
from gateway.metering.tokens import (
    count_text,
    encoding_name_for_model,
    estimate_prompt_tokens,
    get_encoding,
    max_output_tokens,
)

ROOT = Path(__file__).resolve().parent.parent

# The example of OpenAI's cookbook "How to count tokens with tiktoken", whose published counts
# (also what the API reported) are 129 prompt tokens for gpt-3.5-turbo / gpt-4 and 124 for
# gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        ("o200k_base", "hello world", [24912, 2375]),
        ("cl100k_base", "hello world", [15339, 1917]),
        ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ],
)
def test_packaged_encodings_give_official_token_ids(name: str, text: str, ids: list[int]) -> None:
    encoding = get_encoding(name)
    assert encoding.encode_ordinary(text) == ids
    assert encoding.decode(ids) == text


def test_packaged_encodings_carry_tiktokens_special_tokens() -> None:
    o200k, cl100k = get_encoding("o200k_base"), get_encoding("cl100k_base")
    assert o200k.name == "o200k_base"
    assert o200k.n_vocab == 200_019
    assert o200k.eot_token == 199_999
    assert cl100k.n_vocab == 100_277
    assert cl100k.special_tokens_set == {
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|endofprompt|>",
    }


def test_unpackaged_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="r50k_base"):
        get_encoding("r50k_base")


def test_count_text_uses_the_models_encoding() -> None:
    assert count_text("gpt-4o-mini", "hello world") == 2
    assert count_text("gpt-3.5-turbo", "tiktoken is great!") == 6
    assert count_text("gpt-4o", "") == 0


def test_special_token_text_is_counted_as_ordinary_text() -> None:
    text = "before <|endoftext|> after <|endofprompt|>"
    encoding = get_encoding("o200k_base")
    ordinary = encoding.encode_ordinary(text)
    assert count_text("gpt-4o", text) == len(ordinary)
    assert encoding.eot_token not in ordinary
    # Had it been read as the special token, "<|endoftext|>" would be a single token.
    assert count_text("gpt-4o", "<|endoftext|>") > 1
    assert count_text("gpt-4", "<|endoftext|>") > 1


def test_encodings_load_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    builds: list[str] = []
    real_build = tokens._build_encoding

    def counting_build(name: str):
        builds.append(name)
        return real_build(name)

    monkeypatch.setattr(tokens, "_build_encoding", counting_build)
    barrier = threading.Barrier(8)
    results = []

    def load() -> None:
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["cl100k_base"]
    assert len(results) == 8
    assert all(result is results[0] for result in results)


# ---------------------------------------------------------------- model → encoding


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "gpt-4o-mini-2024-07-18",
        "gpt-4.1-nano",
        "gpt-4.5-preview",
        "gpt-5",
        "gpt-5-mini",
        "o1",
        "o1-mini",
        "o3-mini",
        "o4-mini",
        "chatgpt-4o-latest",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "GPT-4O",
        "some-future-model",
        "",
        None,
    ],
)
def test_models_on_o200k(model: str | None) -> None:
    assert encoding_name_for_model(model) == "o200k_base"


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4",
        "gpt-4-0613",
        "gpt-4-turbo",
        "gpt-4-32k",
        "gpt-3.5-turbo",
        "gpt-3.5-turbo-instruct",
        "gpt-35-turbo",
        "text-embedding-3-small",
        "text-embedding-ada-002",
        "davinci-002",
        "babbage-002",
        "ft:gpt-3.5-turbo-0125:acme::xyz",
    ],
)
def test_models_on_cl100k(model: str) -> None:
    assert encoding_name_for_model(model) == "cl100k_base"


# ---------------------------------------------------------------- prompt estimates


@pytest.mark.parametrize(
    ("model", "published"),
    [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_chat_estimate_matches_openais_published_counts(model: str, published: int) -> None:
    body = {"model": model, "messages": COOKBOOK_MESSAGES}
    assert estimate_prompt_tokens("/v1/chat/completions", body) == published


def test_chat_estimate_follows_the_formula() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "text", "text": "tiktoken is great!"},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    c = lambda text: len(get_encoding("o200k_base").encode_ordinary(text))  # noqa: E731
    by_hand = (
        (3 + c("system") + c("You are terse."))
        + (3 + c("user") + c("alice") + 1 + c("hello world") + c("tiktoken is great!"))
        + (3 + c("assistant"))
        + 3
    )
    assert c("hello world") == 2
    body = {"model": "gpt-4o", "messages": messages}
    assert estimate_prompt_tokens("/v1/chat/completions", body) == by_hand


def test_chat_estimate_counts_tools_as_compact_json() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "hi"}]
    plain = estimate_prompt_tokens("/v1/chat/completions", {"messages": messages})
    with_tools = estimate_prompt_tokens(
        "/v1/chat/completions", {"messages": messages, "tools": tools}
    )
    compact = '[{"type":"function","function":{"name":"get_weather","parameters":{}}}]'
    assert with_tools - plain == count_text(None, compact)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello world"], 4),
        ([1, 2, 3], 3),
        ([[1, 2], [3, 4, 5]], 5),
    ],
)
def test_completions_prompt_shapes(prompt: object, expected: int) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": prompt}
    assert estimate_prompt_tokens("/v1/completions", body) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "tiktoken is great!"], 8),
        ([15339, 1917], 2),
        ([[15339, 1917], [83]], 3),
    ],
)
def test_embeddings_input_shapes(value: object, expected: int) -> None:
    body = {"model": "text-embedding-3-small", "input": value}
    assert estimate_prompt_tokens("/v1/embeddings", body) == expected


def test_responses_input_is_counted_like_chat() -> None:
    c = lambda text: count_text("gpt-4o", text)  # noqa: E731
    as_string = {"model": "gpt-4o", "input": "hello world", "instructions": "You are terse."}
    expected = (3 + c("system") + c("You are terse.")) + (3 + c("user") + 2) + 3
    assert estimate_prompt_tokens("/v1/responses", as_string) == expected

    as_items = {
        "model": "gpt-4o",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
            {"role": "assistant", "content": "tiktoken is great!"},
            {"type": "input_image", "image_url": "https://example.com/cat.png"},
        ],
    }
    expected = (3 + c("user") + 2) + (3 + c("assistant") + c("tiktoken is great!")) + 3 + 3
    assert estimate_prompt_tokens("/v1/responses", as_items) == expected


def test_other_paths_count_nothing() -> None:
    body = {"model": "gpt-4o", "input": "hello world", "messages": [{"content": "hi"}]}
    assert estimate_prompt_tokens("/v1/models", body) == 0
    assert estimate_prompt_tokens("/v1/audio/transcriptions", body) == 0


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # Chat: the reply priming (3) and 3 per message that is an object; anything else in
        # it counts nothing.
        ("/v1/chat/completions", {"messages": "not a list"}, 3),
        ("/v1/chat/completions",
         {"messages": [None, 3, "x", {"role": 5, "content": {"a": 1}}]}, 3 + 3),
        ("/v1/chat/completions", {"messages": [{"content": [None, {"text": 7}, "raw"]}]}, 3 + 3),
        # Tools of any shape are counted as their compact JSON: {"x":"{1, 2}"} is 10 tokens.
        ("/v1/chat/completions", {"model": 42, "messages": [], "tools": {"x": {1, 2}}}, 3 + 10),
        ("/v1/completions", {"prompt": [None, 1.5, {"a": "b"}, True]}, 1),
        ("/v1/embeddings", {"input": {"not": "a list"}}, 0),
        ("/v1/embeddings", {"input": [[1, "x"], None]}, 2),
        ("/v1/responses", {"input": 7, "instructions": ["x"]}, 3),
        ("/v1/responses", {"input": [None, "hello", {"type": "function_call_output"}]}, 10),
        ("/v1/chat/completions", [], 0),
        ("/v1/chat/completions", None, 0),
    ],
)  # fmt: skip
def test_odd_shapes_count_what_they_can_and_never_raise(
    path: str, body: object, expected: int
) -> None:
    assert estimate_prompt_tokens(path, body) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_completion_tokens": 100, "max_tokens": 5}, 100),
        ({"max_tokens": 5}, 5),
        ({"max_output_tokens": 0}, 0),
        ({"max_tokens": -1}, None),
        ({"max_tokens": True}, None),
        ({"max_tokens": "10"}, None),
        ({"max_tokens": None, "max_output_tokens": 7}, 7),
        ({}, None),
    ],
)
def test_max_output_tokens(body: dict, expected: int | None) -> None:
    assert max_output_tokens(body) == expected


# ---------------------------------------------------------------- offline, for real

_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.getaddrinfo = refuse
    socket.create_connection = refuse

    from gateway.metering import tokens

    assert tokens.count_text("gpt-4o", "hello world") == 2
    assert tokens.count_text("gpt-4", "hello world") == 2
    assert tokens.estimate_prompt_tokens(
        "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello world"}
    ) == 2
    assert attempts == [], attempts
    assert os.listdir(os.environ["TIKTOKEN_CACHE_DIR"]) == []

    # The guard bites: plain tiktoken, with the same empty cache, needs the network and fails.
    import tiktoken
    try:
        tiktoken.get_encoding("o200k_base")
    except Exception:
        pass
    else:
        sys.exit("tiktoken loaded o200k_base without network; the test proves nothing")
    assert attempts, "tiktoken failed without trying the network"
    print("offline-ok")
    """
)


def test_counting_never_touches_the_network(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "DATA_GYM_CACHE_DIR": str(cache),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offline-ok" in done.stdout


async def test_the_first_estimate_builds_its_encoding_off_the_event_loop(
    gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building o200k takes most of a second: in the event loop it would stall every call."""
    monkeypatch.setattr(tokens, "_encodings", {})
    built_in: list[str] = []
    build = tokens._build_encoding

    def recording_build(name: str):
        built_in.append(threading.current_thread().name)
        return build(name)

    monkeypatch.setattr(tokens, "_build_encoding", recording_build)
    answer = await gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a b c"}],
        extra_headers={"x-fake-fault": "no_usage"},
    )
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert row["tokens_estimated"] == 1 and row["input_tokens"] > 0
    assert len(built_in) == 1 and built_in[0] != threading.main_thread().name

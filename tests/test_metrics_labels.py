"""`/metrics` label values stay bounded whatever model names clients send: a model outside
the price tables and every team's `models` is counted as `model="other"`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.loader import GatewayConfig, load_config
from gateway.web import metrics
from gateway.web.metrics import ModelLabels
from tests.conftest import DEFAULT_TEAMS, PRODUCT_KEY, RESEARCH_KEY, Gateway, GatewayFactory, sha

FINETUNE_TEAMS = (
    DEFAULT_TEAMS
    + f"""
  interns:
    models: [ft:gpt-4o-mini:acme::abc123, whisper-1]
    keys:
      - id: interns-1
        sha256: {sha("mgw-test-interns-secret")}
"""
)


async def scrape(gateway: Gateway) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(gateway.server.make_url("/metrics"))) as response,
    ):
        assert response.status == 200
        return await response.text()


def requests_by_model(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_requests":
            for sample in family.samples:
                model = sample.labels["model"]
                counts[model] = counts.get(model, 0) + sample.value
    return counts


async def chat(gateway: Gateway, model: str, key: str = RESEARCH_KEY) -> None:
    client = gateway.client(key)
    await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello there"}]
    )


async def test_twenty_100_kb_model_names_count_as_other_and_keep_metrics_small(
    gateway: Gateway,
):
    for i in range(20):
        await chat(gateway, f"{i:02d}-" + "m" * 100_000)
    await chat(gateway, "gpt-4o-mini")
    text = await scrape(gateway)
    assert len(text.encode()) < 200_000
    assert "m" * 200 not in text
    assert requests_by_model(text) == {"other": 20, "gpt-4o-mini": 1}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    other = (("model", "other"), ("outcome", "ok"), ("status", "200"), ("team", "research"))
    assert samples[("gateway_requests_total", other)] == 20
    assert samples[("gateway_requests_total", (
        ("model", "gpt-4o-mini"), ("outcome", "ok"), ("status", "200"), ("team", "research"),
    ))] == 1  # fmt: skip
    input_tokens = (("kind", "input"), ("model", "other"), ("team", "research"))
    assert samples[("gateway_tokens_total", input_tokens)] > 0


async def test_priced_snapshots_and_allow_listed_models_keep_their_own_label(
    make_gateway: GatewayFactory,
):
    gateway = await make_gateway(teams=FINETUNE_TEAMS)
    for model in (
        "gpt-4o-mini",  # priced
        "gpt-4o-mini-2024-07-18",  # a dated snapshot of a priced model
        "text-embedding-3-small",  # priced and on product's list
        "ft:gpt-4o-mini:acme::abc123",  # on interns' list, unpriced, used by research
        "gpt-4o-mini-fancy",  # neither: a name that merely starts like a priced one
        "gpt-4o-mini-2024-07-18-x",
        "whisper-2",
    ):
        await chat(gateway, model)
    await chat(gateway, "gpt-4o-mini", PRODUCT_KEY)
    assert requests_by_model(await scrape(gateway)) == {
        "gpt-4o-mini": 2,
        "gpt-4o-mini-2024-07-18": 1,
        "text-embedding-3-small": 1,
        "ft:gpt-4o-mini:acme::abc123": 1,
        "other": 3,
    }


async def test_calls_without_a_model_keep_an_empty_model_label(gateway: Gateway):
    await gateway.client().models.list()
    assert requests_by_model(await scrape(gateway)) == {"": 1}


# ---------------------------------------------------------------- the classifier


def config_with(tmp_path: Path, name: str, models: str) -> GatewayConfig:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            storage: {{sqlite_path: {tmp_path / "ledger.sqlite3"}}}
            pricing: {{models: {{{models}}}}}
            teams:
              research:
                keys: [{{id: r, sha256: {sha("mgw-x-secret")}}}]
            """
        )
    )
    return load_config(path)


def test_a_reload_that_prices_a_model_gives_it_its_own_label(tmp_path: Path):
    before = config_with(tmp_path, "before", "gpt-4o-mini: {input: 0.15, output: 0.6}")
    after = config_with(
        tmp_path,
        "after",
        "gpt-4o-mini: {input: 0.15, output: 0.6}, gpt-5-nano: {input: 0.05, output: 0.4}",
    )
    current = [before]
    labels = ModelLabels(lambda: current[0])
    assert [labels("gpt-5-nano"), labels("gpt-5-nano"), labels("gpt-4o-mini")] == [
        "other", "other", "gpt-4o-mini",
    ]  # fmt: skip
    current[0] = after
    assert [labels("gpt-5-nano"), labels("gpt-5-nano-2025-08-07")] == [
        "gpt-5-nano", "gpt-5-nano-2025-08-07",
    ]  # fmt: skip


def test_snapshot_labels_are_capped_and_later_snapshots_count_as_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(metrics, "MAX_SNAPSHOT_LABELS", 2)
    config = config_with(tmp_path, "c", "gpt-4o-mini: {input: 0.15, output: 0.6}")
    labels = ModelLabels(lambda: config)
    names = [f"gpt-4o-mini-2024-07-{day:02d}" for day in (1, 2, 3)]
    assert [labels(name) for name in names] == [names[0], names[1], "other"]
    assert [labels(names[0]), labels("gpt-4o-mini")] == [names[0], "gpt-4o-mini"]


def test_the_classifier_remembers_a_bounded_number_of_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(metrics, "LABEL_CACHE_SIZE", 10)
    config = config_with(tmp_path, "c", "gpt-4o-mini: {input: 0.15, output: 0.6}")
    labels = ModelLabels(lambda: config)
    assert {labels(f"m{i}") for i in range(1000)} == {"other"}
    assert labels("x" * 100_000) == "other"
    assert len(labels._cache) <= 10
    assert all(len(model) < 100 for model in labels._cache)

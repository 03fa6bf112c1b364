"""Prices from the maintained database (genai-prices' packaged OpenAI data), computed by hand
from OpenAI's list prices to the nano-dollar: dated changes, service tiers, batch, long
context, units billed at their parent's rate, unknown models, overrides, the `prices` command.

1 USD per 1M tokens is 1000 nano-USD (1e-9 USD) a token: gpt-4o-mini's $0.15 input is 150.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import genai_prices
import pytest

from gateway.cli import main
from gateway.commands.config_file import unpriced_model_warnings
from gateway.config.loader import ConfigError, load_config, parse_config
from gateway.ledger.writer import CallRecord, Ledger
from gateway.metering.usage import CallUsage
from gateway.pricing.book import PriceBook
from gateway.pricing.catalog import Catalog, builtin_catalog
from gateway.pricing.errors import PricingError
from gateway.pricing.table import load_price_table, parse_price_table
from tests.conftest import sha

ROOT = Path(__file__).resolve().parent.parent
SOURCE = f"genai-prices {genai_prices.__version__}"


def at(year: int, month: int, day: int, hour: int = 12, second: int = 0) -> float:
    """A call's `started_at`: unix seconds of that UTC time."""
    return datetime(year, month, day, hour, 0, second, tzinfo=UTC).timestamp()


NOV_2_2026 = at(2026, 11, 2)  # after every dated tier and batch price the data has started


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.builtin()


def cost(book: PriceBook, model: str | None, when: float = NOV_2_2026, **usage: object):
    tier = usage.pop("service_tier", None)
    batch = bool(usage.pop("batch", False))
    return book.cost_of(
        CallUsage(**usage),  # type: ignore[arg-type]
        model=model,
        at=when,
        service_tier=tier,  # type: ignore[arg-type]
        batch=batch,
    )


# ---------------------------------------------------------------- what the database has


def test_the_database_has_openai_models_tiers_batch_and_dated_changes() -> None:
    # genai-prices 0.2.3's packaged data; a newer package may only add to it.
    catalog = builtin_catalog()
    assert len(catalog.models) >= 113
    assert catalog.data_date is not None and catalog.data_date >= date(2026, 10, 19)
    tiers = {tier for model in catalog.models for tier in model.tiers}
    assert tiers >= {"default", "flex", "priority", "fast"}
    batch = [m.id for m in catalog.models if any(v.is_batch for v in m.variants)]
    assert len(batch) >= 46
    dated = {m.id: [d.start for d in m.prices] for m in catalog.models if len(m.prices) > 1}
    changes = {
        "gpt-5.5-cyber": [None, date(2026, 10, 19)],
        "gpt-5.6-luna": [None, date(2026, 7, 30)],
        "gpt-5.6-sol": [None, date(2026, 8, 21)],
        "gpt-5.6-terra": [None, date(2026, 7, 30)],
        "o3": [None, date(2025, 6, 10)],
    }
    assert {model: dated.get(model) for model in changes} == changes
    long_context = {m.id for m in catalog.models if m.prices[-1].rates.tier_starts()}
    assert long_context >= {
        "gpt-5.4", "gpt-5.4-pro", "gpt-5.5", "gpt-5.5-pro", "gpt-5.6-luna", "gpt-5.6-sol",
        "gpt-5.6-terra", "gpt-6-astra", "gpt-6-luna", "gpt-6-rosalind", "gpt-6-sol",
        "gpt-6.1-sol", "gpt-6.1-terra",
    }  # fmt: skip


# ---------------------------------------------------------------- list prices, by hand


def test_gpt_4o_mini_input_cached_and_output(book: PriceBook) -> None:
    # $0.15 input, $0.075 cached, $0.60 output per 1M: 600·150 + 400·75 + 500·600.
    got = cost(book, "gpt-4o-mini", input_tokens=1000, cached_input_tokens=400, output_tokens=500)
    assert got == (420_000, True)


def test_a_dated_snapshot_is_priced_as_its_model(book: PriceBook) -> None:
    usage = {"input_tokens": 1000, "cached_input_tokens": 400, "output_tokens": 500}
    assert cost(book, "gpt-4o-mini-2024-07-18", **usage) == (420_000, True)
    assert cost(book, "GPT-4o-mini", **usage) == (420_000, True)


def test_gpt_4o(book: PriceBook) -> None:
    # $2.50 / $1.25 / $10: 976·2500 + 1024·1250 + 300·10000.
    got = cost(book, "gpt-4o", input_tokens=2000, cached_input_tokens=1024, output_tokens=300)
    assert got == (6_720_000, True)


def test_gpt_5_reasoning_tokens_are_output(book: PriceBook) -> None:
    # $1.25 / $0.125 / $10: 500·1250 + 1000·125 + 2000·10000; 1500 of the output is reasoning.
    usage = {"input_tokens": 1500, "cached_input_tokens": 1000, "output_tokens": 2000}
    assert cost(book, "gpt-5", **usage, reasoning_tokens=1500) == (20_750_000, True)
    assert cost(book, "gpt-5", **usage) == (20_750_000, True)


def test_rejected_prediction_tokens_are_output_already_counted(book: PriceBook) -> None:
    # OpenAI counts rejected predictions inside completion_tokens and bills them as output.
    got = cost(book, "gpt-4o", input_tokens=100, output_tokens=50, rejected_prediction_tokens=20)
    assert got == (100 * 2500 + 50 * 10_000, True)


def test_gpt_5_2_released_after_august_2025_is_priced(book: PriceBook) -> None:
    # Released 2025-12-11 at $1.75 / $0.175 / $14: 8000·1750 + 2000·175 + 1000·14000.
    usage = {"input_tokens": 10_000, "cached_input_tokens": 2000, "output_tokens": 1000}
    assert cost(book, "gpt-5.2", **usage) == (28_350_000, True)
    assert cost(book, "gpt-5.2-2025-12-11", **usage) == (28_350_000, True)


def test_a_ledger_row_is_priced_as_it_stands(book: PriceBook) -> None:
    record = CallRecord(request_id="r1", started_at=NOV_2_2026, model="gpt-4o-mini",
                        input_tokens=1000, cached_input_tokens=400, output_tokens=500)  # fmt: skip
    assert book.cost_of(record, model=record.model, at=record.started_at) == (420_000, True)


# ---------------------------------------------------------------- rounding


def test_the_exact_cost_is_rounded_once_half_up(book: PriceBook) -> None:
    # gpt-5 flex: $0.625 input, $0.0625 cached (62.5 nano-USD a token), $5 output.
    # 1000·625 + 3·62.5 + 1·5000 = 630187.5 → 630188 (62.5 rounded per token would give 630189).
    got = cost(book, "gpt-5", input_tokens=1003, cached_input_tokens=3, output_tokens=1,
               service_tier="flex")  # fmt: skip
    assert got == (630_188, True)
    assert cost(book, "gpt-5", input_tokens=1, cached_input_tokens=1, service_tier="flex") == (
        63,
        True,
    )


# ---------------------------------------------------------------- tiers, batch, dates


def test_flex_and_priority_tiers_follow_the_reported_service_tier(book: PriceBook) -> None:
    usage = {"input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100}
    # standard $1.25 / $0.125 / $10; flex $0.625 / $0.0625 / $5; priority $2.50 / $0.25 / $20.
    assert cost(book, "gpt-5", **usage) == (800 * 1250 + 200 * 125 + 100 * 10_000, True)
    assert cost(book, "gpt-5", **usage, service_tier="default") == (2_025_000, True)
    assert cost(book, "gpt-5", **usage, service_tier="flex") == (1_012_500, True)
    assert cost(book, "gpt-5", **usage, service_tier="priority") == (4_050_000, True)
    # A tier the database has no prices for is the standard tier.
    assert cost(book, "gpt-5", **usage, service_tier="scale") == (2_025_000, True)
    assert cost(book, "gpt-4o-mini", input_tokens=1000, service_tier="flex") == (150_000, True)


def test_tier_prices_apply_from_the_day_the_database_dates_them(book: PriceBook) -> None:
    # The database models gpt-5's flex prices from 2026-10-12; before, flex pays standard.
    usage = {"input_tokens": 1000, "output_tokens": 100}
    assert cost(book, "gpt-5", at(2026, 10, 11), **usage, service_tier="flex") == (2_250_000, True)
    assert cost(book, "gpt-5", at(2026, 10, 12), **usage, service_tier="flex") == (1_125_000, True)


def test_batch_without_a_batch_price_is_half_the_exact_cost_rounded_once(book: PriceBook) -> None:
    # gpt-5-search-api has no batch price: 100·1250 + 1·125 = 125125, half 62562.5 → 62563.
    usage = {"input_tokens": 101, "cached_input_tokens": 1}
    assert cost(book, "gpt-5-search-api", **usage) == (125_125, True)
    assert cost(book, "gpt-5-search-api", **usage, batch=True) == (62_563, True)


def test_batch_uses_the_database_batch_price_from_its_date(book: PriceBook) -> None:
    usage = {"input_tokens": 1000, "cached_input_tokens": 400, "output_tokens": 500}
    # From 2026-10-14 gpt-4o-mini's batch price is $0.075 / $0.30; cached input keeps $0.075,
    # as the database says: 600·75 + 400·75 + 500·300.
    assert cost(book, "gpt-4o-mini", **usage, batch=True) == (225_000, True)
    # Before it, 50% of the standard 420,000.
    assert cost(book, "gpt-4o-mini", at(2026, 10, 13), **usage, batch=True) == (210_000, True)


def test_a_price_change_applies_from_its_utc_day(book: PriceBook) -> None:
    # o3 went from $10 / $40 to $2 / $8 on 2025-06-10.
    usage = {"input_tokens": 1000, "output_tokens": 1000}
    last_second_before = at(2025, 6, 9, 23, 59) + 59
    assert cost(book, "o3", last_second_before, **usage) == (50_000_000, True)
    assert cost(book, "o3", at(2025, 6, 10, 0), **usage) == (10_000_000, True)


def test_long_context_prices_apply_to_every_token_above_the_threshold(book: PriceBook) -> None:
    # gpt-5.4: $2.50 / $15, and $5 / $22.50 for a call with more than 272,000 input tokens.
    assert cost(book, "gpt-5.4", input_tokens=272_000, output_tokens=1000) == (695_000_000, True)
    assert cost(book, "gpt-5.4", input_tokens=272_001, output_tokens=1000) == (
        272_001 * 5000 + 1000 * 22_500,
        True,
    )


# ---------------------------------------------------------------- units


def test_units_without_a_price_of_their_own_pay_their_parents_rate(book: PriceBook) -> None:
    # gpt-5 has no cache-write price: input rate. gpt-6-sol has one ($2.50 against $2 input).
    assert cost(book, "gpt-5", input_tokens=1000, cache_write_tokens=400) == (1_250_000, True)
    assert cost(book, "gpt-6-sol", input_tokens=1000, cache_write_tokens=400) == (
        600 * 2000 + 400 * 2500,
        True,
    )
    # gpt-4o-audio-preview lists no audio prices: audio in and out at its $2.50 / $10.
    got = cost(book, "gpt-4o-audio-preview", input_tokens=1000, audio_input_tokens=500,
               output_tokens=300, audio_output_tokens=200)  # fmt: skip
    assert got == (1000 * 2500 + 300 * 10_000, True)
    # gpt-image-1 has no image-output price ($40 output); gpt-image-1.5 has one ($32, $10 text).
    assert cost(book, "gpt-image-1", output_tokens=1000, image_output_tokens=800) == (
        40_000_000,
        True,
    )
    assert cost(book, "gpt-image-1.5", output_tokens=1000, image_output_tokens=800) == (
        200 * 10_000 + 800 * 32_000,
        True,
    )


def test_audio_input_of_a_transcription_model(book: PriceBook) -> None:
    # gpt-4o-mini-transcribe: $1.25 text input, $3 audio input, $5 output.
    got = cost(book, "gpt-4o-mini-transcribe", input_tokens=1200, audio_input_tokens=1000,
               output_tokens=100)  # fmt: skip
    assert got == (200 * 1250 + 1000 * 3000 + 100 * 5000, True)


def test_tool_calls_seconds_and_characters(book: PriceBook) -> None:
    # Web search $10 and file search $2.50 per 1000 calls.
    assert cost(book, "gpt-4o", web_search_calls=2, file_search_calls=4) == (30_000_000, True)
    # whisper-1: $0.36 an hour is 100,000 nano-USD a second.
    assert cost(book, "whisper-1", audio_seconds=61.5) == (6_150_000, True)
    # gpt-live-transcribe: $1.02 an hour; one second is 283,333.33... → 283,333.
    assert cost(book, "gpt-live-transcribe", audio_seconds=1.0) == (283_333, True)
    # tts-1: $15 per 1M characters.
    assert cost(book, "tts-1", input_characters=1000) == (15_000_000, True)


# ---------------------------------------------------------------- unknown models


def test_an_unknown_model_is_estimated_as_the_nearest_known_model_of_its_family(
    book: PriceBook,
) -> None:
    usage = {"input_tokens": 1500, "cached_input_tokens": 1000, "output_tokens": 2000}
    assert cost(book, "gpt-5-acme-preview", **usage) == (20_750_000, False)
    assert cost(book, "gpt-5-acme-preview-2026-01-01", **usage) == (20_750_000, False)
    assert book.find("gpt-5-acme-preview")[1] == "gpt-5"  # type: ignore[index]
    assert book.find("gpt-4.1-mini-x")[1] == "gpt-4.1-mini"  # type: ignore[index]
    assert not book.is_priced("gpt-5-acme-preview")
    # No family: 0, flagged; a call without a model or usage has nothing unpriced.
    assert cost(book, "mystery-model", input_tokens=10) == (0, False)
    assert cost(book, None) == (0, True)
    assert cost(book, None, input_tokens=3) == (0, False)


def test_unknown_model_zero_and_reject(book: PriceBook) -> None:
    zero = PriceBook.builtin(unknown_model="zero")
    reject = PriceBook.builtin(unknown_model="reject")
    for other in (zero, reject):
        assert cost(other, "gpt-5-acme-preview", input_tokens=1000) == (0, False)
        assert cost(other, "gpt-5", input_tokens=1000) == (1_250_000, True)
    assert not reject.is_priced("gpt-5-acme-preview")
    assert reject.is_priced("gpt-5-2025-08-07") and reject.is_priced(None)
    assert len({book.content_hash, zero.content_hash, reject.content_hash}) == 3


# ---------------------------------------------------------------- overrides


def overridden(mapping: dict, **kwargs: str) -> PriceBook:
    return PriceBook.builtin(parse_price_table({}, "o"), **kwargs).with_overrides(mapping)


def test_an_override_replaces_the_models_entry_whole() -> None:
    book = overridden({"models": {"gpt-5": {"input": 1.00, "output": 8.00}}})
    usage = {"input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100}
    # Every tier, every name of the entry; cached input falls back to the override's input.
    for tier in (None, "flex", "priority"):
        assert cost(book, "gpt-5", **usage, service_tier=tier) == (1_800_000, True)
    assert cost(book, "gpt-5-2025-08-07", **usage) == (1_800_000, True)
    assert cost(book, "gpt-5", at(2020, 1, 1), **usage) == (1_800_000, True)
    # Batch: the override has no batch price, so 50%.
    assert cost(book, "gpt-5", **usage, batch=True) == (900_000, True)
    # Other models keep the database's prices.
    assert cost(book, "gpt-5-mini", input_tokens=1000) == (250_000, True)


def test_override_fees_apply_to_every_call_and_a_new_model_is_priced() -> None:
    book = overridden(
        {"transfer_per_mb": 0.01, "per_request": 0.1,
         "models": {"acme-llm": {"input": 3.00, "output": 12.00, "per_request": 0}}}
    )  # fmt: skip
    assert cost(book, "gpt-4o-mini", input_tokens=1000, request_bytes=1000) == (
        150_000 + 1000 * 10 + 100_000_000,
        True,
    )
    assert cost(book, "acme-llm", input_tokens=10, output_tokens=10) == (150_000, True)
    assert cost(book, "acme-llm-2026-01-01", input_tokens=10) == (30_000, True)


def test_team_pricing_overrides_on_top_of_the_global_overrides(tmp_path: Path) -> None:
    overrides = tmp_path / "mine.yaml"
    overrides.write_text("per_request: 0.001\nmodels:\n  gpt-4o: {input: 2.00, output: 8.00}\n")
    config = parse_config(
        textwrap.dedent(
            f"""\
            pricing: {{table: builtin, overrides: {overrides}}}
            teams:
              research:
                pricing: {{models: {{gpt-4o-mini: {{input: 0.10, output: 0.40}}}}}}
              product: {{}}
            """
        ),
        tmp_path / "gw.yaml",
    )
    research, product = config.team_prices("research"), config.team_prices("product")
    usage = CallUsage(input_tokens=1000, output_tokens=100)
    assert research.cost_of(usage, model="gpt-4o-mini", at=NOV_2_2026) == (
        100_000 + 40_000 + 1_000_000,
        True,
    )
    assert product.cost_of(usage, model="gpt-4o-mini", at=NOV_2_2026) == (1_210_000, True)
    assert research.cost_of(usage, model="gpt-4o", at=NOV_2_2026) == (3_800_000, True)
    assert research.content_hash != product.content_hash


# ---------------------------------------------------------------- config


def test_pricing_absent_is_the_builtin_database() -> None:
    config = parse_config("teams: {}\n", Path("gw.yaml"))
    assert config.pricing.catalog is builtin_catalog()
    assert config.pricing.unknown_model == "estimate"
    assert config.pricing.currency == "USD"


def test_a_table_alone_keeps_its_meaning_and_its_hash(tmp_path: Path) -> None:
    pinned = tmp_path / "gw.yaml"
    pinned.write_text(f"pricing: {ROOT / 'config' / 'pricing.yaml'}\nteams: {{}}\n")
    config = load_config(pinned)
    table = load_price_table(ROOT / "config" / "pricing.yaml")
    assert config.pricing.catalog is None
    assert config.pricing.content_hash == table.content_hash
    usage = CallUsage(input_tokens=1000, output_tokens=100)
    # Unknown to the table: estimated from the models it lists.
    assert config.pricing.cost_of(usage, model="gpt-4o-mini-tts", at=NOV_2_2026) == (
        210_000,
        False,
    )


def test_the_builtin_hash_names_the_package_version_and_data_date(book: PriceBook) -> None:
    catalog = builtin_catalog()
    assert catalog.identity.startswith(
        f"genai-prices {genai_prices.__version__} openai {catalog.data_date} "
    )
    assert book.content_hash == PriceBook.builtin().content_hash
    assert book.content_hash != overridden({"per_request": 0.001}).content_hash


def test_pricing_keys_are_validated_with_their_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            textwrap.dedent(
                """\
                pricing:
                  table: builtin
                  unknown_model: guess
                  models: {}
                teams: {}
                """
            ),
            Path("gw.yaml"),
        )
    assert caught.value.problems == [
        "gw.yaml:3: pricing.unknown_model: must be one of: estimate, zero, reject",
        "gw.yaml:4: pricing: unknown key 'models'",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(
            "pricing:\n  overrides: {models: {gpt-5: {input: -1}}}\nteams: {}\n", Path("gw.yaml")
        )
    assert caught.value.problems == [
        "gw.yaml:2: pricing.overrides: models.gpt-5.input: must not be negative (got -1)"
    ]


def test_a_database_price_that_is_not_exact_is_refused() -> None:
    from genai_prices.types import ClauseEquals, ModelInfo
    from genai_prices.types import ModelPrice as LibraryPrice

    price = LibraryPrice(input_mtok=Decimal("0.0000001"))
    info = ModelInfo(id="odd", match=ClauseEquals(equals="odd"), prices=price)
    with pytest.raises(PricingError, match=r"odd\.input_mtok: 1E-7 USD is not a whole number"):
        Catalog.from_library(SimpleNamespace(models=[info]), "test")


def library_openai() -> genai_prices.types.Provider:
    from genai_prices.data import providers

    return next(p for p in providers if p.id == "openai")


def test_model_names_resolve_as_genai_prices_resolves_them() -> None:
    catalog, library = builtin_catalog(), library_openai()
    names = sorted(catalog.names) + [
        "GPT-4o-Mini", "gpt-4o-mini-2024-07-18", "gpt-5.2-20251211", "gpt-5-20251301",
        "o3-mini-20250131:batch", "ft:gpt-4o-mini-2024-07-18:acme::abc", "gpt-4.1-nano-x",
        "chatgpt-4o-latest", "text-embedding-3-large", "whisper-1", "tts-1-hd-1106",
        "gpt-realtime-mini-2025-10-06", "omni-moderation-latest", "not-a-model", "",
    ]  # fmt: skip
    for name in names:
        info = library.find_model(name)
        mine = catalog.find(name)
        assert (mine.id if mine else None) == (info.id if info else None), name


def test_the_compiled_copy_is_the_package_compiled(tmp_path: Path) -> None:
    compiled = Catalog.from_library(library_openai(), genai_prices.__version__)
    again = Catalog.from_json(json.loads(json.dumps(compiled.to_json())))
    assert again.models == compiled.models
    assert again.matches == compiled.matches
    assert again.identity == compiled.identity == builtin_catalog().identity
    with pytest.raises(ValueError, match="catalog format 0, not 1"):
        Catalog.from_json({**compiled.to_json(), "format": 0})


def start_in_a_fresh_process(cache: Path) -> dict:
    """Load the builtin book in a new interpreter: what it found, and whether it had to
    import genai-prices to do it."""
    probe = (
        "import json, sys; from gateway.pricing.book import PriceBook; "
        "from gateway.pricing.catalog import compiled_catalog_path; "
        "book = PriceBook.builtin(); "
        "print(json.dumps({'imported': 'genai_prices' in sys.modules, "
        "'hash': book.content_hash, 'path': str(compiled_catalog_path()), "
        "'gpt-5': book.catalog.find('gpt-5-2025-08-07').id}))"
    )
    env = {"PATH": "/usr/bin:/bin", "GATEWAY_CACHE_DIR": str(cache), "HOME": str(cache)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(done.stdout)


def test_a_start_reads_the_compiled_copy_instead_of_importing_the_package(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    first = start_in_a_fresh_process(cache)
    path = Path(first["path"])
    assert first["imported"] is True and path.parent == cache and path.is_file()
    assert path.name.startswith("genai-prices-") and path.suffix == ".json"
    assert path.stat().st_mode & 0o777 == 0o644, "readable by the user a container runs as"
    second = start_in_a_fresh_process(cache)
    assert second == {**first, "imported": False}
    assert second["gpt-5"] == "gpt-5"
    assert second["hash"] == PriceBook.builtin().content_hash
    # A damaged copy is compiled anew and replaced; an unwritable folder only costs time.
    path.write_text("{not json")
    assert start_in_a_fresh_process(cache) == first
    assert start_in_a_fresh_process(cache)["imported"] is False
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    assert start_in_a_fresh_process(blocked)["imported"] is True
    assert start_in_a_fresh_process(blocked)["hash"] == first["hash"]


# ---------------------------------------------------------------- commands


def prices_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    assert main(["prices", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_prices_json_for_gpt_4o_mini(capsys: pytest.CaptureFixture[str]) -> None:
    assert prices_json(capsys, "gpt-4o-mini", "--at", "2026-11-02") == [
        {
            "model": "gpt-4o-mini",
            "source": SOURCE,
            "valid_from": None,
            "tier": "standard",
            "usd_per_million": {
                "input": 0.15, "cached_input": 0.075, "cache_write": None, "output": 0.6,
                "audio_input": None, "audio_output": None, "image_input": None,
                "image_output": None,
            },
            "usd_per_call": {"web_search": 0.01, "file_search": 0.0025},
            "per_request": 0,
            "transfer_per_mb": 0,
        }
    ]  # fmt: skip


def test_prices_json_for_a_tier_and_a_long_context_model(capsys: pytest.CaptureFixture[str]):
    nulls = {"cache_write": None, "audio_input": None, "audio_output": None,
             "image_input": None, "image_output": None}  # fmt: skip
    assert prices_json(capsys, "gpt-5.4", "--at", "2026-11-02", "--tier", "priority") == [
        {
            "model": "gpt-5.4",
            "source": SOURCE,
            "valid_from": "2026-10-12",
            "tier": "priority",
            "usd_per_million": {"input": 5, "cached_input": 0.5, "output": 30, **nulls},
            "usd_per_call": {"web_search": 0.01, "file_search": 0.0025},
            "per_request": 0,
            "transfer_per_mb": 0,
        }
    ]
    [standard] = prices_json(capsys, "gpt-5.4", "--at", "2026-11-02")
    assert standard["valid_from"] is None
    assert standard["usd_per_million"] == {"input": 2.5, "cached_input": 0.25, "output": 15,
                                           **nulls}  # fmt: skip
    assert standard["above_input_tokens"] == [
        {"threshold": 272_000,
         "usd_per_million": {"input": 5, "cached_input": 0.5, "output": 22.5, **nulls}}
    ]  # fmt: skip


def test_prices_json_on_dates_batch_and_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    [before] = prices_json(capsys, "o3", "--at", "2025-06-09")
    [after] = prices_json(capsys, "o3", "--at", "2025-06-10")
    assert (before["usd_per_million"]["input"], before["valid_from"]) == (10, None)
    assert (after["usd_per_million"]["input"], after["valid_from"]) == (2, "2025-06-10")
    [batch] = prices_json(capsys, "gpt-5-search-api", "--tier", "batch")
    assert batch["usd_per_million"]["cached_input"] == 0.0625
    [whisper] = prices_json(capsys, "whisper-1")
    assert whisper["usd_per_hour"] == {"audio": 0.36}
    everything = prices_json(capsys)
    assert len(everything) == len(builtin_catalog().models)
    assert [e["model"] for e in everything][:3] == ["ada", "babbage", "babbage-002"]


def test_prices_with_a_config_shows_what_it_charges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "pricing:\n  overrides: {per_request: 0.002, transfer_per_mb: 0.01,\n"
        "              models: {gpt-4o-mini: {input: 0.10, output: 0.40}}}\nteams: {}\n"
    )
    [mini, gpt_5] = prices_json(capsys, "gpt-4o-mini", "gpt-5", "--config", str(path))
    assert (mini["source"], mini["usd_per_million"]["cached_input"]) == ("pricing table", 0.1)
    assert (mini["per_request"], mini["transfer_per_mb"]) == (0.002, 0.01)
    assert (gpt_5["source"], gpt_5["usd_per_million"]["input"]) == (SOURCE, 1.25)
    assert gpt_5["per_request"] == 0.002


def test_prices_of_an_unknown_model_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "mystery-model", "gpt-4o", "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert [e["model"] for e in json.loads(captured.out)] == ["gpt-4o"]
    assert captured.err == "prices: no price for 'mystery-model'\n"
    assert main(["prices", "--at", "November"]) == 2


def test_check_config_warns_about_an_allowed_model_without_a_price(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            teams:
              research:
                models:
                  - gpt-4o-mini
                  - gpt-5-acme-preview
                  - mystery-model
                keys: [{{id: r, sha256: {sha("r")}}}]
            """
        )
    )
    config = load_config(path)
    assert unpriced_model_warnings(config, "gw.yaml") == [
        "gw.yaml:5: warning: model 'gpt-5-acme-preview' allowed for team 'research' has no price "
        "(priced as 'gpt-5', the nearest known model of its family)",
        "gw.yaml:6: warning: model 'mystery-model' allowed for team 'research' has no price "
        "(its calls cost 0)",
    ]
    done = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 0
    assert done.stdout == f"{path}: ok (1 teams, 1 keys)\n"
    assert done.stderr.splitlines() == [
        f"{path}:5: warning: model 'gpt-5-acme-preview' allowed for team 'research' has no price "
        "(priced as 'gpt-5', the nearest known model of its family)",
        f"{path}:6: warning: model 'mystery-model' allowed for team 'research' has no price "
        "(its calls cost 0)",
    ]
    rejecting = tmp_path / "reject.yaml"
    rejecting.write_text("pricing: {unknown_model: reject}\n" + path.read_text())
    assert unpriced_model_warnings(load_config(rejecting), "r.yaml")[0].endswith(
        "has no price (its calls are refused with 400 model_not_priced)"
    )


def test_reprice_with_the_builtin_database_prices_each_row_at_its_date(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    ledger_path = tmp_path / "ledger.sqlite3"
    path.write_text(
        f"storage: {{sqlite_path: {ledger_path}}}\n"
        "pricing:\n  models:\n    o3: {input: 1.00, output: 1.00}\n"
        "teams:\n  research: {}\n"
    )
    records = [
        CallRecord(request_id="before", started_at=at(2025, 6, 9), team="research", model="o3",
                   status=200, input_tokens=1000, output_tokens=1000, cost_nanousd=2_000_000),
        CallRecord(request_id="after", started_at=at(2025, 6, 11), team="research", model="o3",
                   status=200, input_tokens=1000, output_tokens=1000, cost_nanousd=2_000_000),
        CallRecord(request_id="flex", started_at=NOV_2_2026, team="research", model="gpt-5",
                   status=200, input_tokens=1000, service_tier="flex", batch=0),
        CallRecord(request_id="batch", started_at=NOV_2_2026, team="research", model="gpt-5-pro",
                   status=200, input_tokens=1000, batch=1),
    ]  # fmt: skip

    async def write() -> None:
        ledger = Ledger(ledger_path, flush_interval_ms=1000)
        await ledger.open()
        for record in records:
            ledger.append(record)
        await ledger.close()

    asyncio.run(write())
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "reprice", "--config", str(path), "--since",
         "2025-01-01", "--pricing", "builtin"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "4 rows examined, 4 with a new cost (updated)"
    with sqlite3.connect(ledger_path) as db:
        got = dict(db.execute("SELECT request_id, cost_nanousd FROM requests"))
        hashes = {h for (h,) in db.execute("SELECT pricing_hash FROM requests")}
    # o3 $10 / $40 before 2025-06-10, $2 / $8 after; gpt-5 flex $0.625; gpt-5-pro batch $7.50.
    assert got == {"before": 50_000_000, "after": 10_000_000, "flex": 625_000, "batch": 7_500_000}
    assert hashes == {PriceBook.builtin().content_hash}

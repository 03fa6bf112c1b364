"""Prices in integer nano-USD: exact costs computed by hand, validation, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.pricing.arithmetic import format_usd
from gateway.pricing.errors import PricingError
from gateway.pricing.table import ModelPrice, PriceTable, load_price_table, parse_price_table

ROOT = Path(__file__).resolve().parent.parent

TABLE = {
    "currency": "USD",
    "source": "test prices",
    "models": {
        "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
        "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00},
        "gpt-4o-2024-05-13": {"input": 5.00, "output": 15.00},
        "gpt-4": {"input": 30.00, "output": 60.00},
        "o4-mini": {"input": 1.10, "cached_input": 0.275, "output": 4.40},
        "text-embedding-3-small": {"input": 0.02},
    },
}


def cost(table: PriceTable, model: str | None, **counts: int) -> tuple[int, bool]:
    values = {
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "request_bytes": 0,
        "response_bytes": 0,
        **counts,
    }
    return table.cost_nanousd(model, billable=True, **values)


@pytest.fixture
def table() -> PriceTable:
    return parse_price_table(TABLE, "test")


# ---------------------------------------------------------------- conversion


def test_prices_convert_to_exact_nanousd_per_token(table: PriceTable) -> None:
    assert table.models["gpt-4o-mini"] == ModelPrice(150, 75, 600)
    assert table.models["o4-mini"] == ModelPrice(1100, 275, 4400)
    # cached_input defaults to input, output to 0.
    assert table.models["gpt-4"] == ModelPrice(30_000, 30_000, 60_000)
    assert table.models["text-embedding-3-small"] == ModelPrice(20, 20, 0)
    assert (table.currency, table.source) == ("USD", "test prices")
    assert (table.transfer_nanousd_per_byte, table.per_request_nanousd) == (0, 0)


def test_fees_convert_to_exact_nanousd() -> None:
    table = parse_price_table({"transfer_per_mb": 0.01, "per_request": 0.1, "models": {}}, "t")
    assert table.transfer_nanousd_per_byte == 10
    assert table.per_request_nanousd == 100_000_000


# ---------------------------------------------------------------- costs


def test_cached_input_is_priced_apart(table: PriceTable) -> None:
    # 1000 input tokens of which 400 cached, 500 output.
    got = cost(table, "gpt-4o-mini", input_tokens=1000, cached_input_tokens=400, output_tokens=500)
    assert got == (600 * 150 + 400 * 75 + 500 * 600, True)
    assert got[0] == 420_000


def test_reasoning_tokens_are_priced_as_the_output_they_are_part_of(table: PriceTable) -> None:
    # o4-mini: 2000 input (1024 cached), 3000 output of which 2500 reasoning.
    got = cost(table, "o4-mini", input_tokens=2000, cached_input_tokens=1024, output_tokens=3000)
    assert got == (976 * 1100 + 1024 * 275 + 3000 * 4400, True)
    assert got[0] == 14_555_200


def test_embeddings_cost_input_only(table: PriceTable) -> None:
    got = cost(table, "text-embedding-3-small", input_tokens=1_000_000)
    assert got == (20_000_000, True)
    assert format_usd(got[0]) == "0.02"


def test_cached_tokens_beyond_input_are_clamped(table: PriceTable) -> None:
    got = cost(table, "gpt-4o-mini", input_tokens=100, cached_input_tokens=250)
    assert got == (100 * 75, True)


def test_transfer_of_one_megabyte() -> None:
    table = parse_price_table({"transfer_per_mb": 0.01, "models": {}}, "t")
    got = cost(table, None, request_bytes=400_000, response_bytes=600_000)
    assert got == (10_000_000, True)


def test_ten_calls_of_transfer_and_fee_make_one_dollar_ten() -> None:
    table = parse_price_table(
        {"transfer_per_mb": 0.01, "per_request": 0.1, "models": TABLE["models"]}, "t"
    )
    per_call, priced = cost(
        table,
        "gpt-4o-mini",
        request_bytes=250_000,
        response_bytes=750_000,
    )
    assert priced
    total = sum([per_call] * 10)
    assert total == 1_100_000_000
    assert format_usd(total) == "1.10"


def test_unknown_model_pays_transfer_and_fee_but_no_tokens() -> None:
    table = parse_price_table(
        {"transfer_per_mb": 0.01, "per_request": 0.1, "models": TABLE["models"]}, "t"
    )
    got = cost(
        table,
        "whisper-1",
        input_tokens=500,
        output_tokens=500,
        request_bytes=1_000,
        response_bytes=2_000,
    )
    assert got == (3_000 * 10 + 100_000_000, False)


def test_a_call_without_model_or_tokens_has_nothing_unpriced(table: PriceTable) -> None:
    assert cost(table, None, response_bytes=5_000) == (0, True)
    assert cost(table, None, input_tokens=3) == (0, False)


def test_non_billable_calls_cost_nothing() -> None:
    table = parse_price_table(
        {"transfer_per_mb": 0.01, "per_request": 0.1, "models": TABLE["models"]}, "t"
    )
    for model in ("gpt-4o-mini", "unknown-model", None):
        got = table.cost_nanousd(
            model,
            input_tokens=10_000,
            cached_input_tokens=0,
            output_tokens=10_000,
            request_bytes=10**6,
            response_bytes=10**6,
            billable=False,
        )
        assert got == (0, True)


def test_per_model_fees_replace_the_tables() -> None:
    table = parse_price_table(
        {
            "transfer_per_mb": 0.01,
            "per_request": 0.1,
            "models": {
                "whisper-1": {"per_request": 0.006},
                "gpt-4o-mini": {"input": 0.15, "transfer_per_mb": 0},
            },
        },
        "t",
    )
    assert cost(table, "whisper-1", request_bytes=1_000) == (1_000 * 10 + 6_000_000, True)
    assert cost(table, "gpt-4o-mini", input_tokens=10, request_bytes=1_000) == (
        10 * 150 + 100_000_000,
        True,
    )


def test_a_million_small_costs_add_up_exactly(table: PriceTable) -> None:
    one, _ = cost(table, "gpt-4o-mini", input_tokens=1)
    assert one == 150
    total = 0
    for _ in range(1_000_000):
        total += cost(table, "gpt-4o-mini", input_tokens=1)[0]
    assert total == 150 * 1_000_000 == 150_000_000
    assert format_usd(total) == "0.15"
    # What floats would have given instead: the drift integer nano-USD avoids.
    drifting = 0.0
    for _ in range(1_000_000):
        drifting += 0.15 / 1_000_000
    assert drifting != 0.15


# ---------------------------------------------------------------- model lookup


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # an exact entry beats the base name
        ("o4-mini-2025-04-16", "o4-mini"),
    ],
)
def test_price_for_resolves_dated_snapshots(table: PriceTable, model: str, priced_as: str) -> None:
    assert table.price_for(model) == table.models[priced_as]


@pytest.mark.parametrize(
    "model",
    [None, "", "gpt-4o-mini-latest", "whisper-1", "ft:gpt-4o-mini-2024-07-18:acme::x1", "4o"],
)
def test_price_for_unknown_models(table: PriceTable, model: str | None) -> None:
    assert table.price_for(model) is None


# ---------------------------------------------------------------- team overrides


def test_team_overrides_replace_models_and_given_fees(table: PriceTable) -> None:
    team = table.with_overrides(
        {
            "per_request": 0.01,
            "models": {
                "gpt-4o-mini": {"input": 0.10, "output": 0.40},
                "my-finetune": {"input": 3.00, "cached_input": 1.50, "output": 12.00},
            },
        }
    )
    # The team's entry replaces the global one whole: its cached_input falls back to its input.
    assert team.models["gpt-4o-mini"] == ModelPrice(100, 100, 400)
    assert team.models["my-finetune"] == ModelPrice(3000, 1500, 12_000)
    assert team.models["gpt-4o"] == table.models["gpt-4o"]
    assert team.per_request_nanousd == 10_000_000
    assert team.transfer_nanousd_per_byte == table.transfer_nanousd_per_byte
    assert team.currency == "USD"
    assert team.content_hash != table.content_hash
    # The global table is untouched.
    assert table.models["gpt-4o-mini"] == ModelPrice(150, 75, 600)
    assert "my-finetune" not in table.models


def test_team_override_of_transfer_only() -> None:
    base = parse_price_table({"transfer_per_mb": 0.01, "per_request": 0.1, "models": {}}, "t")
    team = base.with_overrides({"transfer_per_mb": 0})
    assert (team.transfer_nanousd_per_byte, team.per_request_nanousd) == (0, 100_000_000)
    assert base.with_overrides({}) == base
    assert base.with_overrides({}).content_hash == base.content_hash


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"discount": 0.5}, "unknown field"),
        ({"models": {"gpt-4o": {"input": -1}}}, "models.gpt-4o.input"),
        ({"currency": "EUR"}, "currency"),
        ("cheap", "must be a mapping"),
    ],
)
def test_invalid_team_overrides(table: PriceTable, overrides: object, message: str) -> None:
    with pytest.raises(PricingError, match=message):
        table.with_overrides(overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------- loading


def test_the_shipped_price_table_loads() -> None:
    table = load_price_table("config/pricing.yaml", base_dir=ROOT)
    assert table.currency == "USD"
    assert table.source.startswith("https://openai.com/api/pricing")
    assert (table.transfer_nanousd_per_byte, table.per_request_nanousd) == (0, 0)
    assert table.models["gpt-4o-mini"] == ModelPrice(150, 75, 600)
    assert table.models["gpt-4o"] == ModelPrice(2500, 1250, 10_000)
    assert table.models["gpt-5-nano"] == ModelPrice(50, 5, 400)
    assert table.models["o4-mini"] == ModelPrice(1100, 275, 4400)
    assert table.models["gpt-3.5-turbo"] == ModelPrice(500, 500, 1500)
    assert table.models["text-embedding-3-small"] == ModelPrice(20, 20, 0)
    expected = {
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3",
        "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-3.5-turbo",
        "gpt-4-turbo", "text-embedding-3-small", "text-embedding-3-large",
        "text-embedding-ada-002",
    }  # fmt: skip
    assert expected <= set(table.models)
    assert table.price_for("gpt-4o-mini-2024-07-18") == table.models["gpt-4o-mini"]


def test_load_from_a_path_an_absolute_path_or_inline(tmp_path: Path) -> None:
    (tmp_path / "prices.yaml").write_text(
        "source: mine\nmodels:\n  gpt-4o-mini: {input: 0.15, output: 0.60}\n", encoding="utf-8"
    )
    relative = load_price_table("prices.yaml", base_dir=tmp_path)
    absolute = load_price_table(tmp_path / "prices.yaml", base_dir=Path("/nowhere"))
    inline = load_price_table({"models": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}})
    assert relative.models == absolute.models == inline.models
    assert relative.source == "mine"
    # `source` is informational: the same prices hash the same.
    assert relative.content_hash == inline.content_hash


def test_content_hash_is_a_canonical_sha256(table: PriceTable) -> None:
    assert len(table.content_hash) == 64
    int(table.content_hash, 16)
    reordered = dict(reversed(list(TABLE["models"].items())))
    same = parse_price_table({**TABLE, "models": reordered}, "t")
    changed = {**TABLE["models"], "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.001}}
    different = parse_price_table({**TABLE, "models": changed}, "t")
    assert same.content_hash == table.content_hash
    assert different.content_hash != table.content_hash


def test_tables_are_read_only(table: PriceTable) -> None:
    with pytest.raises(TypeError):
        table.models["gpt-4o"] = ModelPrice(0, 0, 0)  # type: ignore[index]


def test_an_empty_file_is_an_empty_table(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    table = load_price_table(tmp_path / "empty.yaml")
    assert (table.currency, dict(table.models), table.per_request_nanousd) == ("USD", {}, 0)


def test_broken_yaml_is_a_pricing_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("models: {gpt-4o: [\n", encoding="utf-8")
    with pytest.raises(PricingError, match="bad.yaml"):
        load_price_table(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"models": {"gpt-4o": {"input": -2.5}}}, r"models\.gpt-4o\.input: must not be negative"),
        ({"per_request": -0.01}, "per_request: must not be negative"),
        (
            {"models": {"gpt-4o": {"input": 2.5, "output": 10.0001}}},
            r"models\.gpt-4o\.output: 10\.0001 is not a whole number of nano-USD",
        ),
        ({"transfer_per_mb": 0.0001}, "transfer_per_mb: 0.0001 is not a whole number"),
        ({"per_request": 1e-10}, "per_request: 1e-10 is not a whole number"),
        ({"models": {"gpt-4o": {"input": 2.5, "ouput": 10}}}, r"models\.gpt-4o: unknown field"),
        ({"models": {}, "discount": 0.1}, "unknown field.*discount"),
        ({"models": {"gpt-4o": {"input": "2.50"}}}, r"models\.gpt-4o\.input: must be a number"),
        ({"models": {"gpt-4o": {"input": True}}}, r"models\.gpt-4o\.input: must be a number"),
        ({"models": {"gpt-4o": {"input": float("nan")}}}, "must be a finite number"),
        ({"models": {"gpt-4o": None}}, r"models\.gpt-4o: must be a mapping"),
        ({"models": {"gpt-4o": {}}}, r"models\.gpt-4o: must be a mapping"),
        ({"models": ["gpt-4o"]}, "models: must be a mapping"),
        ({"currency": 5, "models": {}}, "currency: must be a string"),
    ],
)
def test_invalid_tables_name_the_problem(mapping: dict, message: str) -> None:
    with pytest.raises(PricingError, match=message) as raised:
        parse_price_table(mapping, "prices.yaml")
    assert str(raised.value).startswith("prices.yaml: ")
    assert isinstance(raised.value, ValueError)


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("nanousd", "text"),
    [
        (0, "0.00"),
        (150, "0.00000015"),
        (1, "0.000000001"),
        (10_000_000, "0.01"),
        (1_100_000_000, "1.10"),
        (1_000_000_000, "1.00"),
        (123_456_789_012, "123.456789012"),
        (12_345_000_000_000, "12345.00"),
        (-150, "-0.00000015"),
    ],
)
def test_format_usd(nanousd: int, text: str) -> None:
    assert format_usd(nanousd) == text

"""Tests for spendgate.money: exact micro-USD conversion, rounding and formatting."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.money import (
    ceil_div,
    format_usd,
    micros_to_usd,
    token_cost_micros,
    usd_to_micros,
)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        pytest.param("0", 0, id="zero"),
        pytest.param("0.000001", 1, id="one-micro"),
        pytest.param("2.50", 2_500_000, id="price"),
        pytest.param("0.125", 125_000, id="three-places"),
        pytest.param("25000", 25_000_000_000, id="large"),
        pytest.param("1.0000010", 1_000_001, id="trailing-zero"),
        pytest.param("1E+2", 100_000_000, id="exponent"),
        pytest.param("-1.5", -1_500_000, id="negative"),
    ],
)
def test_usd_to_micros_exact(amount: str, expected: int) -> None:
    micros = usd_to_micros(Decimal(amount))

    assert micros == expected
    assert type(micros) is int


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param("0.0000001", id="tenth-micro"),
        pytest.param("1.2345678", id="seven-places"),
        pytest.param("0.0000005", id="half-micro"),
    ],
)
def test_usd_to_micros_rejects_fraction(amount: str) -> None:
    with pytest.raises(ValueError, match="not a whole number of micro-USD"):
        usd_to_micros(Decimal(amount))


def test_micros_to_usd_exact() -> None:
    assert micros_to_usd(12_500_000) == Decimal("12.5")
    assert micros_to_usd(1) == Decimal("0.000001")
    assert micros_to_usd(0) == Decimal(0)


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        pytest.param(0, 7, 0, id="zero"),
        pytest.param(14, 7, 2, id="exact"),
        pytest.param(15, 7, 3, id="remainder"),
        pytest.param(1, 1_000_000, 1, id="tiny"),
    ],
)
def test_ceil_div_rounds_up(numerator: int, denominator: int, expected: int) -> None:
    assert ceil_div(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("tokens_and_prices", "expected"),
    [
        pytest.param((), 0, id="nothing"),
        pytest.param(((0, 2_500_000),), 0, id="no-tokens"),
        pytest.param(((1, 1),), 1, id="sub-micro-up"),
        pytest.param(((1_000_000, 2_500_000),), 2_500_000, id="whole"),
        # 0.5 + 0.5 micro-USD: one rounding gives 1, rounding each gives 2.
        pytest.param(((1, 500_000), (1, 500_000)), 1, id="sum-then-round"),
        # 3 x 2.5 + 1 x 0.5 = 8.0 micro-USD exactly, 9 if each part rounded up.
        pytest.param(((3, 2_500_000), (1, 500_000)), 8, id="no-double-round"),
        pytest.param(((3, 2_500_000), (1, 10_000_000)), 18, id="round-once-up"),
    ],
)
def test_token_cost_micros_rounds_once(
    tokens_and_prices: tuple[tuple[int, int], ...], expected: int
) -> None:
    assert token_cost_micros(tokens_and_prices=tokens_and_prices) == expected


def test_token_cost_micros_cached_example() -> None:
    input_tokens, cached_tokens, output_tokens = 10_000, 8_000, 500

    cost = token_cost_micros(
        tokens_and_prices=(
            (input_tokens - cached_tokens, usd_to_micros(Decimal("2.50"))),
            (cached_tokens, usd_to_micros(Decimal("1.25"))),
            (output_tokens, usd_to_micros(Decimal("10.00"))),
        )
    )

    # 2,000 x 2.50 + 8,000 x 1.25 + 500 x 10.00 = 5,000 + 10,000 + 5,000.
    assert cost == 20_000


@pytest.mark.parametrize(
    ("micros", "expected"),
    [
        pytest.param(0, "$0.000000", id="zero"),
        pytest.param(1, "$0.000001", id="one-micro"),
        pytest.param(12_500_000, "$12.500000", id="docstring"),
        pytest.param(25_000_000_000, "$25000.000000", id="large"),
        pytest.param(-1_500_000, "-$1.500000", id="negative"),
        pytest.param(-1, "-$0.000001", id="negative-micro"),
    ],
)
def test_format_usd(micros: int, expected: str) -> None:
    assert format_usd(micros) == expected

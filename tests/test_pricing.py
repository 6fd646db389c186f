"""Price arithmetic: half-up rounding of percentages, clamping, currency rules, integers only."""

from __future__ import annotations

import pytest

from core.pricing import final_price


@pytest.mark.parametrize(
    ("base", "basis_points", "expected"),
    [
        (10_000, 1500, 8500),  # exact: 15% of 100.00
        (999, 1500, 849),  # discount 149.85 rounds up to 150
        (1, 5000, 0),  # discount 0.5 rounds half up to 1
        (3, 5000, 1),  # discount 1.5 rounds half up to 2
        (1, 4999, 1),  # discount 0.4999 rounds down to 0
        (10_001, 3333, 6668),  # discount 3333.3333 rounds down to 3333
        (12_345, 0, 12_345),
        (12_345, 10_000, 0),
        (0, 2500, 0),
    ],
)
def test_percent_off_rounds_the_discount_half_up(
    base: int, basis_points: int, expected: int
) -> None:
    assert final_price(base, "USD", "percent_off", basis_points, None) == expected


def test_percent_off_is_exact_for_amounts_beyond_float_precision() -> None:
    base = 2**62 + 1  # a float would lose the last digit
    assert final_price(base, "USD", "percent_off", 1, None) == base - (base + 5000) // 10_000


def test_percent_off_ignores_the_rule_currency() -> None:
    assert final_price(1000, "EUR", "percent_off", 1000, "USD") == 900


def test_amount_off_subtracts_minor_units() -> None:
    assert final_price(1999, "USD", "amount_off", 500, "USD") == 1499


def test_amount_off_larger_than_the_price_clamps_to_zero() -> None:
    assert final_price(300, "USD", "amount_off", 500, "USD") == 0


def test_amount_off_in_another_currency_does_not_apply() -> None:
    assert final_price(1999, "EUR", "amount_off", 500, "USD") == 1999


def test_amount_off_without_a_currency_does_not_apply() -> None:
    assert final_price(1999, "EUR", "amount_off", 500, None) == 1999


def test_result_is_an_int() -> None:
    assert type(final_price(999, "USD", "percent_off", 1500, None)) is int
    assert type(final_price(999, "USD", "amount_off", 100, "USD")) is int


@pytest.mark.parametrize(
    ("base", "kind", "value"),
    [
        (-1, "percent_off", 100),
        (100, "amount_off", -1),
        (100, "percent_off", 10_001),
        (100, "buy_one_get_one", 100),
    ],
)
def test_out_of_domain_inputs_raise(base: int, kind: str, value: int) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        final_price(base, "USD", kind, value, "USD")

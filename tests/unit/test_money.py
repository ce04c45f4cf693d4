"""Money helpers (`money.py`): integer cents inside, two-decimal strings at the edges.

A parser that silently rounds, or lets a non-number through, moves real money.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kameng.errors import ErrorCode, KamengError
from kameng.money import MAX_CENTS, apply_basis_points, format_cents, parse_amount


def _refused(text: Any, **kwargs: Any) -> KamengError:
    with pytest.raises(KamengError) as info:
        parse_amount(text, **kwargs)
    assert info.value.code is ErrorCode.invalid_amount
    assert info.value.http_status == 422
    return info.value


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("12.5", 1250),
        ("12.50", 1250),
        ("12", 1200),
        ("0.01", 1),
        ("0.1", 10),
        ("1.99", 199),
        (" 3.20 ", 320),
        ("+7", 700),
        ("007.05", 705),
        ("100000000000", MAX_CENTS),  # exactly the cap is allowed
        (5, 500),
        (Decimal("2.34"), 234),
        (0.1, 10),  # str(0.1) == '0.1': no binary-float drift
        (19.99, 1999),
    ],
)
def test_parse_amount_accepts(text: Any, cents: int) -> None:
    assert parse_amount(text) == cents
    assert isinstance(parse_amount(text), int)


@pytest.mark.parametrize("text", ["1.005", "0.001", "12.345", "0.009", "1.999"])
def test_more_than_two_decimals_refused(text: str) -> None:
    """Never round money silently: 1.005 is a client bug, not 1.01 or 1.00."""
    error = _refused(text)
    assert "two decimals" in str(error.params.get("detail"))


@pytest.mark.parametrize("text", ["-1", "-0.01", "-100", -5])
def test_negative_refused(text: Any) -> None:
    _refused(text)
    _refused(text, allow_zero=True)


@pytest.mark.parametrize("text", ["0", "0.00", "-0", "0.0"])
def test_zero_only_when_allowed(text: str) -> None:
    _refused(text)
    assert parse_amount(text, allow_zero=True) == 0


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "   ",
        "1,00",
        "1.2.3",
        "12元",
        "¥12",
        "0x10",
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        float("nan"),
        float("inf"),
        None,
        True,
    ],
)
def test_non_numbers_refused(text: Any) -> None:
    _refused(text)


@pytest.mark.parametrize("text", ["100000000000.01", "1e12", "99999999999999999999", "1e30"])
def test_too_large_refused(text: str) -> None:
    error = _refused(text)
    assert "large" in str(error.params.get("detail"))


def test_huge_exponent_refused_not_crashing() -> None:
    """'1e999999' comes from a client; it must be invalid_amount, not an unhandled Overflow."""
    _refused("1e999999")


def test_many_digits_are_not_rounded_away() -> None:
    """0.0100000000000000000000000000001 has more than two decimals and must be refused."""
    _refused("0.0100000000000000000000000000001")


def test_error_message_never_crashes_on_odd_input() -> None:
    error = _refused("{not a number}")
    assert "{not a number}" in error.message("en")


# -- format_cents -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (0, "0.00"),
        (1, "0.01"),
        (10, "0.10"),
        (99, "0.99"),
        (100, "1.00"),
        (1250, "12.50"),
        (123456789, "1234567.89"),
        (-1, "-0.01"),
        (-1250, "-12.50"),
        (MAX_CENTS, "100000000000.00"),
    ],
)
def test_format_cents(cents: int, text: str) -> None:
    assert format_cents(cents) == text


@settings(max_examples=500)
@given(st.integers(min_value=1, max_value=MAX_CENTS))
def test_format_then_parse_round_trips(cents: int) -> None:
    assert parse_amount(format_cents(cents)) == cents


@settings(max_examples=300)
@given(st.integers(min_value=-MAX_CENTS, max_value=MAX_CENTS))
def test_format_cents_shape(cents: int) -> None:
    """Always exactly two decimals, a sign only for negatives, equal to cents/100 exactly."""
    text = format_cents(cents)
    whole, _, frac = text.lstrip("-").partition(".")
    assert len(frac) == 2
    assert whole.isdigit()
    assert text.startswith("-") is (cents < 0)
    assert Decimal(text) * 100 == cents


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=10**11 - 1), st.integers(min_value=0, max_value=99))
def test_parse_then_format_round_trips(yuan: int, fen: int) -> None:
    text = f"{yuan}.{fen:02d}"
    assert format_cents(parse_amount(text, allow_zero=True)) == text


# -- apply_basis_points -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cents", "bp", "expected"),
    [
        (10000, 10000, 10000),
        (10000, 9500, 9500),
        (1, 5000, 1),  # 0.5 -> 1 (half-up, not banker's 0)
        (3, 5000, 2),  # 1.5 -> 2
        (5, 5000, 3),  # 2.5 -> 3 (banker's rounding would give 2)
        (15, 9700, 15),  # 14.55 -> 15
        (199, 9500, 189),  # 189.05 -> 189
        (1, 4999, 0),  # 0.4999 -> 0
        (1, 0, 0),
        (0, 9500, 0),
        (999, 12000, 1199),  # 1198.8 -> 1199 (mark-up above base)
        (MAX_CENTS, 100000, MAX_CENTS * 10),
    ],
)
def test_apply_basis_points(cents: int, bp: int, expected: int) -> None:
    assert apply_basis_points(cents, bp) == expected


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=MAX_CENTS), st.integers(min_value=0, max_value=100000))
def test_apply_basis_points_is_exact_half_up(cents: int, bp: int) -> None:
    """Compare against pure integer arithmetic: no float or precision drift anywhere."""
    assert apply_basis_points(cents, bp) == (cents * bp + 5000) // 10000

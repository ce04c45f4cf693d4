"""Money is integer cents (分) inside the platform and a two-decimal string at the edges."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from kameng.errors import ErrorCode, KamengError

MAX_CENTS = 10**13  # 100 billion yuan: far above any real order, far below int64 overflow


def parse_amount(text: str | int | float | Decimal, *, allow_zero: bool = False) -> int:
    """'12.5' -> 1250. Refuses more than two decimals rather than silently rounding money."""
    try:
        value = Decimal(str(text).strip())
    except (InvalidOperation, ValueError):
        raise KamengError(ErrorCode.invalid_amount, detail=f"{text!r} is not a number") from None
    if not value.is_finite():
        raise KamengError(ErrorCode.invalid_amount, detail="not a finite number")
    cents = value * 100
    if cents != cents.to_integral_value():
        raise KamengError(ErrorCode.invalid_amount, detail="at most two decimals")
    result = int(cents)
    if result < 0 or (result == 0 and not allow_zero):
        raise KamengError(ErrorCode.invalid_amount, detail="must be positive")
    if result > MAX_CENTS:
        raise KamengError(ErrorCode.invalid_amount, detail="too large")
    return result


def format_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


def apply_basis_points(cents: int, bp: int) -> int:
    """Price times bp/10000, rounded half-up to the cent."""
    return int((Decimal(cents) * bp / Decimal(10000)).quantize(Decimal(1), rounding=ROUND_HALF_UP))

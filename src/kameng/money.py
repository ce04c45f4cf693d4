"""Money is integer cents (分) inside the platform and a two-decimal string at the edges."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, Inexact, InvalidOperation, localcontext

from kameng.errors import ErrorCode, KamengError

MAX_CENTS = 10**13  # 100 billion yuan: far above any real order, far below int64 overflow


def parse_amount(text: str | int | float | Decimal, *, allow_zero: bool = False) -> int:
    """'12.5' -> 1250. Refuses more than two decimals rather than silently rounding money."""
    with localcontext() as ctx:
        ctx.prec = 60
        ctx.traps[Inexact] = False
        try:
            value = Decimal(str(text).strip())
            if not value.is_finite():
                raise KamengError(ErrorCode.invalid_amount, detail="not a finite number")
            if value.adjusted() > 15:
                raise KamengError(ErrorCode.invalid_amount, detail="too large")
            cents_exact = value.scaleb(2)
            cents = cents_exact.to_integral_value()
        except (InvalidOperation, ValueError, ArithmeticError):
            raise KamengError(
                ErrorCode.invalid_amount, detail=f"{str(text)[:40]!r} is not a number"
            ) from None
        if cents != cents_exact:
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

"""Tier prices: base price per SKU, per-tier fixed price or percentage, never below cost.

Cost protection is applied both when staff set a price (refused) and when a price is computed
(clamped to cost), so a cost that rises later can never turn every sale into a loss.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from kameng.catalog.models import Sku
from kameng.errors import ErrorCode, KamengError
from kameng.money import apply_basis_points, format_cents
from kameng.pricing.models import Tier, TierPrice

DEFAULT_TIERS = (("normal", "普通", 10000), ("silver", "银牌", 9700), ("gold", "金牌", 9500))


def ensure_default_tiers(session: Session) -> list[Tier]:
    tiers = []
    for code, name, bp in DEFAULT_TIERS:
        tier = session.scalar(select(Tier).where(Tier.code == code))
        if tier is None:
            tier = Tier(code=code, name=name, default_bp=bp)
            session.add(tier)
            session.flush()
        tiers.append(tier)
    return tiers


def get_tier(session: Session, *, code: str) -> Tier:
    tier = session.scalar(select(Tier).where(Tier.code == code))
    if tier is None:
        raise KamengError(ErrorCode.tier_not_found, tier=code)
    return tier


def create_tier(session: Session, *, code: str, name: str, default_bp: int = 10000) -> Tier:
    if session.scalar(select(Tier.id).where(Tier.code == code)) is not None:
        raise KamengError(ErrorCode.already_exists, what=f"tier {code}")
    if not 1 <= default_bp <= 100000:
        raise KamengError(ErrorCode.invalid_amount, detail="percentage out of range")
    tier = Tier(code=code, name=name, default_bp=default_bp)
    session.add(tier)
    session.flush()
    return tier


def compute_price(
    *,
    base_cents: int,
    cost_cents: int,
    default_bp: int,
    row: TierPrice | None,
    sku_allows_below_cost: bool = False,
) -> int:
    """The price a tier pays for one unit."""
    allow_below = sku_allows_below_cost
    if row is not None and row.fixed_cents is not None:
        price = row.fixed_cents
        allow_below = allow_below or row.allow_below_cost
    elif row is not None and row.percent_bp is not None:
        price = apply_basis_points(base_cents, row.percent_bp)
        allow_below = allow_below or row.allow_below_cost
    else:
        price = apply_basis_points(base_cents, default_bp)
    if price < cost_cents and not allow_below:
        return cost_cents
    return price


def set_tier_price(
    session: Session,
    *,
    tier: Tier,
    sku: Sku,
    fixed_cents: int | None = None,
    percent_bp: int | None = None,
    allow_below_cost: bool = False,
) -> TierPrice:
    if (fixed_cents is None) == (percent_bp is None):
        raise KamengError(ErrorCode.invalid_amount, detail="give exactly one of fixed or percent")
    candidate = (
        fixed_cents
        if fixed_cents is not None
        else apply_basis_points(sku.price_cents, percent_bp or 0)
    )
    if candidate < sku.cost_cents and not (allow_below_cost or sku.allow_below_cost):
        raise KamengError(
            ErrorCode.price_below_cost,
            price=format_cents(candidate),
            cost=format_cents(sku.cost_cents),
        )
    row = session.scalar(
        select(TierPrice).where(TierPrice.tier_id == tier.id, TierPrice.sku_id == sku.id)
    )
    if row is None:
        row = TierPrice(tier_id=tier.id, sku_id=sku.id)
        session.add(row)
    row.fixed_cents = fixed_cents
    row.percent_bp = percent_bp
    row.allow_below_cost = allow_below_cost
    session.flush()
    return row


def prices_for_tier(session: Session, *, tier_id: int) -> dict[int, int]:
    """Unit price of every SKU for one tier (sku_id -> cents)."""
    tier = session.get(Tier, tier_id)
    if tier is None:
        raise KamengError(ErrorCode.tier_not_found, tier=str(tier_id))
    rows = {
        r.sku_id: r for r in session.scalars(select(TierPrice).where(TierPrice.tier_id == tier_id))
    }
    out: dict[int, int] = {}
    for sku in session.scalars(select(Sku)):
        out[sku.id] = compute_price(
            base_cents=sku.price_cents,
            cost_cents=sku.cost_cents,
            default_bp=tier.default_bp,
            row=rows.get(sku.id),
            sku_allows_below_cost=sku.allow_below_cost,
        )
    return out


def price_for(session: Session, *, tier_id: int, sku_id: int) -> int:
    tier = session.get(Tier, tier_id)
    sku = session.get(Sku, sku_id)
    if tier is None or sku is None:
        raise KamengError(ErrorCode.sku_not_found, sku=str(sku_id))
    row = session.scalar(
        select(TierPrice).where(TierPrice.tier_id == tier_id, TierPrice.sku_id == sku_id)
    )
    return compute_price(
        base_cents=sku.price_cents,
        cost_cents=sku.cost_cents,
        default_bp=tier.default_bp,
        row=row,
        sku_allows_below_cost=sku.allow_below_cost,
    )

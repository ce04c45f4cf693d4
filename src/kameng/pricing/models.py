"""Reseller tiers and their per-SKU prices."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId


class Tier(Base):
    __tablename__ = "tiers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    # Default price for SKUs without their own row, in basis points of the base price
    # (10000 = base price, 9500 = 5 % off).
    default_bp: Mapped[int] = mapped_column(Integer, default=10000)


class TierPrice(Base):
    __tablename__ = "tier_prices"
    __table_args__ = (UniqueConstraint("tier_id", "sku_id", name="uq_tier_price"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tier_id: Mapped[int] = mapped_column(ForeignKey("tiers.id"))
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"), index=True)
    fixed_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    percent_bp: Mapped[int | None] = mapped_column(Integer, nullable=True)
    allow_below_cost: Mapped[bool] = mapped_column(Boolean, default=False)

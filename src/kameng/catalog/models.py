"""Catalog tables: categories, products (with buyer-field templates) and SKUs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from kameng.db import Base, BigId, UTCDateTime, utcnow


class DeliveryKind(StrEnum):
    card_key = "card_key"  # from our own encrypted stock
    direct_topup = "direct_topup"  # fulfilled upstream into the buyer's account
    manual = "manual"  # staff deliver by hand


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    sort: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    delivery_kind: Mapped[str] = mapped_column(String(20))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    min_quantity: Mapped[int] = mapped_column(Integer, default=1)
    max_quantity: Mapped[int] = mapped_column(Integer, default=10)
    field_template: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    sla_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    low_stock_threshold: Mapped[int] = mapped_column(Integer, default=10)
    # 0 (none) .. 3 (high): an attribute risk rules can use (game currency resold for fraud...).
    risk_level: Mapped[int] = mapped_column(Integer, default=0)
    # Buyers need an approved, unexpired document of this kind ('' = any kind) on their
    # account before they can buy this product.
    requires_qualification: Mapped[bool] = mapped_column(Boolean, default=False)
    qualification_kind: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    category: Mapped[Category] = relationship()
    skus: Mapped[list[Sku]] = relationship(back_populates="product", order_by="Sku.id")


class Sku(Base):
    __tablename__ = "skus"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    denomination: Mapped[str] = mapped_column(String(64), default="")
    price_cents: Mapped[int] = mapped_column(BigInteger)
    cost_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3), default="CNY")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_below_cost: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    product: Mapped[Product] = relationship(back_populates="skus")

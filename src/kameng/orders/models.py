"""Orders, their lines, the event timeline and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_reseller_created", "reseller_id", "id"),
        Index("ix_orders_member_created", "member_id", "id"),
        Index("ix_orders_dedupe", "dedupe_key", "created_at"),
        # The pipeline's work queue: undelivered orders by when they are next due.
        Index(
            "ix_orders_due",
            "next_action_at",
            sqlite_where=text("next_action_at IS NOT NULL"),
            postgresql_where=text("next_action_at IS NOT NULL"),
        ),
        Index("ix_orders_status_sku", "status", "sku_id", "id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_no: Mapped[str] = mapped_column(String(32), unique=True)
    channel: Mapped[str] = mapped_column(String(16))  # api, storefront, console
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey("resellers.id"), nullable=True)
    # The member who placed it (storefront); guests and resellers leave it empty.
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    customer_ref: Mapped[str] = mapped_column(String(128), default="")
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"))
    status: Mapped[str] = mapped_column(String(24))
    stage: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str] = mapped_column(String(64), default="")
    stage_since: Mapped[datetime] = mapped_column(UTCDateTime)
    next_action_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    sla_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    currency: Mapped[str] = mapped_column(String(3), default="CNY")
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    paid_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dedupe_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    lookup_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Where to POST signed status updates for this order (a docking site's callback URL).
    notify_url: Mapped[str] = mapped_column(String(500), default="")


class OrderLine(Base):
    __tablename__ = "order_lines"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_cents: Mapped[int] = mapped_column(BigInteger)
    fields: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class OrderEvent(Base):
    """One row per transition: the timeline shown to buyers and staff."""

    __tablename__ = "order_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(24), nullable=True)
    to_status: Mapped[str] = mapped_column(String(24))
    stage: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str] = mapped_column(String(64), default="")
    actor: Mapped[str] = mapped_column(String(100))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class Delivery(Base):
    """At most one delivery per order line, whatever retries or crashes happen."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_line_id: Mapped[int] = mapped_column(ForeignKey("order_lines.id"), unique=True)
    source: Mapped[str] = mapped_column(String(32))  # own_stock, supplier:<id>, manual
    key_count: Mapped[int] = mapped_column(Integer)
    delivered_at: Mapped[datetime] = mapped_column(UTCDateTime)

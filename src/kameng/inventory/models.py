"""Encrypted card-key stock: one row per key, claimed by compare-and-set, never a counter."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class KeyState(StrEnum):
    available = "available"
    sold = "sold"
    held = "held"  # bought from a supplier for a line that is not complete yet; not for sale
    burned = "burned"  # reported bad / withdrawn by staff; never sold again


class StockBatch(Base):
    """One import (or one supplier delivery): who, when, from where, at what unit cost.

    Each batch has its own data key, wrapped by the master key.
    """

    __tablename__ = "stock_batches"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"), index=True)
    source: Mapped[str] = mapped_column(String(200), default="")
    unit_cost_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    imported_by: Mapped[str] = mapped_column(String(100))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    imported: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CardKey(Base):
    __tablename__ = "card_keys"
    __table_args__ = (
        UniqueConstraint("sku_id", "fingerprint", name="uq_card_keys_sku_fingerprint"),
        # Claims scan only available rows; the literal predicate lets SQLite use it too.
        Index(
            "ix_card_keys_available",
            "sku_id",
            "id",
            sqlite_where=text("state = 'available'"),
            postgresql_where=text("state = 'available'"),
        ),
        Index("ix_card_keys_order_line", "order_line_id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"))
    batch_id: Mapped[int] = mapped_column(ForeignKey("stock_batches.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=KeyState.available.value)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    order_line_id: Mapped[int | None] = mapped_column(ForeignKey("order_lines.id"), nullable=True)
    sold_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class KeyReveal(Base):
    """Every time plaintext keys leave the platform, who saw them and through which door."""

    __tablename__ = "key_reveals"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    channel: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(100))
    key_count: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

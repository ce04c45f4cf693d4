"""Review items (one per order sent to review) and the decision log.

An item carries its own `version` so that a claim or a decision is a compare-and-set: two
reviewers pressing "claim" together get one winner and one clear refusal, never both.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class ItemStatus(StrEnum):
    open = "open"  # waiting for a reviewer
    claimed = "claimed"  # one reviewer is on it (until the claim expires)
    second = "second"  # approved once; above the two-reviewer amount it needs another
    approved = "approved"
    rejected = "rejected"
    canceled = "canceled"  # the order left review another way (the buyer canceled)


OPEN_STATUSES = (ItemStatus.open, ItemStatus.claimed, ItemStatus.second)


class ReviewItem(Base):
    __tablename__ = "review_items"
    __table_args__ = (Index("ix_review_items_status_deadline", "status", "sla_deadline"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), unique=True)
    status: Mapped[str] = mapped_column(String(12))
    category: Mapped[str] = mapped_column(String(32))
    rule_code: Mapped[str] = mapped_column(String(64))
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    score: Mapped[int] = mapped_column(Integer, default=0)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sla_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str] = mapped_column(String(100), default="")
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    first_approver: Mapped[str] = mapped_column(String(100), default="")
    decided_by: Mapped[str] = mapped_column(String(100), default="")
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decision_note: Mapped[str] = mapped_column(Text, default="")
    escalated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class ReviewDecision(Base):
    """Every claim, release, approval, rejection and SLA action, by whom and when."""

    __tablename__ = "review_decisions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    order_id: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(24))
    note: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

"""Risk tables: versioned rule sets, allow/block/proxy lists, per-order facts and screenings.

`risk_facts` is what velocity counters count: one row per order, written when the order is
placed (paid or not), indexed by each key over time so a sliding-window count is one index
range scan. `risk_screenings` keeps what every screening saw and decided (live and shadow), so
a decision can always be explained and a rule set compared with another on real traffic.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class RuleSetStatus(StrEnum):
    draft = "draft"  # saved, not used
    live = "live"  # decides orders (exactly one)
    shadow = "shadow"  # runs beside the live set and records what it would have decided
    retired = "retired"  # was live or shadow once; kept for the record


class RiskRuleSet(Base):
    __tablename__ = "risk_rule_sets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_by: Mapped[str] = mapped_column(String(100), default="")
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ListKind(StrEnum):
    allow = "allow"
    block = "block"
    proxy = "proxy"  # IPs or networks (CIDR) of proxies and anonymisers


class RiskListEntry(Base):
    __tablename__ = "risk_lists"
    __table_args__ = (UniqueConstraint("list", "kind", "value"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    list: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(16))  # buyer | ip | account | email | device
    value: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RiskFact(Base):
    __tablename__ = "risk_facts"
    __table_args__ = (
        Index("ix_risk_facts_buyer_at", "buyer", "created_at"),
        Index("ix_risk_facts_ip_at", "ip", "created_at"),
        Index("ix_risk_facts_account_at", "account", "created_at"),
        Index("ix_risk_facts_device_at", "device", "created_at"),
        Index("ix_risk_facts_email_at", "email", "created_at"),
        Index("ix_risk_facts_created_at", "created_at"),  # pruning past the retention
    )
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), primary_key=True)
    buyer: Mapped[str] = mapped_column(String(80))
    ip: Mapped[str] = mapped_column(String(45), default="")
    device: Mapped[str] = mapped_column(String(64), default="")
    email: Mapped[str] = mapped_column(String(254), default="")
    account: Mapped[str] = mapped_column(String(128), default="")
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[bool] = mapped_column(Boolean, default=False)  # payment never came
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RiskScreening(Base):
    __tablename__ = "risk_screenings"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    rule_set_version: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(8))  # live | shadow
    action: Mapped[str] = mapped_column(String(8))
    rule_code: Mapped[str] = mapped_column(String(64), default="")
    score: Mapped[int] = mapped_column(Integer, default=0)
    matched: Mapped[list[str]] = mapped_column(JSON, default=list)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    latency_us: Mapped[int] = mapped_column(Integer, default=0)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

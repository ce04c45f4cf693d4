"""Double-entry ledger: accounts, immutable transactions and entries, and holds.

Sign convention: every amount is signed integer cents and the legs of a transaction sum to
zero. A wallet's balance is what the platform owes its owner (never below zero). External
accounts (staff funding, gateways) may go negative: they mirror money outside the platform.
Each entry records the balance after it and the account version it produced, so the chain of
an account can be replayed and checked link by link.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class AccountKind(StrEnum):
    wallet = "wallet"  # a reseller's or buyer's balance
    revenue = "revenue"  # platform sales
    holds = "holds"  # money held for paid-but-undelivered orders
    funding = "funding"  # staff top-ups (money received outside the platform)
    gateway_clearing = "gateway_clearing"  # payment gateways (next issues)
    refunds = "refunds"  # refunds paid out of the platform


class HoldState(StrEnum):
    pending = "pending"
    captured = "captured"
    voided = "voided"


class Account(Base):
    __tablename__ = "ledger_accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner_type", "owner_id", "currency", name="uq_account_owner"),
        CheckConstraint("allow_negative OR balance_cents >= 0", name="non_negative"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    owner_type: Mapped[str] = mapped_column(String(32), default="platform")
    owner_id: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3), default="CNY")
    balance_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    allow_negative: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerTransaction(Base):
    __tablename__ = "ledger_transactions"
    __table_args__ = (Index("ix_ledger_transactions_ref", "ref_type", "ref_id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # sale, hold, capture, void, topup, reversal
    ref_type: Mapped[str] = mapped_column(String(32), default="")
    ref_id: Mapped[int] = mapped_column(BigInteger, default=0)
    actor: Mapped[str] = mapped_column(String(100), default="system")
    memo: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Entry(Base):
    """Append-only (update/delete refused by triggers); corrections are reversal transactions."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("account_id", "account_version", name="uq_entry_account_version"),
        CheckConstraint("amount_cents <> 0", name="non_zero"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("ledger_accounts.id"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    balance_after_cents: Mapped[int] = mapped_column(BigInteger)
    account_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Hold(Base):
    """Money moved from a wallet into the holds account, resolved exactly once."""

    __tablename__ = "ledger_holds"
    __table_args__ = (CheckConstraint("amount_cents > 0", name="positive"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("ledger_accounts.id"), index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=HoldState.pending.value)
    ref_type: Mapped[str] = mapped_column(String(32), default="order")
    ref_id: Mapped[int] = mapped_column(BigInteger)
    place_txn_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"))
    resolve_txn_id: Mapped[int | None] = mapped_column(
        ForeignKey("ledger_transactions.id"), nullable=True, unique=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

"""Payment gateways, the payments we ask them to collect, and every notify they send us.

A `Payment` is written before the buyer is sent to the gateway, so every sum a gateway may
collect for us has a row that the worker can query and reconciliation can compare. Its state
only moves forward (pending -> paid, or -> flagged), and the money is posted to the ledger in
the same transaction as the move, exactly once.
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
    LargeBinary,
    String,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class GatewayKind(StrEnum):
    epay = "epay"  # 易支付 (EPay) protocol; the bundled `kameng gateway-sim` speaks it too


class PaymentPurpose(StrEnum):
    order = "order"  # pays one order (guest or member)
    topup = "topup"  # adds to a member's balance


class PaymentState(StrEnum):
    pending = "pending"  # the buyer was sent to the gateway; no proof of payment yet
    paid = "paid"  # proven paid (signed notify or the gateway's query); money is in the ledger
    flagged = "flagged"  # the gateway says paid, but something differs: staff must look
    closed = "closed"  # never paid, and we stopped asking
    returned = "returned"  # flagged money sent back to the payer (never in our books)


class PaymentGateway(Base):
    __tablename__ = "payment_gateways"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(String(500))
    merchant_id: Mapped[str] = mapped_column(String(64))  # EPay `pid`
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)  # EPay merchant key, AES-GCM sealed
    currency: Mapped[str] = mapped_column(String(3), default="CNY")
    pay_types: Mapped[str] = mapped_column(String(100), default="alipay,wxpay")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # The worker's queue of payments to ask the gateway about.
        Index(
            "ix_payments_check_due",
            "next_check_at",
            sqlite_where=text("next_check_at IS NOT NULL"),
            postgresql_where=text("next_check_at IS NOT NULL"),
        ),
        Index("ix_payments_member", "member_id", "id"),
        Index("ix_payments_created", "created_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    payment_no: Mapped[str] = mapped_column(String(64), unique=True)  # EPay out_trade_no
    gateway_id: Mapped[int] = mapped_column(ForeignKey("payment_gateways.id"))
    purpose: Mapped[str] = mapped_column(String(16))
    order_id: Mapped[int | None] = mapped_column(
        ForeignKey("orders.id"), nullable=True, unique=True
    )
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    pay_type: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=PaymentState.pending.value)
    reason: Mapped[str] = mapped_column(String(64), default="")
    gateway_trade_no: Mapped[str] = mapped_column(String(64), default="")
    reported_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reported_currency: Mapped[str] = mapped_column(String(3), default="")
    wallet_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # credited wallet
    ledger_txn_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    checks: Mapped[int] = mapped_column(Integer, default=0)
    last_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PaymentNotify(Base):
    """Every notify (and return) a gateway sent us, with what we made of it: the evidence
    for disputes, and the answer to "did the gateway ever tell us?"."""

    __tablename__ = "payment_notifies"
    __table_args__ = (Index("ix_payment_notifies_no", "payment_no"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    gateway_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    payment_no: Mapped[str] = mapped_column(String(64), default="")
    gateway_trade_no: Mapped[str] = mapped_column(String(64), default="")
    channel: Mapped[str] = mapped_column(String(16), default="notify")  # notify, return, query
    outcome: Mapped[str] = mapped_column(String(32))
    money: Mapped[str] = mapped_column(String(24), default="")
    remote_ip: Mapped[str] = mapped_column(String(45), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PayoutState(StrEnum):
    sending = "sending"  # recorded before the refund request leaves
    done = "done"  # the gateway (or staff) paid it back; the ledger says so
    refused = "refused"  # the gateway said no: staff must look
    unknown = "unknown"  # we crashed or timed out mid-request: staff must check the gateway


class Payout(Base):
    """Money owed to a guest, paid back. A row is written before the gateway is asked, so a
    crash mid-request is never retried blindly (it becomes `unknown` for staff to check)."""

    __tablename__ = "payouts"
    __table_args__ = (Index("ix_payouts_payment", "payment_id", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    via: Mapped[str] = mapped_column(String(16))  # gateway, manual
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(200), default="")
    actor: Mapped[str] = mapped_column(String(100), default="system")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

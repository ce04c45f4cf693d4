"""Suppliers we buy from, the offers that map our SKUs to theirs, and every purchase we make.

A `Procurement` row is written *before* the purchase request leaves (state `sending`), so a
crash between the request and its answer still leaves a trace that the worker resolves by
querying the supplier — never by buying again. The partial unique index on `order_line_id`
makes "at most one live upstream purchase per order line" a property of the database.
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
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class AdapterKind(StrEnum):
    simulator = "simulator"  # the bundled `kameng supplier-sim` protocol
    kameng = "kameng"  # another kameng site, through its Reseller API v1


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class ProcurementState(StrEnum):
    sending = "sending"  # intent recorded; the request may or may not have reached them
    accepted = "accepted"  # they took it; waiting for a callback or a poll
    unknown = "unknown"  # timeout / reset / garbled answer: resolved by query only
    partial = "partial"  # some keys received, the rest still owed
    delivered = "delivered"
    # They refused, or it provably never arrived (no copy of the request can still be
    # accepted): nothing was bought. `settles_at` says from when the line may be bought again.
    rejected = "rejected"
    abandoned = "abandoned"  # the order was refunded at its deadline while this was open


# States in which the supplier may still deliver: the line must not be bought again.
LIVE_STATES = frozenset(
    {
        ProcurementState.sending,
        ProcurementState.accepted,
        ProcurementState.unknown,
        ProcurementState.partial,
    }
)


class Supplier(Base):
    __tablename__ = "suppliers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    adapter: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(String(500))
    api_key: Mapped[str] = mapped_column(String(128))
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    timeout_ms: Mapped[int] = mapped_column(Integer, default=10_000)
    circuit_state: Mapped[str] = mapped_column(String(16), default=CircuitState.closed.value)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    circuit_open_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    circuit_opened_count: Mapped[int] = mapped_column(Integer, default=0)
    balance_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    balance_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    low_balance_cents: Mapped[int] = mapped_column(BigInteger, default=10_000)
    # What the supplier promises about a purchase request (docs/suppliers.md): it refuses a
    # request signed more than `request_ttl_s` ago, and it deduplicates on our out-trade-no for
    # `dedup_window_s` (None: for as long as it keeps the order). Together they say when a
    # "not found" is final and for how long the same number may be sent again.
    request_ttl_s: Mapped[int] = mapped_column(Integer, default=300)
    dedup_window_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SupplierOffer(Base):
    """One way to procure one of our SKUs: from this supplier, as their SKU, at this cost."""

    __tablename__ = "supplier_offers"
    __table_args__ = (
        UniqueConstraint("sku_id", "supplier_id", "supplier_sku", name="uq_supplier_offer"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sku_id: Mapped[int] = mapped_column(ForeignKey("skus.id"), index=True)
    supplier_id: Mapped[int] = mapped_column(ForeignKey("suppliers.id"))
    supplier_sku: Mapped[str] = mapped_column(String(64))
    cost_cents: Mapped[int] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(Integer, default=100)  # lower goes first
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Procurement(Base):
    __tablename__ = "procurements"
    __table_args__ = (
        UniqueConstraint("supplier_id", "out_trade_no", name="uq_procurement_out_trade_no"),
        Index(
            "uq_procurements_live_line",
            "order_line_id",
            unique=True,
            sqlite_where=text("state <> 'rejected'"),
            postgresql_where=text("state <> 'rejected'"),
        ),
        Index("ix_procurements_supplier_created", "supplier_id", "created_at"),
        Index("ix_procurements_late_check_at", "late_check_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    order_line_id: Mapped[int] = mapped_column(ForeignKey("order_lines.id"))
    supplier_id: Mapped[int] = mapped_column(ForeignKey("suppliers.id"))
    offer_id: Mapped[int] = mapped_column(ForeignKey("supplier_offers.id"))
    out_trade_no: Mapped[str] = mapped_column(String(48))
    trade_no: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16))
    quantity: Mapped[int] = mapped_column(Integer)
    keys_received: Mapped[int] = mapped_column(Integer, default=0)
    cost_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the newest copy of the purchase request left (first send or a re-send): a copy held
    # in the network can still be accepted until this + the supplier's request_ttl_s.
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # For a refused purchase: from when no copy of it can be charged any more, so the line may
    # be bought again (at once for a refusal the supplier records against our number).
    settles_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set once the supplier has said it delivered (all or part), whatever our row's state:
    # `kameng verify` allows at most one charged purchase per order line.
    charged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    charged_cents: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # For a purchase we gave up on while it might still succeed (abandoned at the order's
    # deadline, or refused in a way a late copy could undo): when the worker asks the supplier
    # about it next. NULL once its outcome is known.
    late_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ClaimKind(StrEnum):
    keys_to_stock = "keys_to_stock"  # late keys: ours to sell, nothing to recover
    overcharge = "overcharge"  # a late top-up for a line served or refunded otherwise


class ClaimState(StrEnum):
    open = "open"  # staff should recover it from the supplier (or write it off)
    stocked = "stocked"  # the keys went on sale; shown for the record
    resolved = "resolved"  # staff settled it with the supplier


class SupplierClaim(Base):
    """A purchase that succeeded after its order line was served another way or refunded.

    Never lost: late keys go to our stock, a late top-up is money the supplier took for
    nothing we can use, to be recovered. One per procurement; staff see them in
    `kameng supplier claims` and settle them with `kameng supplier claim-resolve`.
    """

    __tablename__ = "supplier_claims"
    __table_args__ = (UniqueConstraint("procurement_id", name="uq_supplier_claims_procurement"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    supplier_id: Mapped[int] = mapped_column(ForeignKey("suppliers.id"), index=True)
    procurement_id: Mapped[int] = mapped_column(ForeignKey("procurements.id"))
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    amount_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    keys_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolved_by: Mapped[str] = mapped_column(String(100), default="")


class SupplierReconciliation(Base):
    """One run of supplier reconciliation: the supplier's record of purchases against ours.

    Kept so /metrics and /healthz can say how many mismatches the latest run of each supplier
    found without asking the supplier again.
    """

    __tablename__ = "supplier_reconciliations"
    __table_args__ = (Index("ix_supplier_reconciliations_supplier_ran", "supplier_id", "ran_at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    supplier_id: Mapped[int] = mapped_column(ForeignKey("suppliers.id"))
    ran_at: Mapped[datetime] = mapped_column(UTCDateTime)
    since: Mapped[datetime] = mapped_column(UTCDateTime)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
    checked: Mapped[int] = mapped_column(Integer, default=0)
    mismatches: Mapped[int] = mapped_column(Integer, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SupplierEvent(Base):
    """Callbacks already applied, by the supplier's event id: a duplicate is acknowledged and
    ignored."""

    __tablename__ = "supplier_events"
    __table_args__ = (UniqueConstraint("supplier_id", "event_id", name="uq_supplier_event"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    supplier_id: Mapped[int] = mapped_column(ForeignKey("suppliers.id"))
    event_id: Mapped[str] = mapped_column(String(128))
    out_trade_no: Mapped[str] = mapped_column(String(48))
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)

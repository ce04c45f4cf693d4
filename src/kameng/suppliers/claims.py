"""Late successes: purchases that succeeded after their order line was served another way or
refunded — late keys put on sale, late top-ups to recover from the supplier (staff settle them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.suppliers.models import ClaimKind, ClaimState, Procurement, Supplier, SupplierClaim

_supplier = table(Supplier)
_proc = table(Procurement)

_claim = table(SupplierClaim)


def record_late_success(
    conn: Connection,
    *,
    procurement: Any,
    stocked_keys: int | None,
    amount_cents: int,
    now: datetime,
) -> int:
    """Record (or add to) the claim for a purchase that succeeded too late to serve its line.

    `stocked_keys` is how many late keys went to our stock (None for a top-up: then the money
    is owed back by the supplier). One claim per procurement: a later part of the same
    purchase adds its keys to it.
    """
    kind = ClaimKind.overcharge if stocked_keys is None else ClaimKind.keys_to_stock
    existing = conn.execute(
        select(_claim.c.id, _claim.c.keys_count).where(_claim.c.procurement_id == procurement.id)
    ).first()
    if existing is not None:
        conn.execute(
            update(_claim)
            .where(_claim.c.id == existing.id)
            .values(keys_count=existing.keys_count + (stocked_keys or 0), amount_cents=amount_cents)
        )
        return int(existing.id)
    return int(
        conn.execute(
            insert(_claim)
            .values(
                supplier_id=procurement.supplier_id,
                procurement_id=procurement.id,
                order_id=procurement.order_id,
                kind=kind.value,
                state=(
                    ClaimState.open if kind is ClaimKind.overcharge else ClaimState.stocked
                ).value,
                amount_cents=amount_cents,
                keys_count=stocked_keys or 0,
                note="",
                created_at=now,
                resolved_by="",
            )
            .returning(_claim.c.id)
        ).scalar_one()
    )


@dataclass(frozen=True, slots=True)
class ClaimView:
    id: int
    supplier: str
    out_trade_no: str
    order_id: int
    kind: str
    state: str
    amount_cents: int
    keys_count: int
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str
    note: str


def list_claims(
    conn: Connection, *, supplier_id: int | None = None, state: str | None = None, limit: int = 200
) -> list[ClaimView]:
    stmt = (
        select(
            _claim.c.id,
            _supplier.c.code,
            _proc.c.out_trade_no,
            _claim.c.order_id,
            _claim.c.kind,
            _claim.c.state,
            _claim.c.amount_cents,
            _claim.c.keys_count,
            _claim.c.created_at,
            _claim.c.resolved_at,
            _claim.c.resolved_by,
            _claim.c.note,
        )
        .join(_supplier, _supplier.c.id == _claim.c.supplier_id)
        .join(_proc, _proc.c.id == _claim.c.procurement_id)
        .order_by(_claim.c.id.desc())
        .limit(limit)
    )
    if supplier_id is not None:
        stmt = stmt.where(_claim.c.supplier_id == supplier_id)
    if state:
        stmt = stmt.where(_claim.c.state == state)
    return [ClaimView(*tuple(r)) for r in conn.execute(stmt)]


def resolve_claim(conn: Connection, *, claim_id: int, actor: str, note: str, now: datetime) -> None:
    """Staff settled an overcharge with the supplier (refunded, credited, or written off)."""
    if not note.strip():
        raise KamengError(ErrorCode.invalid_request, detail="a note saying how it was settled")
    row = conn.execute(select(_claim.c.state).where(_claim.c.id == claim_id)).first()
    if row is None:
        raise KamengError(ErrorCode.not_found, detail=f"claim {claim_id}")
    if row.state != ClaimState.open.value:
        raise KamengError(ErrorCode.invalid_request, detail=f"claim {claim_id} is {row.state}")
    conn.execute(
        update(_claim)
        .where(_claim.c.id == claim_id, _claim.c.state == ClaimState.open.value)
        .values(
            state=ClaimState.resolved.value,
            resolved_at=now,
            resolved_by=actor[:100],
            note=note.strip()[:500],
        )
    )


def open_claims_count(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(_claim).where(_claim.c.state == ClaimState.open.value)
        ).scalar_one()
    )

"""Reading orders: by number (scoped to a reseller or member), lines, timelines, lists, and
the buyer's lookup by order number and secret."""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from kameng.db import RawSQL, table
from kameng.errors import ErrorCode, KamengError
from kameng.orders.models import Order, OrderEvent, OrderLine
from kameng.security.crypto import Vault

_order = table(Order)
_line = table(OrderLine)
_event = table(OrderEvent)
_BACKORDER_WAITING = RawSQL(
    "SELECT id FROM orders WHERE status = 'backordered' AND sku_id = :sku_id LIMIT 1"
)


def backorders_waiting(conn: Connection, *, sku_id: int) -> bool:
    """Whether older orders wait for this SKU's keys: a newer order (placed, approved after
    review, or held at screening) must not take keys ahead of them. One place asks it, so the
    queue's rule cannot drift between the paths that claim keys."""
    return _BACKORDER_WAITING.one(conn, {"sku_id": sku_id}) is not None


def find_order(conn: Connection, *, order_no: str, reseller_id: int | None) -> Any:
    stmt = select(_order).where(_order.c.order_no == order_no)
    if reseller_id is not None:
        stmt = stmt.where(_order.c.reseller_id == reseller_id)
    row = conn.execute(stmt).first()
    if row is None:
        raise KamengError(ErrorCode.order_not_found)
    return row


def order_line(conn: Connection, *, order_id: int) -> Any:
    return conn.execute(
        select(_line).where(_line.c.order_id == order_id).order_by(_line.c.id)
    ).first()


def timeline(conn: Connection, *, order_id: int) -> list[Any]:
    return list(
        conn.execute(select(_event).where(_event.c.order_id == order_id).order_by(_event.c.id))
    )


def list_orders(
    conn: Connection,
    *,
    reseller_id: int,
    limit: int,
    before_id: int | None = None,
    status: str | None = None,
    sku_id: int | None = None,
    customer_ref: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
) -> list[Any]:
    stmt = select(_order).where(_order.c.reseller_id == reseller_id)
    if before_id is not None:
        stmt = stmt.where(_order.c.id < before_id)
    if status:
        stmt = stmt.where(_order.c.status == status)
    if sku_id is not None:
        stmt = stmt.where(_order.c.sku_id == sku_id)
    if customer_ref:
        stmt = stmt.where(_order.c.customer_ref == customer_ref)
    if created_from is not None:
        stmt = stmt.where(_order.c.created_at >= created_from)
    if created_to is not None:
        stmt = stmt.where(_order.c.created_at < created_to)
    return list(conn.execute(stmt.order_by(_order.c.id.desc()).limit(limit)))


def normalize_secret(text: str) -> str:
    """What a buyer types, as issued: Crockford base-32 read forgivingly (case, O for 0, I/L
    for 1, missing or extra separators), grouped 4-4-4-4."""
    raw = "".join(ch for ch in text.upper() if ch.isalnum())
    raw = raw.replace("O", "0").replace("I", "1").replace("L", "1")
    if len(raw) != 16:
        return text.strip().upper()
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def lookup(conn: Connection, *, order_no: str, secret: str, vault: Vault) -> Any | None:
    """The order if the secret matches; None otherwise (unknown and wrong look the same)."""
    row = conn.execute(select(_order).where(_order.c.order_no == order_no)).first()
    expected = vault.lookup_hash(order_no, normalize_secret(secret))
    if row is None:
        # Spend the same work as a real comparison so timing does not reveal which orders exist.
        hmac.compare_digest(expected, expected)
        return None
    return row if hmac.compare_digest(bytes(row.lookup_hash), expected) else None


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(_order.c.status, func.count()).group_by(_order.c.status))
    return {status: int(n) for status, n in rows}


def list_member_orders(conn: Connection, *, member_id: int, limit: int) -> list[Any]:
    """A member's own orders, newest first (the query is keyed by the member: isolation)."""
    stmt = (
        select(_order)
        .where(_order.c.member_id == member_id)
        .order_by(_order.c.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt))


def order_by_id(conn: Connection, *, order_id: int) -> Any:
    row = conn.execute(select(_order).where(_order.c.id == order_id)).first()
    if row is None:
        raise KamengError(ErrorCode.order_not_found)
    return row


def order_numbers(conn: Connection, *, ids: set[int]) -> dict[int, str]:
    """Order numbers by id, for listings that hold ids (supplier claims, staff reports)."""
    if not ids:
        return {}
    rows = conn.execute(select(_order.c.id, _order.c.order_no).where(_order.c.id.in_(sorted(ids))))
    return {int(r.id): str(r.order_no) for r in rows}

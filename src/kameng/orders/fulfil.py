"""What happens to a paid order after it was placed: deliver, wait, refund.

Every function here runs inside the caller's transaction and moves the order through
`service.transition` (compare-and-set on `version`, one event row per move), so a step that
loses a race with a cancel or another worker fails cleanly instead of acting twice. Money
moves in the same transaction as the status it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind, Product, Sku
from kameng.db import db_time, notify_due, table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.inventory.models import KeyState
from kameng.ledger import service as ledger
from kameng.orders.models import Order, OrderLine
from kameng.orders.service import _INSERT_DELIVERY, transition
from kameng.orders.state import Status
from kameng.security.crypto import Vault

_order = table(Order)
_line = table(OrderLine)
_sku = table(Sku)
_product = table(Product)


@dataclass(frozen=True, slots=True)
class Loaded:
    order: Any
    line: Any
    delivery_kind: str


@dataclass(frozen=True, slots=True)
class LineView:
    id: int
    quantity: int
    unit_price_cents: int
    fields: dict[str, Any]


_LOAD = (
    select(
        _order,
        _line.c.id.label("line_id"),
        _line.c.quantity.label("line_quantity"),
        _line.c.unit_price_cents.label("line_unit_price_cents"),
        _line.c.fields.label("line_fields"),
        _product.c.delivery_kind.label("delivery_kind"),
    )
    .select_from(
        _order.join(_line, _line.c.order_id == _order.c.id)
        .join(_sku, _sku.c.id == _order.c.sku_id)
        .join(_product, _product.c.id == _sku.c.product_id)
    )
    .order_by(_line.c.id)
    .limit(1)
)


_LOAD_BY_ID = _LOAD.where(_order.c.id == bindparam("oid"))
_LOAD_LOCKED = _LOAD_BY_ID.with_for_update(of=_order)
_LOCK_VERSION = select(_order.c.version).where(_order.c.id == bindparam("oid")).with_for_update()


def load(conn: Connection, *, order_id: int, lock: bool = True) -> Loaded | None:
    """The order, its line and its delivery kind in one statement; with `lock`, the order row
    is locked (PostgreSQL; SQLite has one writer) for the rest of the transaction."""
    stmt = _LOAD_LOCKED if lock and conn.dialect.name == "postgresql" else _LOAD_BY_ID
    row = conn.execute(stmt, {"oid": order_id}).first()
    if row is None:
        return None
    line = LineView(
        int(row.line_id),
        int(row.line_quantity),
        int(row.line_unit_price_cents),
        dict(row.line_fields or {}),
    )
    return Loaded(row, line, str(row.delivery_kind))


def lock_order(conn: Connection, *, loaded: Loaded) -> Loaded | None:
    """Lock an order read without a lock; re-read it only if it changed in between."""
    if conn.dialect.name != "postgresql":
        return loaded
    version = conn.execute(_LOCK_VERSION, {"oid": loaded.order.id}).scalar()
    if version is None:
        return None
    if version == loaded.order.version:
        return loaded
    return load(conn, order_id=loaded.order.id)


def store_supplier_keys(
    conn: Connection,
    vault: Vault,
    *,
    order: Any,
    line: Any,
    keys: list[tuple[str, str | None]],
    source: str,
    unit_cost_cents: int | None,
    now: datetime,
) -> int:
    """Encrypt keys a supplier delivered and hold them for this line; returns how many of the
    line's keys are now held (keys seen before, e.g. in a repeated callback, count once)."""
    if keys:
        batch_id, aead = inventory.new_batch(
            conn,
            vault,
            sku_id=order.sku_id,
            source=source,
            unit_cost_cents=unit_cost_cents,
            imported_by="system",
            now=now,
        )
        room = line.quantity - inventory.held_count(conn, line_id=line.id)
        if room > 0:
            inventory.insert_keys(
                conn,
                vault,
                aead,
                sku_id=order.sku_id,
                batch_id=batch_id,
                keys=keys[: line.quantity],
                now=now,
                for_line=(KeyState.held, line.id),
            )
    return inventory.held_count(conn, line_id=line.id)


def deliver(
    conn: Connection,
    *,
    loaded: Loaded,
    accounts: ledger.PlatformAccounts,
    source: str,
    reason: str,
    now: datetime,
    details: dict[str, Any] | None = None,
    allow_partial: bool = False,
) -> int:
    """Deliver the line: held supplier keys become sold, the delivery row is written (unique
    per line) and the hold is captured. With `allow_partial`, a card-key line short of keys is
    delivered with what it has and the missing part refunded in the same ledger transaction.
    Returns the number of keys delivered."""
    order, line = loaded.order, loaded.line
    key_count = 0
    if loaded.delivery_kind == DeliveryKind.card_key.value:
        inventory.sell_held(conn, line_id=line.id, now=now)
        key_count = len(inventory.keys_of_line(conn, line_id=line.id))
        if key_count == 0 or (key_count < line.quantity and not allow_partial):
            raise KamengError(
                ErrorCode.invalid_transition, from_status=order.status, to_status="delivered"
            )
    missing = (
        line.quantity - key_count if loaded.delivery_kind == DeliveryKind.card_key.value else 0
    )
    returned = missing * line.unit_price_cents
    _INSERT_DELIVERY.run(
        conn,
        {
            "order_line_id": line.id,
            "source": source,
            "key_count": key_count,
            "delivered_at": db_time(conn, now),
        },
    ).close()
    if order.hold_id is not None:
        ledger.capture_hold(
            conn,
            hold_id=order.hold_id,
            accounts=accounts,
            now=now,
            returned_cents=returned,
            memo=f"deliver {order.order_no}" + (f", {missing} short refunded" if missing else ""),
        )
    transition(
        conn,
        order=order,
        to_status=Status.delivered,
        reason=reason,
        actor="system",
        now=now,
        next_action_at=None,
        details={
            "keys": key_count,
            **({"refunded_units": missing} if missing else {}),
            **(details or {}),
        },
        extra_values={
            "delivered_at": now,
            "sla_deadline": None,
            "refunded_cents": order.refunded_cents + returned,
        },
    )
    return key_count


def refund(
    conn: Connection,
    *,
    loaded: Loaded,
    accounts: ledger.PlatformAccounts,
    reason: str,
    now: datetime,
    actor: str = "system",
    details: dict[str, Any] | None = None,
) -> None:
    """Give the buyer their money back for an order that will not be delivered. Keys a supplier
    already delivered for it go into our stock (we paid for them)."""
    order, line = loaded.order, loaded.line
    back_to_stock = inventory.held_to_stock(conn, line_id=line.id)
    inventory.release(conn, line_id=line.id)
    if order.hold_id is not None:
        ledger.void_hold(
            conn,
            hold_id=order.hold_id,
            accounts=accounts,
            now=now,
            actor=actor,
            memo=f"refund {order.order_no}: {reason}",
        )
    transition(
        conn,
        order=order,
        to_status=Status.refunded,
        reason=reason,
        now=now,
        next_action_at=None,
        actor=actor,
        details={**({"keys_to_stock": back_to_stock} if back_to_stock else {}), **(details or {})},
        extra_values={"refunded_cents": order.paid_cents, "sla_deadline": None},
    )


def serve_backorders(
    conn: Connection,
    *,
    sku_id: int,
    accounts: ledger.PlatformAccounts,
    now: datetime,
    limit: int = 200,
) -> list[int]:
    """Fill waiting orders for a SKU from own stock, oldest first, stopping at the first that
    cannot be filled whole so a later, smaller order never overtakes it. Returns order ids."""
    stmt = (
        select(_order.c.id)
        .where(_order.c.status == Status.backordered.value, _order.c.sku_id == sku_id)
        .order_by(_order.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    served: list[int] = []
    for (order_id,) in conn.execute(stmt).all():
        loaded = load(conn, order_id=order_id)
        if loaded is None or loaded.line is None:
            continue
        claimed = inventory.claim(
            conn, sku_id=sku_id, quantity=loaded.line.quantity, line_id=loaded.line.id, now=now
        )
        if claimed is None:
            break
        deliver(
            conn, loaded=loaded, accounts=accounts, source="own_stock", reason="restocked", now=now
        )
        served.append(order_id)
    return served


def reschedule(conn: Connection, *, order: Any, next_action_at: datetime) -> None:
    """Move the next action time only (no status change, so no event): compare-and-set on
    `version` like every other write to the order."""
    changed = conn.execute(
        update(_order)
        .where(_order.c.id == order.id, _order.c.version == order.version)
        .values(next_action_at=next_action_at, version=order.version + 1)
    ).rowcount
    if changed != 1:
        raise KamengError(ErrorCode.concurrent_update)


def lock_backorder_queue(conn: Connection, *, sku_id: int) -> None:
    """Everything that touches a SKU's whole queue (serving it oldest first, nudging it) takes
    this per-SKU lock first, so two transactions never lock the same orders in different
    orders (a deadlock) on PostgreSQL. SQLite has one writer and needs nothing."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": 0x6B6D, "b": int(sku_id)})


def nudge_backorders(conn: Connection, *, sku_ids: list[int], now: datetime) -> int:
    """Stock arrived or a supplier recovered: make the orders waiting for these SKUs due now
    (the worker then serves them oldest first)."""
    if not sku_ids:
        return 0
    for sku_id in sorted(sku_ids):
        lock_backorder_queue(conn, sku_id=sku_id)
    nudged = conn.execute(
        update(_order)
        .where(_order.c.status == Status.backordered.value, _order.c.sku_id.in_(sku_ids))
        .values(next_action_at=now)
    ).rowcount
    if nudged:
        notify_due(conn)
    return nudged

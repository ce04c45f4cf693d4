"""Cancelling an order before delivery: stock released, the hold voided, one event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.orders.models import Order, OrderLine
from kameng.orders.service import transition
from kameng.orders.state import CANCELABLE, Status

_order = table(Order)
_line = table(OrderLine)


def _load_for_update(conn: Connection, *, order_no: str, reseller_id: int | None) -> Any:
    stmt = select(_order).where(_order.c.order_no == order_no)
    if reseller_id is not None:
        stmt = stmt.where(_order.c.reseller_id == reseller_id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise KamengError(ErrorCode.order_not_found)
    return row


def cancel_order(
    conn: Connection,
    *,
    order_no: str,
    reseller_id: int | None,
    wallet_id: int,
    accounts: ledger.PlatformAccounts,
    actor: str,
    reason: str,
    now: datetime,
    only_from: frozenset[Status] = CANCELABLE,
) -> bool:
    """Cancel an undelivered order: release stock, void the hold. False if already canceled.
    `only_from` narrows what may be canceled; it is checked after the row lock, so a payment
    that lands between the caller's read and this cancel is not canceled by mistake."""
    order = _load_for_update(conn, order_no=order_no, reseller_id=reseller_id)
    status = Status(order.status)
    if status is Status.canceled:
        return False
    if status not in CANCELABLE or status not in only_from:
        raise KamengError(ErrorCode.order_not_cancelable, status=status.value)
    for (line_id,) in conn.execute(select(_line.c.id).where(_line.c.order_id == order.id)):
        inventory.release(conn, line_id=line_id)
    refunded = order.refunded_cents
    if order.hold_id is not None:
        ledger.void_hold(
            conn,
            hold_id=order.hold_id,
            wallet_id=wallet_id,
            accounts=accounts,
            now=now,
            actor=actor,
            memo=f"cancel {order.order_no}",
        )
        refunded = order.paid_cents
    transition(
        conn,
        order=order,
        to_status=Status.canceled,
        reason=reason,
        actor=actor,
        now=now,
        extra_values={"refunded_cents": refunded, "sla_deadline": None},
    )
    return True

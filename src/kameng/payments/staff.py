"""What staff decide about payments that need a person: money that arrived in a different
amount or currency (`flagged`). Every decision moves the payment forward, posts the ledger in
the same transaction, and leaves an event on the order's timeline.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.orders import checkout
from kameng.orders.models import Order
from kameng.payments.models import Payment, PaymentPurpose, PaymentState
from kameng.payments.service import lock_payment, payer_wallet

_pay = table(Payment)


def _flagged(conn: Connection, payment_no: str) -> Any:
    pay = lock_payment(conn, payment_no)
    if pay is None:
        raise KamengError(ErrorCode.payment_not_found)
    if pay.state != PaymentState.flagged.value:
        raise KamengError(ErrorCode.invalid_transition, from_status=pay.state, to_status="resolved")
    return pay


def accept_flagged(
    conn: Connection,
    *,
    payment_no: str,
    amount_cents: int | None,
    deps: checkout.PaymentDeps,
    actor: str,
    now: datetime,
) -> str:
    """Staff accept money that arrived in a different amount: it is credited to the payer's
    wallet. An order still payable with it is paid (and fulfilled as a late payment would be);
    otherwise the order closes and the money stays credited."""
    pay = _flagged(conn, payment_no)
    if pay.reason == "currency_mismatch":
        raise KamengError(
            ErrorCode.invalid_request, detail="money in another currency cannot be credited"
        )
    amount = amount_cents if amount_cents is not None else pay.reported_cents
    if amount is None or amount <= 0:
        raise KamengError(ErrorCode.invalid_amount, detail="give the amount that arrived")
    wallet_id = payer_wallet(conn, pay)
    txn_id = ledger.post(
        conn,
        kind="payment",
        legs=[(deps.accounts.clearing_for(pay.id), -amount), (wallet_id, amount)],
        now=now,
        ref_type="payment",
        ref_id=pay.id,
        actor=actor,
        memo=f"{payment_no} accepted by staff ({pay.reason})",
    )
    conn.execute(
        update(_pay)
        .where(_pay.c.id == pay.id)
        .values(
            state=PaymentState.paid.value,
            reason="accepted_by_staff",
            reported_cents=amount,
            wallet_id=wallet_id,
            ledger_txn_id=txn_id,
            paid_at=now,
        )
    )
    if pay.purpose != PaymentPurpose.order.value:
        return "topup_credited"
    order = conn.execute(
        select(Order.status, Order.amount_cents).where(Order.id == pay.order_id)
    ).one()
    if amount >= order.amount_cents and order.status in ("pending_payment", "expired"):
        return checkout.accept_payment(
            conn,
            order_id=pay.order_id,
            wallet_id=wallet_id,
            amount_cents=order.amount_cents,
            actor=actor,
            payment_no=payment_no,
            deps=deps,
            now=now,
        )
    checkout.close_unpaid(
        conn,
        order_id=pay.order_id,
        reason="payment_short_credited",
        actor=actor,
        now=now,
        details={"credited": amount, "order_amount": order.amount_cents},
    )
    return "credited"


def mark_returned(
    conn: Connection, *, payment_no: str, via: str, actor: str, now: datetime
) -> None:
    """Flagged money went back to the payer (a gateway refund, or staff by other means). It
    never entered our books, so nothing is posted; the order says what happened."""
    pay = _flagged(conn, payment_no)
    conn.execute(
        update(_pay)
        .where(_pay.c.id == pay.id)
        .values(state=PaymentState.returned.value, reason=f"returned_{via}")
    )
    if pay.order_id is not None:
        checkout.close_unpaid(
            conn,
            order_id=pay.order_id,
            reason="payment_returned",
            actor=actor,
            now=now,
            details={"returned": pay.reported_cents, "via": via},
        )

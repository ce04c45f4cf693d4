"""Orders paid at a gateway: created `pending_payment`, moved on when the money is proven.

Stock is not reserved while the buyer is at the gateway: an abandoned checkout would otherwise
lock keys away (a known way to starve a shop). Keys are claimed when the payment is proven;
if they are gone by then the order waits in the backorder queue like any other paid order.

A payment proven after the order closed (expired, or canceled by the buyer) is never ignored:
the order is fulfilled if it still can be at once, otherwise the money stays credited to the
payer's wallet (a member's balance; for a guest, a wallet kept for that order until staff pay
it back) and the order says so on its timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind, Sku
from kameng.catalog.service import SkuInfo
from kameng.db import RawSQL, db_time, notify_due, pipelined, table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.notify.service import OrderTarget
from kameng.orders import fulfil, screening
from kameng.orders import service as orders
from kameng.orders.events import record
from kameng.orders.models import Order, OrderLine
from kameng.orders.state import Stage, Status
from kameng.risk import service as risk

_order = table(Order)
_line = table(OrderLine)
_sku = table(Sku)

_AVAILABLE = RawSQL(
    "SELECT count(*) FROM (SELECT 1 FROM card_keys WHERE sku_id = :sku_id "
    "AND state = 'available' LIMIT :n) AS k"
)
_FINISH_PAID = RawSQL(
    "UPDATE orders SET status = :status, stage = :stage, reason = :reason, "
    "stage_since = :at, updated_at = :at, next_action_at = :next_action_at, "
    "sla_deadline = :sla_deadline, hold_id = :hold_id, delivered_at = :delivered_at, "
    "paid_cents = :paid, refunded_cents = :refunded, version = version + 1 "
    "WHERE id = :oid AND version = :version"
)


@dataclass(frozen=True, slots=True)
class PaymentDeps:
    """What resuming a paid order needs from the composition root."""

    accounts: ledger.PlatformAccounts
    policy: orders.Policy
    sku: Callable[[Connection, int], SkuInfo]  # by SKU id
    has_offers: Callable[[Connection, int], bool]
    risk_engine: risk.Engine | None = None  # None: paid orders are not screened


def place_pending(
    conn: Connection,
    *,
    buyer: orders.Buyer,
    cmd: orders.PlaceOrder,
    vault: Any,
    policy: orders.Policy,
    now: datetime,
    pay_window_s: int,
    context: screening.Context | None = None,
) -> orders.Placed:
    """An order that waits for a gateway payment until `now + pay_window_s`. With a `context`,
    its risk facts are recorded now (an unpaid order counts in velocity too) and it is
    screened when the payment arrives."""
    key = orders.dedupe_key(
        owner=buyer.owner, customer_ref=cmd.customer_ref, sku_id=cmd.sku.id, fields=cmd.fields
    )
    if not cmd.confirm_duplicate:
        orders.guard_duplicates(conn, key, now, policy.duplicate_window_s)
    deadline = now + timedelta(seconds=pay_window_s)
    order_id, line_id, order_no, secret = orders.insert_order(
        conn,
        buyer=buyer,
        cmd=cmd,
        key=key,
        vault=vault,
        status=Status.pending_payment,
        reason="awaiting_payment",
        paid_cents=0,
        now=now,
        next_action_at=deadline,
        sla_deadline=deadline,
    )
    event = orders.event_row(
        conn,
        order_id,
        None,
        Status.pending_payment,
        None,
        "awaiting_payment",
        buyer.actor,
        now,
        {"pay_by": deadline.isoformat()},
    )
    record(
        conn,
        [event],
        notify=OrderTarget(order_id, order_no, cmd.customer_ref, cmd.notify_url)
        if cmd.notify_url
        else None,
        now=now,
    )
    if context is not None:
        subject = screening.subject_for(
            order_id=order_id,
            owner=buyer.risk_key,
            buyer_kind=buyer.kind,
            channel=cmd.channel,
            sku=cmd.sku,
            quantity=cmd.quantity,
            unit_price_cents=cmd.unit_price_cents,
            fields=cmd.fields,
            context=context,
        )
        risk.record_facts(conn, subject=subject, now=now)
    return orders.Placed(
        order_id=order_id,
        order_no=order_no,
        line_id=line_id,
        status=Status.pending_payment,
        stage=Stage.awaiting_payment,
        reason="awaiting_payment",
        amount_cents=cmd.unit_price_cents * cmd.quantity,
        lookup_secret=secret,
        created_at=now,
        next_action_at=deadline,
        sla_deadline=deadline,
    )


def _lock(conn: Connection, order_id: int) -> Any:
    stmt = select(_order).where(_order.c.id == order_id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise KamengError(ErrorCode.order_not_found)
    return row


def _can_fulfil_now(conn: Connection, *, sku: SkuInfo, quantity: int, offers: bool) -> bool:
    """Whether a late payment can still be served at once (no waiting, no queue jumping)."""
    if not sku.on_sale:
        return False
    if sku.delivery_kind == DeliveryKind.card_key.value:
        queue = conn.execute(
            text("SELECT 1 FROM orders WHERE status = 'backordered' AND sku_id = :s LIMIT 1"),
            {"s": sku.id},
        ).first()
        if queue is not None:
            return False
        have = int(_AVAILABLE.one(conn, {"sku_id": sku.id, "n": quantity})[0])
        return have >= quantity
    if sku.delivery_kind == DeliveryKind.direct_topup.value:
        return offers
    return False  # manual goods: staff could not promise the late buyer anything


def accept_payment(
    conn: Connection,
    *,
    order_id: int,
    wallet_id: int,
    amount_cents: int,
    actor: str,
    payment_no: str,
    deps: PaymentDeps,
    now: datetime,
) -> str:
    """The order's money (`amount_cents`, already credited to `wallet_id`) is proven paid.
    Returns what became of the order: `fulfilment_started`, `late_fulfilment_started` or
    `late_payment_credited`."""
    order = _lock(conn, order_id)
    status = Status(order.status)
    line = conn.execute(
        select(_line.c.id, _line.c.quantity, _line.c.unit_price_cents)
        .where(_line.c.order_id == order_id)
        .limit(1)
    ).one()
    sku = deps.sku(conn, order.sku_id)
    late = status in (Status.expired, Status.canceled)
    if status is not Status.pending_payment and not late:
        raise KamengError(ErrorCode.order_not_payable, status=status.value)
    offers = deps.has_offers(conn, sku.id)
    if late and not (
        status is Status.expired
        and _can_fulfil_now(conn, sku=sku, quantity=line.quantity, offers=offers)
    ):
        orders.transition(
            conn,
            order=order,
            to_status=Status.refunded,
            reason="late_payment_credited",
            actor=actor,
            now=now,
            details={"payment_no": payment_no, "credited": amount_cents},
            extra_values={"paid_cents": amount_cents, "refunded_cents": amount_cents},
            late_payment=True,
        )
        return "late_payment_credited"
    reason = "late_payment_accepted" if late else "paid_by_gateway"
    events = [
        orders.event_row(
            conn,
            order_id,
            status,
            Status.paid,
            None,
            reason,
            actor,
            now,
            {"payment_no": payment_no},
            late_payment=late,
        )
    ]
    screened = None
    if deps.risk_engine is not None:
        subject = screening.stored_subject(
            conn,
            order=order,
            sku=sku,
            quantity=line.quantity,
            unit_price_cents=line.unit_price_cents,
        )
        if subject is not None:
            screened = screening.screen(
                conn,
                engine=deps.risk_engine,
                subject=subject,
                review_sla_s=deps.policy.review_sla_s,
                now=now,
            )
    with pipelined(conn):
        started = orders.start_fulfilment(
            conn,
            order_id=order_id,
            line_id=line.id,
            sku=sku,
            quantity=line.quantity,
            amount=amount_cents,
            wallet_id=wallet_id,
            actor=actor,
            supplier_offers=offers,
            accounts=deps.accounts,
            policy=deps.policy,
            now=now,
            events=events,
            screened=screened,
            notify=OrderTarget.of(order),
        )
    # Outside the pipeline: its row count is only known once the statement has run.
    changed = _FINISH_PAID.run(
        conn,
        {
            "oid": order_id,
            "version": order.version,
            "status": started.status.value,
            "stage": started.stage.value,
            "reason": started.reason,
            "at": db_time(conn, now),
            "hold_id": started.hold_id,
            "next_action_at": db_time(conn, started.next_action_at),
            "sla_deadline": db_time(conn, started.sla_deadline),
            "delivered_at": db_time(conn, now) if started.status is Status.delivered else None,
            "paid": amount_cents,
            "refunded": amount_cents if started.status is Status.rejected else 0,
        },
    ).rowcount
    if changed != 1:
        raise KamengError(ErrorCode.concurrent_update)
    if started.next_action_at is not None:
        notify_due(conn)
    return "late_fulfilment_started" if late else "fulfilment_started"


def note_payment_problem(
    conn: Connection,
    *,
    order_id: int,
    reason: str,
    actor: str,
    now: datetime,
    details: dict[str, Any],
) -> None:
    """Say on the order's timeline what happened to a payment that could not simply be applied
    (a different amount, money sent back, ...). An unpaid order keeps waiting with this reason;
    a closed one stays closed, with the event added."""
    order = _lock(conn, order_id)
    status = Status(order.status)
    if status is Status.pending_payment:
        orders.transition(
            conn,
            order=order,
            to_status=status,
            reason=reason,
            actor=actor,
            now=now,
            next_action_at=order.next_action_at,
            details=details,
        )
    elif status in (Status.expired, Status.canceled):
        orders.transition(
            conn,
            order=order,
            to_status=status,
            reason=reason,
            actor=actor,
            now=now,
            details=details,
            late_payment=True,
        )


def close_unpaid(
    conn: Connection,
    *,
    order_id: int,
    reason: str,
    actor: str,
    now: datetime,
    details: dict[str, Any],
) -> None:
    """An unpaid order that will not be paid (its payment was short and credited, or sent
    back): cancel it now rather than let it wait for its deadline."""
    order = _lock(conn, order_id)
    if order.status != Status.pending_payment.value:
        note_payment_problem(
            conn, order_id=order_id, reason=reason, actor=actor, now=now, details=details
        )
        return
    orders.transition(
        conn,
        order=order,
        to_status=Status.canceled,
        reason=reason,
        actor=actor,
        now=now,
        next_action_at=None,
        details=details,
        extra_values={"sla_deadline": None},
    )


def expire_unpaid(conn: Connection, *, order: Any, now: datetime) -> bool:
    """Close an order whose payment window passed. A payment that still arrives later is
    handled as a late payment, so nothing is lost by closing now."""
    if order.status != Status.pending_payment.value:
        return False
    if order.sla_deadline is not None and order.sla_deadline > now:
        fulfil.reschedule(conn, order=order, next_action_at=order.sla_deadline)
        return False
    orders.transition(
        conn,
        order=order,
        to_status=Status.expired,
        reason="payment_timeout",
        actor="system",
        now=now,
        next_action_at=None,
        extra_values={"sla_deadline": None},
    )
    risk.mark_payment_failed(conn, order_id=order.id)
    return True

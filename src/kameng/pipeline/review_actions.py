"""Deciding a reviewed order: a reviewer's approval or rejection, or the SLA's default action.

Each function is one transaction's worth of work: the review item's compare-and-set, the
decision log and audit row, and the order's move (deliver, procure, queue, or reject with the
money back in the buyer's balance) commit together, so a decision is never half applied. An
approval above the two-reviewer amount only records the first approval until a different
reviewer approves too.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind, Product, Sku
from kameng.db import notify_due, table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.notify import service as notify
from kameng.orders import fulfil, queries
from kameng.orders.models import Order
from kameng.orders.state import Stage, Status
from kameng.pipeline import apply
from kameng.review import service as review
from kameng.review.models import ItemStatus
from kameng.review.service import ReviewPolicy

log = logging.getLogger("kameng.review")
_order = table(Order)
_product = table(Product)
_sku = table(Sku)

SLA_BREACHES = Counter(
    "kameng_review_sla_breaches_total",
    "Review items whose SLA ran out before a reviewer decided, by the default action applied",
    ["action"],
)
DECISIONS = Counter("kameng_review_decisions_total", "Review decisions, by outcome", ["outcome"])
SLA_ACTOR = "system:review_sla"


def _loaded(conn: Connection, order_id: int) -> fulfil.Loaded:
    loaded = fulfil.load(conn, order_id=order_id)
    if loaded is None:
        raise KamengError(ErrorCode.order_not_found)
    return loaded


def resume(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    accounts: ledger.PlatformAccounts,
    fulfil_sla_s: int,
    now: datetime,
) -> str:
    """An approved order goes on as if it had never stopped: its held keys are delivered, or it
    is sent upstream, handed to staff, or queued for stock; its delivery SLA starts now."""
    order, line = loaded.order, loaded.line
    deadline = now + timedelta(seconds=fulfil_sla_s)
    if loaded.delivery_kind == DeliveryKind.card_key.value:
        held = inventory.held_count(conn, line_id=line.id)
        if held < line.quantity and not queries.backorders_waiting(conn, sku_id=order.sku_id):
            # No keys were set aside (stock was short at screening): take some now, unless
            # older orders are queued for this SKU — an approval does not jump the queue.
            inventory.held_to_stock(conn, line_id=line.id)
            inventory.claim(
                conn,
                sku_id=order.sku_id,
                quantity=line.quantity,
                line_id=line.id,
                now=now,
                hold=True,
            )
            held = inventory.held_count(conn, line_id=line.id)
        if held >= line.quantity:
            apply.deliver(
                conn,
                loaded=loaded,
                accounts=accounts,
                source="own_stock",
                reason="review_approved",
                now=now,
            )
            return "delivered"
        apply.transition(
            conn,
            loaded=loaded,
            to_status=Status.backordered,
            stage=Stage.waiting_stock,
            reason="out_of_stock",
            now=now,
            next_action_at=now,  # the step routes it upstream if a supplier has it
            extra_values={"sla_deadline": deadline},
        )
        notify_due(conn)
        return "backordered"
    if loaded.delivery_kind == DeliveryKind.manual.value:
        apply.transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.staff_processing,
            reason="awaiting_staff",
            now=now,
            next_action_at=deadline,
            extra_values={"sla_deadline": deadline},
        )
        return "staff_processing"
    apply.transition(
        conn,
        loaded=loaded,
        to_status=Status.fulfilling,
        stage=Stage.procuring,
        reason="awaiting_supplier",
        now=now,
        next_action_at=now,
        extra_values={"sla_deadline": deadline},
    )
    notify_due(conn)
    return "procuring"


def reject_order(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    accounts: ledger.PlatformAccounts,
    reason: str,
    actor: str,
    now: datetime,
    to_status: Status = Status.rejected,
) -> None:
    """Rejected (or refunded, when no reviewer decided in time): keys set aside go back on
    sale and the money goes back to the buyer's balance (a guest's is paid back through their
    gateway by the payout job)."""
    order, line = loaded.order, loaded.line
    inventory.held_to_stock(conn, line_id=line.id)
    if order.hold_id is not None:
        ledger.void_hold(
            conn,
            hold_id=order.hold_id,
            accounts=accounts,
            now=now,
            actor=actor,
            memo=f"review rejected {order.order_no}",
        )
    apply.transition(
        conn,
        loaded=loaded,
        to_status=to_status,
        stage=None,
        reason=reason,
        now=now,
        next_action_at=None,
        details={"refunded": order.paid_cents},
        extra_values={"refunded_cents": order.paid_cents, "sla_deadline": None},
        actor=actor,
    )


def _decidable(
    conn: Connection, *, item_id: int, reviewer: str, now: datetime
) -> tuple[review.Item, fulfil.Loaded]:
    """Lock in the pipeline's order — the order row first, then the item — so a decision at
    the SLA deadline waits for the pipeline's step (or the step for it) instead of deadlocking;
    then check the decider's claim on the fresh item."""
    first = review.get_item(conn, item_id=item_id)
    loaded = _loaded(conn, first.order_id)
    item = review.get_item(conn, item_id=item_id, lock=True)
    review.check_decider(item, reviewer=reviewer, now=now)
    if loaded.order.status != Status.review.value:
        raise KamengError(ErrorCode.review_already_decided, status=loaded.order.status)
    return item, loaded


def product_sla(conn: Connection, *, sku_id: int) -> int | None:
    """The product's own delivery SLA in seconds (None: the platform default applies)."""
    value = conn.execute(
        select(_product.c.sla_seconds)
        .join(_sku, _sku.c.product_id == _product.c.id)
        .where(_sku.c.id == sku_id)
    ).scalar()
    return int(value) if value else None


def approve(
    conn: Connection,
    *,
    item_id: int,
    reviewer: str,
    note: str,
    policy: ReviewPolicy,
    accounts: ledger.PlatformAccounts,
    fulfil_sla_s: int,
    now: datetime,
) -> dict[str, Any]:
    item, loaded = _decidable(conn, item_id=item_id, reviewer=reviewer, now=now)
    if item.amount_cents >= policy.two_reviewers_from_cents:
        if not item.first_approver:
            review.record_first_approval(conn, item=item, reviewer=reviewer, note=note, now=now)
            DECISIONS.labels("first_approval").inc()
            return {"item": item.id, "status": ItemStatus.second.value, "order": None}
        if item.first_approver == reviewer:
            raise KamengError(ErrorCode.review_second_reviewer_required, first=reviewer)
    review.close(conn, item=item, status=ItemStatus.approved, actor=reviewer, note=note, now=now)
    outcome = resume(
        conn,
        loaded=loaded,
        accounts=accounts,
        fulfil_sla_s=product_sla(conn, sku_id=loaded.order.sku_id) or fulfil_sla_s,
        now=now,
    )
    DECISIONS.labels("approved").inc()
    return {"item": item.id, "status": ItemStatus.approved.value, "order": outcome}


def reject(
    conn: Connection,
    *,
    item_id: int,
    reviewer: str,
    note: str,
    accounts: ledger.PlatformAccounts,
    now: datetime,
) -> dict[str, Any]:
    if not note.strip():
        raise KamengError(ErrorCode.invalid_request, detail="a rejection needs a note")
    item, loaded = _decidable(conn, item_id=item_id, reviewer=reviewer, now=now)
    review.close(conn, item=item, status=ItemStatus.rejected, actor=reviewer, note=note, now=now)
    reject_order(
        conn, loaded=loaded, accounts=accounts, reason="review_rejected", actor=reviewer, now=now
    )
    DECISIONS.labels("rejected").inc()
    return {"item": item.id, "status": ItemStatus.rejected.value, "order": "rejected"}


def _escalate(conn: Connection, *, item: review.Item, url: str, action: str, now: datetime) -> None:
    review.mark_escalated(conn, item=item, now=now)
    SLA_BREACHES.labels(action).inc()
    log.warning(
        "review item %s (order %s) passed its SLA undecided: %s", item.id, item.order_id, action
    )
    if not url:
        return
    notify.enqueue(
        conn,
        topic="review.sla_breached",
        target_url=url,
        payload={
            "type": "review.sla_breached",
            "item": item.id,
            "order_id": item.order_id,
            "category": item.category,
            "amount_cents": item.amount_cents,
            "currency": item.currency,
            "opened_at": item.opened_at.isoformat(),
            "sla_deadline": item.sla_deadline.isoformat(),
            "default_action": action,
            "at": now.isoformat(),
        },
        now=now,
    )


def apply_sla(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    policy: ReviewPolicy,
    accounts: ledger.PlatformAccounts,
    fulfil_sla_s: int,
    escalation_url: str,
    now: datetime,
) -> str:
    """The pipeline's step for an order in review that is due: nothing before the deadline;
    at it, escalate and apply the default action (approve under the configured amount,
    otherwise reject with a refund). Never leaves a review open past its SLA."""
    order = loaded.order
    item = review.item_of_order(conn, order_id=order.id)
    deadline = item.sla_deadline if item is not None else order.sla_deadline
    if deadline is not None and deadline > now:
        fulfil.reschedule(conn, order=order, next_action_at=deadline)
        return "in_review"
    small = order.amount_cents < policy.auto_approve_below_cents
    action = "approve" if small else "refund"
    if item is not None and item.is_open:
        _escalate(conn, item=item, url=escalation_url, action=action, now=now)
        item = review.get_item(conn, item_id=item.id)
        review.close(
            conn,
            item=item,
            status=ItemStatus.approved if small else ItemStatus.rejected,
            actor=SLA_ACTOR,
            note=f"SLA passed without a decision: default action {action}",
            now=now,
        )
    if small:
        return resume(
            conn,
            loaded=loaded,
            accounts=accounts,
            fulfil_sla_s=fulfil_sla_s,
            now=now,
        )
    reject_order(
        conn,
        loaded=loaded,
        accounts=accounts,
        reason="review_sla_refund",
        actor=SLA_ACTOR,
        now=now,
        to_status=Status.refunded,
    )
    return "refunded"

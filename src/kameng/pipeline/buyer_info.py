"""Buyer information: checked with the supplier before money moves, corrected after a refusal.

Before payment, a direct top-up's fields are put to the supplier's pre-check where one exists
(outside any transaction, with a short timeout); only a definite "no" refuses the buyer — a
check that could not run never stands between a buyer and their order. After payment, a
supplier that still refuses the information sends the order to `needs_buyer_action`; the buyer
corrects the fields here and the order resumes at once (the refusing supplier is asked again,
with a new out-trade-no), or cancels for a refund, or the order is refunded at its own SLA.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind
from kameng.catalog.service import SkuInfo
from kameng.db import notify_due, table
from kameng.errors import ErrorCode, KamengError, field_error
from kameng.ledger import service as ledger
from kameng.orders import fulfil, screening
from kameng.orders.models import Order, OrderLine
from kameng.orders.state import Stage, Status
from kameng.pipeline import apply, review_actions
from kameng.pipeline.registry import Adapters
from kameng.review import service as review
from kameng.risk import service as risk
from kameng.risk.attributes import recharge_account
from kameng.risk.models import RiskFact
from kameng.risk.rules import Action
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import Supplier
from kameng.suppliers.port import Precheck
from kameng.suppliers.precheck import precheck_order

_order = table(Order)
_line = table(OrderLine)
_fact = table(RiskFact)
_supplier = table(Supplier)

PRECHECK_TIMEOUT_S = 3.0


def _screen_again(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    sku: SkuInfo,
    engine: risk.Engine,
    accounts: ledger.PlatformAccounts,
    review_sla_s: int,
    changed: list[str],
    actor: str,
    now: datetime,
) -> bool:
    """Screen the corrected order; True when it went to review or was rejected instead."""
    order, line = loaded.order, loaded.line
    subject = screening.stored_subject(
        conn, order=order, sku=sku, quantity=line.quantity, unit_price_cents=line.unit_price_cents
    )
    if subject is None:
        return False
    screened = screening.screen(
        conn, engine=engine, subject=subject, review_sla_s=review_sla_s, now=now
    )
    if screened.action is Action.allow:
        return False
    if screened.action is Action.block:
        review_actions.reject_order(
            conn, loaded=loaded, accounts=accounts, reason="risk_rejected", actor=actor, now=now
        )
        return True
    deadline = screened.review_deadline
    assert deadline is not None
    apply.transition(
        conn,
        loaded=loaded,
        to_status=Status.review,
        stage=None,
        reason=f"risk_review_{screened.category}",
        now=now,
        next_action_at=deadline,
        details={
            "changed": changed,
            "category": screened.category,
            "decide_by": deadline.isoformat(),
        },
        extra_values={"sla_deadline": deadline},
        actor=actor,
    )
    review.open_item(
        conn,
        order_id=order.id,
        category=screened.category,
        rule_code=screened.rule_code,
        reasons=screened.reasons,
        score=screened.score,
        amount_cents=order.amount_cents,
        currency=order.currency,
        sla_deadline=deadline,
        now=now,
    )
    return True


async def precheck(
    *,
    run_read: Any,
    adapters: Adapters,
    sku: SkuInfo,
    fields: dict[str, str],
    now: datetime,
) -> Precheck | None:
    """Ask a supplier whether these fields will be accepted (direct top-ups only). `run_read`
    runs a function on a read connection (the caller's thread pool); no transaction is open
    while the supplier answers."""
    if sku.delivery_kind != DeliveryKind.direct_topup.value:
        return None

    def load(conn: Connection) -> tuple[list[Any], dict[int, Any]]:
        offers = suppliers.offers_for(conn, sku_id=sku.id)
        ids = {o.supplier_id for o in offers}
        rows = (
            {int(r.id): r for r in conn.execute(select(_supplier).where(_supplier.c.id.in_(ids)))}
            if ids
            else {}
        )
        return offers, rows

    offers, rows = await run_read(load)
    if not offers:
        return None
    ports = {sid: adapters.get(row) for sid, row in rows.items()}
    return await precheck_order(
        offers=offers, adapters=ports, fields=fields, now=now, timeout_s=PRECHECK_TIMEOUT_S
    )


def refuse_if_wrong(result: Precheck | None) -> None:
    """Raise `invalid_fields` (naming the field) when the supplier definitely said no."""
    if result is None or result.ok or not result.decisive:
        return
    raise KamengError(
        ErrorCode.invalid_fields,
        extra={
            "fields": [
                field_error(
                    result.field or "fields",
                    result.reason,
                    result.message_zh,
                    result.message_en,
                )
            ],
            "precheck": result.reason,
        },
    )


def correct_fields(
    conn: Connection,
    *,
    order_id: int,
    sku: SkuInfo,
    fields: dict[str, str],
    actor: str,
    fulfil_sla_s: int,
    now: datetime,
    engine: risk.Engine | None = None,
    accounts: ledger.PlatformAccounts | None = None,
    review_sla_s: int = 1800,
) -> Any:
    """The buyer's corrected information (already validated against the product's template):
    stored on the line, and the order goes back to procuring now with a fresh delivery SLA.

    With an engine, the order is screened again first: a refused account swapped for one that
    many buyers top up is exactly what the first screening could not see."""
    loaded = fulfil.load(conn, order_id=order_id)
    if loaded is None:
        raise KamengError(ErrorCode.order_not_found)
    order = loaded.order
    if order.status != Status.needs_buyer_action.value:
        raise KamengError(ErrorCode.order_not_fixable, status=order.status)
    before = dict(loaded.line.fields or {})
    changed = sorted(k for k in set(before) | set(fields) if before.get(k) != fields.get(k))
    if not changed:
        raise KamengError(
            ErrorCode.invalid_fields,
            extra={
                "fields": [
                    field_error(
                        "fields",
                        "unchanged",
                        "信息与上次相同，上游已拒绝过这些信息，请核对后修改",
                        "This is what the supplier already refused; please correct it",
                    )
                ]
            },
        )
    conn.execute(update(_line).where(_line.c.id == loaded.line.id).values(fields=fields))
    account = recharge_account(sku.field_template, fields)
    conn.execute(update(_fact).where(_fact.c.order_id == order_id).values(account=account))
    if engine is not None and accounts is not None:
        flagged = _screen_again(
            conn,
            loaded=loaded,
            sku=sku,
            engine=engine,
            accounts=accounts,
            review_sla_s=review_sla_s,
            changed=changed,
            actor=actor,
            now=now,
        )
        if flagged:
            return conn.execute(select(_order).where(_order.c.id == order_id)).one()
    apply.transition(
        conn,
        loaded=loaded,
        to_status=Status.fulfilling,
        stage=Stage.procuring,
        reason="buyer_info_corrected",
        now=now,
        next_action_at=now,
        details={"changed": changed},
        extra_values={"sla_deadline": now + timedelta(seconds=fulfil_sla_s)},
        actor=actor,
    )
    notify_due(conn)
    return conn.execute(select(_order).where(_order.c.id == order_id)).one()

"""Supplier callbacks: verified, bound to the supplier connection and to one of *our*
purchases from that supplier, deduplicated by event id, then applied like any other answer.

A callback is only ever a faster way to learn what a poll would tell us: the order is also
polled on schedule, so a lost or refused callback delays an order, never strands it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.db import notify_due, table
from kameng.errors import ErrorCode, KamengError
from kameng.orders import fulfil
from kameng.orders.state import Stage, Status
from kameng.pipeline import apply, wakeup
from kameng.pipeline.apply import Timing
from kameng.pipeline.metrics import CALLBACKS
from kameng.pipeline.registry import Adapters
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import LIVE_STATES, ProcurementState, Supplier
from kameng.suppliers.port import CallbackEvent, CallbackRefused

_supplier = table(Supplier)


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    body: dict[str, Any]


REFUSAL_STATUS = {"bad_signature": 401, "unknown_supplier": 404, "unknown_order": 404}


def _apply(conn: Connection, container: Container, supplier: Any, event: CallbackEvent) -> str:
    proc = suppliers.procurement_by_out_trade_no(
        conn, supplier_id=supplier.id, out_trade_no=event.out_trade_no
    )
    if proc is None:
        # Signed by this supplier but not about anything we bought from it: refuse, so a
        # supplier can never touch another supplier's (or a made-up) order.
        raise CallbackRefused("unknown_order")
    outcome = event.result.outcome.value if event.result is not None else "nudge"
    now = container.clock()
    if not suppliers.remember_event(
        conn,
        supplier_id=supplier.id,
        event_id=event.event_id,
        out_trade_no=event.out_trade_no,
        outcome=outcome,
        now=now,
    ):
        return "duplicate"
    if event.result is None:
        # Their webhook says "something changed": poll now instead of at the next scheduled time.
        if ProcurementState(proc.state) in LIVE_STATES:
            loaded = fulfil.load(conn, order_id=proc.order_id)
            if (
                loaded is not None
                and loaded.order.status in (Status.fulfilling.value, Status.backordered.value)
                and loaded.order.stage != Stage.staff_processing.value
            ):
                fulfil.reschedule(conn, order=loaded.order, next_action_at=now)
                notify_due(conn)
        return "nudged"
    s = container.settings
    return apply.apply_result(
        conn,
        vault=container.vault,
        accounts=container.accounts,
        procurement=proc,
        supplier_code=supplier.code,
        result=event.result,
        now=now,
        timing=Timing(
            poll_s=s.supplier_poll_s,
            retry_cap_s=s.supplier_retry_cap_s,
            backorder_retry_s=s.backorder_retry_s,
            buyer_action_s=s.buyer_action_sla_s,
        ),
        via="callback",
        promises=suppliers.Promises.of(supplier),
    )


async def receive(
    container: Container,
    adapters: Adapters,
    *,
    supplier_code: str,
    headers: dict[str, str],
    body: bytes,
) -> Answer:
    def find(conn: Connection) -> Any:
        return conn.execute(select(_supplier).where(_supplier.c.code == supplier_code)).first()

    with container.db.connect(write=False) as conn:
        supplier = find(conn)
    if supplier is None:
        CALLBACKS.labels("unknown_supplier").inc()
        return Answer(404, {"status": "refused", "code": "unknown_supplier"})
    try:
        event = adapters.get(supplier).parse_callback(
            headers=headers, body=body, now=int(time.time())
        )
    except CallbackRefused as exc:
        CALLBACKS.labels(exc.code).inc()
        return Answer(REFUSAL_STATUS.get(exc.code, 400), {"status": "refused", "code": exc.code})
    for attempt in range(3):
        try:
            outcome = await container.writer.run_async(
                lambda conn: _apply(conn, container, supplier, event)
            )
            break
        except CallbackRefused as exc:
            CALLBACKS.labels(exc.code).inc()
            return Answer(
                REFUSAL_STATUS.get(exc.code, 400), {"status": "refused", "code": exc.code}
            )
        except KamengError as exc:
            if exc.code is not ErrorCode.concurrent_update or attempt == 2:
                raise
    CALLBACKS.labels(outcome).inc()
    if outcome == "nudged":
        wakeup.DOORBELL.ring()
    return Answer(200, {"status": "ok", "outcome": outcome})

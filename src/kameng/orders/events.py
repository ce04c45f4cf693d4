"""Order events (the timeline) and what a paid order's first move produced.

Shared by placing (`service`), payment landing (`checkout`), screening and every transition:
every event row is checked against the transition table when it is built, so a forbidden move
cannot be written anywhere; and every row is written by `record`, which writes the order's
notifications with it, so no state change can go unannounced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from kameng.db import MultiInsert, db_time
from kameng.inventory import service as inventory
from kameng.notify import service as notify_service
from kameng.notify.service import OrderTarget
from kameng.orders.state import Stage, Status, check_transition

INSERT_EVENTS = MultiInsert(
    "order_events",
    ("order_id", "from_status", "to_status", "stage", "reason", "actor", "details", "at"),
)


def record(
    conn: Connection,
    events: list[dict[str, Any]],
    *,
    notify: OrderTarget | None,
    now: datetime,
) -> None:
    """Write timeline rows and, for an order with a `notify_url`, one notification per row —
    in the caller's transaction, so both commit with the change or neither does."""
    INSERT_EVENTS.run(conn, events)
    notify_service.order_updates(conn, target=notify, changes=events, now=now)


def event_row(
    conn: Connection,
    order_id: int,
    from_status: Status | None,
    to_status: Status,
    stage: Stage | None,
    reason: str,
    actor: str,
    now: datetime,
    details: dict[str, Any] | None = None,
    *,
    late_payment: bool = False,
) -> dict[str, Any]:
    move = check_transition(from_status, to_status, stage, late_payment=late_payment)
    return {
        "order_id": order_id,
        "from_status": move.from_status.value if move.from_status else None,
        "to_status": move.to_status.value,
        "stage": move.stage.value,
        "reason": reason,
        "actor": actor,
        "details": json.dumps(details or {}, ensure_ascii=False),
        "at": db_time(conn, now),
    }


@dataclass(frozen=True, slots=True)
class Started:
    """Where a just-paid order went first, as `start_fulfilment` decided and wrote it."""

    status: Status
    stage: Stage
    reason: str
    claimed: list[inventory.ClaimedKey] | None
    next_action_at: datetime | None
    sla_deadline: datetime | None
    hold_id: int | None

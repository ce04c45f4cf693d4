"""Order events (the timeline) and what a paid order's first move produced.

Shared by placing (`service`) and screening (`screening`): every event row is checked against
the transition table when it is built, so a forbidden move cannot be written anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from kameng.db import MultiInsert, db_time
from kameng.inventory import service as inventory
from kameng.orders.state import Stage, Status, check_transition

INSERT_EVENTS = MultiInsert(
    "order_events",
    ("order_id", "from_status", "to_status", "stage", "reason", "actor", "details", "at"),
)


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

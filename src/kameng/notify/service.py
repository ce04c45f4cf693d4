"""Writing outbox rows, and the figures housekeeping and /metrics read from them.

An order's notifications are written where its timeline is written (`orders.events.record`),
one row per state change, in the same transaction: no path that changes an order can forget to
announce it, and nothing is announced that did not commit. The worker sends them afterwards
(`pipeline/outbox.py`: signing needs the reseller's credentials, which live above this layer).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection

from kameng.db import MultiInsert, db_time, table
from kameng.notify.models import OutboxMessage

_outbox = table(OutboxMessage)

ORDER_UPDATED = "order.updated"

_INSERT = MultiInsert(
    "outbox",
    (
        "event_id",
        "topic",
        "order_id",
        "target_url",
        "payload",
        "state",
        "attempts",
        "due_at",
        "created_at",
        "last_error",
    ),
)


@dataclass(frozen=True, slots=True)
class OrderTarget:
    """Who hears about an order's changes: its `notify_url`, with what identifies the order."""

    order_id: int
    order_no: str
    customer_ref: str
    notify_url: str

    @classmethod
    def of(cls, order: Any) -> OrderTarget | None:
        """From an order row (it must carry `notify_url`: a row read without it would silently
        skip the notification, so that is an error); None when it has nobody to notify."""
        url = order.notify_url or ""
        if not url:
            return None
        return cls(int(order.id), str(order.order_no), str(order.customer_ref or ""), url)


def order_updates(
    conn: Connection, *, target: OrderTarget | None, changes: list[dict[str, Any]], now: datetime
) -> None:
    """One `order.updated` row per state change (event rows as `orders.events` builds them),
    in one statement; nothing when the order has nobody to notify."""
    if target is None or not changes:
        return
    at = db_time(conn, now)
    rows = []
    for change in changes:
        event_id = "evt_" + uuid.uuid4().hex
        payload = {
            "event_id": event_id,
            "type": ORDER_UPDATED,
            "order_no": target.order_no,
            "customer_ref": target.customer_ref,
            "status": change["to_status"],
            "stage": change["stage"],
            "reason": change["reason"],
            "at": now.isoformat(),
        }
        rows.append(
            {
                "event_id": event_id,
                "topic": ORDER_UPDATED,
                "order_id": target.order_id,
                "target_url": target.notify_url,
                "payload": json.dumps(payload, ensure_ascii=False),
                "state": "pending",
                "attempts": 0,
                "due_at": at,
                "created_at": at,
                "last_error": "",
            }
        )
    _INSERT.run(conn, rows)


def enqueue(
    conn: Connection,
    *,
    topic: str,
    target_url: str,
    payload: dict[str, Any],
    now: datetime,
    order_id: int | None = None,
    event_id: str | None = None,
) -> str:
    """Any other notification (an operator's hook, say); returns its event id."""
    event_id = event_id or "evt_" + uuid.uuid4().hex
    conn.execute(
        insert(_outbox).values(
            event_id=event_id,
            topic=topic,
            order_id=order_id,
            target_url=target_url,
            payload={"event_id": event_id, **payload},
            state="pending",
            attempts=0,
            due_at=now,
            created_at=now,
            last_error="",
        )
    )
    return event_id


def pending_count(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(_outbox).where(_outbox.c.state == "pending")
        ).scalar_one()
    )


def prune_sent(conn: Connection, *, older_than: datetime) -> int:
    return conn.execute(
        delete(_outbox).where(_outbox.c.state == "sent", _outbox.c.sent_at < older_than)
    ).rowcount

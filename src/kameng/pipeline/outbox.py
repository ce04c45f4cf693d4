"""Sending the outbox: notifications leave only after the change they announce has committed.

Rows are written by the change itself (`kameng.notify`, from the order's transition); the
worker sends them here, signed like every kameng webhook (`X-Kameng-Signature: t=…,v1=…`),
retrying with capped, jittered backoff. The `event_id` is stable across retries so receivers
can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import random
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.db import table
from kameng.notify.models import OutboxMessage
from kameng.orders.models import Order
from kameng.resellers import service as resellers
from kameng.security.signing import webhook_signature

_outbox = table(OutboxMessage)
_order = table(Order)
log = logging.getLogger("kameng.outbox")

MAX_ATTEMPTS = 12  # about 1.5 h of retries with the backoff below
LEASE_S = 60


def backoff_s(attempt: int, *, base: float = 2.0, cap: float = 900.0) -> float:
    """Capped exponential backoff with full jitter (never 0, so a retry storm spreads out)."""
    return max(0.5, random.uniform(0, min(cap, base * 2 ** max(attempt - 1, 0))))


def _claim(conn: Connection, *, now: datetime, limit: int) -> list[Any]:
    stmt = (
        select(_outbox)
        .where(_outbox.c.state == "pending", _outbox.c.due_at <= now)
        .order_by(_outbox.c.due_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(conn.execute(stmt).all())
    if rows:
        conn.execute(
            update(_outbox)
            .where(_outbox.c.id.in_([r.id for r in rows]))
            .values(due_at=now + timedelta(seconds=LEASE_S))
        )
    return rows


# Events for the operator's own hooks (not a reseller's): signed with the operator's secret
# when one is configured, sent unsigned otherwise.
OPERATOR_TOPICS = ("review.",)


def _secrets_for(
    conn: Connection, container: Container, order_id: int | None, topic: str = ""
) -> list[str]:
    if topic.startswith(OPERATOR_TOPICS):
        secret = container.settings.review_escalation_secret
        return [secret] if secret else []
    if order_id is None:
        return []
    reseller_id = conn.execute(select(_order.c.reseller_id).where(_order.c.id == order_id)).scalar()
    if reseller_id is None:
        return []
    return resellers.webhook_secrets(conn, container.vault, reseller_id=int(reseller_id))


async def send_due(container: Container, client: httpx.AsyncClient, *, limit: int = 50) -> int:
    """Send what is due; returns how many were attempted."""
    now = container.clock()

    def claim(conn: Connection) -> list[tuple[Any, list[str]]]:
        return [
            (r, _secrets_for(conn, container, r.order_id, r.topic))
            for r in _claim(conn, now=now, limit=limit)
        ]

    batch = await container.writer.run_async(claim)
    for row, secrets in batch:
        body = json.dumps(row.payload, ensure_ascii=False, separators=(",", ":")).encode()
        ts = int(now.timestamp())
        header = f"t={ts}," + ",".join(f"v1={webhook_signature(s, ts, body)}" for s in secrets)
        error = ""
        try:
            response = await client.post(
                row.target_url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Kameng-Signature": header,
                    "X-Kameng-Event": row.event_id,
                },
            )
            if response.status_code >= 300:
                error = f"http {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        if not secrets and not row.topic.startswith(OPERATOR_TOPICS):
            error = error or "no active credential to sign with"
        attempts = row.attempts + 1

        def settle(
            conn: Connection, row: Any = row, error: str = error, attempts: int = attempts
        ) -> None:
            done = container.clock()
            if not error:
                values: dict[str, Any] = {"state": "sent", "sent_at": done}
            elif attempts >= MAX_ATTEMPTS:
                values = {"state": "failed", "last_error": error[:200]}
                log.warning("webhook %s failed for good: %s", row.event_id, error)
            else:
                values = {
                    "due_at": done + timedelta(seconds=backoff_s(attempts)),
                    "last_error": error[:200],
                }
            conn.execute(
                update(_outbox).where(_outbox.c.id == row.id).values(attempts=attempts, **values)
            )

        await container.writer.run_async(settle)
    return len(batch)

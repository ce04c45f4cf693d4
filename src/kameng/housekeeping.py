"""Periodic clean-up of data whose job is done: expired nonces, old idempotency records,
expired member sessions, risk facts and screening records past their retention.

Supplier callback event ids and sent notifications are kept a week.
Nonces only need remembering for twice the signature window (a replay outside the window is
refused by its timestamp anyway); idempotency records are kept for 7 days, well past any
client's retry horizon.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from kameng.container import Container
from kameng.idempotency import service as idem
from kameng.members import service as members
from kameng.notify import service as notify
from kameng.resellers import service as resellers
from kameng.risk import records as risk_records
from kameng.suppliers import service as suppliers

IDEMPOTENCY_RETENTION = timedelta(days=7)
# Suppliers retry callbacks for hours, not weeks: a week of event ids is plenty to drop
# duplicates, and sent notifications are kept as long for support questions.
EVENT_RETENTION = timedelta(days=7)
INTERVAL_S = 60.0
log = logging.getLogger("kameng.housekeeping")


def prune(container: Container) -> dict[str, int]:
    now = container.clock()
    with container.db.connect() as conn:
        nonces = resellers.prune_nonces(conn, now=now)
        records = idem.prune(conn, older_than=now - IDEMPOTENCY_RETENTION)
        events = suppliers.prune_events(conn, older_than=now - EVENT_RETENTION)
        sent = notify.prune_sent(conn, older_than=now - EVENT_RETENTION)
        sessions = members.prune_sessions(conn, now=now)
        risk_rows = risk_records.prune(
            conn,
            now=now,
            facts_days=container.settings.risk_facts_retention_days,
            screenings_days=container.settings.risk_screenings_retention_days,
        )
    return {
        **risk_rows,
        "member_sessions": sessions,
        "nonces": nonces,
        "idempotency_records": records,
        "supplier_events": events,
        "outbox_sent": sent,
    }


async def run_forever(container: Container, interval_s: float = INTERVAL_S) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(prune, container)
        except Exception as exc:  # keep serving; the next round retries
            log.warning("housekeeping failed: %s", type(exc).__name__)

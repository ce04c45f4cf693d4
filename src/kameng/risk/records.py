"""Stored risk records after the fact: a buyer's history for reviewers, and retention.

Both read across orders and risk facts for people (reviewers) or housekeeping, never on the
order hot path; screening itself lives in `service`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from kameng.db import RawSQL, db_time
from kameng.risk import attributes

_HISTORY = text(
    "SELECT o.order_no, o.status, o.reason, o.amount_cents, o.currency, o.channel, "
    "o.created_at, f.ip, f.account FROM risk_facts f JOIN orders o ON o.id = f.order_id "
    "WHERE f.buyer = :buyer ORDER BY f.created_at DESC, f.order_id DESC LIMIT 20"
)
_HISTORY_SUMMARY = text(
    "SELECT o.status, COUNT(*), SUM(o.amount_cents) FROM risk_facts f "
    "JOIN orders o ON o.id = f.order_id WHERE f.buyer = :buyer GROUP BY o.status"
)


def buyer_history(conn: Connection, *, order_id: int) -> dict[str, Any]:
    """What a reviewer needs to judge the buyer: their recent orders and how they ended."""
    fact = conn.execute(
        text("SELECT buyer, account, ip FROM risk_facts WHERE order_id = :oid"), {"oid": order_id}
    ).first()
    if fact is None:
        return {"buyer": None, "recent": [], "by_status": {}}
    recent = [
        {
            "order_no": r.order_no,
            "status": r.status,
            "reason": r.reason,
            "amount_cents": int(r.amount_cents),
            "currency": r.currency,
            "channel": r.channel,
            "created_at": r.created_at.isoformat()
            if isinstance(r.created_at, datetime)
            else str(r.created_at),
            "ip": r.ip,
            "account": r.account,
        }
        for r in conn.execute(_HISTORY, {"buyer": fact.buyer})
    ]
    by_status = {
        str(r[0]): {"orders": int(r[1]), "amount_cents": int(r[2] or 0)}
        for r in conn.execute(_HISTORY_SUMMARY, {"buyer": fact.buyer})
    }
    account_buyers = 0
    if fact.account:
        account_buyers = int(
            conn.execute(
                text("SELECT COUNT(DISTINCT buyer) FROM risk_facts WHERE account = :a"),
                {"a": fact.account},
            ).scalar_one()
        )
    return {
        "buyer": fact.buyer,
        "recent": recent,
        "by_status": by_status,
        "recharge_account_buyers": account_buyers,
    }


# -- retention ----------------------------------------------------------------------------------

PRUNE_BATCH = 5000
_PRUNE_FACTS = RawSQL(
    "DELETE FROM risk_facts WHERE order_id IN (SELECT order_id FROM risk_facts "
    f"WHERE created_at < :cut ORDER BY created_at LIMIT {PRUNE_BATCH})"
)
_PRUNE_SCREENINGS = RawSQL(
    "DELETE FROM risk_screenings WHERE id IN (SELECT id FROM risk_screenings "
    f"WHERE at < :cut ORDER BY at LIMIT {PRUNE_BATCH})"
)


def prune(
    conn: Connection, *, now: datetime, facts_days: int, screenings_days: int
) -> dict[str, int]:
    """Drop facts and screening records past their retention, a batch per call (housekeeping
    calls it every minute, so a backlog drains without one long lock). Facts are kept at least
    a day longer than the longest counter window, whatever the setting says."""
    facts_keep = max(
        timedelta(days=facts_days), timedelta(seconds=attributes.MAX_WINDOW_S + 86_400)
    )
    screenings_keep = max(timedelta(days=screenings_days), timedelta(days=1))
    facts = _PRUNE_FACTS.run(conn, {"cut": db_time(conn, now - facts_keep)})
    screenings = _PRUNE_SCREENINGS.run(conn, {"cut": db_time(conn, now - screenings_keep)})
    try:
        return {"risk_facts": facts.rowcount, "risk_screenings": screenings.rowcount}
    finally:
        facts.close()
        screenings.close()

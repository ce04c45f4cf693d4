"""The review queue itself: items, claims and decisions, without moving orders.

Claims and decisions are compare-and-set on the item's `version`: of two reviewers acting at
once, one wins and the other gets a clear refusal naming who holds the item. Moving the order
(deliver, procure, refund) is `review.actions`, which calls these in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.db import RawSQL, db_time, table
from kameng.errors import ErrorCode, KamengError
from kameng.review.models import OPEN_STATUSES, ItemStatus, ReviewDecision, ReviewItem

_item = table(ReviewItem)
_decision = table(ReviewDecision)

_OPEN = tuple(s.value for s in OPEN_STATUSES)


@dataclass(frozen=True, slots=True)
class ReviewPolicy:
    """How the queue behaves; from settings (KAMENG_REVIEW_*)."""

    sla_s: int = 1800
    claim_s: int = 900
    two_reviewers_from_cents: int = 100_000
    # At the SLA, an order under this amount is approved; at or above it, refunded.
    auto_approve_below_cents: int = 10_000


_INSERT_ITEM = RawSQL(
    "INSERT INTO review_items (order_id, status, category, rule_code, reasons, score, "
    "amount_cents, currency, opened_at, sla_deadline, claimed_by, first_approver, decided_by, "
    "decision_note, version) VALUES (:order_id, 'open', :category, :rule_code, :reasons, "
    ":score, :amount_cents, :currency, :opened_at, :sla_deadline, '', '', '', '', 1)"
)


def open_item(
    conn: Connection,
    *,
    order_id: int,
    category: str,
    rule_code: str,
    reasons: list[dict[str, Any]],
    score: int,
    amount_cents: int,
    currency: str,
    sla_deadline: datetime,
    now: datetime,
) -> None:
    _INSERT_ITEM.run(
        conn,
        {
            "order_id": order_id,
            "category": category,
            "rule_code": rule_code,
            "reasons": json.dumps(reasons, ensure_ascii=False),
            "score": score,
            "amount_cents": amount_cents,
            "currency": currency,
            "opened_at": db_time(conn, now),
            "sla_deadline": db_time(conn, sla_deadline),
        },
    ).close()


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    order_id: int
    status: str
    category: str
    rule_code: str
    reasons: list[dict[str, Any]]
    score: int
    amount_cents: int
    currency: str
    opened_at: datetime
    sla_deadline: datetime
    claimed_by: str
    claim_expires_at: datetime | None
    first_approver: str
    decided_by: str
    decided_at: datetime | None
    decision_note: str
    escalated_at: datetime | None
    version: int

    @property
    def is_open(self) -> bool:
        return self.status in _OPEN

    def holder(self, now: datetime) -> str:
        """Who holds the claim now ('' when nobody does or the claim ran out)."""
        if self.claimed_by and self.claim_expires_at is not None and self.claim_expires_at > now:
            return self.claimed_by
        return ""

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "order_id": self.order_id,
            "status": self.status,
            "category": self.category,
            "rule": self.rule_code,
            "reasons": self.reasons,
            "score": self.score,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "opened_at": self.opened_at.isoformat(),
            "sla_deadline": self.sla_deadline.isoformat(),
            "age_s": int((now - self.opened_at).total_seconds()),
            "claimed_by": self.holder(now),
            "claim_expires_at": (
                self.claim_expires_at.isoformat()
                if self.holder(now) and self.claim_expires_at
                else None
            ),
            "first_approver": self.first_approver,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "note": self.decision_note,
            "escalated": self.escalated_at is not None,
        }


def _item_of(row: Any) -> Item:
    return Item(
        id=int(row.id),
        order_id=int(row.order_id),
        status=str(row.status),
        category=str(row.category),
        rule_code=str(row.rule_code),
        reasons=list(row.reasons or []),
        score=int(row.score),
        amount_cents=int(row.amount_cents),
        currency=str(row.currency),
        opened_at=row.opened_at,
        sla_deadline=row.sla_deadline,
        claimed_by=str(row.claimed_by),
        claim_expires_at=row.claim_expires_at,
        first_approver=str(row.first_approver),
        decided_by=str(row.decided_by),
        decided_at=row.decided_at,
        decision_note=str(row.decision_note),
        escalated_at=row.escalated_at,
        version=int(row.version),
    )


def get_item(conn: Connection, *, item_id: int, lock: bool = False) -> Item:
    stmt = select(_item).where(_item.c.id == item_id)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise KamengError(ErrorCode.review_item_not_found)
    return _item_of(row)


def item_of_order(conn: Connection, *, order_id: int) -> Item | None:
    row = conn.execute(select(_item).where(_item.c.order_id == order_id)).first()
    return _item_of(row) if row is not None else None


def list_items(
    conn: Connection, *, status: str | None = None, limit: int = 100, offset: int = 0
) -> list[Item]:
    stmt = select(_item)
    if status == "open":
        stmt = stmt.where(_item.c.status.in_(_OPEN)).order_by(_item.c.sla_deadline, _item.c.id)
    elif status:
        stmt = stmt.where(_item.c.status == status).order_by(_item.c.id.desc())
    else:
        stmt = stmt.order_by(_item.c.id.desc())
    return [_item_of(r) for r in conn.execute(stmt.limit(min(limit, 500)).offset(offset))]


def decisions_of(conn: Connection, *, item_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(_decision).where(_decision.c.item_id == item_id).order_by(_decision.c.id)
    )
    return [
        {"actor": r.actor, "action": r.action, "note": r.note, "at": r.at.isoformat()} for r in rows
    ]


_CAS = (
    update(_item)
    .where(_item.c.id == bindparam("iid"), _item.c.version == bindparam("expected"))
    .values(version=bindparam("next_version"))
)


def _cas(conn: Connection, item: Item, **values: Any) -> None:
    changed = conn.execute(
        _CAS.values(**values),
        {"iid": item.id, "expected": item.version, "next_version": item.version + 1},
    ).rowcount
    if changed != 1:
        # Someone acted first: say who holds it now, or what became of it.
        fresh = get_item(conn, item_id=item.id)
        if not fresh.is_open:
            raise KamengError(ErrorCode.review_already_decided, status=fresh.status)
        raise KamengError(
            ErrorCode.review_claimed_by_other,
            reviewer=fresh.claimed_by or "?",
            until=fresh.claim_expires_at.isoformat() if fresh.claim_expires_at else "-",
        )


def log(conn: Connection, *, item: Item, actor: str, action: str, note: str, now: datetime) -> None:
    conn.execute(
        insert(_decision).values(
            item_id=item.id, order_id=item.order_id, actor=actor, action=action, note=note, at=now
        )
    )
    audit.record_on(
        conn,
        actor=actor,
        action=f"review_{action}",
        target_type="order",
        target_id=item.order_id,
        now=now,
        details={"item": item.id, "note": note[:500]},
    )


def claim(
    conn: Connection, *, item_id: int, reviewer: str, policy: ReviewPolicy, now: datetime
) -> Item:
    """Take an item (or extend one's own claim). An expired claim can be taken over."""
    item = get_item(conn, item_id=item_id)
    if not item.is_open:
        raise KamengError(ErrorCode.review_already_decided, status=item.status)
    holder = item.holder(now)
    if holder and holder != reviewer:
        raise KamengError(
            ErrorCode.review_claimed_by_other,
            reviewer=holder,
            until=item.claim_expires_at.isoformat() if item.claim_expires_at else "-",
        )
    if item.status == ItemStatus.second.value and item.first_approver == reviewer:
        raise KamengError(ErrorCode.review_second_reviewer_required, first=reviewer)
    status = ItemStatus.second.value if item.status == ItemStatus.second.value else "claimed"
    until = now + timedelta(seconds=policy.claim_s)
    _cas(conn, item, status=status, claimed_by=reviewer, claim_expires_at=until)
    log(conn, item=item, actor=reviewer, action="claim", note="", now=now)
    return get_item(conn, item_id=item_id)


def release(conn: Connection, *, item_id: int, reviewer: str, now: datetime) -> Item:
    item = get_item(conn, item_id=item_id)
    if not item.is_open:
        raise KamengError(ErrorCode.review_already_decided, status=item.status)
    if item.holder(now) != reviewer:
        raise KamengError(ErrorCode.review_not_claimed)
    status = ItemStatus.second.value if item.status == ItemStatus.second.value else "open"
    _cas(conn, item, status=status, claimed_by="", claim_expires_at=None)
    log(conn, item=item, actor=reviewer, action="release", note="", now=now)
    return get_item(conn, item_id=item_id)


def check_decider(item: Item, *, reviewer: str, now: datetime) -> None:
    """A decision needs the decider's own live claim."""
    if not item.is_open:
        raise KamengError(ErrorCode.review_already_decided, status=item.status)
    holder = item.holder(now)
    if holder != reviewer:
        if holder:
            raise KamengError(
                ErrorCode.review_claimed_by_other,
                reviewer=holder,
                until=item.claim_expires_at.isoformat() if item.claim_expires_at else "-",
            )
        raise KamengError(ErrorCode.review_not_claimed)


def record_first_approval(
    conn: Connection, *, item: Item, reviewer: str, note: str, now: datetime
) -> Item:
    """Above the two-reviewer amount, a first approval waits for a different reviewer."""
    _cas(
        conn,
        item,
        status=ItemStatus.second.value,
        first_approver=reviewer,
        claimed_by="",
        claim_expires_at=None,
    )
    log(conn, item=item, actor=reviewer, action="approve_first", note=note, now=now)
    return get_item(conn, item_id=item.id)


def close(
    conn: Connection, *, item: Item, status: ItemStatus, actor: str, note: str, now: datetime
) -> None:
    _cas(
        conn,
        item,
        status=status.value,
        decided_by=actor,
        decided_at=now,
        decision_note=note[:2000],
        claimed_by="",
        claim_expires_at=None,
    )
    action = {
        ItemStatus.approved: "approve",
        ItemStatus.rejected: "reject",
        ItemStatus.canceled: "canceled",
    }[status]
    log(conn, item=item, actor=actor, action=action, note=note, now=now)


def mark_escalated(conn: Connection, *, item: Item, now: datetime) -> None:
    conn.execute(update(_item).where(_item.c.id == item.id).values(escalated_at=now))


# -- figures for /metrics and the queue endpoint ------------------------------------------------


def queue_figures(conn: Connection, *, now: datetime) -> dict[str, Any]:
    row = conn.execute(
        select(func.count(), func.min(_item.c.opened_at)).where(_item.c.status.in_(_OPEN))
    ).one()
    depth, oldest = int(row[0]), row[1]
    hour_ago = now - timedelta(hours=1)
    decided = conn.execute(
        select(func.count())
        .select_from(_decision)
        .where(_decision.c.at >= hour_ago, _decision.c.action.in_(("approve", "reject")))
    ).scalar_one()
    breaches = conn.execute(
        select(func.count()).select_from(_item).where(_item.c.escalated_at.is_not(None))
    ).scalar_one()
    overdue = conn.execute(
        select(func.count())
        .select_from(_item)
        .where(_item.c.status.in_(_OPEN), _item.c.sla_deadline < now)
    ).scalar_one()
    return {
        "depth": depth,
        "oldest_age_s": int((now - oldest).total_seconds()) if oldest is not None else 0,
        "decisions_last_hour": int(decided),
        "sla_breaches_total": int(breaches),
        "open_past_sla": int(overdue),
    }

"""Measuring misjudgement: a rule set replayed over stored orders, and the shadow set's record.

A backtest recomputes every attribute as it was when each order was placed (velocity counters
count the facts up to that moment; they are append-only, so the past is reproducible), then
evaluates the chosen rule set. Two things are not replayed: list changes made since (lists are
read as they are now) and payments that failed after the order (the `failed` flag is read as it
is now). Where a reviewer decided an order, the flagged-then-approved share is the measured
false-positive rate of the rules that flagged it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from kameng.db import db_time, utcnow
from kameng.risk import attributes
from kameng.risk import lists as risk_lists
from kameng.risk import service as risk
from kameng.risk.attributes import Subject
from kameng.risk.rules import Action, attributes_used, evaluate

_ORDERS = (
    "SELECT f.order_id, f.buyer, f.ip, f.device, f.email, f.account, f.created_at, "
    "o.channel, o.member_id, o.reseller_id, l.quantity, l.unit_price_cents, p.risk_level, "
    "p.delivery_kind, m.created_at AS member_since, r.created_at AS reseller_since, "
    "ri.status AS review_status, ri.decided_by AS review_by, "
    "(SELECT s.action FROM risk_screenings s WHERE s.order_id = f.order_id AND s.mode = 'live' "
    " ORDER BY s.id DESC LIMIT 1) AS live_action "
    "FROM risk_facts f JOIN orders o ON o.id = f.order_id "
    "JOIN order_lines l ON l.order_id = o.id "
    "JOIN skus k ON k.id = o.sku_id JOIN products p ON p.id = k.product_id "
    "LEFT JOIN members m ON m.id = o.member_id "
    "LEFT JOIN resellers r ON r.id = o.reseller_id "
    "LEFT JOIN review_items ri ON ri.order_id = o.id "
    "WHERE f.created_at >= :since AND f.created_at <= :until "
    "ORDER BY f.created_at, f.order_id LIMIT :limit"
)

# Reviewer outcomes (a human's decision, not the SLA's default action).
HUMAN = "staff:"


@dataclass
class BacktestResult:
    version: int
    screened: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    by_rule: Counter[str] = field(default_factory=Counter)
    changed_vs_live: Counter[str] = field(default_factory=Counter)
    flagged_reviewed: int = 0
    flagged_then_approved: int = 0
    flagged_then_rejected: int = 0

    @property
    def flagged(self) -> int:
        return self.actions[Action.review.value] + self.actions[Action.block.value]

    @property
    def false_positive_rate(self) -> float | None:
        if not self.flagged_reviewed:
            return None
        return self.flagged_then_approved / self.flagged_reviewed

    def as_json(self) -> dict[str, Any]:
        fpr = self.false_positive_rate
        return {
            "version": self.version,
            "screened": self.screened,
            "allow": self.actions[Action.allow.value],
            "review": self.actions[Action.review.value],
            "block": self.actions[Action.block.value],
            "flagged": self.flagged,
            "review_rate": round(self.actions[Action.review.value] / self.screened, 4)
            if self.screened
            else None,
            "by_rule": dict(self.by_rule.most_common()),
            "changed_vs_live": dict(self.changed_vs_live),
            "flagged_reviewed": self.flagged_reviewed,
            "flagged_then_approved": self.flagged_then_approved,
            "flagged_then_rejected": self.flagged_then_rejected,
            "false_positive_rate": round(fpr, 4) if fpr is not None else None,
        }


def _aware(value: datetime | None) -> datetime | None:
    """Times without a zone (SQLite text, a date typed by hand) are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _subject(r: Any) -> Subject:
    if r.reseller_id is not None:
        kind, since = "reseller", r.reseller_since
    elif r.member_id is not None:
        kind, since = "member", r.member_since
    else:
        kind, since = "guest", None
    if isinstance(since, str):
        since = datetime.fromisoformat(since)
    since = _aware(since)
    return Subject(
        order_id=int(r.order_id),
        buyer=r.buyer,
        buyer_kind=kind,
        channel=r.channel,
        amount_cents=int(r.quantity) * int(r.unit_price_cents),
        quantity=int(r.quantity),
        unit_price_cents=int(r.unit_price_cents),
        product_risk=int(r.risk_level),
        delivery_kind=r.delivery_kind,
        ip=r.ip,
        device=r.device,
        email=r.email,
        account=r.account,
        buyer_since=since,
    )


def backtest(
    conn: Connection,
    *,
    version: int,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 5000,
    now: datetime | None = None,
) -> BacktestResult:
    rules = risk.check_rule_set(risk.get_rule_set(conn, version=version).rules)
    needed: frozenset[str] = frozenset().union(*(attributes_used(r.when) for r in rules))
    lists = risk_lists.load_lists(conn)
    result = BacktestResult(version=version)
    rows = conn.execute(
        text(_ORDERS),
        {
            "since": db_time(conn, _aware(since) or datetime(2000, 1, 1, tzinfo=UTC)),
            "until": db_time(conn, _aware(until) or now or utcnow()),
            "limit": limit,
        },
    ).all()
    for r in rows:
        at = r.created_at
        if isinstance(at, str):
            at = datetime.fromisoformat(at)
        at = _aware(at)
        assert at is not None
        subject = _subject(r)
        attrs = attributes.gather(conn, subject=subject, lists=lists, needed=needed, now=at)
        verdict = evaluate(rules, attrs)
        result.screened += 1
        result.actions[verdict.action.value] += 1
        for code in verdict.matched:
            result.by_rule[code] += 1
        if r.live_action and r.live_action != verdict.action.value:
            result.changed_vs_live[f"{r.live_action}->{verdict.action.value}"] += 1
        if verdict.action is not Action.allow and str(r.review_by or "").startswith(HUMAN):
            result.flagged_reviewed += 1
            if r.review_status == "approved":
                result.flagged_then_approved += 1
            elif r.review_status == "rejected":
                result.flagged_then_rejected += 1
    return result


_SHADOW = text(
    "SELECT l.action AS live, s.action AS shadow, ri.status AS review_status, "
    "ri.decided_by AS review_by FROM risk_screenings s "
    "JOIN risk_screenings l ON l.order_id = s.order_id AND l.mode = 'live' "
    "LEFT JOIN review_items ri ON ri.order_id = s.order_id "
    "WHERE s.mode = 'shadow' AND s.rule_set_version = :version"
)


def shadow_report(conn: Connection, *, version: int | None = None) -> dict[str, Any]:
    """What the shadow set would have decided next to what the live set did, order by order."""
    if version is None:
        version = conn.execute(
            text(
                "SELECT rule_set_version FROM risk_screenings WHERE mode = 'shadow' "
                "ORDER BY id DESC LIMIT 1"
            )
        ).scalar()
        if version is None:
            return {"version": None, "orders": 0, "matrix": {}}
    matrix: Counter[str] = Counter()
    approved_but_flagged = 0
    rejected_but_allowed = 0
    orders = 0
    for r in conn.execute(_SHADOW, {"version": version}):
        orders += 1
        matrix[f"{r.live}->{r.shadow}"] += 1
        human = str(r.review_by or "").startswith(HUMAN)
        if human and r.review_status == "approved" and r.shadow != Action.allow.value:
            approved_but_flagged += 1
        if human and r.review_status == "rejected" and r.shadow == Action.allow.value:
            rejected_but_allowed += 1
    return {
        "version": int(version),
        "orders": orders,
        "matrix": dict(matrix),
        "agreement": round(
            sum(v for k, v in matrix.items() if k.split("->")[0] == k.split("->")[1]) / orders, 4
        )
        if orders
        else None,
        "would_flag_reviewer_approved": approved_but_flagged,
        "would_allow_reviewer_rejected": rejected_but_allowed,
    }

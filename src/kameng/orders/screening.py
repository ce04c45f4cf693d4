"""Screening a paid order: the facts it is judged on and the decision it gets.

Screening runs in the transaction that takes the money, right before fulfilment starts, so an
order is never paid and unscreened, and a flagged order holds its money (and its keys, when in
stock) from the first moment. What the buyer is told is a plain category and when a decision is
due; the rule itself stays with the reviewers.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind
from kameng.catalog.service import SkuInfo
from kameng.db import table
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.members.models import Member
from kameng.notify.service import OrderTarget
from kameng.orders import queries
from kameng.orders.events import Started, event_row, record
from kameng.orders.state import Stage, Status
from kameng.resellers.models import Reseller
from kameng.review import service as review
from kameng.risk import service as risk
from kameng.risk.attributes import Subject, contact_email, recharge_account
from kameng.risk.models import RiskFact
from kameng.risk.rules import Action

_fact = table(RiskFact)
_member = table(Member)
_reseller = table(Reseller)


@dataclass(frozen=True, slots=True)
class Context:
    """Where an order came from, as the edge saw it (IP, browser cookie, account email)."""

    ip: str = ""
    device: str = ""
    email: str = ""
    buyer_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Screened:
    """The decision start_fulfilment acts on."""

    action: Action
    category: str
    rule_code: str
    score: int
    reasons: list[dict[str, Any]]
    review_deadline: datetime | None
    version: int


@functools.lru_cache(maxsize=4096)
def public_ip(ip: str) -> str:
    """The client IP as screening should count it. A loopback address means a proxy on this
    machine is in front of us and every buyer would share it: counting it would flag everyone,
    so it counts as unknown (configure the proxy to pass the client's address)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    # Canonical spelling, as the lists store it (IPv6 can be written many ways).
    return "" if addr.is_loopback else str(addr)


def subject_for(
    *,
    order_id: int,
    owner: str,
    buyer_kind: str,
    channel: str,
    sku: SkuInfo,
    quantity: int,
    unit_price_cents: int,
    fields: dict[str, str],
    context: Context,
) -> Subject:
    template = sku.field_template
    return Subject(
        order_id=order_id,
        buyer=owner,
        buyer_kind=buyer_kind,
        channel=channel,
        amount_cents=unit_price_cents * quantity,
        quantity=quantity,
        unit_price_cents=unit_price_cents,
        product_risk=sku.risk_level,
        delivery_kind=sku.delivery_kind,
        ip=public_ip(context.ip),
        device=context.device,
        email=context.email or contact_email(template, fields),
        account=recharge_account(template, fields),
        buyer_since=context.buyer_since,
    )


def stored_subject(
    conn: Connection,
    *,
    order: Any,
    sku: SkuInfo,
    quantity: int,
    unit_price_cents: int,
) -> Subject | None:
    """Rebuild an order's subject from the facts written when it was placed (gateway orders are
    screened when their payment arrives, minutes later, with the counters of that moment)."""
    fact = conn.execute(select(_fact).where(_fact.c.order_id == order.id)).first()
    if fact is None:
        return None
    since = None
    if order.member_id is not None:
        since = conn.execute(
            select(_member.c.created_at).where(_member.c.id == order.member_id)
        ).scalar()
        kind = "member"
    elif order.reseller_id is not None:
        since = conn.execute(
            select(_reseller.c.created_at).where(_reseller.c.id == order.reseller_id)
        ).scalar()
        kind = "reseller"
    else:
        kind = "guest"
    return Subject(
        order_id=order.id,
        buyer=fact.buyer,
        buyer_kind=kind,
        channel=order.channel,
        amount_cents=unit_price_cents * quantity,
        quantity=quantity,
        unit_price_cents=unit_price_cents,
        product_risk=sku.risk_level,
        delivery_kind=sku.delivery_kind,
        ip=fact.ip,
        device=fact.device,
        email=fact.email,
        account=fact.account,
        buyer_since=since,
    )


def screen(
    conn: Connection,
    *,
    engine: risk.Engine,
    subject: Subject,
    review_sla_s: int,
    now: datetime,
    loaded: risk.Loaded | None = None,
) -> Screened:
    result, rules = risk.screen(conn, engine=engine, subject=subject, now=now, loaded=loaded)
    verdict = result.verdict
    return Screened(
        action=verdict.action,
        category=verdict.category,
        rule_code=verdict.rule.code if verdict.rule else "",
        score=verdict.score,
        reasons=result.reasons(rules),
        review_deadline=(
            now + timedelta(seconds=review_sla_s) if verdict.action is Action.review else None
        ),
        version=result.rule_set_version,
    )


def divert(
    conn: Connection,
    *,
    order_id: int,
    line_id: int,
    sku: SkuInfo,
    quantity: int,
    amount: int,
    currency: str,
    wallet_id: int,
    actor: str,
    screened: Screened,
    accounts: ledger.PlatformAccounts,
    now: datetime,
    events: list[dict[str, Any]],
    notify: OrderTarget | None = None,
) -> Started:
    """A flagged order: to review, holding its money and (in stock) its keys until a reviewer
    or the SLA decides; or rejected at once with its money back in the buyer's balance."""
    events.append(
        event_row(
            conn,
            order_id,
            Status.paid,
            Status.screening,
            None,
            "risk_check",
            "system",
            now,
            {"rules": screened.version},
        )
    )
    if screened.action is Action.block:
        # The money never leaves the buyer's balance (a gateway payment stays credited to it):
        # the order records it as paid and refunded, with no ledger movement of its own.
        events.append(
            event_row(
                conn,
                order_id,
                Status.screening,
                Status.rejected,
                None,
                "risk_rejected",
                "system",
                now,
                {"category": screened.category, "refunded": amount},
            )
        )
        record(conn, events, notify=notify, now=now)
        return Started(Status.rejected, Stage.closed, "risk_rejected", None, None, None, None)
    hold_id = ledger.place_hold(
        conn,
        wallet_id=wallet_id,
        holds_account=accounts.holds_for(order_id),
        amount=amount,
        ref_type="order",
        ref_id=order_id,
        now=now,
        actor=actor,
    )
    deadline = screened.review_deadline
    assert deadline is not None
    if sku.delivery_kind == DeliveryKind.card_key.value and not queries.backorders_waiting(
        conn, sku_id=sku.id
    ):
        # Keys are set aside (not sold) so an approval can deliver at once.
        inventory.claim(conn, sku_id=sku.id, quantity=quantity, line_id=line_id, now=now, hold=True)
    reason = f"risk_review_{screened.category}"
    events.append(
        event_row(
            conn,
            order_id,
            Status.screening,
            Status.review,
            None,
            reason,
            "system",
            now,
            {"category": screened.category, "decide_by": deadline.isoformat()},
        )
    )
    record(conn, events, notify=notify, now=now)
    review.open_item(
        conn,
        order_id=order_id,
        category=screened.category,
        rule_code=screened.rule_code,
        reasons=screened.reasons,
        score=screened.score,
        amount_cents=amount,
        currency=currency,
        sla_deadline=deadline,
        now=now,
    )
    return Started(Status.review, Stage.manual_review, reason, None, deadline, deadline, hold_id)

"""Money owed to guests, paid back by the platform itself.

A guest has no balance: when a guest's order is refunded (its SLA ran out, a partial delivery)
or money arrives after the order closed, it lands in a wallet kept for that order. The worker
pays it back through the gateway the guest paid with (its refund API), without anyone asking:

1. a `payouts` row is written (`sending`) before the request leaves;
2. the gateway is asked to refund, with no transaction open;
3. `done` posts the ledger (guest wallet -> refunds) in the same transaction; `refused` keeps
   the money owed and says why. A payout left `sending` by a crash becomes `unknown`: it is
   never retried blindly (that could pay twice), staff check the gateway and decide.

Anything not `done` is visible in `kameng payments owed`, `/healthz` and `/metrics`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.ledger.models import Account
from kameng.orders.models import Order
from kameng.payments.models import Payment, Payout, PayoutState

_pay = table(Payment)
_payout = table(Payout)
_acc = table(Account)
_order = table(Order)

# A payout still `sending` after this was interrupted (the request itself times out sooner).
SENDING_LEASE = timedelta(minutes=5)

_last = (
    select(_payout.c.state, _payout.c.message)
    .where(_payout.c.payment_id == _pay.c.id)
    .order_by(_payout.c.id.desc())
    .limit(1)
)


def owed_to_guests(conn: Connection) -> list[Any]:
    """Guest orders whose money sits in their own wallet: (order_no, payment_no, payment_id,
    gateway_id, wallet_id, owed_cents, credited_at, last_payout_state, last_payout_message)."""
    last = _last.correlate(_pay)
    return list(
        conn.execute(
            select(
                _order.c.order_no,
                _pay.c.payment_no,
                _pay.c.id.label("payment_id"),
                _pay.c.gateway_id,
                _acc.c.id.label("wallet_id"),
                _acc.c.balance_cents.label("owed_cents"),
                _pay.c.paid_at.label("credited_at"),
                last.with_only_columns(_payout.c.state).scalar_subquery().label("payout_state"),
                last.with_only_columns(_payout.c.message).scalar_subquery().label("payout_message"),
            )
            .select_from(
                _acc.join(_order, _order.c.id == _acc.c.owner_id).join(
                    _pay, _pay.c.order_id == _order.c.id
                )
            )
            .where(_acc.c.owner_type == "guest", _acc.c.balance_cents > 0)
            .order_by(_order.c.id)
        )
    )


def owed_summary(conn: Connection, *, now: datetime) -> tuple[int, float]:
    """(guest orders owed money, age in seconds of the oldest) for /healthz and /metrics."""
    rows = owed_to_guests(conn)
    if not rows:
        return 0, 0.0
    oldest = min(r.credited_at or now for r in rows)
    return len(rows), max((now - oldest).total_seconds(), 0.0)


def _owed(conn: Connection, order_no: str) -> Any:
    row = {r.order_no: r for r in owed_to_guests(conn)}.get(order_no)
    if row is None:
        raise KamengError(ErrorCode.invalid_amount, detail=f"nothing is owed for {order_no}")
    return row


def start_payout(
    conn: Connection, *, order_no: str, via: str, actor: str, now: datetime, force: bool = False
) -> tuple[int, Any]:
    """Record the intent to pay back what `order_no` is owed: (payout id, owed row). Refuses
    while an earlier payout is in flight or unresolved, unless `force` (staff, after checking
    the gateway)."""
    owed = _owed(conn, order_no)
    if owed.payout_state in (PayoutState.sending.value, PayoutState.unknown.value) and not force:
        raise KamengError(
            ErrorCode.invalid_transition,
            from_status=f"payout:{owed.payout_state}",
            to_status="payout:sending",
        )
    payout_id = conn.execute(
        insert(_payout)
        .values(
            payment_id=owed.payment_id,
            amount_cents=owed.owed_cents,
            via=via,
            state=PayoutState.sending.value,
            message="",
            actor=actor,
            created_at=now,
        )
        .returning(_payout.c.id)
    ).scalar_one()
    return int(payout_id), owed


def finish_payout(
    conn: Connection,
    *,
    payout_id: int,
    done: bool,
    message: str,
    accounts: ledger.PlatformAccounts,
    now: datetime,
) -> None:
    """Settle a payout: `done` moves the money out of the guest's wallet in the same
    transaction; otherwise it stays owed and the payout says why."""
    row = conn.execute(select(_payout).where(_payout.c.id == payout_id)).one()
    if row.state != PayoutState.sending.value:
        return  # settled already (or marked unknown meanwhile): nothing moves twice
    if done:
        wallet = conn.execute(
            select(_acc.c.id)
            .select_from(
                _acc.join(
                    _pay, and_(_acc.c.owner_type == "guest", _acc.c.owner_id == _pay.c.order_id)
                )
            )
            .where(_pay.c.id == row.payment_id)
        ).scalar_one()
        ledger.post(
            conn,
            kind="payout",
            legs=[(int(wallet), -row.amount_cents), (accounts.refunds, row.amount_cents)],
            now=now,
            ref_type="payment",
            ref_id=row.payment_id,
            actor=row.actor,
            memo=f"paid back to guest via {row.via}",
        )
    conn.execute(
        update(_payout)
        .where(_payout.c.id == payout_id)
        .values(
            state=(PayoutState.done if done else PayoutState.refused).value,
            message=message[:200],
            finished_at=now,
        )
    )


def due_payouts(conn: Connection, *, now: datetime, limit: int) -> list[Any]:
    """Owed guest money the worker should pay back now: nothing in flight, never refused or
    unknown (those wait for staff). Payouts interrupted mid-request become `unknown` here."""
    conn.execute(
        update(_payout)
        .where(
            _payout.c.state == PayoutState.sending.value,
            _payout.c.created_at < now - SENDING_LEASE,
        )
        .values(state=PayoutState.unknown.value, message="interrupted: check the gateway")
    )
    ready = (None, PayoutState.done.value)  # never tried, or owed again after one was paid
    return [r for r in owed_to_guests(conn) if r.payout_state in ready][:limit]


def count_attention(conn: Connection) -> int:
    """Payouts refused or unknown whose money is still owed: staff must look."""
    rows = owed_to_guests(conn)
    return sum(
        1 for r in rows if r.payout_state in (PayoutState.refused.value, PayoutState.unknown.value)
    )

"""Payment use cases: open a payment, apply what a gateway says (notify, return or query),
schedule active queries, and manage gateways.

Rules that make a payment a link that cannot drop an order:
- A payment row exists before the buyer leaves for the gateway, and it is `next_check_at`-due
  from the start: if no notify ever arrives, the worker asks the gateway itself.
- Every statement from a gateway goes through `apply_confirmation`, which locks the payment
  row, so a notify, a return and a query racing each other credit the money exactly once.
- The amount and currency must equal ours to the cent; anything else is `flagged` for staff
  and never fulfilled, and the buyer's order says why.
- The money is posted (gateway clearing -> payer's wallet) in the same transaction as the
  state change; the order then pays from that wallet like any balance order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.orders import checkout
from kameng.orders.numbers import new_order_no
from kameng.payments.models import (
    GatewayKind,
    Payment,
    PaymentGateway,
    PaymentNotify,
    PaymentPurpose,
    PaymentState,
)
from kameng.payments.port import Confirmation, GatewayRecord, RecordState
from kameng.security.crypto import Vault

_pay = table(Payment)
_gw = table(PaymentGateway)
_notify = table(PaymentNotify)


class Outcome(StrEnum):
    """What became of one statement from a gateway: recorded on `payment_notifies`, and the
    exact answer tests and staff look for."""

    fulfilment_started = "fulfilment_started"
    late_fulfilment_started = "late_fulfilment_started"
    late_payment_credited = "late_payment_credited"
    topup_credited = "topup_credited"
    duplicate = "duplicate"  # already applied: acknowledged, nothing moves
    second_trade = "second_trade"  # paid again in another gateway trade: staff must refund it
    amount_mismatch = "amount_mismatch"
    currency_mismatch = "currency_mismatch"
    already_flagged = "already_flagged"
    already_returned = "already_returned"
    unknown_payment = "unknown_payment"
    wrong_gateway = "wrong_gateway"
    # refused before we looked for the payment (from the adapter's check)
    bad_signature = "bad_signature"
    wrong_merchant = "wrong_merchant"
    not_success = "not_success"
    malformed = "malformed"


# Answered `success` to the gateway: we hold the statement durably and need no resend.
ACKNOWLEDGED = frozenset(
    {
        Outcome.fulfilment_started,
        Outcome.late_fulfilment_started,
        Outcome.late_payment_credited,
        Outcome.topup_credited,
        Outcome.duplicate,
        Outcome.second_trade,
        Outcome.amount_mismatch,
        Outcome.currency_mismatch,
        Outcome.already_flagged,
        Outcome.already_returned,
    }
)


@dataclass(frozen=True, slots=True)
class CheckPolicy:
    """When to ask a gateway about a payment nobody told us about."""

    first_check_s: int = 60
    cap_s: int = 300  # while the payment window is open: at most this long between asks
    # After the window closed, a few more asks spread over a day: banks confirm late.
    after_expiry_s: tuple[int, ...] = (60, 300, 1800, 7200, 43200, 86400)

    def next_check(self, *, checks: int, expires_at: datetime, now: datetime) -> datetime | None:
        if now < expires_at:
            wait = min(self.first_check_s * (2 ** max(checks - 1, 0)), self.cap_s)
            return min(now + timedelta(seconds=wait), expires_at)
        done_after = sum(self.after_expiry_s)
        elapsed = (now - expires_at).total_seconds()
        if elapsed >= done_after:
            return None
        total = 0
        for step in self.after_expiry_s:
            total += step
            if total > elapsed:
                return expires_at + timedelta(seconds=total)
        return None


# -- gateways ------------------------------------------------------------------------------------


def key_context(code: str) -> str:
    return f"gateway:{code}"


def add_gateway(
    conn: Connection,
    *,
    vault: Vault,
    code: str,
    name: str,
    base_url: str,
    merchant_id: str,
    key: str,
    currency: str = "CNY",
    pay_types: str = "alipay,wxpay",
    now: datetime,
) -> int:
    if not base_url.startswith(("http://", "https://")):
        raise KamengError(ErrorCode.invalid_request, detail="base_url must be http(s)")
    try:
        with conn.begin_nested():
            return int(
                conn.execute(
                    insert(_gw)
                    .values(
                        code=code,
                        name=name,
                        kind=GatewayKind.epay.value,
                        base_url=base_url.rstrip("/"),
                        merchant_id=merchant_id,
                        sealed_key=vault.seal(key, key_context(code)),
                        currency=currency.upper(),
                        pay_types=pay_types,
                        enabled=True,
                        created_at=now,
                    )
                    .returning(_gw.c.id)
                ).scalar_one()
            )
    except IntegrityError as exc:
        raise KamengError(ErrorCode.already_exists, what=f"gateway {code}") from exc


def gateway_key(vault: Vault, row: Any) -> str:
    """The merchant key of a gateway row, unsealed."""
    return vault.unseal(bytes(row.sealed_key), key_context(row.code))


def set_gateway_key(conn: Connection, *, vault: Vault, code: str, key: str) -> None:
    """Replace a gateway's merchant key (what a gateway's "reset key" button asks of us). The
    gateway caches compare the sealed key, so running processes pick the new one up."""
    changed = conn.execute(
        update(_gw).where(_gw.c.code == code).values(sealed_key=vault.seal(key, key_context(code)))
    ).rowcount
    if not changed:
        raise KamengError(ErrorCode.gateway_not_found, gateway=code)


def list_gateways(conn: Connection, *, enabled_only: bool = False) -> list[Any]:
    stmt = select(_gw).order_by(_gw.c.id)
    if enabled_only:
        stmt = stmt.where(_gw.c.enabled.is_(True))
    return list(conn.execute(stmt))


def get_gateway(conn: Connection, *, code: str | None = None, gateway_id: int | None = None) -> Any:
    stmt = select(_gw)
    stmt = (
        stmt.where(_gw.c.code == code) if code is not None else stmt.where(_gw.c.id == gateway_id)
    )
    row = conn.execute(stmt).first()
    if row is None:
        raise KamengError(ErrorCode.gateway_not_found, gateway=code or gateway_id)
    return row


# -- opening payments ----------------------------------------------------------------------------


def open_payment(
    conn: Connection,
    *,
    gateway: Any,
    purpose: PaymentPurpose,
    pay_type: str,
    amount_cents: int,
    currency: str,
    expires_at: datetime,
    now: datetime,
    checks: CheckPolicy,
    order_id: int | None = None,
    order_no: str | None = None,
    member_id: int | None = None,
    wallet_id: int | None = None,
) -> str:
    """Write the payment before the buyer goes to the gateway; returns its number (the
    gateway's out_trade_no: the order number for an order, T... for a top-up)."""
    if pay_type not in gateway.pay_types.split(","):
        raise KamengError(ErrorCode.pay_type_unsupported, pay_type=pay_type[:16])
    if amount_cents <= 0:
        raise KamengError(ErrorCode.invalid_amount, detail="must be positive")
    payment_no = order_no if order_no is not None else "T" + new_order_no(now)[1:]
    conn.execute(
        insert(_pay).values(
            payment_no=payment_no,
            gateway_id=gateway.id,
            purpose=purpose.value,
            order_id=order_id,
            member_id=member_id,
            wallet_id=wallet_id,
            amount_cents=amount_cents,
            currency=currency,
            pay_type=pay_type,
            state=PaymentState.pending.value,
            reason="",
            gateway_trade_no="",
            reported_currency="",
            created_at=now,
            expires_at=expires_at,
            next_check_at=now + timedelta(seconds=checks.first_check_s),
            checks=0,
            details={},
        )
    )
    return payment_no


def find_payment(conn: Connection, *, payment_no: str) -> Any:
    row = conn.execute(select(_pay).where(_pay.c.payment_no == payment_no)).first()
    if row is None:
        raise KamengError(ErrorCode.payment_not_found)
    return row


def payment_or_none(conn: Connection, *, payment_no: str) -> Any | None:
    return conn.execute(select(_pay).where(_pay.c.payment_no == payment_no)).first()


def payment_of_order(conn: Connection, *, order_id: int) -> Any | None:
    return conn.execute(select(_pay).where(_pay.c.order_id == order_id)).first()


def lock_payment(conn: Connection, payment_no: str) -> Any | None:
    stmt = select(_pay).where(_pay.c.payment_no == payment_no)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


# -- what gateways tell us -----------------------------------------------------------------------


def record_statement(
    conn: Connection,
    *,
    gateway_id: int | None,
    channel: str,
    outcome: str,
    payment_no: str = "",
    gateway_trade_no: str = "",
    money: str = "",
    remote_ip: str = "",
    now: datetime,
) -> None:
    conn.execute(
        insert(_notify).values(
            gateway_id=gateway_id,
            payment_no=payment_no[:64],
            gateway_trade_no=gateway_trade_no[:64],
            channel=channel,
            outcome=outcome,
            money=money[:24],
            remote_ip=remote_ip[:45],
            received_at=now,
        )
    )


def payer_wallet(conn: Connection, pay: Any) -> int:
    if pay.wallet_id is not None:
        return int(pay.wallet_id)
    if pay.member_id is not None:
        return ledger.wallet_account(conn, owner_type="member", owner_id=pay.member_id)
    # A guest: the money is kept in a wallet of its own order (refunds return there).
    return ledger.wallet_account(conn, owner_type="guest", owner_id=pay.order_id)


def apply_confirmation(
    conn: Connection,
    *,
    gateway: Any,
    confirmation: Confirmation,
    channel: str,
    deps: checkout.PaymentDeps,
    now: datetime,
) -> Outcome:
    """Apply a gateway's proof that a trade is paid. Idempotent; never raises for a statement
    that does not fit (the outcome says why), so the caller can always record and answer."""
    pay = lock_payment(conn, confirmation.payment_no)
    if pay is None:
        return Outcome.unknown_payment
    if pay.gateway_id != gateway.id:
        return Outcome.wrong_gateway
    if pay.state == PaymentState.paid.value:
        if confirmation.gateway_trade_no and confirmation.gateway_trade_no != (
            pay.gateway_trade_no or confirmation.gateway_trade_no
        ):
            # The same order paid twice at the gateway (two trades): never silently absorbed.
            return Outcome.second_trade
        return Outcome.duplicate
    if pay.state == PaymentState.flagged.value:
        return Outcome.already_flagged
    if pay.state == PaymentState.returned.value:
        # Staff sent this money back: a replay of the same statement must not reopen it; a
        # statement about another trade is new money, and says so.
        if (
            confirmation.gateway_trade_no
            and pay.gateway_trade_no
            and (confirmation.gateway_trade_no != pay.gateway_trade_no)
        ):
            return Outcome.second_trade
        return Outcome.already_returned
    reported = {
        "gateway_trade_no": confirmation.gateway_trade_no,
        "reported_cents": confirmation.amount_cents,
        "reported_currency": confirmation.currency,
        "last_checked_at": now,
    }
    problem: Outcome | None = None
    if confirmation.currency.upper() != pay.currency.upper():
        problem = Outcome.currency_mismatch
    elif confirmation.amount_cents != pay.amount_cents:
        problem = Outcome.amount_mismatch
    if problem is not None:
        conn.execute(
            update(_pay)
            .where(_pay.c.id == pay.id)
            .values(
                state=PaymentState.flagged.value,
                reason=problem.value,
                next_check_at=None,
                **reported,
            )
        )
        if pay.order_id is not None:
            checkout.note_payment_problem(
                conn,
                order_id=pay.order_id,
                reason=f"payment_{problem.value}",
                actor=f"gateway:{gateway.code}",
                now=now,
                details={
                    "expected": pay.amount_cents,
                    "reported": confirmation.amount_cents,
                    "currency": confirmation.currency,
                },
            )
        return problem

    wallet_id = payer_wallet(conn, pay)
    txn_id = ledger.post(
        conn,
        kind="payment",
        legs=[
            (deps.accounts.clearing_for(pay.id), -pay.amount_cents),
            (wallet_id, pay.amount_cents),
        ],
        now=now,
        ref_type="payment",
        ref_id=pay.id,
        actor=f"gateway:{gateway.code}",
        memo=f"{pay.payment_no} {confirmation.gateway_trade_no} via {channel}"[:500],
    )
    conn.execute(
        update(_pay)
        .where(_pay.c.id == pay.id)
        .values(
            state=PaymentState.paid.value,
            reason=f"confirmed_by_{channel}",
            paid_at=now,
            wallet_id=wallet_id,
            ledger_txn_id=txn_id,
            next_check_at=None,
            **reported,
        )
    )
    if pay.purpose == PaymentPurpose.topup.value:
        return Outcome.topup_credited
    result = checkout.accept_payment(
        conn,
        order_id=pay.order_id,
        wallet_id=wallet_id,
        amount_cents=pay.amount_cents,
        actor=f"gateway:{gateway.code}",
        payment_no=pay.payment_no,
        deps=deps,
        now=now,
    )
    return Outcome(result)


# -- active queries ------------------------------------------------------------------------------


_CLAIM = (
    select(_pay.c.id, _pay.c.payment_no, _pay.c.gateway_id)
    .where(_pay.c.next_check_at.is_not(None))
    .order_by(_pay.c.next_check_at)
)


def claim_due_checks(conn: Connection, *, now: datetime, lease_s: int, limit: int) -> list[Any]:
    """Payments due for a query, leased like orders: a worker that dies leaves them due again."""
    stmt = _CLAIM.where(_pay.c.next_check_at <= now).limit(limit)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(conn.execute(stmt))
    if rows:
        conn.execute(
            update(_pay)
            .where(_pay.c.id.in_([r.id for r in rows]))
            .values(next_check_at=now + timedelta(seconds=lease_s))
        )
    return rows


def apply_query(
    conn: Connection,
    *,
    gateway: Any,
    payment_no: str,
    record: GatewayRecord,
    deps: checkout.PaymentDeps,
    checks: CheckPolicy,
    now: datetime,
) -> str:
    """Apply the answer to an active query: a paid record is a confirmation like a notify;
    anything else schedules the next ask, until the payment is given up (`closed`)."""
    if record.state is RecordState.paid and record.payment_no not in ("", payment_no):
        # An answer about another trade says nothing about ours: ask again later.
        record = GatewayRecord(RecordState.unreachable, payment_no=payment_no, detail="mismatch")
    if record.state is RecordState.paid and record.amount_cents is None:
        # Paid, in an amount we cannot read: a person must look (never "never paid").
        pay = lock_payment(conn, payment_no)
        if pay is None or pay.state != PaymentState.pending.value:
            return "settled"
        conn.execute(
            update(_pay)
            .where(_pay.c.id == pay.id)
            .values(
                state=PaymentState.flagged.value,
                reason="unreadable_amount",
                next_check_at=None,
                gateway_trade_no=record.gateway_trade_no,
                last_checked_at=now,
            )
        )
        if pay.order_id is not None:
            checkout.note_payment_problem(
                conn,
                order_id=pay.order_id,
                reason="payment_unreadable_amount",
                actor=f"gateway:{gateway.code}",
                now=now,
                details={"expected": pay.amount_cents},
            )
        record_statement(
            conn,
            gateway_id=gateway.id,
            channel="query",
            outcome="unreadable_amount",
            payment_no=payment_no,
            gateway_trade_no=record.gateway_trade_no,
            now=now,
        )
        return "unreadable_amount"
    if record.state is RecordState.paid and record.amount_cents is not None:
        outcome = apply_confirmation(
            conn,
            gateway=gateway,
            confirmation=Confirmation(
                payment_no=payment_no,
                gateway_trade_no=record.gateway_trade_no,
                amount_cents=record.amount_cents,
                currency=record.currency,
            ),
            channel="query",
            deps=deps,
            now=now,
        )
        record_statement(
            conn,
            gateway_id=gateway.id,
            channel="query",
            outcome=outcome.value,
            payment_no=payment_no,
            gateway_trade_no=record.gateway_trade_no,
            money=str(record.amount_cents),
            now=now,
        )
        return outcome.value
    pay = lock_payment(conn, payment_no)
    if pay is None or pay.state != PaymentState.pending.value:
        return "settled"
    count = pay.checks + 1
    due = checks.next_check(checks=count, expires_at=pay.expires_at, now=now)
    values: dict[str, Any] = {"checks": count, "last_checked_at": now, "next_check_at": due}
    if due is None:
        values.update(state=PaymentState.closed.value, reason=f"never_paid_{record.state.value}")
    conn.execute(update(_pay).where(_pay.c.id == pay.id).values(**values))
    return record.state.value if due is not None else "closed"


def request_final_check(
    conn: Connection, *, order_id: int, deadline: datetime, now: datetime
) -> bool:
    """At an order's payment deadline: if its payment is still pending and nobody has asked the
    gateway since the deadline, ask now (True). The order waits for that answer instead of
    closing first and treating a payment made in time as late."""
    pay = conn.execute(
        select(_pay.c.id, _pay.c.state, _pay.c.last_checked_at).where(_pay.c.order_id == order_id)
    ).first()
    if pay is None or pay.state != PaymentState.pending.value:
        return False
    if pay.last_checked_at is not None and pay.last_checked_at >= deadline:
        return False
    conn.execute(update(_pay).where(_pay.c.id == pay.id).values(next_check_at=now))
    return True


def list_payments(
    conn: Connection,
    *,
    state: str | None = None,
    member_id: int | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Any]:
    stmt = select(_pay).order_by(_pay.c.id.desc()).limit(limit)
    if state:
        stmt = stmt.where(_pay.c.state == state)
    if member_id is not None:
        stmt = stmt.where(_pay.c.member_id == member_id)
    if since is not None:
        stmt = stmt.where(_pay.c.created_at >= since)
    return list(conn.execute(stmt))


def health_counts(conn: Connection, *, now: datetime) -> dict[str, int]:
    """For /healthz and /metrics: what waits on gateways, and what waits on a person."""
    by_state: dict[str, int] = {
        state: int(n)
        for state, n in conn.execute(
            select(_pay.c.state, func.count())
            .where(_pay.c.state.in_([PaymentState.pending.value, PaymentState.flagged.value]))
            .group_by(_pay.c.state)
        )
    }
    overdue = conn.execute(
        select(func.count())
        .select_from(_pay)
        .where(
            _pay.c.next_check_at.is_not(None), _pay.c.next_check_at < now - timedelta(seconds=60)
        )
    ).scalar_one()
    from kameng.payments import payouts  # payouts builds on this module

    owed, owed_oldest_s = payouts.owed_summary(conn, now=now)
    return {
        "payments_owed_to_guests": owed,
        "payouts_need_staff": payouts.count_attention(conn),
        "payments_owed_oldest_s": int(owed_oldest_s),
        "payments_pending": int(by_state.get(PaymentState.pending.value, 0)),
        "payments_flagged": int(by_state.get(PaymentState.flagged.value, 0)),
        "payment_checks_overdue": int(overdue),
    }

"""Reconciliation: the gateway's books against our ledger, trade by trade.

For every payment we opened in the period, and every trade the gateway lists for us in it,
we compare what the gateway says was paid with what our ledger recorded as received (the
`payment` transaction's leg on the gateway clearing account, not the payment row's state, so
a row that says paid without money behind it is caught too). Mismatches:

- `paid_not_recorded`: the gateway has the money, our ledger has none of it (a lost notify
  the active query has not found yet, a flagged amount, or a trade we never opened);
- `recorded_not_paid`: our ledger received money the gateway does not show as paid;
- `amount_differs`: both have it, in different amounts.

A trade the gateway could not be asked about is listed as `unchecked`, never taken as fine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from kameng.ledger.models import Entry, LedgerTransaction
from kameng.payments.models import Payment
from kameng.payments.port import GatewayPort, GatewayRecord, RecordState

_pay = Payment.__table__
_txn = LedgerTransaction.__table__
_entry = Entry.__table__


class MismatchKind(StrEnum):
    paid_not_recorded = "paid_not_recorded"
    recorded_not_paid = "recorded_not_paid"
    amount_differs = "amount_differs"
    unchecked = "unchecked"


@dataclass(frozen=True, slots=True)
class Mismatch:
    kind: MismatchKind
    payment_no: str
    gateway: str
    ours_state: str  # our payment row's state, or "none" when we never opened it
    recorded_cents: int  # what our ledger received
    gateway_cents: int | None  # what the gateway says was paid (None: not paid / unknown)
    detail: str = ""


@dataclass
class Report:
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _recorded(clearing: tuple[int, ...]) -> Any:
    """Payments with what our ledger received for each: its payment transaction's legs on the
    clearing accounts (not the row's state, so a row marked paid without money shows)."""
    received = (
        select(func.coalesce(func.sum(-_entry.c.amount_cents), 0))
        .select_from(_entry.join(_txn, _txn.c.id == _entry.c.transaction_id))
        .where(
            _txn.c.ref_type == "payment",
            _txn.c.ref_id == _pay.c.id,
            _entry.c.account_id.in_(clearing),
        )
        .scalar_subquery()
    )
    return select(_pay.c.payment_no, _pay.c.state, received.label("received"))


def recorded_amounts(
    conn: Connection,
    *,
    gateway_id: int,
    since: datetime,
    until: datetime,
    clearing: tuple[int, ...],
) -> dict[str, tuple[str, int]]:
    """payment_no -> (state, cents our ledger received) for payments opened in the period."""
    rows = conn.execute(
        _recorded(clearing).where(
            _pay.c.gateway_id == gateway_id,
            _pay.c.created_at >= since,
            _pay.c.created_at < until,
        )
    )
    return {r.payment_no: (r.state, int(r.received)) for r in rows}


def recorded_one(
    conn: Connection, *, payment_no: str, clearing: tuple[int, ...]
) -> tuple[str, int] | None:
    row = conn.execute(_recorded(clearing).where(_pay.c.payment_no == payment_no)).first()
    return (row.state, int(row.received)) if row is not None else None


def classify(
    *, payment_no: str, gateway: str, ours: tuple[str, int] | None, record: GatewayRecord
) -> Mismatch | None:
    state, recorded = ours if ours is not None else ("none", 0)
    if record.state is RecordState.unreachable:
        return Mismatch(
            MismatchKind.unchecked, payment_no, gateway, state, recorded, None, record.detail
        )
    paid = record.state is RecordState.paid
    theirs = record.amount_cents if paid else None
    if state == "returned" and recorded == 0:
        return None  # flagged money staff sent back: never in our books, rightly
    if paid and recorded == 0:
        return Mismatch(MismatchKind.paid_not_recorded, payment_no, gateway, state, 0, theirs)
    if not paid and recorded > 0:
        return Mismatch(
            MismatchKind.recorded_not_paid,
            payment_no,
            gateway,
            state,
            recorded,
            None,
            record.state.value,
        )
    if paid and theirs != recorded:
        return Mismatch(MismatchKind.amount_differs, payment_no, gateway, state, recorded, theirs)
    return None


async def reconcile_gateway(
    *,
    gateway: Any,
    adapter: GatewayPort,
    read: Callable[[Callable[[Connection], Any]], Any],
    clearing: tuple[int, ...],
    since: datetime,
    until: datetime,
    list_limit: int = 500,
    concurrency: int = 8,
) -> Report:
    """Compare one gateway's records with our ledger for payments opened in [since, until)."""
    ours = read(
        lambda conn: recorded_amounts(
            conn, gateway_id=gateway.id, since=since, until=until, clearing=clearing
        )
    )
    report = Report()
    gate = asyncio.Semaphore(concurrency)

    async def ask(payment_no: str) -> GatewayRecord:
        async with gate:
            return await adapter.query(payment_no)

    numbers = sorted(ours)
    records = await asyncio.gather(*(ask(n) for n in numbers))
    for payment_no, record in zip(numbers, records, strict=True):
        report.checked += 1
        found = classify(
            payment_no=payment_no, gateway=gateway.code, ours=ours[payment_no], record=record
        )
        if found is not None:
            report.mismatches.append(found)

    # Trades the gateway lists for us beyond those: never opened by us, or opened before the
    # period (and perhaps paid since). Each is compared with what our ledger holds for it.
    listed = await adapter.recent(limit=min(list_limit, 50))
    if listed is None:
        report.mismatches.append(
            Mismatch(
                MismatchKind.unchecked,
                "*",
                gateway.code,
                "-",
                0,
                None,
                "the gateway cannot list its trades: trades we never opened were not checked",
            )
        )
    offset = 0
    seen = set(numbers)
    while listed:
        for record in listed:
            if not record.payment_no or record.payment_no in seen:
                continue
            seen.add(record.payment_no)
            mine = read(
                functools.partial(recorded_one, payment_no=record.payment_no, clearing=clearing)
            )
            report.checked += 1
            found = classify(
                payment_no=record.payment_no, gateway=gateway.code, ours=mine, record=record
            )
            if found is not None:
                report.mismatches.append(found)
        offset += len(listed)
        if offset >= list_limit or len(listed) < 50:
            break
        listed = await adapter.recent(limit=50, offset=offset)
    return report

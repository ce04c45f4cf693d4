"""Supplier reconciliation: the supplier's own record of our purchases against our procurements.

The pipeline never buys twice on purpose (DESIGN §5.3); this is how we would know if it ever
did, or if a supplier charged us for something we never recorded. For every purchase either
side knows of in the period, compared by our out-trade-no:

- `charged_not_recorded`: the supplier kept our money for a number we have no charge for
  (no procurement at all, or one we took as refused, never arrived or abandoned);
- `bought_twice`: the supplier charged more than one purchase for one of our order lines;
- `recorded_not_charged`: we recorded a charge the supplier does not show (missing, refused
  or refunded on their side);
- `amount_differs`: both have the charge, at different amounts;
- `unchecked`: the supplier's record could not be had — never taken as fine.

Purchases still in flight on our side (sending, accepted, unknown) are not judged yet: the
pipeline is resolving them, and the next run sees how they ended.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.suppliers.models import (
    LIVE_STATES,
    Procurement,
    ProcurementState,
    SupplierReconciliation,
)
from kameng.suppliers.port import SupplierPort, SupplierRecord

_proc = table(Procurement)
_run = table(SupplierReconciliation)

# A request held in the network reaches the supplier after we created its procurement: their
# record of it may be this much younger than ours, so their side is read with this slack.
ARRIVAL_SLACK = timedelta(hours=1)
# How much of a report is kept with the run (the CLI prints the whole of a fresh one).
KEPT_MISMATCHES = 50


class MismatchKind(StrEnum):
    charged_not_recorded = "charged_not_recorded"
    bought_twice = "bought_twice"
    recorded_not_charged = "recorded_not_charged"
    amount_differs = "amount_differs"
    unchecked = "unchecked"


@dataclass(frozen=True, slots=True)
class Ours:
    """A procurement as reconciliation needs it."""

    out_trade_no: str
    order_line_id: int
    state: str
    charged: bool
    cents: int  # what we recorded it cost (the supplier's figure when it gave one)


@dataclass(frozen=True, slots=True)
class Mismatch:
    kind: MismatchKind
    out_trade_no: str
    ours_state: str  # our procurement's state, or "none"
    supplier_status: str  # the supplier's status, or "none"
    our_cents: int | None
    supplier_cents: int | None
    detail: str = ""


@dataclass
class Report:
    supplier: str
    since: datetime
    until: datetime
    checked: int = 0
    complete: bool = True
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.mismatches

    def counts(self) -> dict[str, int]:
        out = {kind.value: 0 for kind in MismatchKind}
        for m in self.mismatches:
            out[m.kind.value] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "supplier": self.supplier,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "checked": self.checked,
            "complete": self.complete,
            "ok": self.ok,
            "counts": self.counts(),
            "mismatches": [{**asdict(m), "kind": m.kind.value} for m in self.mismatches],
        }


def compare(ours: dict[str, Ours], theirs: list[SupplierRecord]) -> tuple[int, list[Mismatch]]:
    """Pure comparison of the two books (keyed by out-trade-no); returns (checked, mismatches).

    `ours` must hold every procurement of every line that either side mentions, so that a
    second charged purchase of a line is seen even when its number fell outside the period.
    """
    mismatches: list[Mismatch] = []
    by_no: dict[str, SupplierRecord] = {}
    for entry in theirs:
        # A supplier listing one number twice is itself odd; the charged entry wins.
        if entry.out_trade_no not in by_no or entry.charged:
            by_no[entry.out_trade_no] = entry
    charged_by_line: dict[int, list[str]] = defaultdict(list)
    for no in sorted(set(ours) | set(by_no)):
        mine, record = ours.get(no), by_no.get(no)
        live = mine is not None and ProcurementState(mine.state) in LIVE_STATES
        their_charge = record is not None and record.charged
        if their_charge and mine is not None:
            charged_by_line[mine.order_line_id].append(no)
        if live and not (mine is not None and mine.charged):
            continue  # still being resolved by the pipeline
        if their_charge and (mine is None or not mine.charged):
            mismatches.append(_mismatch(MismatchKind.charged_not_recorded, no, mine, record))
        elif mine is not None and mine.charged and not their_charge:
            mismatches.append(_mismatch(MismatchKind.recorded_not_charged, no, mine, record))
        elif (
            mine is not None
            and record is not None
            and mine.charged
            and record.cost_cents is not None
            and record.cost_cents != mine.cents
        ):
            mismatches.append(_mismatch(MismatchKind.amount_differs, no, mine, record))
    for line, numbers in sorted(charged_by_line.items()):
        if len(numbers) > 1:
            mismatches.append(
                Mismatch(
                    kind=MismatchKind.bought_twice,
                    out_trade_no=numbers[0],
                    ours_state=",".join(ours[n].state for n in numbers),
                    supplier_status=",".join(by_no[n].status for n in numbers),
                    our_cents=None,
                    supplier_cents=sum(by_no[n].cost_cents or 0 for n in numbers),
                    detail=f"order line {line}: {', '.join(numbers)}",
                )
            )
    return len(set(ours) | set(by_no)), mismatches


def _mismatch(
    kind: MismatchKind, no: str, mine: Ours | None, record: SupplierRecord | None
) -> Mismatch:
    return Mismatch(
        kind=kind,
        out_trade_no=no,
        ours_state=mine.state if mine is not None else "none",
        supplier_status=record.status if record is not None else "none",
        our_cents=mine.cents if mine is not None and mine.charged else None,
        supplier_cents=record.cost_cents if record is not None and record.charged else None,
    )


def _ours_from_rows(rows: list[Any]) -> dict[str, Ours]:
    out: dict[str, Ours] = {}
    for r in rows:
        charged = r.charged_at is not None or r.state in (
            ProcurementState.delivered.value,
            ProcurementState.partial.value,
        )
        cents = r.charged_cents if r.charged_cents is not None else r.cost_cents
        out[r.out_trade_no] = Ours(
            out_trade_no=r.out_trade_no,
            order_line_id=int(r.order_line_id),
            state=r.state,
            charged=charged,
            cents=int(cents),
        )
    return out


_COLUMNS = (
    _proc.c.out_trade_no,
    _proc.c.order_line_id,
    _proc.c.state,
    _proc.c.charged_at,
    _proc.c.charged_cents,
    _proc.c.cost_cents,
)


def our_side(
    conn: Connection,
    *,
    supplier_id: int,
    since: datetime,
    until: datetime,
    numbers: set[str],
) -> dict[str, Ours]:
    """Our procurements at this supplier created in the period, plus any the supplier named
    (a request held in the network lands after the period it was made in). A line charged at
    two suppliers is `kameng verify`'s one_charged_purchase_per_line, or shows here as
    charged_not_recorded at the one we did not record."""
    rows = list(
        conn.execute(
            select(*_COLUMNS).where(
                _proc.c.supplier_id == supplier_id,
                _proc.c.created_at >= since,
                _proc.c.created_at < until,
            )
        )
    )
    known = {r.out_trade_no for r in rows}
    missing = sorted(numbers - known)
    for start in range(0, len(missing), 500):
        rows.extend(
            conn.execute(
                select(*_COLUMNS).where(
                    _proc.c.supplier_id == supplier_id,
                    _proc.c.out_trade_no.in_(missing[start : start + 500]),
                )
            )
        )
    return _ours_from_rows(rows)


async def reconcile_supplier(
    *,
    supplier: Any,
    adapter: SupplierPort,
    read: Any,
    since: datetime,
    until: datetime,
) -> Report:
    """Ask the supplier for its record, then compare it with ours (`read(fn)` runs `fn(conn)`
    in a read transaction, off the event loop)."""
    report = Report(supplier=supplier.code, since=since, until=until)
    theirs = await adapter.records(
        since=int((since - ARRIVAL_SLACK).timestamp()),
        until=int((until + ARRIVAL_SLACK).timestamp()) + 1,
    )
    if theirs is None:
        report.complete = False
        report.mismatches.append(
            Mismatch(
                kind=MismatchKind.unchecked,
                out_trade_no="",
                ours_state="",
                supplier_status="",
                our_cents=None,
                supplier_cents=None,
                detail="the supplier's record of purchases could not be had",
            )
        )
        return report
    numbers = {r.out_trade_no for r in theirs}

    def load(conn: Connection) -> dict[str, Ours]:
        return our_side(conn, supplier_id=supplier.id, since=since, until=until, numbers=numbers)

    ours = await read(load)
    report.checked, report.mismatches = compare(ours, theirs)
    return report


def record_run(conn: Connection, *, supplier_id: int, report: Report, now: datetime) -> None:
    summary = report.as_dict()
    summary["mismatches"] = summary["mismatches"][:KEPT_MISMATCHES]
    conn.execute(
        insert(_run).values(
            supplier_id=supplier_id,
            ran_at=now,
            since=report.since,
            until=report.until,
            checked=report.checked,
            mismatches=len(report.mismatches),
            complete=report.complete,
            summary=summary,
        )
    )


def last_run_at(conn: Connection) -> datetime | None:
    """When reconciliation last ran for any supplier (workers skip a round another did)."""
    value: datetime | None = conn.execute(select(func.max(_run.c.ran_at))).scalar()
    return value


def latest_mismatches(conn: Connection) -> dict[int, int]:
    """Mismatches found by the latest run of each supplier (for /metrics and /healthz)."""
    latest = (
        select(_run.c.supplier_id, func.max(_run.c.id).label("id"))
        .group_by(_run.c.supplier_id)
        .subquery()
    )
    rows = conn.execute(
        select(_run.c.supplier_id, _run.c.mismatches).join(latest, latest.c.id == _run.c.id)
    )
    return {int(r.supplier_id): int(r.mismatches) for r in rows}


def prune_runs(conn: Connection, *, older_than: datetime) -> int:
    return conn.execute(delete(_run).where(_run.c.ran_at < older_than)).rowcount

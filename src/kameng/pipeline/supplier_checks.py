"""Supplier reconciliation as the worker and the CLI run it: ask each supplier for its record,
compare it with ours, keep the result for /metrics and /healthz."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.pipeline import apply
from kameng.suppliers import reconcile
from kameng.suppliers import service as suppliers
from kameng.suppliers.port import Result, SupplierPort

log = logging.getLogger("kameng.worker")


async def reconcile_suppliers(
    container: Container,
    adapter_for: Callable[[Any], SupplierPort],
    *,
    since: datetime,
    until: datetime,
    code: str | None = None,
    record: bool = True,
) -> list[reconcile.Report]:
    """One report per enabled supplier (or just `code`, enabled or not), oldest first.

    `record` keeps each run (the worker's runs and the CLI's alike), so /metrics shows the
    mismatches the latest run found wherever it ran.
    """

    def read(fn: Callable[[Connection], Any]) -> Any:
        with container.db.connect(write=False) as conn:
            return fn(conn)

    rows = await asyncio.to_thread(read, suppliers.all_suppliers)
    if code is not None:
        rows = [r for r in rows if r.code == code]
        if not rows:
            raise KamengError(ErrorCode.not_found, detail=f"supplier {code}")
    else:
        rows = [r for r in rows if r.enabled]
    reports = []
    for row in rows:
        report = await reconcile.reconcile_supplier(
            supplier=row,
            adapter=adapter_for(row),
            read=lambda fn: asyncio.to_thread(read, fn),
            since=since,
            until=until,
        )
        reports.append(report)
        if record:
            await container.writer.run_async(
                functools.partial(
                    reconcile.record_run, supplier_id=row.id, report=report, now=container.clock()
                )
            )
        if not report.ok:
            log.warning(
                "supplier %s reconciliation: %s", row.code, report.counts() | {"ok": report.ok}
            )
    return reports


async def check_given_up(
    container: Container,
    adapter_for: Callable[[Any], SupplierPort],
    *,
    timing: apply.Timing,
    limit: int = 50,
) -> int:
    """Ask suppliers about purchases we gave up on while they might still succeed (abandoned
    at an order's deadline, refused in a way a late copy could undo), until each outcome is
    known. A late success is applied like any answer: it serves its line if that still waits
    for it, else its keys go to stock or its cost becomes a claim. Returns how many were asked.
    """

    def read(fn: Callable[[Connection], Any]) -> Any:
        with container.db.connect(write=False) as conn:
            return fn(conn)

    now = container.clock()
    due = await asyncio.to_thread(
        read, functools.partial(suppliers.given_up_due, now=now, limit=limit)
    )
    rows: dict[int, Any] = {}
    for proc in due:
        if proc.supplier_id not in rows:
            rows[proc.supplier_id] = await asyncio.to_thread(
                read, functools.partial(suppliers.supplier_by_id, supplier_id=proc.supplier_id)
            )
        supplier = rows[proc.supplier_id]
        result = await adapter_for(supplier).query(order_no=proc.out_trade_no)
        label = await container.writer.run_async(
            functools.partial(
                _settle_late_check,
                container=container,
                supplier=supplier,
                proc=proc,
                result=result,
                timing=timing,
            )
        )
        log.info("late check of %s: %s -> %s", proc.out_trade_no, result.outcome.value, label)
    return len(due)


def _settle_late_check(
    conn: Connection,
    *,
    container: Container,
    supplier: Any,
    proc: Any,
    result: Result,
    timing: apply.Timing,
) -> str:
    at = container.clock()
    promises = suppliers.Promises.of(supplier)
    label = apply.apply_result(
        conn,
        vault=container.vault,
        accounts=container.accounts,
        procurement=proc,
        supplier_code=supplier.code,
        result=result,
        now=at,
        timing=timing,
        via="late_check",
        promises=promises,
    )
    fresh = suppliers.procurement_by_out_trade_no(
        conn, supplier_id=proc.supplier_id, out_trade_no=proc.out_trade_no
    )
    if fresh is not None and fresh.late_check_at is not None:
        suppliers.set_late_check(
            conn,
            procurement_id=fresh.id,
            at=suppliers.next_late_check(fresh, result.outcome.value, promises, now=at),
            attempts=int(fresh.attempts) + 1,
        )
    return label

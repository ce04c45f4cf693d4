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
from kameng.suppliers import reconcile
from kameng.suppliers import service as suppliers
from kameng.suppliers.port import SupplierPort

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

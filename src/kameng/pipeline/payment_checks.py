"""Active queries of payments nobody told us about (a dropped or late notify).

Each due payment is leased (its `next_check_at` pushed forward in the claiming transaction),
the gateway is asked with no transaction open, and the answer is applied in a short one —
the same plan/call/apply shape as a procurement step, so a crash anywhere leaves the payment
due again and a paid trade is credited exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.payments import payouts
from kameng.payments import service as payments
from kameng.payments.port import GatewayRecord, RecordState
from kameng.payments.registry import Gateways
from kameng.pipeline.metrics import PAYMENT_STATEMENTS

log = logging.getLogger("kameng.payments")

LEASE_S = 60


async def check_due(
    container: Container, gateways: Gateways, *, limit: int = 20, max_rounds: int = 10
) -> int:
    """Query what is due, a round of `limit` at a time until nothing due is left (at most
    `max_rounds`, so one call stays short); returns how many payments were asked about."""
    total = 0
    for _ in range(max_rounds):
        asked = await _round(container, gateways, limit=limit)
        total += asked
        if asked < limit:
            break
    return total


async def _round(container: Container, gateways: Gateways, *, limit: int) -> int:
    now = container.clock()

    def claim(conn: Connection) -> list[tuple[Any, Any]]:
        rows = payments.claim_due_checks(conn, now=now, lease_s=LEASE_S, limit=limit)
        return [(r, payments.get_gateway(conn, gateway_id=r.gateway_id)) for r in rows]

    batch = await container.writer.run_async(claim)

    async def one(row: Any, gateway: Any) -> None:
        try:
            record = await gateways.get(gateway).query(row.payment_no)
        except Exception as exc:  # an adapter bug must not stop the other checks
            log.warning("payment query failed: %s", type(exc).__name__)
            record = GatewayRecord(RecordState.unreachable, payment_no=row.payment_no)
        try:
            outcome = await container.writer.run_async(
                functools.partial(
                    payments.apply_query,
                    gateway=gateway,
                    payment_no=row.payment_no,
                    record=record,
                    deps=container.payment_deps,
                    checks=container.payment_checks,
                    now=container.clock(),
                )
            )
        except Exception as exc:
            # Rolled back; the lease brings the payment back in a minute. Logged and counted
            # so a payment that keeps failing is seen, not retried in silence.
            log.error("applying the query of %s failed: %s", row.payment_no, type(exc).__name__)
            outcome = "error"
        PAYMENT_STATEMENTS.labels("query", outcome).inc()

    await asyncio.gather(*(one(r, g) for r, g in batch))
    return len(batch)


async def pay_back_guests(container: Container, gateways: Gateways, *, limit: int = 20) -> int:
    """Refund money owed to guests through their gateway (see payments.payouts); returns how
    many refunds were attempted."""
    now = container.clock()

    def claim(conn: Connection) -> list[tuple[int, Any, Any]]:
        started = []
        for row in payouts.due_payouts(conn, now=now, limit=limit):
            payout_id, owed = payouts.start_payout(
                conn, order_no=row.order_no, via="gateway", actor="system", now=now
            )
            started.append(
                (payout_id, owed, payments.get_gateway(conn, gateway_id=owed.gateway_id))
            )
        return started

    batch = await container.writer.run_async(claim)
    for payout_id, owed, gateway in batch:
        try:
            done, message = await gateways.get(gateway).refund(owed.payment_no, owed.owed_cents)
        except Exception as exc:  # left `sending`: it turns `unknown` for staff, never retried
            log.error("refund of %s failed: %s", owed.payment_no, type(exc).__name__)
            continue
        await container.writer.run_async(
            functools.partial(
                payouts.finish_payout,
                payout_id=payout_id,
                done=done,
                message=message,
                accounts=container.accounts,
                now=container.clock(),
            )
        )
        PAYMENT_STATEMENTS.labels("payout", "done" if done else "refused").inc()
        if not done:
            log.warning("gateway refused the refund of %s: %s", owed.payment_no, message)
    return len(batch)

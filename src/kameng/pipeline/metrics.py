"""Prometheus figures for the pipeline.

Counters and histograms live in the process that does the work; gauges that describe the
whole installation (workers alive, due orders, the oldest paid-but-undelivered order, supplier
circuits) are read from the database at scrape time, so any web process reports the truth
even when the workers run elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from kameng.db import table
from kameng.orders.models import Order
from kameng.orders.state import PAID_UNDELIVERED
from kameng.pipeline.models import WorkerHeartbeat

STEPS = Counter("kameng_pipeline_steps_total", "Pipeline steps run, by outcome", ["outcome"])
STEP_SECONDS = Histogram(
    "kameng_pipeline_step_seconds",
    "Wall time of one pipeline step (including supplier calls)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PAYMENT_STATEMENTS = Counter(
    "kameng_payment_statements_total",
    "What gateways told us (notify, return) or answered (query), by outcome",
    ["channel", "outcome"],
)
CALLBACKS = Counter(
    "kameng_supplier_callbacks_total", "Supplier callbacks received, by outcome", ["outcome"]
)

_order = table(Order)
_beat = table(WorkerHeartbeat)


def snapshot(container: Any) -> dict[str, Any]:
    """The figures `/healthz` and `/metrics` share."""
    from kameng.notify import service as notify
    from kameng.payments import service as payments
    from kameng.review import service as review
    from kameng.suppliers import claims, reconcile
    from kameng.suppliers import service as suppliers

    now = container.clock()
    alive_after = now - timedelta(seconds=max(3 * container.settings.worker_heartbeat_s, 15))
    with container.db.connect(write=False) as conn:
        workers = int(
            conn.execute(
                select(func.count())
                .select_from(_beat)
                .where(_beat.c.seen_at >= alive_after, _beat.c.state == "running")
            ).scalar_one()
        )
        due = int(
            conn.execute(
                select(func.count())
                .select_from(_order)
                .where(_order.c.next_action_at.is_not(None), _order.c.next_action_at <= now)
            ).scalar_one()
        )
        oldest = conn.execute(
            select(func.min(_order.c.created_at)).where(
                _order.c.status.in_([s.value for s in PAID_UNDELIVERED])
            )
        ).scalar()
        overdue = int(
            conn.execute(
                select(func.count())
                .select_from(_order)
                .where(
                    _order.c.next_action_at.is_not(None),
                    _order.c.next_action_at < now - timedelta(seconds=60),
                )
            ).scalar_one()
        )
        health = suppliers.health(conn, now=now)
        mismatches = reconcile.latest_mismatches(conn)
        open_claims = claims.open_claims_count(conn)
        pending = notify.pending_count(conn)
        pay = payments.health_counts(conn, now=now)
        queue = review.queue_figures(conn, now=now)
    return {
        **pay,
        "review_depth": queue["depth"],
        "review_oldest_s": queue["oldest_age_s"],
        "review_decisions_last_hour": queue["decisions_last_hour"],
        "review_sla_breaches": queue["sla_breaches_total"],
        "review_open_past_sla": queue["open_past_sla"],
        "workers_alive": workers,
        "due_orders": due,
        "overdue_orders": overdue,
        "oldest_paid_undelivered_s": (now - oldest).total_seconds() if oldest else 0.0,
        "outbox_pending": pending,
        "suppliers": health,
        "supplier_mismatches": mismatches,
        "supplier_claims_open": open_claims,
    }


class PipelineCollector(Collector):
    def __init__(self, container: Any) -> None:
        self.container = container

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snap = snapshot(self.container)
        except Exception:
            return
        for name, help_text, key in (
            ("kameng_workers_alive", "Workers with a recent heartbeat", "workers_alive"),
            ("kameng_orders_due", "Orders whose next action time has come", "due_orders"),
            (
                "kameng_orders_overdue",
                "Orders due for more than 60 s (workers not keeping up or absent)",
                "overdue_orders",
            ),
            (
                "kameng_oldest_paid_undelivered_seconds",
                "Age of the oldest order paid but not delivered",
                "oldest_paid_undelivered_s",
            ),
            ("kameng_outbox_pending", "Notifications waiting to be sent", "outbox_pending"),
            (
                "kameng_payments_pending",
                "Gateway payments not yet confirmed (asked about by the worker)",
                "payments_pending",
            ),
            (
                "kameng_payments_flagged",
                "Payments whose amount or currency differed: staff must look",
                "payments_flagged",
            ),
            (
                "kameng_payments_owed_to_guests",
                "Guest orders whose money waits to be paid back (kameng payments owed)",
                "payments_owed_to_guests",
            ),
            (
                "kameng_payments_owed_oldest_seconds",
                "How long the oldest money owed to a guest has waited",
                "payments_owed_oldest_s",
            ),
            (
                "kameng_payouts_need_staff",
                "Refunds to guests the gateway refused, or interrupted: staff must look",
                "payouts_need_staff",
            ),
            (
                "kameng_payment_checks_overdue",
                "Payments due for a gateway query for more than 60 s",
                "payment_checks_overdue",
            ),
            ("kameng_review_queue_depth", "Orders waiting in manual review", "review_depth"),
            (
                "kameng_review_oldest_seconds",
                "Age of the oldest order waiting in manual review",
                "review_oldest_s",
            ),
            (
                "kameng_review_decisions_last_hour",
                "Review approvals and rejections in the last hour (people and the SLA)",
                "review_decisions_last_hour",
            ),
            (
                "kameng_review_sla_breaches",
                "Review items whose SLA ran out before a reviewer decided (all time)",
                "review_sla_breaches",
            ),
            (
                "kameng_supplier_claims_open",
                "Late supplier successes (a top-up for a line served or refunded otherwise) "
                "to recover: kameng supplier claims",
                "supplier_claims_open",
            ),
            (
                "kameng_review_open_past_sla",
                "Reviews open past their SLA (should always be 0: the worker acts at the SLA)",
                "review_open_past_sla",
            ),
        ):
            yield GaugeMetricFamily(name, help_text, value=float(snap[key]))
        circuit = GaugeMetricFamily(
            "kameng_supplier_circuit_open",
            "1 when a supplier's circuit is open",
            labels=["supplier"],
        )
        success = GaugeMetricFamily(
            "kameng_supplier_success_ratio",
            "Purchases answered well, last 15 min",
            labels=["supplier"],
        )
        latency = GaugeMetricFamily(
            "kameng_supplier_latency_ms",
            "Purchase latency, last 15 min",
            labels=["supplier", "quantile"],
        )
        balance = GaugeMetricFamily(
            "kameng_supplier_balance_cents",
            "Last balance read from the supplier",
            labels=["supplier"],
        )
        reconciled = GaugeMetricFamily(
            "kameng_supplier_reconciliation_mismatches",
            "Mismatches found by the latest reconciliation of the supplier's record of "
            "purchases against ours (kameng supplier reconcile)",
            labels=["supplier"],
        )
        for h in snap["suppliers"]:
            found = snap["supplier_mismatches"].get(h.id)
            if found is not None:
                reconciled.add_metric([h.code], float(found))
            circuit.add_metric([h.code], 1.0 if h.circuit_state == "open" else 0.0)
            if h.success_rate is not None:
                success.add_metric([h.code], h.success_rate)
            if h.latency_p50_ms is not None:
                latency.add_metric([h.code, "0.5"], float(h.latency_p50_ms))
                latency.add_metric([h.code, "0.95"], float(h.latency_p95_ms or 0))
            if h.balance_cents is not None:
                balance.add_metric([h.code], float(h.balance_cents))
        yield from (circuit, success, latency, balance, reconciled)


class HealthCache:
    """`/healthz` answers many times a second (load balancers, benchmarks): the pipeline
    figures are recomputed at most once a second per process."""

    def __init__(self, container: Any, ttl_s: float = 1.0) -> None:
        self.container = container
        self.ttl_s = ttl_s
        self._value: dict[str, Any] = {}
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._at < self.ttl_s:
            return self._value
        with self._lock:
            if now - self._at >= self.ttl_s:
                snap = snapshot(self.container)
                self._value = {
                    "workers_alive": snap["workers_alive"],
                    "due_orders": snap["due_orders"],
                    "overdue_orders": snap["overdue_orders"],
                    "oldest_paid_undelivered_s": round(snap["oldest_paid_undelivered_s"], 1),
                    "outbox_pending": snap["outbox_pending"],
                    "supplier_claims_open": snap["supplier_claims_open"],
                    "payments": {
                        "pending": snap["payments_pending"],
                        "flagged": snap["payments_flagged"],
                        "checks_overdue": snap["payment_checks_overdue"],
                        "owed_to_guests": snap["payments_owed_to_guests"],
                        "owed_oldest_s": snap["payments_owed_oldest_s"],
                        "payouts_need_staff": snap["payouts_need_staff"],
                    },
                    "suppliers": {
                        h.code: {
                            "circuit": h.circuit_state,
                            "success_rate": h.success_rate,
                            "latency_p50_ms": h.latency_p50_ms,
                            "latency_p95_ms": h.latency_p95_ms,
                            "balance_cents": h.balance_cents,
                            "low_balance": h.low_balance,
                            "reconciliation_mismatches": snap["supplier_mismatches"].get(h.id),
                        }
                        for h in snap["suppliers"]
                    },
                }
                self._at = now
        return self._value

"""The worker as an operator sees it: health and metrics, leases, one claimer on SQLite,
graceful shutdown of the `kameng worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.pipeline import pipeline_rig, wait_for

from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.orders import service as orders
from kameng.pipeline.worker import Worker, claim_due
from kameng.resellers import service as resellers

SIM = {"skus": [{"sku": "T", "kind": "direct_topup", "price_cents": 100}]}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_healthz_and_metrics_show_workers_due_orders_and_the_oldest_wait(
    backend: str, tmp_path: Path
) -> None:
    with pipeline_rig(backend_container, backend, tmp_path, SIM) as rig:
        sku = rig.product(kind=DeliveryKind.card_key, stock=0, sla_seconds=600)
        waiting = rig.order(sku)["order_no"]
        assert rig.status(waiting) == "backordered"

        def pipeline() -> dict:  # type: ignore[type-arg]
            return dict(httpx.get(f"{rig.url}/healthz").json()["pipeline"])

        health = wait_for(lambda: (p := pipeline())["workers_alive"] >= 1 and p, 10)
        assert health["oldest_paid_undelivered_s"] >= 0
        assert {"due_orders", "overdue_orders", "outbox_pending", "suppliers"} <= set(health)
        time.sleep(1.1)  # the figures are cached for a second
        assert pipeline()["oldest_paid_undelivered_s"] >= 1
        metrics = httpx.get(f"{rig.url}/metrics").text
        for name in (
            "kameng_workers_alive 1.0",
            "kameng_orders_due",
            "kameng_oldest_paid_undelivered_seconds",
            "kameng_outbox_pending",
            "kameng_pipeline_steps_total",
            "kameng_pipeline_step_seconds_bucket",
        ):
            assert name in metrics, name


def test_a_claimed_order_comes_back_when_its_lease_runs_out(container: Container) -> None:
    sku = factories.add_product(container, kind=DeliveryKind.direct_topup, price_cents=1_000)
    creds = factories.add_reseller(container, balance_cents=10_000)
    with container.db.connect() as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
        placed = orders.place_order(
            conn,
            buyer=orders.Buyer(creds.reseller_id, wallet, "reseller:t"),
            cmd=orders.PlaceOrder(
                sku=container.sku(sku), unit_price_cents=1_000, quantity=1, fields={}
            ),
            accounts=container.accounts,
            vault=container.vault,
            policy=container.policy,
            now=container.clock(),
        )
    now = container.clock()
    with container.db.connect() as conn:
        assert claim_due(conn, now=now, lease_s=30, limit=10) == [placed.order_id]
    with container.db.connect() as conn:
        # Claimed: nobody else gets it while the lease runs...
        assert claim_due(conn, now=now + timedelta(seconds=29), lease_s=30, limit=10) == []
    with container.db.connect() as conn:
        # ...and if its worker died, it is due again afterwards (DESIGN §5.4).
        later = now + timedelta(seconds=31)
        assert claim_due(conn, now=later, lease_s=30, limit=10) == [placed.order_id]


def test_sqlite_has_exactly_one_claimer(sqlite_container: Container) -> None:
    first, second = Worker(sqlite_container), Worker(sqlite_container)
    assert first._acquire_claimer()
    assert not second._acquire_claimer()
    assert first._lock_file is not None
    first._lock_file.close()
    first._lock_file = None
    assert second._acquire_claimer()


def test_kameng_worker_process_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    container = factories.make_container(tmp_path)
    env = {
        **os.environ,
        "KAMENG_DATA_DIR": str(tmp_path),
        "KAMENG_MASTER_KEY": factories.MASTER_KEY_B64,
        "KAMENG_APP_SECRET": "test-app-secret",
        "KAMENG_WORKER_HEARTBEAT_S": "0.2",
    }
    env.pop("KAMENG_DATABASE_URL", None)
    kameng = Path(sys.executable).with_name("kameng")
    proc = subprocess.Popen([str(kameng), "worker"], env=env, stderr=subprocess.PIPE)
    try:

        def state() -> str | None:
            with container.db.connect(write=False) as conn:
                return conn.execute(text("SELECT state FROM worker_heartbeats")).scalar()

        wait_for(lambda: state() == "running", 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert state() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
        container.close()

"""A complete pipeline rig for tests: the app on a real port (for callbacks), a worker in a
thread, the bundled supplier simulator as a real HTTP server, and helpers to wait for states."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text

from kameng.apiclient import ResellerClient
from kameng.app import create_app
from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.pipeline.worker import Worker
from kameng.suppliers import service as suppliers
from kameng.suppliers.simulator.runner import RunningSimulator, ServerThread, start_simulator
from tests.support import factories

FAST = {
    "worker_poll_s": 0.02,
    "worker_heartbeat_s": 0.5,
    "worker_lease_s": 6,
    "supplier_poll_s": 1,
    "supplier_retry_cap_s": 2,
    "backorder_retry_s": 1,
    "supplier_balance_check_s": 1,
}


class WorkerThread:
    """A real `Worker` on its own event loop in a thread; `stop()` is its graceful shutdown."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.worker = Worker(container)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.worker.run(self._stop))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=40)
        assert not self._thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error


class Rig:
    def __init__(self, container: Container, app_url: str, sim: RunningSimulator) -> None:
        self.container = container
        self.url = app_url
        self.sim = sim
        self.creds = factories.add_reseller(container, balance_cents=10_000_000)
        self.client = ResellerClient(app_url, self.creds.api_key, self.creds.api_secret)
        self._suppliers: dict[str, int] = {}

    # -- set-up ------------------------------------------------------------------------------
    def add_supplier(
        self, code: str, sim: RunningSimulator | None = None, timeout_ms: int = 2000
    ) -> int:
        sim = sim or self.sim
        with self.container.db.connect() as conn:
            sid = suppliers.create_supplier(
                conn,
                self.container.vault,
                code=code,
                name=code,
                adapter="simulator",
                base_url=sim.url,
                api_key=sim.merchant_key,
                secret=sim.merchant_secret,
                timeout_ms=timeout_ms,
                now=self.container.clock(),
            )
        self._suppliers[code] = sid
        return sid

    def add_offer(
        self, sku: str, supplier: str, their_sku: str, *, cost_cents: int = 100, priority: int = 100
    ) -> None:
        with self.container.db.connect() as conn:
            suppliers.add_offer(
                conn,
                sku_id=self.container.sku(sku).id,
                supplier_id=self._suppliers[supplier],
                supplier_sku=their_sku,
                cost_cents=cost_cents,
                priority=priority,
                now=self.container.clock(),
            )
        self.container.invalidate_caches()

    def product(
        self,
        *,
        kind: DeliveryKind = DeliveryKind.direct_topup,
        stock: int = 0,
        sla_seconds: int | None = None,
        price_cents: int = 5_000,
    ) -> str:
        return factories.add_product(
            self.container, kind=kind, stock=stock, sla_seconds=sla_seconds, price_cents=price_cents
        )

    # -- acting --------------------------------------------------------------------------------
    def order(
        self, sku: str, quantity: int = 1, fields: dict[str, str] | None = None, ref: str = ""
    ) -> dict[str, Any]:
        import secrets

        resp = self.client.request(
            "POST",
            "/api/v1/orders",
            body={
                "sku": sku,
                "quantity": quantity,
                "fields": fields or {},
                "customer_ref": ref or secrets.token_hex(6),
            },
            idempotency_key=secrets.token_hex(8),
        )
        assert resp.status_code == 201, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def get(self, order_no: str) -> dict[str, Any]:
        resp = self.client.request("GET", f"/api/v1/orders/{order_no}")
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def status(self, order_no: str) -> str:
        with self.container.db.connect(write=False) as conn:
            return str(
                conn.execute(
                    text("SELECT status FROM orders WHERE order_no = :n"), {"n": order_no}
                ).scalar_one()
            )

    def wait_status(self, order_no: str, statuses: set[str], timeout: float = 20) -> str:
        return wait_for(
            lambda: (s := self.status(order_no)) in statuses and s,
            timeout,
            lambda: f"{order_no} still {self.status(order_no)}",
        )

    def purchases(self, sim: RunningSimulator | None = None) -> dict[str, dict[str, Any]]:
        orders: dict[str, dict[str, Any]] = (sim or self.sim).state()["orders"]
        return orders


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20, describe: Callable[[], str] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(describe() if describe else "condition not met in time")
        time.sleep(0.05)


@contextmanager
def pipeline_rig(
    backend_container: Callable[..., Any],
    backend: str,
    data_dir: Path,
    sim_config: dict[str, Any] | None = None,
    worker: bool = True,
    **overrides: Any,
) -> Iterator[Rig]:
    port = factories.free_port()
    settings = {**FAST, "public_url": f"http://127.0.0.1:{port}", **overrides}
    with ExitStack() as stack:
        container = stack.enter_context(backend_container(backend, data_dir, **settings))
        sim = stack.enter_context(start_simulator(sim_config, seed=7))
        server = ServerThread(create_app(container), port=port).start()
        stack.callback(server.stop)
        rig = Rig(container, server.url, sim)
        if worker:
            thread = WorkerThread(container).start()
            stack.callback(thread.stop)
            rig.worker = thread  # type: ignore[attr-defined]
        yield rig

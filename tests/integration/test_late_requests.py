"""A purchase request held in the network past our timeout reaches the supplier late, and is
charged: the pipeline must never buy the line again meanwhile (DESIGN §5.3).

The app and two bundled supplier simulators run in this process; the worker is the real
`kameng worker` in a subprocess, SIGKILLed and restarted while requests are held. The first
supplier sits behind a `HoldingProxy` that holds the first copy of every purchase request
(and every re-sent copy) for seconds — far past our 1 s timeout — and then delivers
it. The second supplier is a cheaper-to-reach alternative the router would pick if it thought
the first had refused.

Afterwards: every order is delivered; each order line was charged exactly once across both
suppliers (the second was never asked: the first never refused); every held request did land;
`kameng verify` is clean, including at most one charged purchase per line; and supplier
reconciliation finds nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.integration._helpers import run_cli
from tests.support import factories, workers
from tests.support.holding_proxy import HoldingProxy
from tests.support.pipeline import pipeline_rig, wait_for
from tests.support.workers import WorkerProcess, tail

from kameng.catalog.models import DeliveryKind
from kameng.pipeline.registry import Adapters
from kameng.pipeline.supplier_checks import reconcile_suppliers
from kameng.suppliers.simulator.runner import ServerThread, start_simulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SEED = 20_261_208
N_ORDERS = 10
# Every copy of a purchase request is held: the first 10 s (ten times our timeout), re-sent
# copies 6-10 s. So for seconds every query answers "not found" while copies are on the wire.
FIRST_HOLD_S = 10.0
RESEND_HOLD_S = (6.0, 10.0)
TIMEOUT_MS = 1000
KILL_AFTER_S = (0.8, 2.0, 3.5)

SIM_CONFIG = {
    "balance_cents": 1_000_000_000,
    "skus": [
        {"sku": "L-TOPUP", "kind": "direct_topup", "price_cents": 700},
        {"sku": "L-KEY", "kind": "card_key", "price_cents": 700},
    ],
}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.pg),
]


def holding_policy(rng: random.Random) -> Any:
    seen: Counter[str] = Counter()

    def hold(method: str, path: str, body: bytes) -> float:
        if method != "POST" or not path.startswith("/v1/orders"):
            return 0.0
        number = json.loads(body)["out_trade_no"]
        seen[number] += 1
        if seen[number] == 1:
            return FIRST_HOLD_S
        return rng.uniform(*RESEND_HOLD_S)

    return hold


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_purchase_held_in_the_network_is_charged_once(backend: str, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    with pipeline_rig(
        backend_container, backend, tmp_path, SIM_CONFIG, worker=False, worker_lease_s=2
    ) as rig:
        proxy = HoldingProxy(rig.sim.url, holding_policy(rng))
        with (
            ServerThread(proxy) as hop,
            start_simulator(SIM_CONFIG, seed=8) as other,
        ):
            hop.start()
            # Behind the congested link, tried first; a second supplier as the alternative.
            held_id = rig.add_supplier("held", timeout_ms=TIMEOUT_MS)
            rig.add_supplier("other", sim=other, timeout_ms=TIMEOUT_MS)
            _point_at(rig, held_id, hop.url)
            topup = rig.product(price_cents=1_000)
            keys = rig.product(kind=DeliveryKind.card_key, stock=0, price_cents=1_000)
            for sku, theirs in ((topup, "L-TOPUP"), (keys, "L-KEY")):
                rig.add_offer(sku, "held", theirs, cost_cents=700, priority=1)
                rig.add_offer(sku, "other", theirs, cost_cents=700, priority=2)

            worker = WorkerProcess(workers.worker_env(rig, lease_s=2), tmp_path)
            placed: list[str] = []
            try:
                worker.start()
                worker.wait_started()
                for i in range(N_ORDERS):
                    sku = topup if i % 2 == 0 else keys
                    quantity = 1 if sku == topup else 1 + i % 3
                    placed.append(rig.order(sku, quantity)["order_no"])
                for delay in KILL_AFTER_S:
                    time.sleep(delay)
                    worker.kill()
                    worker.start()
                    worker.wait_started()
                for no in placed:
                    rig.wait_status(no, {"delivered"}, timeout=90)
                wait_for(lambda: proxy.pending == 0, 30, lambda: f"{proxy.pending} still held")
                time.sleep(0.5)  # the last late arrival's answer, if any, is applied
            except BaseException:
                print(tail(worker.log, 60))
                raise
            finally:
                worker.stop()

            # Every held request landed at the supplier, long after we stopped waiting for it.
            assert len(proxy.held) >= N_ORDERS and proxy.delivered_late == len(proxy.held)
            assert set(proxy.late_answers) == {200}, proxy.late_answers

            # Each line charged exactly once, at the first supplier; the second never asked.
            charged: Counter[str] = Counter()
            for number, o in rig.purchases().items():
                charged[number.rsplit("-", 1)[0] if number not in placed else number] += int(
                    o["bought"]
                )
            assert charged == Counter(dict.fromkeys(placed, 1)), charged
            assert rig.purchases(other) == {}, "bought elsewhere while a purchase could land"

            procs = _sql(rig, "SELECT out_trade_no, state, charged_at FROM procurements")
            assert sorted(p.out_trade_no for p in procs) == sorted(placed), procs
            assert all(p.state == "delivered" and p.charged_at for p in procs), procs
            resends = _sql(rig, "SELECT SUM(attempts) FROM procurements")[0][0]
            assert resends > N_ORDERS  # some were sent (or asked about) more than once

            factories.assert_books_clean(rig.container)
            reports = _reconcile(rig)
            assert [r.supplier for r in reports] == ["held", "other"]
            assert all(r.ok for r in reports), [r.as_dict() for r in reports]
            assert reports[0].checked == N_ORDERS


def _point_at(rig: Any, supplier_id: int, url: str) -> None:
    with rig.container.db.connect() as conn:
        conn.execute(
            text("UPDATE suppliers SET base_url = :u WHERE id = :i"), {"u": url, "i": supplier_id}
        )


def _sql(rig: Any, query: str) -> list[Any]:
    with rig.container.db.connect(write=False) as conn:
        return list(conn.execute(text(query)))


def _reconcile(rig: Any) -> list[Any]:
    container = rig.container
    adapters = Adapters(container.vault)

    async def run() -> list[Any]:
        try:
            now = container.clock()
            return await reconcile_suppliers(
                container, adapters.get, since=now - timedelta(days=1), until=now
            )
        finally:
            await adapters.aclose()

    return asyncio.run(run())


# -- late successes after the order was refunded ---------------------------------------------------

LATE_HOLD_S = 7.0  # every copy, past the order's 3 s deadline


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_success_after_the_deadline_is_caught_not_lost(backend: str, tmp_path: Path) -> None:
    """The order is refunded at its deadline while its purchase is still on the wire; the
    purchase then succeeds. The worker keeps asking about the abandoned purchase: the late
    keys go to our stock, the late top-up becomes a claim to recover; staff see both."""
    with pipeline_rig(backend_container, backend, tmp_path, SIM_CONFIG) as rig:
        proxy = HoldingProxy(
            rig.sim.url,
            lambda method, path, body: LATE_HOLD_S if method == "POST" else 0.0,
        )
        with ServerThread(proxy) as hop:
            hop.start()
            sid = rig.add_supplier("held", timeout_ms=TIMEOUT_MS)
            _point_at(rig, sid, hop.url)
            topup = rig.product(price_cents=1_000, sla_seconds=3)
            keys = rig.product(kind=DeliveryKind.card_key, price_cents=1_000, sla_seconds=3)
            rig.add_offer(topup, "held", "L-TOPUP", cost_cents=700)
            rig.add_offer(keys, "held", "L-KEY", cost_cents=700)
            t_no = rig.order(topup)["order_no"]
            k_no = rig.order(keys, 2)["order_no"]
            for no in (t_no, k_no):
                rig.wait_status(no, {"refunded"}, timeout=20)
            wait_for(lambda: proxy.pending == 0, 30, lambda: f"{proxy.pending} still held")

            def claims() -> list[Any]:
                return _sql(
                    rig, "SELECT kind, state, amount_cents, keys_count FROM supplier_claims"
                )

            wait_for(lambda: len(claims()) == 2, 30, lambda: f"claims: {claims()}")
            assert sorted(tuple(c) for c in claims()) == [
                ("keys_to_stock", "stocked", 1_400, 2),
                ("overcharge", "open", 700, 0),
            ]
            procs = _sql(rig, "SELECT state, charged_at, late_check_at FROM procurements")
            assert [(p.state, bool(p.charged_at), p.late_check_at) for p in procs] == [
                ("abandoned", True, None)
            ] * 2
            # The late keys are on sale (the order that was refunded holds none).
            stock = _sql(
                rig,
                "SELECT state, order_line_id FROM card_keys WHERE sku_id = "
                f"{rig.container.sku(keys).id}",
            )
            assert [(s.state, s.order_line_id) for s in stock] == [("available", None)] * 2
            assert sum(int(o["bought"]) for o in rig.purchases().values()) == 2
            factories.assert_books_clean(rig.container)
            assert all(r.ok for r in _reconcile(rig))

            # Staff see them, and settle the overcharge (audited, a note required).
            listed = json.loads(_ok(_cli(rig, "supplier", "claims", "--json")))
            assert {(c["order_no"], c["kind"], c["state"]) for c in listed} == {
                (t_no, "overcharge", "open"),
                (k_no, "keys_to_stock", "stocked"),
            }
            open_id = next(c["id"] for c in listed if c["state"] == "open")
            metrics = httpx.get(f"{rig.url}/metrics", timeout=10).text
            assert "kameng_supplier_claims_open 1.0" in metrics
            missing_note = _cli(rig, "supplier", "claim-resolve", str(open_id), "--note", " ")
            assert missing_note.returncode == 2 and "Traceback" not in missing_note.stderr
            _ok(_cli(rig, "supplier", "claim-resolve", str(open_id), "--note", "credited"))
            again = _cli(rig, "supplier", "claim-resolve", str(open_id), "--note", "twice")
            assert again.returncode == 2, again.stdout
            assert _sql(rig, "SELECT state, note FROM supplier_claims WHERE id = " + str(open_id))[
                0
            ] == ("resolved", "credited")
            audit = _sql(rig, "SELECT action FROM audit_log WHERE action LIKE 'supplier.claim%'")
            assert [a.action for a in audit] == ["supplier.claim_resolve"]


def _cli(rig: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(rig.container, *args)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout

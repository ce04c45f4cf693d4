"""`kameng supplier reconcile`: the bundled simulator's own record of our purchases against our
procurements, through the real command, with each kind of mismatch made for real."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.integration._helpers import run_cli
from tests.support.pipeline import Rig, pipeline_rig, wait_for

from kameng.suppliers.adapters.signed_http import SignedHttp
from kameng.suppliers.adapters.simulator import SimulatorSupplier
from kameng.suppliers.port import Outcome

pytestmark = pytest.mark.timeout(120)

SIM_CONFIG = {
    "balance_cents": 1_000_000,
    "skus": [{"sku": "R-TOPUP", "kind": "direct_topup", "price_cents": 700}],
}
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.pg),
]


def buy_at_sim(rig: Rig, number: str) -> None:
    """A purchase made at the supplier under `number` behind the pipeline's back."""

    async def go() -> Any:
        adapter = SimulatorSupplier(
            SignedHttp(
                base_url=rig.sim.url,
                api_key=rig.sim.merchant_key,
                secret=rig.sim.merchant_secret,
                timeout_s=5,
            )
        )
        try:
            return await adapter.purchase(
                order_no=number, sku="R-TOPUP", quantity=1, fields={}, callback_url=None
            )
        finally:
            await adapter.aclose()

    assert asyncio.run(go()).outcome is Outcome.delivered


def sql(rig: Rig, query: str, **params: Any) -> list[Any]:
    with rig.container.db.connect() as conn:
        result = conn.execute(text(query), params)
        return list(result) if result.returns_rows else []


def reconcile(rig: Rig, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = run_cli(rig.container, "supplier", "reconcile", "--json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result, json.loads(result.stdout)


def gauge(rig: Rig, supplier: str) -> float | None:
    body = httpx.get(f"{rig.url}/metrics", timeout=10).text
    found = re.search(
        rf'^kameng_supplier_reconciliation_mismatches{{supplier="{supplier}"}} (\S+)$',
        body,
        re.M,
    )
    return float(found.group(1)) if found else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconcile_names_every_mismatch_and_fails(backend: str, tmp_path: Path) -> None:
    with pipeline_rig(backend_container, backend, tmp_path, SIM_CONFIG) as rig:
        rig.add_supplier("recon")
        sku = rig.product(price_cents=1_000)
        rig.add_offer(sku, "recon", "R-TOPUP", cost_cents=700)
        placed = [rig.order(sku)["order_no"] for _ in range(3)]
        for no in placed:
            rig.wait_status(no, {"delivered"})
        assert gauge(rig, "recon") is None  # never reconciled yet

        clean, body = reconcile(rig)
        assert clean.returncode == 0, clean.stderr
        assert body["ok"] and body["checked"] == 3
        assert gauge(rig, "recon") == 0.0

        first, second, third = placed
        # charged_not_recorded: a purchase at the supplier we have no record of.
        buy_at_sim(rig, "STRANGER-1")
        # bought_twice (+ charged_not_recorded for the second number): the first order's line
        # bought again under another number, which we hold as refused.
        buy_at_sim(rig, f"{first}-2")
        sql(
            rig,
            "INSERT INTO procurements (order_id, order_line_id, supplier_id, offer_id, "
            "out_trade_no, trade_no, state, quantity, keys_received, cost_cents, reason, "
            "attempts, created_at, updated_at) SELECT order_id, order_line_id, supplier_id, "
            "offer_id, :n, '', 'rejected', quantity, 0, cost_cents, 'not_received', 1, "
            "created_at, updated_at FROM procurements WHERE out_trade_no = :o",
            n=f"{first}-2",
            o=first,
        )
        # amount_differs: we recorded another price than the supplier charged.
        sql(rig, "UPDATE procurements SET charged_cents = 650 WHERE out_trade_no = :n", n=second)
        # recorded_not_charged: we hold a charge under a number the supplier never saw.
        sql(
            rig,
            "UPDATE procurements SET out_trade_no = :x WHERE out_trade_no = :n",
            x="GHOST",
            n=third,
        )

        found, body = reconcile(rig, "recon", "--days", "1")
        assert found.returncode == 1 and "mismatches" in found.stderr
        (report,) = body["suppliers"]
        kinds = sorted((m["kind"], m["out_trade_no"]) for m in report["mismatches"])
        assert kinds == sorted(
            [
                ("amount_differs", second),
                ("bought_twice", first),
                ("charged_not_recorded", f"{first}-2"),
                ("charged_not_recorded", "STRANGER-1"),
                ("charged_not_recorded", third),
                ("recorded_not_charged", "GHOST"),
            ]
        ), kinds
        assert report["counts"]["charged_not_recorded"] == 3
        differs = next(m for m in report["mismatches"] if m["kind"] == "amount_differs")
        assert (differs["our_cents"], differs["supplier_cents"]) == (650, 700)
        # The worker's and the command's runs are kept: /metrics shows the latest.
        assert gauge(rig, "recon") == 6.0

        table = run_cli(rig.container, "supplier", "reconcile")
        assert table.returncode == 1 and "bought_twice" in table.stdout

        # Had we recorded the second number's charge, kameng verify would name the line.
        assert run_cli(rig.container, "verify").returncode == 0
        sql(
            rig,
            "UPDATE procurements SET charged_at = created_at WHERE out_trade_no = :n",
            n=f"{first}-2",
        )
        bad = run_cli(rig.container, "verify")
        assert bad.returncode == 1 and "one_charged_purchase_per_line" in bad.stderr
        assert "late_successes_claimed" in bad.stderr  # a charged refusal needs its claim

        # A supplier that cannot be asked is unchecked, never taken as fine.
        sql(rig, "UPDATE suppliers SET base_url = 'http://127.0.0.1:9' WHERE code = 'recon'")
        unreachable, body = reconcile(rig)
        assert unreachable.returncode == 1
        (report,) = body["suppliers"]
        assert report["complete"] is False and report["counts"]["unchecked"] == 1

        unknown = run_cli(rig.container, "supplier", "reconcile", "nosuch")
        assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_the_worker_reconciles_on_its_own_and_metrics_show_it(tmp_path: Path) -> None:
    with pipeline_rig(
        backend_container, "sqlite", tmp_path, SIM_CONFIG, supplier_reconcile_s=1
    ) as rig:
        rig.add_supplier("recon")
        sku = rig.product(price_cents=1_000)
        rig.add_offer(sku, "recon", "R-TOPUP", cost_cents=700)
        rig.wait_status(rig.order(sku)["order_no"], {"delivered"})
        wait_for(lambda: gauge(rig, "recon") == 0.0, 15, lambda: f"gauge {gauge(rig, 'recon')}")
        buy_at_sim(rig, "STRANGER-W")
        wait_for(lambda: gauge(rig, "recon") == 1.0, 15, lambda: f"gauge {gauge(rig, 'recon')}")
        health = httpx.get(f"{rig.url}/healthz", timeout=10).json()
        assert health["pipeline"]["suppliers"]["recon"]["reconciliation_mismatches"] == 1, health
        runs = sql(rig, "SELECT checked, mismatches, complete FROM supplier_reconciliations")
        assert runs[-1] == (2, 1, True)

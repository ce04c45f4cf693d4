"""The pipeline end to end: our app, a worker and the bundled supplier simulator, all on real
HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import backend_container
from tests.support import factories
from tests.support.pipeline import Rig, pipeline_rig, wait_for

from kameng.catalog.models import DeliveryKind

SIM = {
    "balance_cents": 100_000_000,
    "skus": [
        {"sku": "TOPUP", "kind": "direct_topup", "price_cents": 4_000},
        {"sku": "KEY", "kind": "card_key", "price_cents": 3_000},
        {
            "sku": "CB",
            "kind": "direct_topup",
            "price_cents": 4_000,
            "mode": "callback",
            "callback_delay_ms": 50,
        },
    ],
}


@pytest.fixture(params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    with pipeline_rig(backend_container, request.param, tmp_path, SIM) as r:
        r.add_supplier("sim")
        yield r


def test_direct_topup_is_procured_and_delivered(rig: Rig) -> None:
    sku = rig.product()
    rig.add_offer(sku, "sim", "TOPUP", cost_cents=4_000)
    placed = rig.order(sku, fields={})
    assert (placed["status"], placed["stage"]) == ("fulfilling", "procuring")
    rig.wait_status(placed["order_no"], {"delivered"})
    body = rig.get(placed["order_no"])
    reasons = [e["reason"] for e in body["timeline"]]
    assert reasons[-1] == "upstream_delivered"
    bought = rig.purchases()
    assert bought[placed["order_no"]]["bought"] == 1
    factories.assert_books_clean(rig.container)


def test_card_keys_from_supplier_when_own_stock_is_out(rig: Rig) -> None:
    sku = rig.product(kind=DeliveryKind.card_key, stock=1)
    rig.add_offer(sku, "sim", "KEY", cost_cents=3_000)
    first = rig.order(sku)
    assert first["status"] == "delivered"
    second = rig.order(sku, quantity=3)
    assert second["status"] == "fulfilling"
    rig.wait_status(second["order_no"], {"delivered"})
    keys = rig.get(second["order_no"])["keys"]
    assert len(keys) == 3 and all(k["code"].startswith("SIM") for k in keys)
    factories.assert_books_clean(rig.container)


def test_callback_mode_delivers_through_the_callback(rig: Rig) -> None:
    sku = rig.product()
    rig.add_offer(sku, "sim", "CB")
    placed = rig.order(sku)
    rig.wait_status(placed["order_no"], {"delivered"}, timeout=10)
    timeline = rig.get(placed["order_no"])["timeline"]
    assert [e["reason"] for e in timeline][-2:] == [
        "awaiting_supplier_callback",
        "upstream_delivered",
    ]
    state = rig.sim.state()["orders"][placed["order_no"]]
    assert state["callbacks_sent"] >= 1
    factories.assert_books_clean(rig.container)
    wait_for(lambda: rig.container is not None)

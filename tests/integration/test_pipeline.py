"""The pipeline end to end: our app, a worker and the bundled supplier simulator, all on real
HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
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


def _post_callback(rig: Rig, code: str, payload: dict, secret: str, *, t: int | None = None):  # type: ignore[no-untyped-def]
    import json
    import time

    import httpx

    from kameng.security.signing import webhook_header

    body = json.dumps(payload).encode()
    ts = int(time.time()) if t is None else t
    return httpx.post(
        f"{rig.url}/api/v1/callbacks/suppliers/{code}",
        content=body,
        headers={
            "X-Kameng-Signature": webhook_header(secret, ts, body),
            "Content-Type": "application/json",
        },
    )


def test_forged_stale_wrongly_bound_and_replayed_callbacks_are_refused(
    tmp_path: Path,
) -> None:
    import time

    from sqlalchemy import text

    sim_cfg = {
        "skus": [
            {
                "sku": "CB",
                "kind": "direct_topup",
                "price_cents": 4_000,
                "mode": "callback",
                "drop_callbacks": True,
            }
        ]
    }
    with pipeline_rig(
        backend_container, "postgresql", tmp_path, sim_cfg, supplier_poll_s=120
    ) as rig:
        rig.add_supplier("sim")
        rig.add_supplier("other")  # a second connection (same simulator, different code)
        sku = rig.product()
        rig.add_offer(sku, "sim", "CB")
        order_no = rig.order(sku)["order_no"]
        wait_for(lambda: rig.get(order_no)["reason"] == "awaiting_supplier_callback")
        secret = rig.sim.merchant_secret
        delivered = {
            "event_id": "e1",
            "out_trade_no": order_no,
            "trade_no": "T1",
            "status": "delivered",
            "keys": [],
            "reason": None,
            "sequence": 2,
        }

        forged = _post_callback(rig, "sim", delivered, "not-the-secret")
        assert (forged.status_code, forged.json()["code"]) == (401, "bad_signature")
        stale = _post_callback(rig, "sim", delivered, secret, t=int(time.time()) - 400)
        assert (stale.status_code, stale.json()["code"]) == (401, "bad_signature")
        future = _post_callback(rig, "sim", delivered, secret, t=int(time.time()) + 400)
        assert future.status_code == 401
        # Properly signed, but through another supplier's door: not its purchase.
        other = _post_callback(rig, "other", delivered, secret)
        assert (other.status_code, other.json()["code"]) == (404, "unknown_order")
        made_up = _post_callback(rig, "sim", {**delivered, "out_trade_no": "K0000"}, secret)
        assert (made_up.status_code, made_up.json()["code"]) == (404, "unknown_order")
        nobody = _post_callback(rig, "ghost", delivered, secret)
        assert (nobody.status_code, nobody.json()["code"]) == (404, "unknown_supplier")
        garbled = _post_callback(rig, "sim", {"event_id": "e9"}, secret)
        assert (garbled.status_code, garbled.json()["code"]) == (400, "malformed_body")
        assert rig.status(order_no) == "fulfilling"

        ok = _post_callback(rig, "sim", delivered, secret)
        assert ok.status_code == 200 and ok.json()["outcome"] == "delivered"
        assert rig.status(order_no) == "delivered"
        replay = _post_callback(rig, "sim", delivered, secret)
        assert replay.status_code == 200 and replay.json()["outcome"] == "duplicate"
        with rig.container.db.connect(write=False) as conn:
            deliveries = conn.execute(text("SELECT COUNT(*) FROM deliveries")).scalar_one()
            events = conn.execute(text("SELECT COUNT(*) FROM supplier_events")).scalar_one()
        assert (deliveries, events) == (1, 1)
        factories.assert_books_clean(rig.container)


def test_backorders_are_served_oldest_first_and_restocks_never_jump_the_queue(rig: Rig) -> None:
    sku = rig.product(kind=DeliveryKind.card_key, stock=0, sla_seconds=600)
    waiting = [rig.order(sku, quantity=q)["order_no"] for q in (2, 1, 1)]
    assert all(rig.status(n) == "backordered" for n in waiting)
    factories.add_stock(rig.container, sku, [f"{sku}-R{i}" for i in range(2)])
    # A newcomer after the restock waits behind the queue instead of taking the fresh keys.
    late = rig.order(sku)["order_no"]
    assert rig.status(late) == "backordered"
    rig.wait_status(waiting[0], {"delivered"})
    # The head took both restocked keys, so nobody behind it overtook it (that would have left
    # it short), and none is left for anyone else: the rest wait, whatever the worker does.
    assert len(rig.get(waiting[0])["keys"]) == 2
    with rig.container.db.connect(write=False) as conn:
        states = conn.execute(
            text("SELECT state, COUNT(*) FROM card_keys WHERE sku_id = :s GROUP BY state"),
            {"s": rig.container.sku(sku).id},
        ).all()
    assert {str(state): int(n) for state, n in states} == {"sold": 2}
    assert [rig.status(n) for n in waiting[1:]] + [rig.status(late)] == ["backordered"] * 3
    factories.add_stock(rig.container, sku, [f"{sku}-S{i}" for i in range(3)])
    for order_no in [*waiting[1:], late]:
        rig.wait_status(order_no, {"delivered"})
    with rig.container.db.connect(write=False) as conn:
        delivered_at = [
            conn.execute(
                text("SELECT delivered_at FROM orders WHERE order_no = :n"), {"n": n}
            ).scalar_one()
            for n in [*waiting, late]
        ]
    assert delivered_at == sorted(delivered_at)
    assert rig.get(waiting[0])["timeline"][-1]["reason"] == "restocked"
    factories.assert_books_clean(rig.container)


def test_backorder_is_refunded_at_its_deadline_with_the_reason_on_its_timeline(
    rig: Rig,
) -> None:
    sku = rig.product(kind=DeliveryKind.card_key, stock=0, sla_seconds=2)
    before = factories.wallet_balance(rig.container, rig.creds.reseller_id)
    order_no = rig.order(sku)["order_no"]
    assert factories.wallet_balance(rig.container, rig.creds.reseller_id) != before
    rig.wait_status(order_no, {"refunded"}, timeout=15)
    body = rig.get(order_no)
    assert (body["reason"], body["next_action_at"]) == ("sla_expired_refund", None)
    assert body["timeline"][-1]["reason_text"] != "sla_expired_refund"  # a sentence, not a code
    assert factories.wallet_balance(rig.container, rig.creds.reseller_id) == before
    factories.assert_books_clean(rig.container)


def test_backorder_is_filled_when_the_supplier_recovers(rig: Rig) -> None:
    rig.sim.configure_sku("KEY", stock=0)
    sku = rig.product(kind=DeliveryKind.card_key, stock=0, sla_seconds=600)
    rig.add_offer(sku, "sim", "KEY")
    order_no = rig.order(sku, quantity=2)["order_no"]
    rig.wait_status(order_no, {"backordered"})
    body = rig.get(order_no)
    assert body["reason"] == "upstream_out_of_stock"
    assert body["reason_text"] and body["next_action_at"]
    rig.sim.add_stock("KEY", 5)
    rig.wait_status(order_no, {"delivered"}, timeout=15)
    assert len(rig.get(order_no)["keys"]) == 2
    factories.assert_books_clean(rig.container)

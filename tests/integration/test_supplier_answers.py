"""Supplier answers that arrive when the order is no longer where the purchase left it.

Scripted answers (`Lab.answer`) applied by the pipeline's own `apply_result`, so each branch is
reached on purpose instead of by timing a simulator: a supplier that delivers part and then
refuses the rest, and a supplier that answers after the order was closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import backend_container
from tests.support import factories
from tests.support.lab import Lab

from kameng.catalog.models import DeliveryKind
from kameng.ledger import service as ledger
from kameng.orders import fulfil
from kameng.orders import service as orders
from kameng.pipeline import apply
from kameng.pipeline.steps import Plan
from kameng.suppliers.port import Outcome, Result, SupplierKey

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    with backend_container(request.param, tmp_path) as container:
        yield Lab(container)


def _procurement(lab: Lab, order_id: int) -> dict[str, object]:
    rows = lab.read(
        "SELECT state, keys_received, charged_at IS NOT NULL AS charged, late_check_at "
        "FROM procurements WHERE order_id = :o",
        o=order_id,
    )
    assert len(rows) == 1, rows
    state, keys, charged, late_check = rows[0]
    return {"state": state, "keys": keys, "charged": bool(charged), "late_check": late_check}


def test_part_delivered_then_the_rest_refused_delivers_the_part_and_refunds_the_rest(
    lab: Lab,
) -> None:
    sku = lab.product(offer=True, price_cents=1_000)
    buyer = lab.member(balance=10_000)
    placed = lab.place(buyer, sku, quantity=3)
    assert lab.status(placed) == "fulfilling"
    plan = lab.plan(placed.order_id)
    part = Result(Outcome.partial, keys=(SupplierKey(f"{sku}-P1"),), cost_cents=300)

    assert lab.answer(plan, part) == "partial"
    order = lab.order(placed)
    assert (order.status, order.stage, order.reason) == (
        "fulfilling",
        "awaiting_supplier",
        "upstream_partial",
    )
    assert lab.stock(sku) == {"held": 1}

    assert lab.answer(plan, Result(Outcome.rejected, reason="out_of_stock")) == (
        "partial_delivered"
    )

    order = lab.order(placed)
    assert (order.status, order.reason) == ("delivered", "upstream_partial_refunded")
    assert (order.paid_cents, order.refunded_cents) == (3_000, 2_000)
    assert lab.stock(sku) == {"sold": 1}
    assert lab.read(
        "SELECT key_count FROM deliveries WHERE order_line_id = :l", l=placed.line_id
    ) == [(1,)]
    assert _procurement(lab, placed.order_id)["state"] == "delivered"
    with lab.c.db.connect(write=False) as conn:
        assert ledger.balances(conn, wallet_id=buyer.wallet_id) == (10_000 - 1_000, 0)
    factories.assert_books_clean(lab.c)


def _refund_while_purchasing(lab: Lab, kind: DeliveryKind) -> tuple[orders.Placed, Plan]:
    """An order refunded while its purchase is still open upstream.

    No path does this today (a deadline abandons the open purchase before refunding, a cancel
    refuses an order being fulfilled), so the refund is applied directly: this is the state the
    terminal-order guard in `apply_result` exists for, and what it must do with each answer.
    """
    sku = lab.product(kind, offer=True)
    placed = lab.place(lab.member(), sku)
    plan = lab.plan(placed.order_id)
    assert plan.kind == "purchase"
    with lab.c.db.connect() as conn:
        loaded = fulfil.load(conn, order_id=placed.order_id)
        assert loaded is not None
        apply.refund(
            conn, loaded=loaded, accounts=lab.c.accounts, reason="staff_refund", now=lab.clock()
        )
    assert lab.status(placed) == "refunded"
    return placed, plan


@pytest.mark.parametrize("kind", [DeliveryKind.direct_topup, DeliveryKind.card_key])
def test_a_success_after_the_order_was_refunded_is_caught_never_delivered(
    lab: Lab, kind: DeliveryKind
) -> None:
    placed, plan = _refund_while_purchasing(lab, kind)
    keys = (SupplierKey("LATE-1"),) if kind is DeliveryKind.card_key else ()
    label = lab.answer(plan, Result(Outcome.delivered, keys=keys, cost_cents=100))

    order = lab.order(placed)
    assert order.status == "refunded"  # not delivered, not paid again
    assert order.refunded_cents == order.paid_cents
    proc = _procurement(lab, order.id)
    assert (proc["state"], proc["charged"]) == ("abandoned", True)
    claims = lab.read(
        "SELECT kind, keys_count FROM supplier_claims WHERE order_id = :o", o=order.id
    )
    assert len(claims) == 1
    if kind is DeliveryKind.card_key:
        assert label == "late_keys_to_stock"
        # The keys we paid for are ours to sell: on sale, on no order's line.
        assert lab.read(
            "SELECT state, order_line_id FROM card_keys WHERE sku_id = :s", s=order.sku_id
        ) == [("available", None)]
    else:
        assert label == "late_overcharge"  # a top-up we cannot use: a claim on the supplier
    factories.assert_books_clean(lab.c)


def test_a_refusal_after_the_order_was_refunded_settles_the_purchase(lab: Lab) -> None:
    placed, plan = _refund_while_purchasing(lab, DeliveryKind.direct_topup)
    assert lab.answer(plan, Result(Outcome.rejected, reason="out_of_stock")) == "order_closed"
    order = lab.order(placed)
    assert order.status == "refunded"
    proc = _procurement(lab, order.id)
    assert (proc["state"], proc["charged"]) == ("rejected", False)
    factories.assert_books_clean(lab.c)


@pytest.mark.parametrize("outcome", [Outcome.accepted, Outcome.unknown])
def test_an_open_answer_after_the_order_was_refunded_is_given_up_and_still_checked(
    lab: Lab, outcome: Outcome
) -> None:
    """Still open at the supplier for an order that no longer wants it: abandoned, with a late
    check due now, so a success that comes later is caught (never bought again, never lost)."""
    placed, plan = _refund_while_purchasing(lab, DeliveryKind.direct_topup)
    assert lab.answer(plan, Result(outcome)) == "order_closed"
    order = lab.order(placed)
    assert order.status == "refunded"
    proc = _procurement(lab, order.id)
    assert proc["state"] == "abandoned"
    assert proc["late_check"] is not None
    assert lab.read("SELECT COUNT(*) FROM supplier_claims") == [(0,)]
    factories.assert_books_clean(lab.c)

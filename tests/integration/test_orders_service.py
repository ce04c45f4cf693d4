"""Order service on both backends: place (delivered, backordered, direct top-up, manual),
cancel, and compare-and-set transitions (DESIGN §4, §5.1, §5.3, §5.4).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from tests.support import factories

from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.orders import cancel as order_cancel
from kameng.orders import queries as order_queries
from kameng.orders import service as orders
from kameng.orders.models import Order
from kameng.orders.state import PAID_UNDELIVERED, Stage, Status, TransitionError
from kameng.resellers import service as resellers

_orders = table(Order)
PRICE = 1_000
INITIAL = 20_000


class Shop:
    def __init__(self, container: Container, balance: int = INITIAL) -> None:
        self.container = container
        self.creds = factories.add_reseller(container, balance_cents=balance)
        with container.db.connect(write=False) as conn:
            self.wallet = resellers.reseller_wallet(conn, reseller_id=self.creds.reseller_id)
        self.buyer = orders.Buyer(self.creds.reseller_id, self.wallet, "reseller:test")

    def place(
        self,
        sku_code: str,
        quantity: int = 1,
        *,
        ref: str = "",
        now: datetime | None = None,
        fields: dict[str, str] | None = None,
    ) -> orders.Placed:
        c = self.container
        sku = c.sku(sku_code)
        with c.db.connect() as conn:
            return orders.place_order(
                conn,
                buyer=self.buyer,
                cmd=orders.PlaceOrder(
                    sku=sku,
                    unit_price_cents=sku.price_cents,
                    quantity=quantity,
                    fields=fields or {},
                    customer_ref=ref,
                ),
                accounts=c.accounts,
                vault=c.vault,
                policy=c.policy,
                now=now or c.clock(),
            )

    def cancel(self, order_no: str, reseller_id: int | None = None) -> bool:
        c = self.container
        with c.db.connect() as conn:
            return order_cancel.cancel_order(
                conn,
                order_no=order_no,
                reseller_id=self.creds.reseller_id if reseller_id is None else reseller_id,
                wallet_id=self.wallet,
                accounts=c.accounts,
                actor="reseller:test",
                reason="canceled_by_buyer",
                now=c.clock(),
            )

    def balance(self) -> tuple[int, int]:
        return factories.wallet_balance(self.container, self.creds.reseller_id)


def _order(container: Container, order_id: int) -> Any:
    with container.db.connect(write=False) as conn:
        return conn.execute(select(_orders).where(_orders.c.id == order_id)).one()


def _order_by_no(container: Container, order_no: str) -> Any:
    with container.db.connect(write=False) as conn:
        return order_queries.find_order(conn, order_no=order_no, reseller_id=None)


def _events(container: Container, order_id: int) -> list[tuple[str | None, str, str, str]]:
    with container.db.connect(write=False) as conn:
        rows = order_queries.timeline(conn, order_id=order_id)
    return [(r.from_status, r.to_status, r.stage, r.reason) for r in rows]


def _hold(container: Container, hold_id: int) -> Any:
    with container.db.connect(write=False) as conn:
        return conn.execute(text("SELECT * FROM ledger_holds WHERE id = :h"), {"h": hold_id}).one()


def _count(container: Container, table: str) -> int:
    with container.db.connect(write=False) as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def _written(container: Container) -> dict[str, int]:
    return {
        t: _count(container, t)
        for t in ("orders", "order_events", "ledger_transactions", "ledger_holds", "deliveries")
    }


def _assert_nothing_paid_is_forgotten(container: Container) -> None:
    """DESIGN §5.4: every paid, undelivered order has a pending hold and a next action."""
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            text(
                "SELECT o.order_no, o.status, o.next_action_at, o.sla_deadline, h.state "
                "FROM orders o LEFT JOIN ledger_holds h ON h.id = o.hold_id"
            )
        ).all()
    for r in rows:
        if Status(r.status) in PAID_UNDELIVERED:
            assert r.next_action_at is not None, r
            assert r.sla_deadline is not None, r
            assert r.state == "pending", r


# -- placing --------------------------------------------------------------------------------------


def test_place_from_stock_delivers_at_once(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    codes = [f"{sku}-KEY-{i}" for i in range(3)]
    factories.add_stock(container, sku, codes)
    shop = Shop(container)
    now = container.clock()
    placed = shop.place(sku, 2, now=now)

    assert (placed.status, placed.stage, placed.reason) == (
        Status.delivered,
        Stage.delivered,
        "own_stock",
    )
    assert placed.amount_cents == 2 * PRICE
    assert placed.next_action_at is None and placed.sla_deadline is None
    assert len(placed.keys) == 2
    with container.db.connect(write=False) as conn:
        container.decryptor.preload(conn, {k.batch_id for k in placed.keys})
    plain = [
        container.decryptor.decrypt(sku_id=container.sku(sku).id, key=k)["code"]
        for k in placed.keys
    ]
    assert len(set(plain)) == 2 and set(plain) <= set(codes)

    row = _order(container, placed.order_id)
    assert (row.status, row.stage, row.version) == ("delivered", "delivered", 2)
    assert (row.paid_cents, row.refunded_cents, row.hold_id) == (2 * PRICE, 0, None)
    assert row.delivered_at is not None and row.next_action_at is None
    assert _events(container, placed.order_id) == [
        (None, "paid", "payment_received", "paid_from_balance"),
        ("paid", "fulfilling", "allocating", "allocating_own_stock"),
        ("fulfilling", "delivered", "delivered", "own_stock"),
    ]
    with container.db.connect(write=False) as conn:
        delivery = conn.execute(
            text("SELECT source, key_count FROM deliveries WHERE order_line_id = :l"),
            {"l": placed.line_id},
        ).all()
        key_lines = conn.execute(
            text("SELECT order_line_id FROM card_keys WHERE state = 'sold'")
        ).scalars()
        reveals = conn.execute(
            text("SELECT channel, key_count FROM key_reveals WHERE order_id = :o"),
            {"o": placed.order_id},
        ).all()
        assert list(key_lines) == [placed.line_id] * 2
    assert [tuple(d) for d in delivery] == [("own_stock", 2)]
    assert [tuple(r) for r in reveals] == [("order_create", 2)]
    assert shop.balance() == (INITIAL - 2 * PRICE, 0)
    factories.assert_books_clean(container)


def test_short_of_stock_the_order_waits_with_its_money_held(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=1, sla_seconds=900)
    shop = Shop(container)
    now = container.clock()
    placed = shop.place(sku, 2, now=now)

    retry = now + timedelta(seconds=container.policy.backorder_retry_s)
    assert (placed.status, placed.stage, placed.reason) == (
        Status.backordered,
        Stage.waiting_stock,
        "out_of_stock",
    )
    assert placed.keys == []
    assert placed.next_action_at == retry
    assert placed.sla_deadline == now + timedelta(seconds=900)
    row = _order(container, placed.order_id)
    assert (row.status, row.stage, row.version) == ("backordered", "waiting_stock", 2)
    assert row.next_action_at == retry
    assert row.sla_deadline == now + timedelta(seconds=900)
    assert row.delivered_at is None
    hold = _hold(container, row.hold_id)
    assert (hold.state, hold.amount_cents, hold.account_id) == ("pending", 2 * PRICE, shop.wallet)
    assert (hold.ref_type, hold.ref_id) == ("order", placed.order_id)
    events = _events(container, placed.order_id)
    assert events == [
        (None, "paid", "payment_received", "paid_from_balance"),
        ("paid", "backordered", "waiting_stock", "out_of_stock"),
    ]
    assert shop.balance() == (INITIAL - 2 * PRICE, 2 * PRICE)
    assert _count(container, "deliveries") == 0
    # The one key in stock is untouched: an order is filled whole or not at all.
    with container.db.connect(write=False) as conn:
        assert conn.execute(text("SELECT state FROM card_keys")).scalars().all() == ["available"]
    factories.assert_books_clean(container)
    _assert_nothing_paid_is_forgotten(container)


def test_backorder_sla_defaults_to_the_policy(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    now = container.clock()
    placed = Shop(container).place(sku, 1, now=now)
    assert placed.sla_deadline == now + timedelta(seconds=container.policy.default_sla_s)
    factories.assert_books_clean(container)


@pytest.mark.parametrize(
    ("kind", "stage", "reason"),
    [
        (DeliveryKind.direct_topup, Stage.procuring, "awaiting_supplier"),
        (DeliveryKind.manual, Stage.staff_processing, "awaiting_staff"),
    ],
)
def test_direct_topup_and_manual_orders_are_fulfilling_with_a_next_action(
    container: Container, kind: DeliveryKind, stage: Stage, reason: str
) -> None:
    sku = factories.add_product(container, price_cents=PRICE, kind=kind, sla_seconds=600)
    shop = Shop(container)
    now = container.clock()
    placed = shop.place(sku, 1, now=now)

    assert (placed.status, placed.stage, placed.reason) == (Status.fulfilling, stage, reason)
    deadline = now + timedelta(seconds=600)
    assert placed.sla_deadline == deadline
    # A supplier is asked at once; staff are expected by the SLA deadline.
    assert placed.next_action_at == (now if kind is DeliveryKind.direct_topup else deadline)
    row = _order(container, placed.order_id)
    assert (row.status, row.stage) == ("fulfilling", stage.value)
    assert row.next_action_at == placed.next_action_at
    assert _hold(container, row.hold_id).state == "pending"
    assert _events(container, placed.order_id) == [
        (None, "paid", "payment_received", "paid_from_balance"),
        ("paid", "fulfilling", stage.value, reason),
    ]
    assert shop.balance() == (INITIAL - PRICE, PRICE)
    factories.assert_books_clean(container)
    _assert_nothing_paid_is_forgotten(container)


def test_every_paid_undelivered_order_has_a_next_action(container: Container) -> None:
    stocked = factories.add_product(container, price_cents=PRICE, stock=3)
    topup = factories.add_product(container, price_cents=PRICE, kind=DeliveryKind.direct_topup)
    manual = factories.add_product(container, price_cents=PRICE, kind=DeliveryKind.manual)
    shop = Shop(container, balance=100_000)
    placed = [shop.place(stocked, q, ref=f"s{i}") for i, q in enumerate([2, 2, 1, 1])]
    placed += [shop.place(topup, 1, ref="t"), shop.place(manual, 1, ref="m")]
    shop.cancel(placed[1].order_no)
    statuses = sorted(_order(container, p.order_id).status for p in placed)
    # The 1-key order placed after the 2-key one waits behind it (FIFO), even though one key
    # was left: restocks and leftovers never jump the queue.
    assert statuses == [
        "backordered",
        "backordered",
        "canceled",
        "delivered",
        "fulfilling",
        "fulfilling",
    ]
    _assert_nothing_paid_is_forgotten(container)
    factories.assert_books_clean(container)


def test_duplicate_guard_and_cancel_lift_it(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    shop = Shop(container)
    first = shop.place(sku, 1, ref="customer-42")
    before = _written(container)
    with pytest.raises(KamengError) as exc:
        shop.place(sku, 1, ref="customer-42")
    assert exc.value.code is ErrorCode.duplicate_order_suspected
    assert exc.value.extra["existing_order_no"] == first.order_no
    assert _written(container) == before
    assert shop.place(sku, 1, ref="customer-43").status is Status.backordered
    assert shop.cancel(first.order_no)
    assert shop.place(sku, 1, ref="customer-42").status is Status.backordered
    factories.assert_books_clean(container)


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_voids_the_hold_and_refunds_in_full(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    shop = Shop(container)
    placed = shop.place(sku, 3)
    assert shop.balance() == (INITIAL - 3 * PRICE, 3 * PRICE)

    assert shop.cancel(placed.order_no) is True
    row = _order(container, placed.order_id)
    assert (row.status, row.stage, row.reason) == ("canceled", "closed", "canceled_by_buyer")
    assert row.refunded_cents == row.paid_cents == 3 * PRICE
    assert row.next_action_at is None and row.sla_deadline is None
    assert row.version == 3
    assert _hold(container, row.hold_id).state == "voided"
    assert _events(container, placed.order_id)[-1] == (
        "backordered",
        "canceled",
        "closed",
        "canceled_by_buyer",
    )
    assert shop.balance() == (INITIAL, 0)
    factories.assert_books_clean(container)

    before = _written(container)
    assert shop.cancel(placed.order_no) is False  # already canceled: nothing more happens
    assert _written(container) == before
    assert shop.balance() == (INITIAL, 0)
    factories.assert_books_clean(container)


def test_cancel_releases_keys_allocated_to_the_order(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    shop = Shop(container)
    placed = shop.place(sku, 2)
    factories.add_stock(container, sku, [f"{sku}-LATE-{i}" for i in range(2)])
    with container.db.connect() as conn:  # stock arrived; allocation has begun
        got = inventory.claim(
            conn,
            sku_id=container.sku(sku).id,
            quantity=2,
            line_id=placed.line_id,
            now=container.clock(),
        )
    assert got is not None
    assert shop.cancel(placed.order_no)
    with container.db.connect(write=False) as conn:
        rows = conn.execute(text("SELECT state, order_line_id FROM card_keys")).all()
    assert sorted(tuple(r) for r in rows) == [("available", None), ("available", None)]
    assert shop.balance() == (INITIAL, 0)
    factories.assert_books_clean(container)


def test_cancel_is_refused_for_delivered_fulfilling_and_foreign_orders(
    container: Container,
) -> None:
    stocked = factories.add_product(container, price_cents=PRICE, stock=1)
    topup = factories.add_product(container, price_cents=PRICE, kind=DeliveryKind.direct_topup)
    shop = Shop(container)
    delivered = shop.place(stocked, 1)
    fulfilling = shop.place(topup, 1)
    mine = shop.place(stocked, 1, ref="backordered")
    stranger = Shop(container)
    before = _written(container)
    balance = shop.balance()
    for placed in (delivered, fulfilling):
        with pytest.raises(KamengError) as exc:
            shop.cancel(placed.order_no)
        assert exc.value.code is ErrorCode.order_not_cancelable
    with pytest.raises(KamengError) as exc:
        shop.cancel(mine.order_no, reseller_id=stranger.creds.reseller_id)
    assert exc.value.code is ErrorCode.order_not_found
    assert _written(container) == before
    assert shop.balance() == balance
    assert _order(container, mine.order_id).status == "backordered"
    factories.assert_books_clean(container)


# -- compare-and-set transitions ------------------------------------------------------------------


def _to_fulfilling(container: Container, order: Any) -> None:
    now = container.clock()
    with container.db.connect() as conn:
        orders.transition(
            conn,
            order=order,
            to_status=Status.fulfilling,
            stage=Stage.allocating,
            reason="stock_arrived",
            actor="system",
            now=now,
            next_action_at=now + timedelta(seconds=30),
        )


def test_a_stale_version_cannot_move_an_order(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    placed = Shop(container).place(sku, 1)
    stale = _order_by_no(container, placed.order_no)
    assert stale.version == 2
    _to_fulfilling(container, stale)
    fresh = _order_by_no(container, placed.order_no)
    assert (fresh.status, fresh.stage, fresh.version) == ("fulfilling", "allocating", 3)
    assert fresh.next_action_at is not None

    before = _written(container)
    with pytest.raises(KamengError) as exc:
        _to_fulfilling(container, stale)
    assert exc.value.code is ErrorCode.concurrent_update
    assert _written(container) == before
    assert _order_by_no(container, placed.order_no).version == 3
    factories.assert_books_clean(container)
    _assert_nothing_paid_is_forgotten(container)


def test_racing_transitions_from_one_snapshot_let_exactly_one_through(
    container: Container,
) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=0)
    placed = Shop(container).place(sku, 1)
    snapshot = _order_by_no(container, placed.order_no)
    events_before = _count(container, "order_events")
    barrier = threading.Barrier(8, timeout=30)

    def attempt(_: int) -> str:
        barrier.wait()
        try:
            _to_fulfilling(container, snapshot)
        except KamengError as exc:
            assert exc.code is ErrorCode.concurrent_update
            return "refused"
        return "moved"

    with ThreadPoolExecutor(8) as pool:
        results = sorted(pool.map(attempt, range(8)))
    assert results == ["moved"] + ["refused"] * 7
    assert _count(container, "order_events") == events_before + 1
    assert _order_by_no(container, placed.order_no).version == snapshot.version + 1
    factories.assert_books_clean(container)


def test_a_forbidden_move_is_refused_and_writes_nothing(container: Container) -> None:
    sku = factories.add_product(container, price_cents=PRICE, stock=1)
    placed = Shop(container).place(sku, 1)
    order = _order_by_no(container, placed.order_no)
    before = _written(container)
    for target in (Status.backordered, Status.canceled, Status.paid):
        with pytest.raises(TransitionError), container.db.connect() as conn:
            orders.transition(
                conn,
                order=order,
                to_status=target,
                reason="test",
                actor="system",
                now=container.clock(),
            )
    assert _written(container) == before
    assert _order_by_no(container, placed.order_no).status == "delivered"
    factories.assert_books_clean(container)

"""Stateful property test: random sequences of reseller, stock and order operations on a real
migrated SQLite database, with the money and stock invariants of DESIGN §5 checked after
every step against a Python model of the expected state.

Operations (all through the real services): create + top up a reseller, import card keys
(including re-imports that must be refused as duplicates), place orders (delivered from stock,
backordered with the money held, or refused for insufficient balance) and cancel orders
(backordered -> canceled with the money back, delivered -> refused, canceled -> no-op).
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from sqlalchemy import text
from tests.support import factories

from kameng.errors import ErrorCode, KamengError
from kameng.orders import cancel as order_cancel
from kameng.orders import service as orders
from kameng.resellers import service as resellers

PRICES = {"SKU-STATE-A": 500, "SKU-STATE-B": 1_500}


@dataclass
class ModelReseller:
    reseller_id: int
    wallet_id: int
    available: int = 0
    held: int = 0


@dataclass
class ModelOrder:
    order_no: str
    reseller_id: int
    sku: str
    quantity: int
    amount: int
    line_id: int
    status: str
    key_ids: list[int] = field(default_factory=list)


class PlatformMachine(RuleBasedStateMachine):
    reseller_ids = Bundle("reseller_ids")
    order_nos = Bundle("order_nos")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kameng-stateful-")
        self.container = factories.make_container(Path(self.tmp))
        self.resellers: dict[int, ModelReseller] = {}
        self.orders: dict[str, ModelOrder] = {}
        self.available_keys: dict[str, int] = dict.fromkeys(PRICES, 0)
        self.imported: dict[str, list[str]] = {sku: [] for sku in PRICES}
        self.sku_ids: dict[str, int] = {}
        self.counter = itertools.count(1)

    @initialize()
    def create_skus(self) -> None:
        for code, price in PRICES.items():
            factories.add_product(
                self.container, sku=code, price_cents=price, cost_cents=price // 2
            )
            self.sku_ids[code] = self.container.sku(code).id

    def teardown(self) -> None:
        self.container.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def _scalar(self, sql: str, **params: object) -> int:
        with self.container.db.connect(write=False) as conn:
            return int(conn.execute(text(sql), params).scalar_one() or 0)

    def _order_count(self) -> int:
        return self._scalar("SELECT COUNT(*) FROM orders")

    def _db_available(self) -> dict[str, int]:
        return {
            code: self._scalar(
                "SELECT COUNT(*) FROM card_keys WHERE sku_id = :s AND state = 'available'",
                s=sku_id,
            )
            for code, sku_id in self.sku_ids.items()
        }

    def _balances(self) -> dict[int, tuple[int, int]]:
        return {rid: factories.wallet_balance(self.container, rid) for rid in self.resellers}

    # -- rules ------------------------------------------------------------------------------

    @rule(target=reseller_ids, amount=st.integers(min_value=1, max_value=6_000))
    def create_reseller(self, amount: int) -> int:
        creds = factories.add_reseller(self.container, tier="normal")
        factories.topup(self.container, creds.reseller_id, amount)
        with self.container.db.connect(write=False) as conn:
            wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
        self.resellers[creds.reseller_id] = ModelReseller(
            creds.reseller_id, wallet, available=amount
        )
        return creds.reseller_id

    @rule(rid=reseller_ids, amount=st.integers(min_value=1, max_value=5_000))
    def topup_more(self, rid: int, amount: int) -> None:
        factories.topup(self.container, rid, amount)
        self.resellers[rid].available += amount

    @rule(sku=st.sampled_from(sorted(PRICES)), count=st.integers(min_value=1, max_value=6))
    def import_keys(self, sku: str, count: int) -> None:
        keys = [f"{sku}-{next(self.counter):06d}-{secrets.token_hex(6)}" for _ in range(count)]
        result = factories.add_stock(self.container, sku, keys)
        assert (result.imported, result.duplicates, result.invalid) == (count, 0, 0)
        self.imported[sku].extend(keys)
        self.available_keys[sku] += count

    @precondition(lambda self: any(self.imported.values()))
    @rule(data=st.data())
    def reimport_duplicate(self, data: st.DataObject) -> None:
        sku = data.draw(st.sampled_from([s for s in sorted(PRICES) if self.imported[s]]))
        old = data.draw(st.sampled_from(self.imported[sku]))
        fresh = f"{sku}-{next(self.counter):06d}-{secrets.token_hex(6)}"
        result = factories.add_stock(self.container, sku, [old, fresh])
        assert (result.imported, result.duplicates) == (1, 1), result
        self.imported[sku].append(fresh)
        self.available_keys[sku] += 1

    @rule(
        target=order_nos,
        rid=reseller_ids,
        sku=st.sampled_from(sorted(PRICES)),
        quantity=st.integers(min_value=1, max_value=3),
    )
    def place_order(self, rid: int, sku: str, quantity: int) -> object:
        r = self.resellers[rid]
        amount = PRICES[sku] * quantity
        orders_before = self._order_count()
        balances_before = self._balances()
        stock_before = self._db_available()
        c = self.container
        info = c.sku(sku)
        try:
            with c.db.connect() as conn:
                placed = orders.place_order(
                    conn,
                    buyer=orders.Buyer(rid, r.wallet_id, "reseller:test"),
                    cmd=orders.PlaceOrder(
                        sku=info,
                        unit_price_cents=info.price_cents,
                        quantity=quantity,
                        fields={},
                        customer_ref=f"ref-{next(self.counter)}",
                    ),
                    accounts=c.accounts,
                    vault=c.vault,
                    policy=c.policy,
                    now=c.clock(),
                )
        except KamengError as exc:
            assert exc.code is ErrorCode.insufficient_balance, exc
            assert r.available < amount, (r, amount)
            # Refused: nothing at all changed.
            assert self._order_count() == orders_before
            assert self._balances() == balances_before
            assert self._db_available() == stock_before
            return multiple()

        assert r.available >= amount, f"order of {amount} accepted with only {r.available}"
        assert placed.amount_cents == amount
        r.available -= amount
        order = ModelOrder(
            placed.order_no, rid, sku, quantity, amount, placed.line_id, placed.status.value
        )
        # FIFO: while an order waits for this SKU, a new one waits behind it whatever the stock.
        queue = any(o.sku == sku and o.status == "backordered" for o in self.orders.values())
        if self.available_keys[sku] >= quantity and not queue:
            assert placed.status.value == "delivered", placed
            assert len(placed.keys) == quantity
            order.key_ids = [k.id for k in placed.keys]
            self.available_keys[sku] -= quantity
        else:
            assert placed.status.value == "backordered", placed
            assert placed.keys == []
            r.held += amount
        self.orders[placed.order_no] = order
        assert self._order_count() == orders_before + 1
        return placed.order_no

    @rule(order_no=order_nos)
    def cancel_order(self, order_no: str) -> None:
        order = self.orders[order_no]
        r = self.resellers[order.reseller_id]
        c = self.container

        def cancel() -> bool:
            with c.db.connect() as conn:
                return order_cancel.cancel_order(
                    conn,
                    order_no=order_no,
                    reseller_id=order.reseller_id,
                    wallet_id=r.wallet_id,
                    accounts=c.accounts,
                    actor="reseller:test",
                    reason="canceled_by_buyer",
                    now=c.clock(),
                )

        if order.status == "backordered":
            assert cancel() is True
            order.status = "canceled"
            r.available += order.amount
            r.held -= order.amount
        elif order.status == "delivered":
            try:
                cancel()
            except KamengError as exc:
                assert exc.code is ErrorCode.order_not_cancelable, exc
            else:
                raise AssertionError(f"delivered order {order_no} was canceled")
        else:
            assert order.status == "canceled"
            assert cancel() is False

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def books_verify(self) -> None:
        report = factories.verify_all(self.container)
        bad = {k: v for k, v in report.violations.items() if v}
        assert report.ok, f"invariant violations: {bad}"

    @invariant()
    def ledger_sums_to_zero(self) -> None:
        assert self._scalar("SELECT COALESCE(SUM(balance_cents), 0) FROM ledger_accounts") == 0

    @invariant()
    def wallets_match_model(self) -> None:
        for rid, r in self.resellers.items():
            assert factories.wallet_balance(self.container, rid) == (r.available, r.held), rid

    @invariant()
    def stock_matches_model(self) -> None:
        assert self._db_available() == self.available_keys

    @invariant()
    def orders_match_model(self) -> None:
        with self.container.db.connect(write=False) as conn:
            rows = conn.execute(text("SELECT order_no, status FROM orders")).all()
        assert {r.order_no: r.status for r in rows} == {
            no: o.status for no, o in self.orders.items()
        }

    @invariant()
    def keys_delivered_once(self) -> None:
        delivered = [k for o in self.orders.values() for k in o.key_ids]
        assert len(delivered) == len(set(delivered)), "a key was delivered to two orders"
        expected = {
            k: (o.line_id, self.sku_ids[o.sku]) for o in self.orders.values() for k in o.key_ids
        }
        with self.container.db.connect(write=False) as conn:
            sold = conn.execute(
                text("SELECT id, order_line_id, sku_id FROM card_keys WHERE state <> 'available'")
            ).all()
            per_line = conn.execute(
                text(
                    "SELECT order_line_id, COUNT(*) AS n FROM card_keys "
                    "WHERE order_line_id IS NOT NULL GROUP BY order_line_id"
                )
            ).all()
        assert {r.id: (r.order_line_id, r.sku_id) for r in sold} == expected
        lines = {o.line_id: len(o.key_ids) for o in self.orders.values() if o.key_ids}
        assert {r.order_line_id: r.n for r in per_line} == lines


PlatformMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPlatformStateMachine = PlatformMachine.TestCase

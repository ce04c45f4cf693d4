"""Stateful property test of the pipeline: random sequences of pay / worker step / supplier
callback / cancel / clock advance (deadline refunds) / restock / supplier stock-outs, against a
real migrated SQLite database and the bundled supplier simulator over real HTTP. After every
step the invariants of DESIGN §5 are checked:

  money      — `verify` (ledger, holds, order money), every wallet = top-up − what it paid for
  stock      — no key on two lines, delivered lines hold exactly their keys
  delivery   — at most one delivery per line, at most one upstream purchase per line
  progress   — every order is terminal or has a next action time the worker will honour

The worker is driven step by step (`run_step`) under a controlled clock, so every interleaving
hypothesis finds can be replayed exactly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import text
from tests.support import factories

from kameng.catalog.models import DeliveryKind
from kameng.errors import ErrorCode, KamengError
from kameng.orders import cancel as order_cancel
from kameng.orders import service as orders
from kameng.pipeline import callbacks
from kameng.pipeline.apply import Timing
from kameng.pipeline.registry import Adapters
from kameng.pipeline.steps import StepContext, run_step
from kameng.resellers import service as resellers
from kameng.security.signing import webhook_header
from kameng.suppliers import service as suppliers
from kameng.suppliers.simulator.runner import RunningSimulator, start_simulator

SIM = {
    "balance_cents": 1_000_000_000,
    "skus": [
        {
            "sku": "SK",
            "kind": "card_key",
            "price_cents": 300,
            "mode": "callback",
            "drop_callbacks": True,
            "callback_delay_ms": 0,
        },
        {"sku": "ST", "kind": "direct_topup", "price_cents": 400},
    ],
}
TOPUP = 1_000_000
# Where a buyer may cancel (orders/state.py CANCELABLE, written out: the machine checks the
# service against the rule, not against itself).
BUYER_CANCELABLE = frozenset({"pending_payment", "backordered", "needs_buyer_action"})
_SIMULATOR: RunningSimulator | None = None


def simulator() -> RunningSimulator:
    global _SIMULATOR
    if _SIMULATOR is None:
        _SIMULATOR = start_simulator(SIM, seed=11)
    return _SIMULATOR


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now().astimezone().replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kameng-pipe-state-")
        self.container = factories.make_container(Path(self.tmp))
        self.clock = Clock()
        self.container.clock = self.clock
        self.sim = simulator()
        self.sim.reset()
        self.loop = asyncio.new_event_loop()
        self.adapters = Adapters(self.container.vault)
        self.ctx = StepContext(
            run=self.container.writer.run_async,
            vault=self.container.vault,
            accounts=self.container.accounts,
            adapters=self.adapters,
            clock=self.clock,
            callback_base_url="http://127.0.0.1:9",  # callbacks are delivered by the test
            timing=Timing(poll_s=5, retry_cap_s=20, backorder_retry_s=10),
            lease_s=30,
        )
        self.placed: list[str] = []
        self.key_serial = 0

    @initialize()
    def set_up(self) -> None:
        c = self.container
        self.card = factories.add_product(
            c, kind=DeliveryKind.card_key, price_cents=1_000, sla_seconds=120
        )
        self.topup = factories.add_product(
            c, kind=DeliveryKind.direct_topup, price_cents=900, sla_seconds=60
        )
        with c.db.connect() as conn:
            self.supplier_id = suppliers.create_supplier(
                conn,
                c.vault,
                code="sim",
                name="sim",
                adapter="simulator",
                base_url=self.sim.url,
                api_key=self.sim.merchant_key,
                secret=self.sim.merchant_secret,
                timeout_ms=3000,
                now=self.clock(),
            )
            for sku, theirs in ((self.card, "SK"), (self.topup, "ST")):
                suppliers.add_offer(
                    conn,
                    sku_id=c.sku(sku).id,
                    supplier_id=self.supplier_id,
                    supplier_sku=theirs,
                    cost_cents=100,
                    now=self.clock(),
                )
        c.invalidate_caches()
        self.creds = factories.add_reseller(c, balance_cents=TOPUP)
        with c.db.connect(write=False) as conn:
            self.wallet = resellers.reseller_wallet(conn, reseller_id=self.creds.reseller_id)
        self.sim.configure_sku("SK", stock=None)

    @initialize(out=st.booleans())
    def supplier_starts_out_of_stock(self, out: bool) -> None:
        self.sim.configure_sku("SK", stock=0 if out else None)

    def teardown(self) -> None:
        if hasattr(self, "creds"):
            with self.container.db.connect(write=False) as conn:
                for status, reason in conn.execute(text("SELECT status, reason FROM orders")):
                    event(f"order ended {status}/{reason}")
        self.loop.run_until_complete(self.adapters.aclose())
        self.loop.close()
        self.container.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- rules ------------------------------------------------------------------------------

    @rule(card=st.booleans(), quantity=st.integers(1, 3), work=st.booleans())
    def pay(self, card: bool, quantity: int, work: bool) -> None:
        c = self.container
        sku = c.sku(self.card if card else self.topup)
        with c.db.connect() as conn:
            placed = orders.place_order(
                conn,
                buyer=orders.Buyer(self.creds.reseller_id, self.wallet, "reseller:test"),
                cmd=orders.PlaceOrder(
                    sku=sku,
                    unit_price_cents=sku.price_cents,
                    quantity=quantity,
                    fields={},
                    customer_ref=f"c{len(self.placed)}",
                    confirm_duplicate=True,
                    supplier_offers=c.has_offers(sku.id),
                    # Every other order has a reseller hook to notify (never reached here:
                    # the worker does not send in this machine, so every row stays pending).
                    notify_url=f"http://127.0.0.1:9/hook/{len(self.placed)}"
                    if len(self.placed) % 2
                    else "",
                ),
                accounts=c.accounts,
                vault=c.vault,
                policy=c.policy,
                now=self.clock(),
            )
        self.placed.append(placed.order_no)
        if work and placed.next_action_at is not None:
            # The worker usually gets to a new order at once (its doorbell rings).
            self.loop.run_until_complete(run_step(self.ctx, placed.order_id))

    @precondition(lambda self: bool(self.placed))
    @rule(data=st.data())
    def worker_step(self, data: st.DataObject) -> None:
        # Drawn before looking at the database, and always the same kind of value: what is due
        # depends on the simulator's answers, and hypothesis needs the same choices to draw the
        # same things when it replays an example.
        picks = data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=4))
        due = self._due()
        if due:
            # A few due orders in an order hypothesis picks (workers race in any order).
            picked = list(dict.fromkeys(due[i % len(due)] for i in picks))
            for order_id in picked:
                self.loop.run_until_complete(run_step(self.ctx, order_id))

    @precondition(lambda self: bool(self.placed))
    @rule(data=st.data(), duplicate=st.booleans())
    def supplier_callback(self, data: st.DataObject, duplicate: bool) -> None:
        """Deliver, as the supplier would, a signed callback for one of its orders (the
        simulator's own callbacks are switched off so the test decides when they arrive)."""
        pick = data.draw(st.integers(0, 63))  # before the simulator's state (see worker_step)
        bought = [n for n, o in self.sim.state()["orders"].items() if o["bought"]]
        if not bought:
            return
        out_trade_no = sorted(bought)[pick % len(bought)]
        resp = self.sim.state()["orders"][out_trade_no]
        query = self._sim_query(out_trade_no)
        if query.get("status") not in ("delivered", "partial"):
            return
        payload = {
            "event_id": f"evt-{out_trade_no}-{query['status']}",
            "out_trade_no": out_trade_no,
            "trade_no": query.get("trade_no"),
            "status": query["status"],
            "keys": query.get("keys", []),
            "reason": None,
            "sequence": resp.get("callbacks_sent", 0) + 1,
        }
        body = json.dumps(payload).encode()
        for _ in range(2 if duplicate else 1):
            headers = {
                "X-Kameng-Signature": webhook_header(
                    self.sim.merchant_secret, int(time.time()), body
                )
            }
            self.loop.run_until_complete(
                callbacks.receive(
                    self.container, self.adapters, supplier_code="sim", headers=headers, body=body
                )
            )

    @precondition(lambda self: bool(self.placed))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A buyer's cancel succeeds exactly in the cancelable statuses, answers False for an
        order already canceled, and everywhere else is refused with `order_not_cancelable`
        and changes nothing. Any other error is a bug, not a refusal, and fails the run."""
        order_no = data.draw(st.sampled_from(self.placed))
        before = self._order_row(order_no)
        try:
            with self.container.db.connect() as conn:
                done = order_cancel.cancel_order(
                    conn,
                    order_no=order_no,
                    reseller_id=self.creds.reseller_id,
                    wallet_id=self.wallet,
                    accounts=self.container.accounts,
                    actor="reseller:test",
                    reason="canceled_by_buyer",
                    now=self.clock(),
                )
        except KamengError as exc:
            assert exc.code is ErrorCode.order_not_cancelable, exc
            assert before.status not in BUYER_CANCELABLE | {"canceled"}, before
            assert self._order_row(order_no) == before, "a refused cancel changed the order"
            event(f"cancel refused in {before.status}")
            return
        event(f"cancel accepted in {before.status}")
        assert before.status in BUYER_CANCELABLE | {"canceled"}, before
        assert done is (before.status != "canceled")
        after = self._order_row(order_no)
        assert after.status == "canceled"
        assert after.refunded_cents == after.paid_cents  # everything paid is back

    @rule(seconds=st.sampled_from([1, 10, 40, 130]))
    def advance_clock(self, seconds: int) -> None:
        self.clock.now += timedelta(seconds=seconds)

    @rule(n=st.integers(1, 4))
    def restock(self, n: int) -> None:
        keys = [f"OWN-{self.key_serial + i}" for i in range(n)]
        self.key_serial += n
        factories.add_stock(self.container, self.card, keys)

    @rule(out=st.booleans())
    def supplier_stock(self, out: bool) -> None:
        self.sim.configure_sku("SK", stock=0 if out else None)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def books_are_clean(self) -> None:
        if not hasattr(self, "creds"):
            return
        factories.assert_books_clean(self.container)

    @invariant()
    def every_change_is_announced_once(self) -> None:
        """Every state change of an order with a notify_url leaves exactly one pending outbox
        row, whatever path made it (placement, a step, a callback, a cancel, a deadline);
        an order without one leaves none."""
        with self.container.db.connect(write=False) as conn:
            rows = conn.execute(
                text(
                    "SELECT o.order_no, o.notify_url, "
                    "(SELECT COUNT(*) FROM order_events e WHERE e.order_id = o.id) AS changes, "
                    "(SELECT COUNT(*) FROM outbox m WHERE m.order_id = o.id "
                    " AND m.topic = 'order.updated' AND m.state = 'pending') AS pending, "
                    "(SELECT COUNT(*) FROM outbox m WHERE m.order_id = o.id) AS rows "
                    "FROM orders o"
                )
            ).all()
        for r in rows:
            expected = r.changes if r.notify_url else 0
            assert (r.pending, r.rows) == (expected, expected), r

    @invariant()
    def one_purchase_per_line_upstream(self) -> None:
        per_order: dict[str, int] = {}
        for out_trade_no, o in self.sim.state()["orders"].items():
            base = out_trade_no.split("-")[0]
            per_order[base] = per_order.get(base, 0) + o["bought"]
        assert all(n <= 1 for n in per_order.values()), per_order

    @invariant()
    def every_open_order_is_scheduled(self) -> None:
        if not hasattr(self, "creds"):
            return
        with self.container.db.connect(write=False) as conn:
            rows = conn.execute(
                text(
                    "SELECT order_no, status, next_action_at FROM orders WHERE status NOT IN "
                    "('delivered', 'completed', 'canceled', 'refunded', 'rejected', 'expired')"
                )
            ).all()
        assert all(r.next_action_at is not None for r in rows), rows

    @invariant()
    def wallet_matches_the_orders(self) -> None:
        if not hasattr(self, "creds"):
            return
        with self.container.db.connect(write=False) as conn:
            spent = conn.execute(
                text("SELECT COALESCE(SUM(paid_cents - refunded_cents), 0) FROM orders")
            ).scalar_one()
        available, held = factories.wallet_balance(self.container, self.creds.reseller_id)
        # Money held for an undelivered order counts as paid until it is refunded.
        assert available == TOPUP - spent
        with self.container.db.connect(write=False) as conn:
            open_paid = conn.execute(
                text(
                    "SELECT COALESCE(SUM(paid_cents), 0) FROM orders WHERE hold_id IS NOT NULL "
                    "AND status IN ('fulfilling', 'backordered', 'needs_buyer_action')"
                )
            ).scalar_one()
        assert held == open_paid

    # -- helpers ------------------------------------------------------------------------------

    def _order_row(self, order_no: str) -> Any:
        with self.container.db.connect(write=False) as conn:
            return conn.execute(
                text(
                    "SELECT status, stage, version, paid_cents, refunded_cents, hold_id "
                    "FROM orders WHERE order_no = :n"
                ),
                {"n": order_no},
            ).one()

    def _due(self) -> list[int]:
        with self.container.db.connect(write=False) as conn:
            rows = conn.execute(
                text(
                    "SELECT id FROM orders WHERE next_action_at IS NOT NULL "
                    "AND next_action_at <= :now ORDER BY id"
                ),
                {
                    "now": self.clock().astimezone().replace(tzinfo=None)
                    if self.container.db.is_sqlite
                    else self.clock()
                },
            ).all()
        return [int(r[0]) for r in rows]

    def _sim_query(self, out_trade_no: str) -> dict[str, Any]:
        adapter = self.adapters.get(self._supplier_row())
        result = self.loop.run_until_complete(adapter.query(order_no=out_trade_no))
        return {
            "status": result.outcome.value,
            "trade_no": result.trade_no,
            "keys": [{"code": k.code, "secret": k.secret} for k in result.keys],
        }

    def _supplier_row(self) -> Any:
        with self.container.db.connect(write=False) as conn:
            return suppliers.supplier_by_code(conn, "sim")


PipelineMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_pipeline_state_machine = PipelineMachine.TestCase

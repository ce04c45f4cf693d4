"""A bench for driving single orders through the real services, step by step, with no network.

The pipeline's own functions do every move: placing (`orders.place_order`, `checkout.
place_pending`), a worker's step (`steps.plan_step`), a supplier's answer (`apply.apply_result`
with a scripted `Result`), a payment (`payments.apply_confirmation`), a cancel, a reviewer's
decision, the buyer's corrected information. Only the supplier's side of the wire is replaced
by the answer the test writes, so a test can put an order in exactly the state it needs (a
purchase in flight, a part delivered, an order refunded while its purchase is open) without
timing a simulator. The clock moves only when the test moves it.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.orders import cancel as order_cancel
from kameng.orders import checkout, screening
from kameng.orders import queries as order_queries
from kameng.orders import service as orders
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.payments.port import Confirmation
from kameng.pipeline import apply, buyer_info, review_actions
from kameng.pipeline.apply import Timing
from kameng.pipeline.registry import Adapters
from kameng.pipeline.steps import Plan, StepContext, plan_step
from kameng.review import service as review
from kameng.risk import lists as risk_lists
from kameng.suppliers import service as suppliers
from kameng.suppliers.port import Result
from tests.support import factories
from tests.support.shop import Clock

GATEWAY = "gw"
OTHER_GATEWAY = "gw-other"
SUPPLIER = "up"
REVIEWER = "staff:alice"
QQ = [{"name": "qq", "type": "qq", "label": "QQ"}]


class Lab:
    """One container, one supplier (never called: its answers are scripted), two gateways."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.clock = Clock()
        container.clock = self.clock
        self.ctx = StepContext(
            run=container.writer.run_async,
            vault=container.vault,
            accounts=container.accounts,
            adapters=Adapters(container.vault),  # plan_step never calls an adapter
            clock=self.clock,
            callback_base_url="http://127.0.0.1:9",
            timing=Timing(poll_s=5, retry_cap_s=20, backorder_retry_s=10, buyer_action_s=600),
            lease_s=30,
            review_policy=container.review_policy,
            default_sla_s=container.settings.default_sla_s,
        )
        self.refs = 0
        self.since: dict[int, Any] = {}
        with container.db.connect() as conn:
            self.supplier_id = suppliers.create_supplier(
                conn,
                container.vault,
                code=SUPPLIER,
                name="upstream",
                adapter="simulator",
                base_url="http://127.0.0.1:9",
                api_key="lab-key",
                secret="lab-secret",
                now=self.clock(),
            )
            for code in (GATEWAY, OTHER_GATEWAY):
                payments.add_gateway(
                    conn,
                    vault=container.vault,
                    code=code,
                    name=code,
                    base_url="http://127.0.0.1:9",
                    merchant_id="1001",
                    key=f"key-{code}",
                    now=self.clock(),
                )

    # -- catalog and buyers -------------------------------------------------------------------
    def product(
        self,
        kind: DeliveryKind = DeliveryKind.card_key,
        *,
        stock: int = 0,
        offer: bool = False,
        price_cents: int = 1_000,
        sla_seconds: int | None = None,
    ) -> str:
        sku = factories.add_product(
            self.c,
            kind=kind,
            stock=stock,
            price_cents=price_cents,
            sla_seconds=sla_seconds,
            fields=QQ if kind is DeliveryKind.direct_topup else None,
        )
        if offer:
            self.offer(sku)
        return sku

    def offer(self, sku: str) -> None:
        with self.c.db.connect() as conn:
            suppliers.add_offer(
                conn,
                sku_id=self.c.sku(sku).id,
                supplier_id=self.supplier_id,
                supplier_sku=f"UP-{sku}",
                cost_cents=100,
                now=self.clock(),
            )
        self.c.invalidate_caches()

    def member(self, balance: int = 1_000_000) -> orders.Buyer:
        now = self.clock()
        with self.c.db.connect() as conn:
            member_id = members.register(
                conn,
                email=f"{secrets.token_hex(5)}@example.com",
                password_hash="not-a-real-hash",
                language="zh-CN",
                now=now,
            )
            wallet = ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=self.c.accounts,
                amount=balance,
                now=now,
                actor="staff:test",
            )
        self.since[member_id] = now
        return orders.Buyer(None, wallet, f"member:{member_id}", member_id=member_id)

    def listed(self, which: str, kind: str, value: str) -> None:
        with self.c.db.connect() as conn:
            risk_lists.add_list_entry(
                conn,
                which=which,
                kind=kind,
                value=value,
                note="lab",
                actor="staff:admin",
                now=self.clock(),
            )
        self.c.risk_engine.invalidate()

    # -- placing and paying -------------------------------------------------------------------
    def place(
        self,
        buyer: orders.Buyer,
        sku: str,
        *,
        ip: str = "",
        quantity: int = 1,
        fields: dict[str, str] | None = None,
    ) -> orders.Placed:
        """A storefront order paid from the member's balance, screened like the real one."""
        self._tick()
        info = self.c.sku(sku)
        self.refs += 1
        with self.c.db.connect() as conn:
            return orders.place_order(
                conn,
                buyer=buyer,
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=quantity,
                    fields=fields if fields is not None else self._fields(info),
                    customer_ref=f"lab-{self.refs}",
                    channel="storefront",
                    supplier_offers=self.c.has_offers(info.id),
                ),
                accounts=self.c.accounts,
                vault=self.c.vault,
                policy=self.c.policy,
                now=self.clock(),
                engine=self.c.screening_engine,
                context=screening.Context(ip=ip, buyer_since=self.since.get(buyer.member_id or 0)),
            )

    def pending(self, sku: str, *, gateway: str = GATEWAY) -> orders.Placed:
        """A guest's storefront order waiting for its payment at `gateway`."""
        self._tick()
        info = self.c.sku(sku)
        guest = f"guest-{secrets.token_hex(4)}"
        with self.c.db.connect() as conn:
            placed = checkout.place_pending(
                conn,
                buyer=orders.Buyer(None, 0, "guest", guest_key=guest),
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=1,
                    fields=self._fields(info),
                    channel="storefront",
                ),
                vault=self.c.vault,
                policy=self.c.policy,
                now=self.clock(),
                pay_window_s=self.c.settings.payment_window_s,
                context=screening.Context(device=guest),
            )
            payments.open_payment(
                conn,
                gateway=payments.get_gateway(conn, code=gateway),
                purpose=PaymentPurpose.order,
                pay_type="alipay",
                amount_cents=placed.amount_cents,
                currency="CNY",
                expires_at=placed.sla_deadline or self.clock(),
                now=self.clock(),
                checks=self.c.payment_checks,
                order_id=placed.order_id,
                order_no=placed.order_no,
            )
        return placed

    def pay(self, placed: orders.Placed, *, cents: int | None = None, via: str = GATEWAY) -> str:
        """The gateway `via` says the order's payment was made (for `cents`, default: in full)."""
        self._tick()
        with self.c.db.connect() as conn:
            outcome = payments.apply_confirmation(
                conn,
                gateway=payments.get_gateway(conn, code=via),
                confirmation=Confirmation(
                    placed.order_no,
                    f"T{placed.order_id}",
                    placed.amount_cents if cents is None else cents,
                    "CNY",
                ),
                channel="notify",
                deps=self.c.payment_deps,
                now=self.clock(),
            )
        return str(outcome)

    # -- the pipeline -------------------------------------------------------------------------
    def plan(self, order_id: int) -> Plan:
        """One worker step's first half (its transaction); a purchase plan's request is not
        sent: the test answers it with `answer`."""
        self._tick()
        with self.c.db.connect() as conn:
            return plan_step(conn, self.ctx, order_id=order_id, now=self.clock())

    def answer(self, plan: Plan, result: Result) -> str:
        """The supplier's answer to the plan's purchase, applied as the worker applies it."""
        assert plan.kind in ("purchase", "query"), plan
        self._tick()
        with self.c.db.connect() as conn:
            return apply.apply_result(
                conn,
                vault=self.c.vault,
                accounts=self.c.accounts,
                procurement=plan.procurement,
                supplier_code=plan.supplier.code,
                result=result,
                now=self.clock(),
                timing=self.ctx.timing,
                via="purchase",
                promises=suppliers.Promises.of(plan.supplier),
            )

    def cancel(self, placed: orders.Placed, *, wallet_id: int = 0) -> bool:
        self._tick()
        with self.c.db.connect() as conn:
            return order_cancel.cancel_order(
                conn,
                order_no=placed.order_no,
                reseller_id=None,
                wallet_id=wallet_id,
                accounts=self.c.accounts,
                actor="buyer",
                reason="canceled_by_buyer",
                now=self.clock(),
            )

    def correct(self, placed: orders.Placed, sku: str, fields: dict[str, str]) -> Any:
        self._tick()
        with self.c.db.connect() as conn:
            return buyer_info.correct_fields(
                conn,
                order_id=placed.order_id,
                sku=self.c.sku(sku),
                fields=fields,
                actor="buyer",
                fulfil_sla_s=self.c.settings.default_sla_s,
                now=self.clock(),
                engine=self.c.screening_engine,
                accounts=self.c.accounts,
                review_sla_s=self.c.settings.review_sla_s,
            )

    def decide(self, placed: orders.Placed, *, approve: bool) -> dict[str, Any]:
        """A reviewer claims the order's review item and approves or rejects it."""
        self._tick()
        with self.c.db.connect() as conn:
            item = review.item_of_order(conn, order_id=placed.order_id)
            assert item is not None, f"order {placed.order_no} is not in review"
            review.claim(
                conn,
                item_id=item.id,
                reviewer=REVIEWER,
                policy=self.c.review_policy,
                now=self.clock(),
            )
        with self.c.db.connect() as conn:
            if approve:
                return review_actions.approve(
                    conn,
                    item_id=item.id,
                    reviewer=REVIEWER,
                    note="",
                    policy=self.c.review_policy,
                    accounts=self.c.accounts,
                    fulfil_sla_s=self.c.settings.default_sla_s,
                    now=self.clock(),
                )
            return review_actions.reject(
                conn,
                item_id=item.id,
                reviewer=REVIEWER,
                note="not the card holder",
                accounts=self.c.accounts,
                now=self.clock(),
            )

    def advance(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)

    def _tick(self) -> None:
        """Every action takes a second of the lab's clock, as real ones take real time: rules
        that compare times (a round of offers starts after the buyer's correction) see them
        in the order they happened."""
        self.advance(1)

    # -- reading ------------------------------------------------------------------------------
    def order(self, placed: orders.Placed) -> Any:
        with self.c.db.connect(write=False) as conn:
            return order_queries.order_by_id(conn, order_id=placed.order_id)

    def status(self, placed: orders.Placed) -> str:
        return str(self.order(placed).status)

    def moves(self, placed: orders.Placed) -> list[tuple[str | None, str]]:
        with self.c.db.connect(write=False) as conn:
            rows = order_queries.timeline(conn, order_id=placed.order_id)
        return [(r.from_status, r.to_status) for r in rows]

    def read(self, sql: str, **params: Any) -> list[Any]:
        with self.c.db.connect(write=False) as conn:
            return list(conn.execute(text(sql), params).all())

    def stock(self, sku: str) -> dict[str, int]:
        """Key counts by state for the SKU (states with no keys left out)."""
        rows = self.read(
            "SELECT state, COUNT(*) FROM card_keys WHERE sku_id = :s GROUP BY state",
            s=self.c.sku(sku).id,
        )
        return {str(state): int(n) for state, n in rows}

    @staticmethod
    def _fields(info: Any) -> dict[str, str]:
        if info.delivery_kind == DeliveryKind.direct_topup.value:
            return {"qq": f"{secrets.randbelow(10**8) + 10**8}"}
        return {}

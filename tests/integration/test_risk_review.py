"""Risk screening and manual review on a real SQLite file.

Synthetic traffic goes through `orders.place_order` with a screening context (documentation
addresses: 203.0.113.x, 198.51.100.x, 192.0.2.x, 2001:db8::), and a gateway order through
`payments.apply_confirmation`. A controlled clock stands in for time: velocity windows, claims
and the review SLA move only when the test moves the clock. Each test checks what the order
became, what the screening row recorded, where the money and the keys are, and that the books
verify clean.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.shop import Clock

from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.orders import checkout, screening
from kameng.orders import queries as order_queries
from kameng.orders import service as orders
from kameng.orders.explain import reason_text
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.payments.port import Confirmation
from kameng.pipeline import outbox, review_actions
from kameng.pipeline.steps import run_step
from kameng.pipeline.worker import Worker
from kameng.resellers import service as resellers
from kameng.review import service as review
from kameng.risk import backtest as risk_backtest
from kameng.risk import lists as risk_lists
from kameng.risk import service as risk
from kameng.risk.attributes import parse_counter
from kameng.risk.defaults import DEFAULT_RULES
from kameng.risk.models import RuleSetStatus
from kameng.risk.rules import CATEGORIES
from kameng.security.signing import verify_webhook

PROXY_NET = "198.51.100.0/24"
PROXY_IP = "198.51.100.7"
ALICE, BOB = "staff:alice", "staff:bob"


class Shop:
    """Buyers, orders and reviewers on one container, under a clock the test moves."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.clock = Clock()
        container.clock = self.clock
        self.since: dict[int, Any] = {}
        self.refs = 0

    # -- buyers -------------------------------------------------------------------------------
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

    def reseller(self, balance: int = 1_000_000) -> orders.Buyer:
        creds = factories.add_reseller(self.c, balance_cents=balance)
        with self.c.db.connect(write=False) as conn:
            wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
        return orders.Buyer(creds.reseller_id, wallet, f"reseller:{creds.name}")

    # -- acting -------------------------------------------------------------------------------
    def place(
        self,
        buyer: orders.Buyer,
        sku: str,
        *,
        ip: str = "",
        device: str = "",
        channel: str = "storefront",
        fields: dict[str, str] | None = None,
        quantity: int = 1,
    ) -> orders.Placed:
        """One order at the clock's time; the clock then moves on a second."""
        info = self.c.sku(sku)
        self.refs += 1
        with self.c.db.connect() as conn:
            placed = orders.place_order(
                conn,
                buyer=buyer,
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=quantity,
                    fields=fields or {},
                    customer_ref=f"ref-{self.refs}",
                    channel=channel,
                ),
                accounts=self.c.accounts,
                vault=self.c.vault,
                policy=self.c.policy,
                now=self.clock(),
                engine=self.c.screening_engine,
                context=screening.Context(
                    ip=ip,
                    device=device,
                    buyer_since=self.since.get(buyer.member_id or 0),
                ),
            )
        self.clock.advance(1)
        return placed

    def listed(self, which: str, kind: str, value: str) -> str:
        with self.c.db.connect() as conn:
            stored = risk_lists.add_list_entry(
                conn,
                which=which,
                kind=kind,
                value=value,
                note="test",
                actor="staff:admin",
                now=self.clock(),
            )
        self.c.risk_engine.invalidate()  # as the staff API does after every list change
        return stored

    def unlisted(self, which: str, kind: str, value: str) -> bool:
        with self.c.db.connect() as conn:
            gone = risk_lists.remove_list_entry(
                conn, which=which, kind=kind, value=value, actor="staff:admin", now=self.clock()
            )
        self.c.risk_engine.invalidate()
        return gone

    def claim(self, item_id: int, reviewer: str) -> review.Item:
        with self.c.db.connect() as conn:
            return review.claim(
                conn,
                item_id=item_id,
                reviewer=reviewer,
                policy=self.c.review_policy,
                now=self.clock(),
            )

    def release(self, item_id: int, reviewer: str) -> review.Item:
        with self.c.db.connect() as conn:
            return review.release(conn, item_id=item_id, reviewer=reviewer, now=self.clock())

    def approve(self, item_id: int, reviewer: str, note: str = "") -> dict[str, Any]:
        with self.c.db.connect() as conn:
            return review_actions.approve(
                conn,
                item_id=item_id,
                reviewer=reviewer,
                note=note,
                policy=self.c.review_policy,
                accounts=self.c.accounts,
                fulfil_sla_s=self.c.settings.default_sla_s,
                now=self.clock(),
            )

    def reject(self, item_id: int, reviewer: str, note: str) -> dict[str, Any]:
        with self.c.db.connect() as conn:
            return review_actions.reject(
                conn,
                item_id=item_id,
                reviewer=reviewer,
                note=note,
                accounts=self.c.accounts,
                now=self.clock(),
            )

    def step(self, order_id: int) -> str:
        """One pipeline step for the order, as the worker runs it (its own StepContext)."""

        async def go() -> str:
            worker = Worker(self.c)
            try:
                return await run_step(worker.ctx, order_id)
            finally:
                await worker.adapters.aclose()
                await worker.gateways.aclose()

        return asyncio.run(go())

    # -- reading ------------------------------------------------------------------------------
    def read(self, sql: str, **params: Any) -> list[Any]:
        with self.c.db.connect(write=False) as conn:
            return list(conn.execute(text(sql), params).all())

    def order(self, order_id: int) -> Any:
        with self.c.db.connect(write=False) as conn:
            return order_queries.order_by_id(conn, order_id=order_id)

    def item(self, order_id: int) -> review.Item:
        with self.c.db.connect(write=False) as conn:
            found = review.item_of_order(conn, order_id=order_id)
        assert found is not None, f"order {order_id} has no review item"
        return found

    def decisions(self, item_id: int) -> list[tuple[str, str]]:
        with self.c.db.connect(write=False) as conn:
            return [(d["actor"], d["action"]) for d in review.decisions_of(conn, item_id=item_id)]

    def audit(self, order_id: int) -> list[tuple[str, str]]:
        rows = self.read(
            "SELECT actor, action FROM audit_log WHERE target_type = 'order' "
            "AND target_id = :t AND action LIKE 'review_%' ORDER BY id",
            t=str(order_id),
        )
        return [(r[0], r[1]) for r in rows]

    def screenings(self, order_id: int) -> list[dict[str, Any]]:
        with self.c.db.connect(write=False) as conn:
            return risk.screenings_of(conn, order_id=order_id)

    def live(self, order_id: int) -> dict[str, Any]:
        rows = [s for s in self.screenings(order_id) if s["mode"] == "live"]
        assert len(rows) == 1, rows
        return rows[0]

    def stock(self, sku: str) -> dict[str, int]:
        sku_id = self.c.sku(sku).id
        with self.c.db.connect(write=False) as conn:
            counts = inventory.counts(conn, sku_ids=[sku_id]).get(sku_id, {})
        return {k: v for k, v in counts.items() if v}

    def keys_of(self, line_id: int, state: str) -> list[int]:
        rows = self.read(
            "SELECT id FROM card_keys WHERE order_line_id = :l AND state = :s ORDER BY id",
            l=line_id,
            s=state,
        )
        return [int(r[0]) for r in rows]

    def balance(self, buyer: orders.Buyer) -> tuple[int, int]:
        with self.c.db.connect(write=False) as conn:
            return ledger.balances(conn, wallet_id=buyer.wallet_id)

    def moves(self, order_id: int) -> list[tuple[str | None, str, str]]:
        with self.c.db.connect(write=False) as conn:
            rows = order_queries.timeline(conn, order_id=order_id)
        return [(r.from_status, r.to_status, r.reason) for r in rows]

    def figures(self) -> dict[str, Any]:
        with self.c.db.connect(write=False) as conn:
            return review.queue_figures(conn, now=self.clock())


def refused(code: ErrorCode, job: Any, *args: Any) -> KamengError:
    with pytest.raises(KamengError) as caught:
        job(*args)
    assert caught.value.code is code, caught.value
    return caught.value


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    container = factories.make_container(tmp_path)
    yield Shop(container)
    container.close()


@pytest.fixture
def make_shop(tmp_path: Path) -> Iterator[Callable[..., Shop]]:
    """Shops on containers with their own settings (closed after the test)."""
    made: list[Shop] = []

    def make(**settings: Any) -> Shop:
        made.append(Shop(factories.make_container(tmp_path / str(len(made)), **settings)))
        return made[-1]

    yield make
    for shop in made:
        shop.c.close()


def flagged(shop: Shop, buyer: orders.Buyer, sku: str) -> orders.Placed:
    """An order the bundled rules send to review: 100 or more through a listed proxy."""
    if not shop.read("SELECT 1 FROM risk_lists WHERE value = :v", v=PROXY_NET):
        shop.listed("proxy", "ip", PROXY_NET)
    placed = shop.place(buyer, sku, ip=PROXY_IP)
    assert placed.status.value == "review", placed
    return placed


# -- screening synthetic traffic ------------------------------------------------------------------


def test_a_storefront_burst_from_one_ip_goes_to_review_from_the_sixth_order(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=10)
    buyer = shop.member(balance=50_000)
    placed = [shop.place(buyer, sku, ip="203.0.113.10") for _ in range(7)]

    assert [p.status.value for p in placed] == ["delivered"] * 5 + ["review"] * 2
    assert all(len(p.keys) == 1 for p in placed[:5])
    sixth = placed[5]
    assert (sixth.stage.value, sixth.reason) == ("manual_review", "risk_review_velocity")
    assert sixth.keys == []
    # The decision is due at the review SLA: the pipeline picks it up then.
    assert sixth.sla_deadline == sixth.created_at + timedelta(seconds=shop.c.settings.review_sla_s)
    assert sixth.next_action_at == sixth.sla_deadline

    # Every order has exactly one live screening, by the bundled set (version 1).
    for p in placed[:5]:
        row = shop.live(p.order_id)
        assert (row["rule_set_version"], row["action"], row["rule"]) == (1, "allow", "")
        assert row["matched"] == []
    row = shop.live(sixth.order_id)
    assert (row["action"], row["rule"], row["matched"]) == (
        "review",
        "velocity_ip",
        ["velocity_ip"],
    )
    assert row["attrs"]["ip_orders_1h"] == 6
    assert row["attrs"]["channel"] == "storefront"
    assert "device_orders_1h" not in row["attrs"]  # no device cookie: nothing to count
    assert shop.live(placed[6].order_id)["attrs"]["ip_orders_1h"] == 7

    # The flagged orders hold their money and their keys; nothing else is sold.
    assert shop.balance(buyer) == (50_000 - 7 * 1_000, 2 * 1_000)
    assert shop.stock(sku) == {"available": 3, "sold": 5, "held": 2}
    assert len(shop.keys_of(sixth.line_id, "held")) == 1
    assert shop.moves(sixth.order_id) == [
        (None, "paid", "paid_from_balance"),
        ("paid", "screening", "risk_check"),
        ("screening", "review", "risk_review_velocity"),
    ]

    item = shop.item(sixth.order_id)
    assert (item.status, item.category, item.rule_code, item.amount_cents) == (
        "open",
        "velocity",
        "velocity_ip",
        1_000,
    )
    assert item.sla_deadline == sixth.sla_deadline
    assert [r["code"] for r in item.reasons] == ["velocity_ip"]
    assert item.reasons[0]["en"] and item.reasons[0]["zh-CN"]
    assert shop.figures()["depth"] == 2
    factories.assert_books_clean(shop.c)


def test_the_same_burst_from_a_reseller_over_the_api_is_not_flagged(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=10)
    buyer = shop.reseller(balance=50_000)
    placed = [shop.place(buyer, sku, ip="203.0.113.10", channel="api") for _ in range(9)]

    assert {p.status.value for p in placed} == {"delivered"}
    last = shop.live(placed[-1].order_id)
    assert (last["action"], last["matched"]) == ("allow", [])
    assert last["attrs"]["buyer_kind"] == "reseller"
    # The storefront rules are ruled out by the channel: nothing is counted for a reseller,
    # however many orders it places (screening stays as cheap at its millionth order).
    assert not [n for n in last["attrs"] if parse_counter(n) is not None]
    # Its facts are kept under r<reseller id>, the form lists use.
    assert shop.read("SELECT DISTINCT buyer FROM risk_facts") == [(f"r{buyer.reseller_id}",)]
    assert shop.read("SELECT COUNT(*) FROM review_items") == [(0,)]
    factories.assert_books_clean(shop.c)


def test_many_buyers_topping_up_one_recharge_account_go_to_review(shop: Shop) -> None:
    sku = factories.add_product(
        shop.c,
        kind=DeliveryKind.direct_topup,
        price_cents=2_000,
        fields=[{"name": "qq", "type": "qq", "label": "QQ"}],
    )
    buyers = [shop.member() for _ in range(4)]
    same = {"qq": "12345678"}
    placed = [
        shop.place(b, sku, ip=f"203.0.113.{20 + i}", fields=same) for i, b in enumerate(buyers[:3])
    ]
    other = shop.place(buyers[3], sku, ip="203.0.113.30", fields={"qq": "87654321"})

    assert [p.status.value for p in placed] == ["fulfilling", "fulfilling", "review"]
    assert placed[2].reason == "risk_review_recharge_account"
    row = shop.live(placed[2].order_id)
    assert (row["rule"], row["attrs"]["account_buyers_24h"]) == ("account_many_buyers", 3)
    assert shop.live(placed[1].order_id)["attrs"]["account_buyers_24h"] == 2
    assert other.status.value == "fulfilling"
    assert shop.live(other.order_id)["attrs"]["account_buyers_24h"] == 1
    assert shop.read(
        "SELECT account FROM risk_facts WHERE order_id = :o", o=placed[2].order_id
    ) == [("12345678",)]
    item = shop.item(placed[2].order_id)
    assert (item.category, item.rule_code) == ("recharge_account", "account_many_buyers")
    # A top-up has no keys to hold: only the money waits.
    assert shop.balance(buyers[2]) == (1_000_000 - 2_000, 2_000)
    factories.assert_books_clean(shop.c)


def test_a_block_listed_ip_is_rejected_and_its_money_stays_in_the_balance(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=3_000, stock=2)
    buyer = shop.member(balance=10_000)
    assert shop.listed("block", "ip", " 203.0.113.66 ") == "203.0.113.66"

    placed = shop.place(buyer, sku, ip="203.0.113.66")

    assert (placed.status.value, placed.stage.value, placed.reason) == (
        "rejected",
        "closed",
        "risk_rejected",
    )
    assert placed.keys == [] and placed.next_action_at is None
    row = shop.order(placed.order_id)
    assert (row.paid_cents, row.refunded_cents) == (3_000, 3_000)
    assert shop.balance(buyer) == (10_000, 0)  # the money never left the balance
    moved = "SELECT COUNT(*) FROM ledger_transactions WHERE ref_type = 'order' AND ref_id = :o"
    assert shop.read(moved, o=placed.order_id) == [(0,)]
    assert shop.stock(sku) == {"available": 2}
    live = shop.live(placed.order_id)
    assert (live["action"], live["rule"], live["score"]) == ("block", "block_listed", 1000)
    assert shop.read("SELECT COUNT(*) FROM review_items") == [(0,)]
    assert shop.moves(placed.order_id)[-1] == ("screening", "rejected", "risk_rejected")
    # Another address of the same buyer is not blocked.
    assert shop.place(buyer, sku, ip="203.0.113.67").status.value == "delivered"
    factories.assert_books_clean(shop.c)


def test_an_allow_listed_buyer_passes_a_rule_that_would_flag_them(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=10)
    buyer = shop.member()
    shop.listed("allow", "buyer", f"m{buyer.member_id}")

    placed = [shop.place(buyer, sku, ip="203.0.113.40") for _ in range(7)]

    assert {p.status.value for p in placed} == {"delivered"}
    sixth = shop.live(placed[5].order_id)
    # Allowed by the list, with the velocity rule still on the record (and in the score).
    assert (sixth["action"], sixth["rule"]) == ("allow", "allow_listed")
    assert sixth["matched"] == ["allow_listed", "velocity_ip"]
    assert sixth["score"] == 200

    assert shop.unlisted("allow", "buyer", f"m{buyer.member_id}")
    after = shop.place(buyer, sku, ip="203.0.113.40")
    assert (after.status.value, after.reason) == ("review", "risk_review_velocity")
    factories.assert_books_clean(shop.c)


def test_a_listed_proxy_network_with_an_amount_goes_to_review(shop: Shop) -> None:
    cheap = factories.add_product(shop.c, price_cents=5_000, stock=5)
    dear = factories.add_product(shop.c, price_cents=10_000, stock=5)
    assert shop.listed("proxy", "ip", "198.51.100.99/24") == PROXY_NET  # stored as the network
    assert shop.listed("proxy", "ip", "2001:DB8:AB::/48") == "2001:db8:ab::/48"
    buyer = shop.member()
    shop.clock.advance(31 * 86400)  # a month-old account: its VPN is its own business

    small = shop.place(buyer, cheap, ip=PROXY_IP)
    assert small.status.value == "delivered"  # a proxy alone only adds to the score
    row = shop.live(small.order_id)
    assert (row["matched"], row["score"], row["attrs"]["ip_proxy"]) == (["note_proxy"], 30, True)

    big = shop.place(buyer, dear, ip=PROXY_IP)
    assert (big.status.value, big.reason) == ("review", "risk_review_network")
    assert shop.live(big.order_id)["rule"] == "proxy_amount"

    v6_buyer = shop.member()
    v6 = shop.place(v6_buyer, dear, ip="2001:db8:ab:1::5")
    assert (v6.status.value, v6.reason) == ("review", "risk_review_network")
    outside = shop.place(shop.member(), dear, ip="2001:db8:ac::5")
    assert outside.status.value == "delivered"
    assert shop.live(outside.order_id)["attrs"]["ip_proxy"] is False
    # The same amount from an ordinary network is delivered.
    plain = shop.place(shop.member(), dear, ip="192.0.2.50")
    assert plain.status.value == "delivered"
    # An account under a month old hiding behind a proxy is reviewed whatever the amount; at
    # 30 days it is an old account again.
    young = shop.member()
    shop.clock.advance(30 * 86400 - 60)
    hidden = shop.place(young, cheap, ip=PROXY_IP)
    assert (hidden.status.value, hidden.reason) == ("review", "risk_review_network")
    assert shop.live(hidden.order_id)["rule"] == "proxy_young_member"
    shop.clock.advance(60)
    assert shop.place(young, cheap, ip=PROXY_IP).status.value == "delivered"
    factories.assert_books_clean(shop.c)


def test_a_loopback_address_is_not_counted(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=10)
    buyer = shop.member()
    placed = [shop.place(buyer, sku, ip=ip) for ip in ["127.0.0.1"] * 5 + ["::1", "127.0.0.9"]]

    assert {p.status.value for p in placed} == {"delivered"}
    assert shop.read("SELECT DISTINCT ip FROM risk_facts") == [("",)]
    attrs = shop.live(placed[-1].order_id)["attrs"]
    assert "ip_orders_1h" not in attrs  # an unknown address has no counter at all
    assert attrs["buyer_orders_1h"] == 7  # the buyer is still counted
    # A real address after them starts its own count at one.
    public = shop.place(buyer, sku, ip="203.0.113.50")
    assert shop.live(public.order_id)["attrs"]["ip_orders_1h"] == 1


def _stricter_shadow_then_a_burst(shop: Shop) -> list[orders.Placed]:
    """Version 2 (velocity_ip from the third order) as the shadow set; a burst of seven from
    one IP; the live set sends the last two to review: one approved, one rejected."""
    stricter = copy.deepcopy(DEFAULT_RULES)
    for rule in stricter:
        if rule["code"] == "velocity_ip":
            rule["when"]["all"][1]["value"] = 3
    with shop.c.db.connect() as conn:
        saved = risk.save_rule_set(
            conn, rules=stricter, note="ip burst at 3", actor="staff:admin", now=shop.clock()
        )
        assert (saved.version, saved.status) == (2, "draft")
        risk.activate(
            conn, version=2, mode=RuleSetStatus.shadow, actor="staff:admin", now=shop.clock()
        )
    shop.c.risk_engine.invalidate()

    sku = factories.add_product(shop.c, price_cents=1_000, stock=10)
    buyer = shop.member()
    placed = [shop.place(buyer, sku, ip="203.0.113.60") for _ in range(7)]
    assert [p.status.value for p in placed] == ["delivered"] * 5 + ["review"] * 2
    approved, rejected = (shop.item(p.order_id).id for p in placed[5:])
    shop.claim(approved, ALICE)
    shop.approve(approved, ALICE, "known buyer")
    shop.claim(rejected, ALICE)
    shop.reject(rejected, ALICE, "stolen card")
    return placed


def test_a_shadow_set_is_recorded_beside_the_live_one(shop: Shop) -> None:
    placed = _stricter_shadow_then_a_burst(shop)

    for i, p in enumerate(placed):
        rows = shop.screenings(p.order_id)
        assert [(r["mode"], r["rule_set_version"]) for r in rows] == [("live", 1), ("shadow", 2)]
        assert rows[0]["action"] == ("review" if i >= 5 else "allow")
        assert rows[1]["action"] == ("review" if i >= 2 else "allow")
        assert rows[1]["attrs"] == rows[0]["attrs"]  # one gathering, two verdicts
    # Only the live set decides.
    assert shop.read("SELECT COUNT(*) FROM review_items") == [(2,)]

    with shop.c.db.connect(write=False) as conn:
        report = risk_backtest.shadow_report(conn)
        assert risk_backtest.shadow_report(conn, version=1)["orders"] == 0
    assert report["version"] == 2 and report["orders"] == 7
    assert report["matrix"] == {"allow->allow": 2, "allow->review": 3, "review->review": 2}
    assert report["agreement"] == round(4 / 7, 4)
    assert report["would_flag_reviewer_approved"] == 1
    assert report["would_allow_reviewer_rejected"] == 0

    with shop.c.db.connect() as conn:
        assert risk.stop_shadow(conn, actor="staff:admin", now=shop.clock()) == 1
        assert risk.stop_shadow(conn, actor="staff:admin", now=shop.clock()) == 0
        statuses = [(v.version, v.status) for v in risk.list_rule_sets(conn)]
        actions = [
            r[0]
            for r in conn.execute(
                text("SELECT action FROM audit_log WHERE target_type = 'risk_rule_set' ORDER BY id")
            )
        ]
    assert statuses == [(2, "retired"), (1, "live")]
    assert actions == [
        "risk_rules_saved",  # the bundled set, saved and made live by bootstrap
        "risk_rules_live",
        "risk_rules_saved",
        "risk_rules_shadow",
        "risk_rules_shadow_stopped",
    ]
    shop.c.risk_engine.invalidate()
    sku = factories.add_product(shop.c, price_cents=1_000, stock=1)
    after = shop.place(shop.member(), sku, ip="203.0.113.61")
    assert [r["mode"] for r in shop.screenings(after.order_id)] == ["live"]
    factories.assert_books_clean(shop.c)


@pytest.fixture(
    params=[
        "sqlite",
        "postgresql",
    ]
)
def any_shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shop]:
    with backend_container(request.param, tmp_path) as container:
        yield Shop(container)


def test_a_backtest_counts_reviewer_approved_flags_as_false_positives(any_shop: Shop) -> None:
    shop = any_shop
    _stricter_shadow_then_a_burst(shop)
    with shop.c.db.connect(write=False) as conn:
        result = risk_backtest.backtest(conn, version=2, until=shop.clock())
        live = risk_backtest.backtest(conn, version=1, until=shop.clock())
        early = risk_backtest.backtest(conn, version=2, until=shop.clock(), limit=2)

    figures = result.as_json()
    assert figures["version"] == 2
    assert (figures["screened"], figures["allow"], figures["review"], figures["block"]) == (
        7,
        2,
        5,
        0,
    )
    assert figures["by_rule"] == {"velocity_ip": 5}
    assert figures["changed_vs_live"] == {"allow->review": 3}
    assert (figures["flagged_reviewed"], figures["flagged_then_approved"]) == (2, 1)
    assert figures["flagged_then_rejected"] == 1
    assert figures["false_positive_rate"] == 0.5
    assert figures["review_rate"] == round(5 / 7, 4)
    # Replaying the live set reproduces what it decided at the time.
    assert (live.actions["allow"], live.actions["review"], dict(live.changed_vs_live)) == (
        5,
        2,
        {},
    )
    assert early.screened == 2 and early.false_positive_rate is None


# -- reviewers' decisions ---------------------------------------------------------------------


def test_approval_delivers_the_keys_held_at_screening(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=3)
    buyer = shop.member(balance=50_000)
    placed = flagged(shop, buyer, sku)
    held = shop.keys_of(placed.line_id, "held")
    assert len(held) == 1
    assert shop.stock(sku) == {"available": 2, "held": 1}
    assert shop.balance(buyer) == (40_000, 10_000)

    item = shop.item(placed.order_id)
    shop.claim(item.id, ALICE)
    result = shop.approve(item.id, ALICE, "looks fine")

    assert result == {"item": item.id, "status": "approved", "order": "delivered"}
    order = shop.order(placed.order_id)
    assert (order.status, order.reason, order.hold_id is not None) == (
        "delivered",
        "review_approved",
        True,
    )
    assert shop.keys_of(placed.line_id, "sold") == held  # the very keys set aside
    assert shop.stock(sku) == {"available": 2, "sold": 1}
    assert shop.balance(buyer) == (40_000, 0)  # the held money was taken
    closed = shop.item(placed.order_id)
    assert (closed.status, closed.decided_by, closed.decision_note) == (
        "approved",
        ALICE,
        "looks fine",
    )
    assert shop.decisions(item.id) == [(ALICE, "claim"), (ALICE, "approve")]
    assert shop.audit(placed.order_id) == [(ALICE, "review_claim"), (ALICE, "review_approve")]
    refused(ErrorCode.review_already_decided, shop.approve, item.id, ALICE)
    factories.assert_books_clean(shop.c)


def test_rejection_puts_the_keys_back_and_the_money_in_the_balance(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=3)
    buyer = shop.member(balance=50_000)
    placed = flagged(shop, buyer, sku)
    item = shop.item(placed.order_id)
    shop.claim(item.id, BOB)

    error = refused(ErrorCode.invalid_request, shop.reject, item.id, BOB, "  ")
    assert "note" in error.message("en")
    result = shop.reject(item.id, BOB, "card reported stolen")

    assert result == {"item": item.id, "status": "rejected", "order": "rejected"}
    order = shop.order(placed.order_id)
    assert (order.status, order.reason, order.next_action_at) == (
        "rejected",
        "review_rejected",
        None,
    )
    assert (order.paid_cents, order.refunded_cents) == (10_000, 10_000)
    assert shop.stock(sku) == {"available": 3}
    assert shop.keys_of(placed.line_id, "held") == []
    assert shop.balance(buyer) == (50_000, 0)
    assert shop.item(placed.order_id).status == "rejected"
    assert shop.decisions(item.id) == [(BOB, "claim"), (BOB, "reject")]
    assert shop.audit(placed.order_id) == [(BOB, "review_claim"), (BOB, "review_reject")]
    assert shop.moves(placed.order_id)[-1] == ("review", "rejected", "review_rejected")
    factories.assert_books_clean(shop.c)


def test_large_amounts_need_a_second_different_reviewer(make_shop: Callable[..., Shop]) -> None:
    shop = make_shop(review_two_reviewers_from_cents=20_000)
    sku = factories.add_product(shop.c, price_cents=25_000, stock=2)
    buyer = shop.member(balance=100_000)
    placed = flagged(shop, buyer, sku)
    item = shop.item(placed.order_id)

    shop.claim(item.id, ALICE)
    first = shop.approve(item.id, ALICE, "first look ok")
    assert first == {"item": item.id, "status": "second", "order": None}
    waiting = shop.item(placed.order_id)
    assert (waiting.status, waiting.first_approver, waiting.claimed_by) == ("second", ALICE, "")
    assert shop.order(placed.order_id).status == "review"  # nothing moves yet
    assert shop.stock(sku) == {"available": 1, "held": 1}

    refused(ErrorCode.review_second_reviewer_required, shop.claim, item.id, ALICE)
    refused(ErrorCode.review_not_claimed, shop.approve, item.id, ALICE)
    refused(ErrorCode.review_not_claimed, shop.approve, item.id, BOB)
    assert shop.claim(item.id, BOB).status == "second"
    final = shop.approve(item.id, BOB, "second look ok")

    assert final == {"item": item.id, "status": "approved", "order": "delivered"}
    assert shop.order(placed.order_id).status == "delivered"
    assert shop.stock(sku) == {"available": 1, "sold": 1}
    assert shop.item(placed.order_id).decided_by == BOB
    steps = [(ALICE, "claim"), (ALICE, "approve_first"), (BOB, "claim"), (BOB, "approve")]
    assert shop.decisions(item.id) == steps
    assert shop.audit(placed.order_id) == [(a, f"review_{s}") for a, s in steps]
    factories.assert_books_clean(shop.c)


def test_claims_are_personal_until_they_expire(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=2)
    placed = flagged(shop, shop.member(), sku)
    item_id = shop.item(placed.order_id).id

    refused(ErrorCode.review_not_claimed, shop.approve, item_id, ALICE)
    refused(ErrorCode.review_not_claimed, shop.reject, item_id, ALICE, "no claim")
    claim_s = timedelta(seconds=shop.c.settings.review_claim_s)
    claimed = shop.claim(item_id, ALICE)
    assert (claimed.status, claimed.claimed_by) == ("claimed", ALICE)
    assert claimed.claim_expires_at == shop.clock() + claim_s

    other = refused(ErrorCode.review_claimed_by_other, shop.claim, item_id, BOB)
    assert ALICE in other.message("en")
    refused(ErrorCode.review_claimed_by_other, shop.approve, item_id, BOB)
    refused(ErrorCode.review_claimed_by_other, shop.reject, item_id, BOB, "mine now")
    refused(ErrorCode.review_not_claimed, shop.release, item_id, BOB)
    # Claiming again extends one's own claim.
    shop.clock.advance(60)
    assert shop.claim(item_id, ALICE).claim_expires_at == shop.clock() + claim_s

    shop.clock.advance(claim_s.total_seconds() + 1)
    taken = shop.claim(item_id, BOB)  # Alice's claim ran out
    assert taken.claimed_by == BOB
    refused(ErrorCode.review_claimed_by_other, shop.approve, item_id, ALICE)
    released = shop.release(item_id, BOB)
    assert (released.status, released.claimed_by) == ("open", "")
    assert shop.order(placed.order_id).status == "review"
    assert shop.decisions(item_id) == [
        (ALICE, "claim"),
        (ALICE, "claim"),
        (BOB, "claim"),
        (BOB, "release"),
    ]


# -- the review SLA, through the real pipeline step -------------------------------------------


@pytest.fixture
def sla_shop(make_shop: Callable[..., Shop]) -> Shop:
    return make_shop(
        review_sla_s=600,
        review_auto_approve_below_cents=20_000,
        review_escalation_url="http://127.0.0.1:9/review-escalations",
    )


def _past_sla(shop: Shop) -> tuple[orders.Placed, orders.Placed, orders.Buyer]:
    small_sku = factories.add_product(shop.c, price_cents=10_000, stock=2)
    big_sku = factories.add_product(shop.c, price_cents=30_000, stock=2)
    small = flagged(shop, shop.member(), small_sku)
    big_buyer = shop.member(balance=100_000)
    big = flagged(shop, big_buyer, big_sku)

    # Before the deadline the step only reschedules the order for it.
    shop.clock.advance(300)
    for p in (small, big):
        assert shop.step(p.order_id) == "in_review"
        order = shop.order(p.order_id)
        assert (order.status, order.next_action_at) == ("review", p.sla_deadline)
    shop.clock.advance(302)  # past both deadlines
    return small, big, big_buyer


def test_at_the_sla_small_orders_are_approved_and_large_ones_refunded(sla_shop: Shop) -> None:
    shop = sla_shop
    small, big, big_buyer = _past_sla(shop)
    assert shop.figures()["open_past_sla"] == 2

    assert shop.step(small.order_id) == "delivered"
    assert shop.step(big.order_id) == "refunded"

    delivered = shop.order(small.order_id)
    assert (delivered.status, delivered.reason) == ("delivered", "review_approved")
    assert len(shop.keys_of(small.line_id, "sold")) == 1
    refunded = shop.order(big.order_id)
    assert (refunded.status, refunded.reason) == ("refunded", "review_sla_refund")
    assert refunded.refunded_cents == refunded.paid_cents == 30_000
    assert shop.keys_of(big.line_id, "held") == []
    assert shop.balance(big_buyer) == (100_000, 0)
    assert shop.moves(big.order_id)[-1] == ("review", "refunded", "review_sla_refund")

    for p, status, action in ((small, "approved", "approve"), (big, "rejected", "refund")):
        item = shop.item(p.order_id)
        assert (item.status, item.decided_by) == (status, review_actions.SLA_ACTOR)
        assert item.escalated_at is not None
        assert f"default action {action}" in item.decision_note
        assert shop.decisions(item.id)[-1][0] == review_actions.SLA_ACTOR

    figures = shop.figures()
    assert (figures["depth"], figures["open_past_sla"], figures["sla_breaches_total"]) == (0, 0, 2)
    assert figures["decisions_last_hour"] == 2

    sent = shop.read("SELECT topic, order_id, target_url, payload FROM outbox ORDER BY id")
    assert [(r[0], r[1], r[2]) for r in sent] == [
        ("review.sla_breached", None, "http://127.0.0.1:9/review-escalations")
    ] * 2
    payloads = [r[3] if isinstance(r[3], dict) else json.loads(r[3]) for r in sent]
    assert [(p["order_id"], p["default_action"]) for p in payloads] == [
        (small.order_id, "approve"),
        (big.order_id, "refund"),
    ]
    assert payloads[1]["amount_cents"] == 30_000 and payloads[1]["type"] == "review.sla_breached"
    # Nothing is left due for these orders.
    assert shop.step(small.order_id) == "nothing_due"
    assert shop.step(big.order_id) == "nothing_due"
    factories.assert_books_clean(shop.c)


def _send_outbox(shop: Shop) -> list[httpx.Request]:
    """One outbox round against an operator endpoint that accepts everything."""
    received: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    async def send() -> int:
        async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
            return await outbox.send_due(shop.c, client)

    assert asyncio.run(send()) == len(received)
    return received


def test_an_escalation_the_endpoint_accepted_is_sent_once(sla_shop: Shop) -> None:
    shop = sla_shop
    small, _, _ = _past_sla(shop)
    assert shop.step(small.order_id) == "delivered"
    received = _send_outbox(shop)
    assert [str(r.url) for r in received] == ["http://127.0.0.1:9/review-escalations"]
    body = json.loads(received[0].content)
    assert (body["type"], body["order_id"]) == ("review.sla_breached", small.order_id)
    assert received[0].headers["X-Kameng-Event"] == body["event_id"]
    assert shop.read("SELECT state, attempts, last_error FROM outbox") == [("sent", 1, "")]
    assert _send_outbox(shop) == []  # sent once, not again


def test_an_escalation_is_signed_with_the_operator_secret(make_shop: Callable[..., Shop]) -> None:
    shop = make_shop(
        review_sla_s=60,
        review_escalation_url="http://127.0.0.1:9/hook",
        review_escalation_secret="operator-secret",
    )
    sku = factories.add_product(shop.c, price_cents=10_000, stock=1)
    placed = flagged(shop, shop.member(), sku)
    shop.clock.advance(61)
    assert shop.step(placed.order_id) == "refunded"
    (request,) = _send_outbox(shop)
    header = request.headers["X-Kameng-Signature"]
    now = int(shop.clock().timestamp())
    assert verify_webhook(["operator-secret"], header, request.content, now=now)
    assert not verify_webhook(["another-secret"], header, request.content, now=now)


def test_without_an_escalation_url_a_breach_writes_no_webhook(
    make_shop: Callable[..., Shop],
) -> None:
    shop = make_shop(review_sla_s=60, review_auto_approve_below_cents=1)
    sku = factories.add_product(shop.c, price_cents=10_000, stock=1)
    buyer = shop.member(balance=10_000)
    placed = flagged(shop, buyer, sku)
    shop.clock.advance(61)
    assert shop.step(placed.order_id) == "refunded"
    assert shop.read("SELECT COUNT(*) FROM outbox") == [(0,)]
    assert shop.figures()["sla_breaches_total"] == 1
    assert shop.balance(buyer) == (10_000, 0)
    factories.assert_books_clean(shop.c)


# -- gateway orders: screened when the money arrives -------------------------------------------


def test_a_gateway_order_is_screened_when_its_payment_arrives(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=120_000, stock=2)
    cheap = factories.add_product(shop.c, price_cents=1_000, stock=2)
    with shop.c.db.connect() as conn:
        payments.add_gateway(
            conn,
            vault=shop.c.vault,
            code="gw",
            name="gateway",
            base_url="http://127.0.0.1:9",
            merchant_id="1001",
            key="k",
            now=shop.clock(),
        )

    def pending(code: str, guest: str, ip: str = "203.0.113.80") -> orders.Placed:
        info = shop.c.sku(code)
        with shop.c.db.connect() as conn:
            placed = checkout.place_pending(
                conn,
                buyer=orders.Buyer(None, 0, "guest", guest_key=guest),
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=1,
                    fields={},
                    channel="storefront",
                ),
                vault=shop.c.vault,
                policy=shop.c.policy,
                now=shop.clock(),
                pay_window_s=shop.c.settings.payment_window_s,
                context=screening.Context(ip=ip, device=guest),
            )
            payments.open_payment(
                conn,
                gateway=payments.get_gateway(conn, code="gw"),
                purpose=PaymentPurpose.order,
                pay_type="alipay",
                amount_cents=placed.amount_cents,
                currency="CNY",
                expires_at=placed.sla_deadline or shop.clock(),
                now=shop.clock(),
                checks=shop.c.payment_checks,
                order_id=placed.order_id,
                order_no=placed.order_no,
            )
        return placed

    def pay(placed: orders.Placed) -> str:
        shop.clock.advance(60)
        with shop.c.db.connect() as conn:
            outcome = payments.apply_confirmation(
                conn,
                gateway=payments.get_gateway(conn, code="gw"),
                confirmation=Confirmation(
                    placed.order_no, f"T{placed.order_id}", placed.amount_cents, "CNY"
                ),
                channel="notify",
                deps=shop.c.payment_deps,
                now=shop.clock(),
            )
        return str(outcome)

    big = pending(sku, "guest-big")
    small = pending(cheap, "guest-small", ip="203.0.113.81")
    shop.listed("block", "device", "guest-bad")
    bad = pending(cheap, "guest-bad")
    # Facts are written when the order is placed; screening waits for the money.
    assert shop.read("SELECT COUNT(*) FROM risk_facts") == [(3,)]
    assert shop.screenings(big.order_id) == []

    assert pay(small) == "fulfilment_started"
    assert shop.order(small.order_id).status == "delivered"
    assert shop.live(small.order_id)["action"] == "allow"

    assert pay(big) == "fulfilment_started"
    order = shop.order(big.order_id)
    assert (order.status, order.reason, order.paid_cents) == (
        "review",
        "risk_review_amount",
        120_000,
    )
    live = shop.live(big.order_id)
    assert (live["action"], live["rule"], live["attrs"]["buyer_kind"]) == (
        "review",
        "guest_big",
        "guest",
    )
    assert live["attrs"]["ip_orders_1h"] == 2  # counted with the unpaid facts of that moment
    with shop.c.db.connect(write=False) as conn:
        wallet = ledger.wallet_account(conn, owner_type="guest", owner_id=big.order_id)
        assert ledger.balances(conn, wallet_id=wallet) == (0, 120_000)
    assert shop.stock(sku) == {"available": 1, "held": 1}
    factories.assert_books_clean(shop.c)

    item = shop.item(big.order_id)
    shop.claim(item.id, ALICE)
    shop.reject(item.id, ALICE, "not the card holder")
    with shop.c.db.connect(write=False) as conn:
        assert ledger.balances(conn, wallet_id=wallet) == (120_000, 0)  # paid back from here
    assert shop.stock(sku) == {"available": 2}
    assert reason_text("review_rejected", "en", guest=True).endswith("how you paid")

    # A blocked gateway order: rejected when paid, the money stays in the guest's wallet.
    assert pay(bad) == "fulfilment_started"
    rejected = shop.order(bad.order_id)
    assert (rejected.status, rejected.reason) == ("rejected", "risk_rejected")
    assert rejected.paid_cents == rejected.refunded_cents == 1_000
    assert shop.live(bad.order_id)["rule"] == "block_listed"
    with shop.c.db.connect(write=False) as conn:
        bad_wallet = ledger.wallet_account(conn, owner_type="guest", owner_id=bad.order_id)
        assert ledger.balances(conn, wallet_id=bad_wallet) == (1_000, 0)
    assert shop.stock(cheap) == {"available": 1, "sold": 1}
    factories.assert_books_clean(shop.c)


# -- approvals and the backorder queue --------------------------------------------------------


def test_an_approved_order_does_not_jump_the_backorder_queue(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=0)
    waiting = shop.place(shop.reseller(), sku, ip="192.0.2.1", channel="api")
    assert waiting.status.value == "backordered"
    placed = flagged(shop, shop.member(), sku)
    assert shop.keys_of(placed.line_id, "held") == []  # the queue came first: nothing held
    factories.add_stock(shop.c, sku, [f"{sku}-RESTOCK-1"])

    item = shop.item(placed.order_id)
    shop.claim(item.id, ALICE)
    shop.approve(item.id, ALICE)

    # The one restocked key belongs to the order that was waiting for it.
    assert shop.order(placed.order_id).status == "backordered"
    assert shop.stock(sku) == {"available": 1}


# -- rule-set versions and list keys ---------------------------------------------------------


def test_activating_the_live_set_as_shadow_never_leaves_orders_unscreened(shop: Shop) -> None:
    with shop.c.db.connect() as conn:
        try:
            risk.activate(
                conn, version=1, mode=RuleSetStatus.shadow, actor="staff:admin", now=shop.clock()
            )
        except KamengError:
            pass  # refusing is one right answer
    shop.c.risk_engine.invalidate()
    with shop.c.db.connect(write=False) as conn:
        assert [v.version for v in risk.list_rule_sets(conn) if v.status == "live"] == [1]
    shop.listed("block", "ip", "203.0.113.99")
    sku = factories.add_product(shop.c, price_cents=1_000, stock=1)
    assert shop.place(shop.member(), sku, ip="203.0.113.99").status.value == "rejected"


def test_a_member_on_the_block_list_by_buyer_id_is_rejected(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=2)
    buyer = shop.member()
    shop.listed("block", "buyer", f"m{buyer.member_id}")
    assert shop.place(buyer, sku, ip="203.0.113.70").status.value == "rejected"
    assert shop.place(shop.member(), sku, ip="203.0.113.70").status.value == "delivered"


def test_a_reseller_listed_as_documented_is_blocked(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=1_000, stock=1)
    buyer = shop.reseller()
    shop.listed("block", "buyer", f"r{buyer.reseller_id}")
    assert shop.place(buyer, sku, ip="192.0.2.5", channel="api").status.value == "rejected"


# -- what the buyer is told ---------------------------------------------------------------------


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_buyers_are_told_a_category_never_the_rule(category: str) -> None:
    zh = reason_text(f"risk_review_{category}", "zh-CN")
    en = reason_text(f"risk_review_{category}", "en")
    assert "审核" in zh and CATEGORIES[category][0] in zh
    assert "review" in en and CATEGORIES[category][1] in en
    codes = {r["code"] for r in DEFAULT_RULES}
    for text_ in (zh, en):
        assert not any(code in text_ for code in codes), text_
        assert "risk_review" not in text_


def test_the_velocity_text_in_chinese() -> None:
    zh = reason_text("risk_review_velocity", "zh-CN")
    assert zh.startswith("订单需人工审核") and "短时间内下单较多" in zh
    assert "velocity" not in zh and "ip" not in zh.lower()


def test_housekeeping_prunes_risk_records_past_their_retention(any_shop: Shop) -> None:
    """Facts past the retention go (never those a 90-day counter still reads); screening
    records go on their own retention; the rest stay."""
    from kameng import housekeeping

    shop = any_shop
    sku = factories.add_product(shop.c, price_cents=1_000, stock=3)
    buyer = shop.member()
    start = shop.clock()
    old = shop.place(buyer, sku, ip="203.0.113.90")
    shop.clock.advance(95 * 86400)
    middle = shop.place(buyer, sku, ip="203.0.113.90")
    shop.clock.advance(100 * 86400)  # old is 195 days back, middle 100
    recent = shop.place(buyer, sku, ip="203.0.113.90")
    shop.c.settings.risk_facts_retention_days = 30  # below the floor: 91 days are kept anyway
    shop.c.settings.risk_screenings_retention_days = 150
    pruned = housekeeping.prune(shop.c)
    assert (pruned["risk_facts"], pruned["risk_screenings"]) == (2, 1)
    kept = {r[0] for r in shop.read("SELECT order_id FROM risk_facts")}
    assert kept == {recent.order_id}
    screened = {r[0] for r in shop.read("SELECT order_id FROM risk_screenings")}
    assert screened == {middle.order_id, recent.order_id}
    assert housekeeping.prune(shop.c)["risk_facts"] == 0
    assert start < shop.clock()
    assert old.order_id not in kept


def test_a_counter_reads_at_most_the_newest_facts_of_a_key(
    any_shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact while the window holds no more than the cap; saturated at the cap beyond it, so a
    very busy key costs a bounded scan. Whether an IP is new for the buyer is read the same way."""
    from kameng.risk import attributes

    shop = any_shop
    sku = factories.add_product(shop.c, price_cents=1_000, stock=12)
    monkeypatch.setattr(attributes, "SCAN_CAP", 3)
    placed = [shop.place(shop.member(), sku, ip="203.0.113.77") for _ in range(5)]
    counts = [shop.live(p.order_id)["attrs"]["ip_orders_1h"] for p in placed]
    assert counts == [1, 2, 3, 3, 3]

    regular = shop.member()
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"):
        shop.place(regular, sku, ip=ip)
    # The first IP is among the buyer's facts, but not among the newest three.
    back = shop.live(shop.place(regular, sku, ip="198.51.100.1").order_id)["attrs"]
    assert back["ip_new_for_buyer"] is True
    monkeypatch.setattr(attributes, "SCAN_CAP", 10_000)
    again = shop.live(shop.place(regular, sku, ip="198.51.100.1").order_id)["attrs"]
    assert again["ip_new_for_buyer"] is False
    factories.assert_books_clean(shop.c)


def test_live_screening_reads_the_buyers_history_as_a_backtest_does(any_shop: Shop) -> None:
    """`ip_new_for_buyer` and `buyer_seen_before` come from the buyer's stored facts: live
    screening must gather them whenever a rule could still use them (a backtest always does),
    or rules on them never match live."""
    shop = any_shop
    sku = factories.add_product(shop.c, price_cents=25_000, stock=5)
    with shop.c.db.unit_of_work() as session:
        session.execute(
            text(
                "UPDATE products SET risk_level = 3 WHERE id = "
                "(SELECT product_id FROM skus WHERE code = :code)"
            ),
            {"code": sku},
        )
    shop.c.invalidate_caches()
    buyer = shop.member()
    shop.clock.advance(10 * 86400)  # no new-account rule in the way

    first = shop.place(buyer, sku, ip="203.0.113.10")
    row = shop.live(first.order_id)
    assert first.status.value == "delivered"
    assert (row["matched"], row["score"]) == (["risky_product_first_order"], 100)
    assert (row["attrs"]["buyer_seen_before"], "ip_new_for_buyer" in row["attrs"]) == (False, False)

    second = shop.place(buyer, sku, ip="203.0.113.10")
    row = shop.live(second.order_id)
    assert second.status.value == "delivered"  # seen before: no longer a first order
    assert (row["attrs"]["buyer_seen_before"], row["attrs"]["ip_new_for_buyer"]) == (True, False)
    assert (row["matched"], row["score"]) == ([], 0)

    moved = shop.place(buyer, sku, ip="198.51.100.20")
    row = shop.live(moved.order_id)
    assert moved.status.value == "delivered"
    assert row["attrs"]["ip_new_for_buyer"] is True
    assert (row["matched"], row["score"]) == (["note_new_ip"], 10)
    factories.assert_books_clean(shop.c)

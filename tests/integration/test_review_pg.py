"""The review queue under concurrency, on the throwaway PostgreSQL: reviewers racing to claim one
item, and decisions racing on one item. Claims and decisions are compare-and-set on the item's
version (and approve/reject lock the item row), so exactly one wins and the order moves once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from tests.integration.test_risk_review import ALICE, BOB, Shop, flagged
from tests.support import factories
from tests.support.pipeline import wait_for

from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.orders import fulfil, screening
from kameng.orders import service as orders
from kameng.pipeline import review_actions
from kameng.review import service as review

pytestmark = pytest.mark.pg

THREADS = 8


@pytest.fixture
def shop(pg_container: Container) -> Iterator[Shop]:
    yield Shop(pg_container)


def race(n: int, job: Callable[[int], Any]) -> list[tuple[Any, ErrorCode | None]]:
    """Run `job(i)` in n threads released together; each gets (result, None) or (None, code)."""
    gate = threading.Barrier(n)

    def attempt(i: int) -> tuple[Any, ErrorCode | None]:
        gate.wait()
        try:
            return job(i), None
        except KamengError as exc:
            return None, exc.code

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(attempt, range(n)))


def moved_out_of_review(shop: Shop, order_id: int) -> int:
    rows = shop.read(
        "SELECT COUNT(*) FROM order_events WHERE order_id = :o AND from_status = 'review'",
        o=order_id,
    )
    return int(rows[0][0])


def lock_waiters(shop: Shop) -> int:
    rows = shop.read(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    return int(rows[0][0])


def decided(shop: Shop, item_id: int) -> list[tuple[str, str]]:
    return [d for d in shop.decisions(item_id) if d[1] in ("approve", "reject")]


def test_eight_reviewers_racing_for_one_item_leave_one_holder(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=3)
    buyer = shop.member()
    for _ in range(3):  # a few rounds: the interleavings differ from one to the next
        placed = flagged(shop, buyer, sku)
        item_id = shop.item(placed.order_id).id
        now = shop.clock()

        def claim(i: int, item_id: int = item_id, now: Any = now) -> review.Item:
            with shop.c.db.connect() as conn:
                return review.claim(
                    conn,
                    item_id=item_id,
                    reviewer=f"staff:r{i}",
                    policy=shop.c.review_policy,
                    now=now,
                )

        results = race(THREADS, claim)
        winners = [r for r, code in results if code is None]
        assert len(winners) == 1, results
        assert sorted(str(code) for _, code in results if code is not None) == [
            "review_claimed_by_other"
        ] * (THREADS - 1)
        item = shop.item(placed.order_id)
        assert (item.status, item.claimed_by, item.version) == ("claimed", winners[0].claimed_by, 2)
        assert shop.decisions(item_id) == [(winners[0].claimed_by, "claim")]


def test_reviewers_racing_to_decide_one_item_apply_exactly_one_decision(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=6)
    buyer = shop.member(balance=1_000_000)
    outcomes: list[str] = []
    for _ in range(3):
        # Claimed, then released: open again, and two reviewers go for it at once, each
        # claiming and deciding in one transaction (Alice approves, Bob rejects).
        placed = flagged(shop, buyer, sku)
        item_id = shop.item(placed.order_id).id
        shop.claim(item_id, ALICE)
        shop.release(item_id, ALICE)

        def claim_and_decide(i: int, item_id: int = item_id) -> dict[str, Any]:
            reviewer = (ALICE, BOB)[i]
            now = shop.clock()
            with shop.c.db.connect() as conn:
                review.claim(
                    conn, item_id=item_id, reviewer=reviewer, policy=shop.c.review_policy, now=now
                )
                if reviewer == ALICE:
                    return review_actions.approve(
                        conn,
                        item_id=item_id,
                        reviewer=reviewer,
                        note="fine",
                        policy=shop.c.review_policy,
                        accounts=shop.c.accounts,
                        fulfil_sla_s=600,
                        now=now,
                    )
                return review_actions.reject(
                    conn,
                    item_id=item_id,
                    reviewer=reviewer,
                    note="fraud",
                    accounts=shop.c.accounts,
                    now=now,
                )

        results = race(2, claim_and_decide)
        applied = [r for r, code in results if code is None]
        assert len(applied) == 1, results
        assert next(code for _, code in results if code is not None) in (
            ErrorCode.review_claimed_by_other,
            ErrorCode.review_already_decided,
        )
        outcomes.append(applied[0]["status"])
        assert len(decided(shop, item_id)) == 1
        assert moved_out_of_review(shop, placed.order_id) == 1
        assert shop.order(placed.order_id).status == (
            "delivered" if applied[0]["status"] == "approved" else "rejected"
        )

        # One reviewer holding the claim sends approve and reject together (two tabs).
        placed = flagged(shop, buyer, sku)
        item_id = shop.item(placed.order_id).id
        shop.claim(item_id, BOB)

        def decide(i: int, item_id: int = item_id) -> dict[str, Any]:
            if i == 0:
                return shop.approve(item_id, BOB, "ok")
            return shop.reject(item_id, BOB, "not ok")

        results = race(2, decide)
        applied = [r for r, code in results if code is None]
        assert len(applied) == 1, results
        assert [code for _, code in results if code is not None] == [
            ErrorCode.review_already_decided
        ]
        assert len(decided(shop, item_id)) == 1
        assert moved_out_of_review(shop, placed.order_id) == 1

    assert set(outcomes) <= {"approved", "rejected"}
    assert shop.figures()["depth"] == 0
    # Keys held for rejected orders are back on sale; delivered ones are sold, none left held.
    assert "held" not in shop.stock(sku)
    factories.assert_books_clean(shop.c)


def test_an_approval_racing_the_sla_step_does_not_deadlock(shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=1)
    placed = flagged(shop, shop.member(), sku)
    item_id = shop.item(placed.order_id).id
    shop.claim(item_id, ALICE)
    assert placed.sla_deadline is not None
    errors: list[BaseException] = []

    def approve() -> None:
        try:
            shop.approve(item_id, ALICE, "just in time")
        except BaseException as exc:
            errors.append(exc)

    reviewer = threading.Thread(target=approve)
    try:
        with shop.c.db.connect() as conn:
            # The step, as plan_step runs it: the order row first...
            loaded = fulfil.load(conn, order_id=placed.order_id, lock=True)
            assert loaded is not None
            reviewer.start()
            wait_for(
                lambda: lock_waiters(shop), timeout=10, describe=lambda: "the approval never waited"
            )
            # ...then the SLA's default action on the item the reviewer has locked.
            review_actions.apply_sla(
                conn,
                loaded=loaded,
                policy=shop.c.review_policy,
                accounts=shop.c.accounts,
                fulfil_sla_s=600,
                escalation_url="",
                now=placed.sla_deadline + timedelta(seconds=1),
            )
    except Exception as exc:
        errors.append(exc)
    finally:
        reviewer.join(timeout=30)
    # The approval waited for the step (no deadlock) and was then told, clearly, that the SLA
    # had decided first.
    assert [getattr(e, "code", e) for e in errors] == [ErrorCode.review_already_decided]
    assert moved_out_of_review(shop, placed.order_id) == 1
    factories.assert_books_clean(shop.c)


def test_a_parallel_burst_from_one_ip_is_counted(shop: Shop) -> None:
    """Six orders from one IP sent at the same moment: screening is serialised per counted key,
    so each one counts those before it and exactly one (the sixth) goes to review."""
    sku = factories.add_product(shop.c, price_cents=1_000, stock=6)
    buyers = [shop.member() for _ in range(6)]
    start = shop.clock()
    placed: dict[int, Any] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(6)

    def place(i: int) -> None:
        info = shop.c.sku(sku)
        try:
            go.wait(timeout=30)
            with shop.c.db.connect() as conn:
                placed[i] = orders.place_order(
                    conn,
                    buyer=buyers[i],
                    cmd=orders.PlaceOrder(
                        sku=info,
                        unit_price_cents=info.price_cents,
                        quantity=1,
                        fields={},
                        customer_ref=f"burst-{i}",
                        channel="storefront",
                    ),
                    accounts=shop.c.accounts,
                    vault=shop.c.vault,
                    policy=shop.c.policy,
                    now=start + timedelta(seconds=1),
                    engine=shop.c.screening_engine,
                    context=screening.Context(ip="203.0.113.200"),
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=place, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert shop.read("SELECT COUNT(*) FROM risk_facts WHERE ip = '203.0.113.200'") == [(6,)]
    statuses = sorted(p.status.value for p in placed.values())
    assert statuses == ["delivered"] * 5 + ["review"]
    seen = sorted(shop.live(p.order_id)["attrs"]["ip_orders_1h"] for p in placed.values())
    assert seen == [1, 2, 3, 4, 5, 6]  # each screening counted every order before it
    factories.assert_books_clean(shop.c)

"""Payments end to end: real app, real EPay gateway simulator, real HTTP both ways.

Each notify negative checks its exact outcome (the `payment_notifies` row and the answer the
gateway gets), that nothing was fulfilled or credited where nothing should be, and that the
books verify clean afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.integration._helpers import run_cli
from tests.support import factories
from tests.support.pipeline import WorkerThread, wait_for
from tests.support.shop import (
    GATEWAY,
    KEY,
    PID,
    ShopRig,
    csrf_of,
    place_gateway_order,
    shop_rig,
    submit_to_gateway,
)

from kameng.catalog.models import DeliveryKind
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.orders import queries as order_queries
from kameng.security import epay


@pytest.fixture(params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    with shop_rig(request.param, tmp_path) as r:
        yield r


@pytest.fixture
def sqlite_rig(tmp_path: Path) -> Any:
    """For behaviour that does not depend on the backend (kept off PostgreSQL for speed)."""
    with shop_rig("sqlite", tmp_path) as r:
        yield r


def order(rig: ShopRig, order_no: str) -> Any:
    with rig.container.db.connect(write=False) as conn:
        return order_queries.find_order(conn, order_no=order_no, reseller_id=None)


def test_guest_pays_at_the_gateway_and_gets_keys(rig: ShopRig) -> None:
    sku = factories.add_product(rig.container, stock=3)
    client = rig.browser()
    order_no = place_gateway_order(client, sku)
    assert order(rig, order_no).status == "pending_payment"
    cashier = submit_to_gateway(client, order_no)
    assert cashier.status_code == 200 and 'id="pay"' in cashier.text
    paid = httpx.post(f"{rig.gateway.url}/_sim/trades/{order_no}/pay", json={}, timeout=10)
    assert paid.status_code == 200, paid.text
    wait_for(lambda: order(rig, order_no).status == "delivered")
    page = client.get(f"/orders/{order_no}")
    assert 'id="keys"' in page.text
    assert rig.payment(order_no).state == "paid"
    assert ("notify", "fulfilment_started") in rig.statements(order_no)
    factories.assert_books_clean(rig.container)


# -- helpers ---------------------------------------------------------------------------------------


def sim(rig: ShopRig, method: str, path: str, **body: Any) -> Any:
    response = httpx.request(method, f"{rig.gateway.url}{path}", json=body or None, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def notify(rig: ShopRig, key: str = KEY, **params: Any) -> str:
    """Send a notify as a gateway would (signed with `key`); returns our answer."""
    base = {
        "pid": PID,
        "trade_no": "202611260000001",
        "type": "alipay",
        "name": "test",
        "trade_status": "TRADE_SUCCESS",
    }
    base.update(params)
    signed = epay.signed(base, key)
    response = httpx.get(f"{rig.url}/pay/notify/{GATEWAY}", params=signed, timeout=10)
    assert response.status_code == 200
    return response.text


def pending_order(rig: ShopRig, sku: str) -> tuple[httpx.Client, str]:
    client = rig.browser()
    order_no = place_gateway_order(client, sku)
    return client, order_no


def balance_of(rig: ShopRig, owner_type: str, owner_id: int) -> int:
    with rig.container.db.connect() as conn:
        wallet = ledger.wallet_account(conn, owner_type=owner_type, owner_id=owner_id)
        return ledger.balances(conn, wallet_id=wallet)[0]


def expire(rig: ShopRig, order_no: str) -> None:
    """Run the worker past the payment window: the gateway is asked once more, then the order
    closes as `expired`."""
    deadline = order(rig, order_no).sla_deadline
    rig.clock.advance(rig.container.settings.payment_window_s + 1)
    worker = WorkerThread(rig.container).start()
    try:
        wait_for(lambda: asked_since(rig, order_no, deadline))
        rig.clock.advance(16)
        wait_for(lambda: order(rig, order_no).status == "expired")
    finally:
        worker.stop()


def asked_since(rig: ShopRig, order_no: str, when: Any) -> bool:
    checked = rig.payment(order_no).last_checked_at
    return checked is not None and checked >= when


# -- notify negatives (one rig per backend for the whole group) ----------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with shop_rig(request.param, tmp_path_factory.mktemp("shop")) as r:
        yield r


def test_bad_signature_is_refused_and_moves_nothing(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=2)
    _, order_no = pending_order(shared, sku)
    assert notify(shared, key="not-the-key", out_trade_no=order_no, money="10.00") == "fail"
    # Anyone can send this: it is counted and logged, but costs no write.
    assert shared.statements(order_no) == []
    assert shared.payment(order_no).state == "pending"
    assert order(shared, order_no).status == "pending_payment"
    factories.assert_books_clean(shared.container)


def test_wrong_pid_is_refused(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=2)
    _, order_no = pending_order(shared, sku)
    assert notify(shared, pid="9999", out_trade_no=order_no, money="10.00") == "fail"
    assert shared.statements(order_no) == [("notify", "wrong_merchant")]
    assert shared.payment(order_no).state == "pending"
    factories.assert_books_clean(shared.container)


def test_not_success_status_is_refused(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=2)
    _, order_no = pending_order(shared, sku)
    answer = notify(shared, out_trade_no=order_no, money="10.00", trade_status="WAIT_BUYER_PAY")
    assert answer == "fail"
    assert shared.statements(order_no) == [("notify", "not_success")]
    assert order(shared, order_no).status == "pending_payment"


@pytest.mark.parametrize(
    ("money", "currency", "outcome"),
    [
        ("9.99", None, "amount_mismatch"),
        ("10.01", None, "amount_mismatch"),
        ("10.00", "USD", "currency_mismatch"),
    ],
)
def test_amount_or_currency_mismatch_is_flagged_never_fulfilled(
    shared: ShopRig, money: str, currency: str | None, outcome: str
) -> None:
    sku = factories.add_product(shared.container, stock=2, price_cents=1000)
    _, order_no = pending_order(shared, sku)
    extra = {"currency": currency} if currency else {}
    # Acknowledged (we hold it durably; resending would change nothing) but flagged.
    assert notify(shared, out_trade_no=order_no, money=money, **extra) == "success"
    assert shared.statements(order_no) == [("notify", outcome)]
    pay = shared.payment(order_no)
    assert (pay.state, pay.reason, pay.ledger_txn_id) == ("flagged", outcome, None)
    assert pay.next_check_at is None
    row = order(shared, order_no)
    assert row.status == "pending_payment"
    assert row.reason == f"payment_{outcome}"
    # A second notify with the right amount does not fulfil a flagged payment either.
    assert notify(shared, out_trade_no=order_no, money="10.00") == "success"
    assert shared.statements(order_no)[-1] == ("notify", "already_flagged")
    assert order(shared, order_no).status == "pending_payment"
    factories.assert_books_clean(shared.container)


def test_unknown_order_is_refused(shared: ShopRig) -> None:
    assert notify(shared, out_trade_no="K20261126NOSUCHORDER", money="10.00") == "fail"
    assert shared.statements("K20261126NOSUCHORDER") == [("notify", "unknown_payment")]
    factories.assert_books_clean(shared.container)


def test_malformed_amount_is_refused(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=2)
    _, order_no = pending_order(shared, sku)
    assert notify(shared, out_trade_no=order_no, money="１０.00") == "fail"
    assert shared.statements(order_no) == [("notify", "malformed")]
    assert shared.payment(order_no).state == "pending"


def test_replayed_notify_credits_once(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=3, price_cents=1000)
    _, order_no = pending_order(shared, sku)
    for _ in range(3):
        assert notify(shared, out_trade_no=order_no, money="10.00") == "success"
    assert [o for _, o in shared.statements(order_no)] == [
        "fulfilment_started",
        "duplicate",
        "duplicate",
    ]
    row = order(shared, order_no)
    assert (row.status, row.paid_cents) == ("delivered", 1000)
    with shared.container.db.connect(write=False) as conn:
        from sqlalchemy import text

        payments_posted = conn.execute(
            text("SELECT count(*) FROM ledger_transactions WHERE kind = 'payment' AND ref_id = :p"),
            {"p": shared.payment(order_no).id},
        ).scalar_one()
    assert payments_posted == 1
    factories.assert_books_clean(shared.container)


def test_notify_for_an_expired_order_with_stock_is_fulfilled(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=2, price_cents=1000)
    _, order_no = pending_order(shared, sku)
    expire(shared, order_no)
    assert notify(shared, out_trade_no=order_no, money="10.00") == "success"
    assert shared.statements(order_no) == [("notify", "late_fulfilment_started")]
    row = order(shared, order_no)
    assert row.status == "delivered"
    with shared.container.db.connect(write=False) as conn:
        reasons = [e.reason for e in order_queries.timeline(conn, order_id=row.id)]
    assert reasons[:3] == ["awaiting_payment", "payment_timeout", "late_payment_accepted"]
    factories.assert_books_clean(shared.container)


def test_notify_for_an_expired_order_without_stock_is_credited(shared: ShopRig) -> None:
    sku = factories.add_product(shared.container, stock=1, price_cents=1000)
    _, order_no = pending_order(shared, sku)
    expire(shared, order_no)
    # Someone else buys the last key meanwhile.
    _, other = pending_order(shared, sku)
    assert notify(shared, out_trade_no=other, money="10.00", trade_no="T-other") == "success"
    assert order(shared, other).status == "delivered"
    assert notify(shared, out_trade_no=order_no, money="10.00") == "success"
    assert shared.statements(order_no) == [("notify", "late_payment_credited")]
    row = order(shared, order_no)
    assert (row.status, row.reason, row.refunded_cents) == (
        "refunded",
        "late_payment_credited",
        1000,
    )
    # A guest: the money waits in the order's own wallet for staff to pay it back.
    assert balance_of(shared, "guest", row.id) == 1000
    factories.assert_books_clean(shared.container)


# -- notifies that never come ----------------------------------------------------------------------


def test_a_dropped_notify_is_recovered_by_the_active_query(rig: ShopRig) -> None:
    sim(rig, "POST", "/_sim/config", notify="drop")
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay")
    assert rig.statements(order_no) == []  # the gateway never told us
    assert rig.check_payments() == 0  # not due yet: the first ask is 30 s after opening
    rig.clock.advance(31)
    assert rig.check_payments() == 1
    assert rig.statements(order_no) == [("query", "fulfilment_started")]
    pay = rig.payment(order_no)
    assert (pay.state, pay.reason, pay.next_check_at) == ("paid", "confirmed_by_query", None)
    assert order(rig, order_no).status == "delivered"
    factories.assert_books_clean(rig.container)


def test_unpaid_payments_are_asked_about_until_a_day_after_the_window(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2)
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)  # the gateway knows the trade; it stays unpaid
    asked = 0
    for _ in range(60):
        rig.clock.advance(600)
        asked += rig.check_payments()
    pay = rig.payment(order_no)
    assert 4 <= asked <= 12
    assert (pay.state, pay.next_check_at) == ("pending", pay.next_check_at)
    rig.clock.advance(86400 * 2)
    for _ in range(8):
        rig.clock.advance(3600 * 6)
        rig.check_payments()
    pay = rig.payment(order_no)
    assert (pay.state, pay.reason, pay.next_check_at) == ("closed", "never_paid_unpaid", None)


def test_a_late_payment_found_by_the_query_is_credited_to_the_member(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sim(rig, "POST", "/_sim/config", notify="drop")
    sku = factories.add_product(rig.container, kind=DeliveryKind.manual, price_cents=1500)
    client = rig.browser()
    member_id = register(rig, client, "late@kameng.test")
    order_no = place_gateway_order(client, sku)
    submit_to_gateway(client, order_no)
    expire(rig, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay")
    rig.clock.advance(120)
    rig.check_payments()
    assert rig.statements(order_no) == [("query", "late_payment_credited")]
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("refunded", "late_payment_credited")
    assert balance_of(rig, "member", member_id) == 1500
    page = client.get("/account")
    assert "¥15.00" in page.text
    factories.assert_books_clean(rig.container)


def register(rig: ShopRig, client: httpx.Client, email: str) -> int:
    page = client.get("/register")
    done = client.post(
        "/register",
        data={"csrf_token": csrf_of(page.text), "email": email, "password": "correct-horse"},
    )
    assert done.status_code == 303, done.text
    with rig.container.db.connect(write=False) as conn:
        member_id = members.find_member(conn, email=email)
    assert member_id is not None
    return member_id


def test_member_tops_up_by_gateway(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    client = rig.browser()
    member_id = register(rig, client, "topup@kameng.test")
    page = client.get("/account")
    started = client.post(
        "/account/topup",
        data={"csrf_token": csrf_of(page.text), "amount": "25.50", "pay": f"{GATEWAY}:wxpay"},
    )
    assert started.status_code == 303
    payment_no = started.headers["location"].removeprefix("/pay/")
    assert payment_no.startswith("T")
    cashier = submit_to_gateway(client, payment_no)
    assert cashier.status_code == 200
    sim(rig, "POST", f"/_sim/trades/{payment_no}/pay")
    wait_for(lambda: rig.payment(payment_no).state == "paid")
    assert rig.statements(payment_no)[0] == ("notify", "topup_credited")
    assert balance_of(rig, "member", member_id) == 2550
    # Bad amounts are refused on the page, and no payment is opened.
    page = client.get("/account")
    refused = client.post(
        "/account/topup",
        data={"csrf_token": csrf_of(page.text), "amount": "0.5", "pay": f"{GATEWAY}:wxpay"},
    )
    assert refused.status_code == 422 and "form-error" in refused.text
    factories.assert_books_clean(rig.container)


# -- reconciliation -------------------------------------------------------------------------------


def paid_order(rig: ShopRig, sku: str, **pay: Any) -> str:
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay", **pay)
    return order_no


def test_reconcile_finds_every_seeded_mismatch(rig: ShopRig) -> None:
    sku = factories.add_product(rig.container, stock=10, price_cents=1000)
    clean = paid_order(rig, sku)
    wait_for(lambda: rig.payment(clean).state == "paid")
    unpaid_client, unpaid = pending_order(rig, sku)  # opened, never paid: fine
    submit_to_gateway(unpaid_client, unpaid)

    not_paid = paid_order(rig, sku)  # recorded by us; then the gateway reverses it
    wait_for(lambda: rig.payment(not_paid).state == "paid")
    sim(rig, "POST", f"/_sim/trades/{not_paid}/mutate", status=0)

    differs = paid_order(rig, sku)  # recorded 10.00; the gateway's books say 12.00
    wait_for(lambda: rig.payment(differs).state == "paid")
    sim(rig, "POST", f"/_sim/trades/{differs}/mutate", money="12.00")

    flagged = paid_order(rig, sku, money="9.00")  # paid a different amount: flagged
    wait_for(lambda: rig.payment(flagged).state == "flagged")

    sim(rig, "POST", "/_sim/config", notify="drop")
    lost = paid_order(rig, sku)  # paid, the notify lost, not yet queried

    sim(rig, "POST", "/_sim/trades", out_trade_no="K20261126STRANGER0", money="5.00", paid=True)

    result = run_cli(rig.container, "payments", "reconcile", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found = {
        m["payment_no"]: (m["kind"], m["ours_state"], m["recorded"], m["gateway_paid"])
        for m in report["mismatches"]
    }
    assert found == {
        not_paid: ("recorded_not_paid", "paid", "10.00", None),
        differs: ("amount_differs", "paid", "10.00", "12.00"),
        flagged: ("paid_not_recorded", "flagged", "0.00", "9.00"),
        lost: ("paid_not_recorded", "pending", "0.00", "10.00"),
        "K20261126STRANGER0": ("paid_not_recorded", "none", "0.00", "5.00"),
    }
    assert report["checked"] == 7
    assert clean not in found and unpaid not in found

    # Once the active query has found the lost payment, it is no longer a mismatch.
    rig.clock.advance(31)
    rig.check_payments()
    again = json.loads(run_cli(rig.container, "payments", "reconcile", "--json").stdout)
    assert lost not in {m["payment_no"] for m in again["mismatches"]}
    assert len(again["mismatches"]) == 4


def test_reconcile_is_clean_when_the_books_agree(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=3, price_cents=1000)
    done = paid_order(rig, sku)
    wait_for(lambda: rig.payment(done).state == "paid")
    result = run_cli(rig.container, "payments", "reconcile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatch" in result.stdout


def test_an_unreachable_gateway_is_listed_as_unchecked(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=3, price_cents=1000)
    done = paid_order(rig, sku)
    wait_for(lambda: rig.payment(done).state == "paid")
    rig.gateway.stop()
    result = run_cli(rig.container, "payments", "reconcile", "--json")
    assert result.returncode == 1
    kinds = {m["kind"] for m in json.loads(result.stdout)["mismatches"]}
    assert kinds == {"unchecked"}


# -- races (PostgreSQL: real row locks) ----------------------------------------------------------


@pytest.mark.pg
def test_notify_return_and_query_racing_credit_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import text

    with shop_rig("postgresql", tmp_path) as rig:
        sku = factories.add_product(rig.container, stock=40, price_cents=1000)
        sim(rig, "POST", "/_sim/config", notify="drop")
        orders_ = [paid_order(rig, sku) for _ in range(8)]
        rig.clock.advance(31)

        def signed(order_no: str) -> dict[str, str]:
            trade = sim(rig, "GET", "/_sim/state")["trades"]
            trade_no = next(t["trade_no"] for t in trade if t["out_trade_no"] == order_no)
            return epay.signed(
                {
                    "pid": PID,
                    "trade_no": trade_no,
                    "out_trade_no": order_no,
                    "type": "alipay",
                    "name": "x",
                    "money": "10.00",
                    "trade_status": "TRADE_SUCCESS",
                },
                KEY,
            )

        params = {o: signed(o) for o in orders_}
        jobs = []
        with ThreadPoolExecutor(max_workers=12) as pool:
            for o in orders_:
                for path in ("notify", "notify", "return"):
                    jobs.append(
                        pool.submit(
                            httpx.get,
                            f"{rig.url}/pay/{path}/{GATEWAY}",
                            params=params[o],
                            timeout=20,
                        )
                    )
                jobs.append(pool.submit(rig.check_payments))
            for job in jobs:
                job.result()
        for o in orders_:
            wait_for(lambda o=o: order(rig, o).status == "delivered")
            outcomes = [out for _, out in rig.statements(o)]
            assert outcomes.count("fulfilment_started") == 1, outcomes
            assert set(outcomes) <= {"fulfilment_started", "duplicate"}, outcomes
        with rig.container.db.connect(write=False) as conn:
            posted = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT ref_id) FROM ledger_transactions "
                    "WHERE kind = 'payment'"
                )
            ).one()
        assert tuple(posted) == (8, 8)
        factories.assert_books_clean(rig.container)


def test_money_owed_to_a_guest_is_paid_back_through_the_gateway(tmp_path: Path) -> None:
    with shop_rig("sqlite", tmp_path) as rig:
        sku = factories.add_product(rig.container, kind=DeliveryKind.manual, price_cents=1500)
        client, order_no = pending_order(rig, sku)
        submit_to_gateway(client, order_no)
        expire(rig, order_no)
        sim(rig, "POST", f"/_sim/trades/{order_no}/pay")
        wait_for(lambda: order(rig, order_no).status == "refunded")
        owed = json.loads(run_cli(rig.container, "payments", "owed", "--json").stdout)
        assert [(o["order_no"], o["owed"]) for o in owed] == [(order_no, "15.00")]

        paid_back = run_cli(rig.container, "payments", "payout", order_no)
        assert paid_back.returncode == 0, paid_back.stderr
        trade = next(
            t for t in sim(rig, "GET", "/_sim/state")["trades"] if t["out_trade_no"] == order_no
        )
        assert trade["refunded_money"] == "15.00"
        row = order(rig, order_no)
        assert balance_of(rig, "guest", row.id) == 0
        again = run_cli(rig.container, "payments", "payout", order_no)
        assert again.returncode == 2 and "nothing is owed" in again.stderr
        factories.assert_books_clean(rig.container)


def test_health_and_metrics_show_what_waits_on_gateways_and_on_staff(tmp_path: Path) -> None:
    with shop_rig("sqlite", tmp_path) as rig:
        sku = factories.add_product(rig.container, stock=3, price_cents=1000)
        _, waiting = pending_order(rig, sku)
        _, wrong = pending_order(rig, sku)
        assert notify(rig, out_trade_no=wrong, money="1.00") == "success"
        health = httpx.get(f"{rig.url}/healthz", timeout=10).json()["pipeline"]["payments"]
        assert health == {
            "pending": 1,
            "flagged": 1,
            "checks_overdue": 0,
            "owed_to_guests": 0,
            "owed_oldest_s": 0,
            "payouts_need_staff": 0,
        }
        metrics = httpx.get(f"{rig.url}/metrics", timeout=10).text
        assert "kameng_payments_flagged 1.0" in metrics
        assert "kameng_payments_pending 1.0" in metrics
        assert 'kameng_payment_statements_total{channel="notify",outcome="amount_mismatch"}' in (
            metrics
        )
        assert rig.payment(waiting).state == "pending"


# -- the edges of the payment window, and what staff decide ----------------------------------------


def test_a_payment_made_in_time_is_not_late_even_when_its_notify_is_lost(rig: ShopRig) -> None:
    """At the deadline the gateway is asked once more before the order closes."""
    sim(rig, "POST", "/_sim/config", notify="drop")
    sku = factories.add_product(rig.container, kind=DeliveryKind.manual, price_cents=1000)
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)
    rig.clock.advance(rig.container.settings.payment_window_s - 10)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay")  # paid 10 s before the deadline
    rig.clock.advance(11)
    worker = WorkerThread(rig.container).start()
    try:
        wait_for(lambda: order(rig, order_no).status == "fulfilling")
    finally:
        worker.stop()
    assert rig.statements(order_no)[-1] == ("query", "fulfilment_started")
    with rig.container.db.connect(write=False) as conn:
        reasons = [e.reason for e in order_queries.timeline(conn, order_id=order(rig, order_no).id)]
    assert "payment_timeout" not in reasons and "late_payment_credited" not in reasons
    factories.assert_books_clean(rig.container)


def resolve(rig: ShopRig, payment_no: str, *args: str) -> Any:
    return run_cli(rig.container, "payments", "resolve", payment_no, *args)


def flagged_order(rig: ShopRig, sku: str, money: str) -> tuple[httpx.Client, str]:
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay", money=money)
    wait_for(lambda: rig.payment(order_no).state == "flagged")
    return client, order_no


def test_staff_accept_an_overpayment_and_the_order_ships(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    client = rig.browser()
    member_id = register(rig, client, "over@kameng.test")
    order_no = place_gateway_order(client, sku)
    submit_to_gateway(client, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay", money="12.00")
    wait_for(lambda: rig.payment(order_no).state == "flagged")
    done = resolve(rig, order_no, "--accept")
    assert done.returncode == 0, done.stderr
    assert "fulfilment_started" in done.stdout
    assert order(rig, order_no).status == "delivered"
    assert balance_of(rig, "member", member_id) == 200  # the extra 2.00 stays with the buyer
    assert rig.payment(order_no).state == "paid"
    factories.assert_books_clean(rig.container)


def test_staff_accept_a_short_payment_it_is_credited_and_the_order_closes(
    sqlite_rig: ShopRig,
) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    _, order_no = flagged_order(rig, sku, "9.00")
    done = resolve(rig, order_no, "--accept")
    assert done.returncode == 0, done.stderr
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("canceled", "payment_short_credited")
    assert balance_of(rig, "guest", row.id) == 900
    owed = json.loads(run_cli(rig.container, "payments", "owed", "--json").stdout)
    assert [(o["order_no"], o["owed"]) for o in owed] == [(order_no, "9.00")]
    factories.assert_books_clean(rig.container)


def test_staff_send_a_flagged_payment_back_through_the_gateway(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    _, order_no = flagged_order(rig, sku, "9.00")
    assert resolve(rig, order_no).returncode == 2  # no decision given: refused
    done = resolve(rig, order_no, "--refund")
    assert done.returncode == 0, done.stderr
    trade = next(
        t for t in sim(rig, "GET", "/_sim/state")["trades"] if t["out_trade_no"] == order_no
    )
    assert trade["refunded_money"] == "9.00"
    assert (rig.payment(order_no).state, rig.payment(order_no).reason) == (
        "returned",
        "returned_gateway",
    )
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("canceled", "payment_returned")
    again = resolve(rig, order_no, "--manual-refund")
    assert again.returncode == 2 and "invalid_transition" in again.stderr
    report = json.loads(run_cli(rig.container, "payments", "reconcile", "--json").stdout)
    assert order_no not in {m["payment_no"] for m in report["mismatches"]}
    factories.assert_books_clean(rig.container)


def test_a_mismatch_on_a_closed_order_is_on_its_timeline(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    client, order_no = pending_order(rig, sku)
    submit_to_gateway(client, order_no)
    expire(rig, order_no)
    sim(rig, "POST", f"/_sim/trades/{order_no}/pay", money="3.00")
    wait_for(lambda: rig.payment(order_no).state == "flagged")
    with rig.container.db.connect(write=False) as conn:
        events = order_queries.timeline(conn, order_id=order(rig, order_no).id)
    assert [(e.to_status, e.reason) for e in events][-1] == ("expired", "payment_amount_mismatch")
    assert resolve(rig, order_no, "--accept").returncode == 0
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("expired", "payment_short_credited")
    factories.assert_books_clean(rig.container)


def test_a_second_trade_for_a_paid_order_is_not_silently_absorbed(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    _, order_no = pending_order(rig, sku)
    assert notify(rig, out_trade_no=order_no, money="10.00", trade_no="T-1") == "success"
    assert notify(rig, out_trade_no=order_no, money="10.00", trade_no="T-1") == "success"
    assert notify(rig, out_trade_no=order_no, money="10.00", trade_no="T-2") == "success"
    assert [o for _, o in rig.statements(order_no)] == [
        "fulfilment_started",
        "duplicate",
        "second_trade",
    ]
    factories.assert_books_clean(rig.container)


def test_a_cancel_after_the_payment_landed_is_refused(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    client, order_no = pending_order(rig, sku)
    page = client.get(f"/orders/{order_no}")
    assert 'id="cancel-order"' in page.text
    assert notify(rig, out_trade_no=order_no, money="10.00") == "success"
    refused = client.post(f"/orders/{order_no}/cancel", data={"csrf_token": csrf_of(page.text)})
    assert refused.status_code == 409 and 'data-code="order_not_cancelable"' in refused.text
    assert order(rig, order_no).status == "delivered"


def test_cancel_before_paying_then_paying_anyway_credits_the_money(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2, price_cents=1000)
    client, order_no = pending_order(rig, sku)
    page = client.get(f"/orders/{order_no}")
    done = client.post(f"/orders/{order_no}/cancel", data={"csrf_token": csrf_of(page.text)})
    assert done.status_code == 303
    assert (order(rig, order_no).status, order(rig, order_no).reason) == (
        "canceled",
        "canceled_before_payment",
    )
    assert notify(rig, out_trade_no=order_no, money="10.00") == "success"
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("refunded", "late_payment_credited")
    assert balance_of(rig, "guest", row.id) == 1000
    # A guest has no balance: the page says the money goes back the way it was paid.
    page = client.get(f"/orders/{order_no}").text
    assert "原路退回" in page and "退回您的余额" not in page
    factories.assert_books_clean(rig.container)


def test_a_return_with_a_bad_signature_lands_home_and_reveals_nothing(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    sku = factories.add_product(rig.container, stock=2)
    _, order_no = pending_order(rig, sku)
    forged = epay.signed({"pid": PID, "out_trade_no": order_no, "money": "10.00"}, "wrong")
    response = httpx.get(
        f"{rig.url}/pay/return/{GATEWAY}", params=forged, timeout=10, follow_redirects=False
    )
    assert (response.status_code, response.headers["location"]) == (303, "/")
    assert rig.payment(order_no).state == "pending"


def test_checkouts_are_rate_limited_per_ip(tmp_path: Path) -> None:
    with shop_rig("sqlite", tmp_path, checkouts_per_minute=3) as rig:
        sku = factories.add_product(rig.container, stock=10)
        client = rig.browser()
        for _ in range(3):
            page = client.get(f"/buy/{sku}")
            data = {
                "csrf_token": csrf_of(page.text),
                "quantity": "1",
                "pay": f"{GATEWAY}:alipay",
                "confirm_duplicate": "1",
            }
            assert client.post(f"/buy/{sku}", data=data).status_code == 303
        refused = client.post(f"/buy/{sku}", data=data)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert 'data-code="rate_limited"' in refused.text


def test_a_paid_answer_with_an_unreadable_amount_is_flagged_not_closed(sqlite_rig: ShopRig) -> None:
    rig = sqlite_rig
    from kameng.payments import service as payments
    from kameng.payments.port import GatewayRecord, RecordState

    sku = factories.add_product(rig.container, stock=2)
    _, order_no = pending_order(rig, sku)
    with rig.container.db.connect() as conn:
        gateway = payments.get_gateway(conn, code=GATEWAY)
        other = payments.apply_query(
            conn,
            gateway=gateway,
            payment_no=order_no,
            record=GatewayRecord(RecordState.paid, payment_no="K-OTHER", amount_cents=1000),
            deps=rig.container.payment_deps,
            checks=rig.container.payment_checks,
            now=rig.clock(),
        )
        unreadable = payments.apply_query(
            conn,
            gateway=gateway,
            payment_no=order_no,
            record=GatewayRecord(RecordState.paid, payment_no=order_no, amount_cents=None),
            deps=rig.container.payment_deps,
            checks=rig.container.payment_checks,
            now=rig.clock(),
        )
    assert (other, unreadable) == ("unreachable", "unreadable_amount")
    pay = rig.payment(order_no)
    assert (pay.state, pay.reason) == ("flagged", "unreadable_amount")
    row = order(rig, order_no)
    assert (row.status, row.reason) == ("pending_payment", "payment_unreadable_amount")
    factories.assert_books_clean(rig.container)


def test_reconcile_checks_listed_trades_opened_before_the_period(tmp_path: Path) -> None:
    with shop_rig("sqlite", tmp_path) as rig:
        sku = factories.add_product(rig.container, stock=2, price_cents=1000)
        sim(rig, "POST", "/_sim/config", notify="drop")
        old = paid_order(rig, sku)  # paid, unrecorded; "opened before" a zero-day period
        result = run_cli(rig.container, "payments", "reconcile", "--days", "0", "--json")
        found = {m["payment_no"]: m["kind"] for m in json.loads(result.stdout)["mismatches"]}
        assert found == {old: "paid_not_recorded"}


def test_the_worker_pays_guests_back_by_itself(tmp_path: Path) -> None:
    with shop_rig("sqlite", tmp_path) as rig:
        sku = factories.add_product(rig.container, kind=DeliveryKind.manual, price_cents=1500)
        client, order_no = pending_order(rig, sku)
        submit_to_gateway(client, order_no)
        expire(rig, order_no)
        sim(rig, "POST", f"/_sim/trades/{order_no}/pay")  # too late: credited to the guest
        wait_for(lambda: order(rig, order_no).status == "refunded")
        # A refund the gateway refuses (it never saw this trade) waits for staff, visibly.
        _, stranger = pending_order(rig, sku)
        expire(rig, stranger)
        assert notify(rig, out_trade_no=stranger, money="15.00", trade_no="X1") == "success"
        worker = WorkerThread(rig.container).start()
        try:
            wait_for(lambda: balance_of(rig, "guest", order(rig, order_no).id) == 0)
            wait_for(
                lambda: (
                    httpx.get(f"{rig.url}/healthz", timeout=10).json()["pipeline"]["payments"][
                        "payouts_need_staff"
                    ]
                    == 1
                )
            )
        finally:
            worker.stop()
        trade = next(
            t for t in sim(rig, "GET", "/_sim/state")["trades"] if t["out_trade_no"] == order_no
        )
        assert trade["refunded_money"] == "15.00"
        owed = json.loads(run_cli(rig.container, "payments", "owed", "--json").stdout)
        assert [(o["order_no"], o["payout_state"]) for o in owed] == [(stranger, "refused")]
        manual = run_cli(rig.container, "payments", "payout", stranger, "--manual")
        assert manual.returncode == 0, manual.stderr
        assert balance_of(rig, "guest", order(rig, stranger).id) == 0
        factories.assert_books_clean(rig.container)

"""Buyer information before and after payment, through the Reseller API with the real worker
and the bundled supplier simulator (a real HTTP server):

- a supplier's pre-check refuses a wrong account before any money moves;
- an account the supplier refuses after payment sends the order to `needs_buyer_action`; the
  buyer corrects it through `POST /api/v1/orders/{no}/fields` and the order is delivered, or
  cancels for a refund, or the buyer-action SLA refunds it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.pipeline import Rig, pipeline_rig

from kameng.catalog.models import DeliveryKind

FIELDS = [{"name": "account", "type": "text", "label": "充值账号", "label_en": "Account"}]
PRICE = 5_000


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with pipeline_rig(backend_container, "sqlite", tmp_path, buyer_action_sla_s=600) as rig:
        yield rig


def topup_sku(rig: Rig, *, precheck_error_rate: float = 0.0) -> tuple[str, str]:
    their = f"BA-{secrets.token_hex(3).upper()}"
    rig.sim.configure_sku(
        their,
        price_cents=1000,
        kind="direct_topup",
        account_field="account",
        precheck_error_rate=precheck_error_rate,
    )
    sku = factories.add_product(
        rig.container, kind=DeliveryKind.direct_topup, fields=FIELDS, price_cents=PRICE
    )
    if "sim" not in rig._suppliers:
        rig.add_supplier("sim")
    rig.add_offer(sku, "sim", their)
    return sku, their


def post(rig: Rig, path: str, body: dict[str, Any], **kw: Any) -> Any:
    return rig.client.request("POST", path, body=body, **kw)


def balance(rig: Rig) -> int:
    return factories.wallet_balance(rig.container, rig.creds.reseller_id)[0]


def test_a_precheck_refusal_moves_no_money(rig: Rig) -> None:
    sku, _ = topup_sku(rig)
    before = balance(rig)
    resp = post(
        rig,
        "/api/v1/orders",
        {"sku": sku, "fields": {"account": "13800000000"}},
        idempotency_key=secrets.token_hex(8),
    )
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_fields"
    assert error["fields"][0]["field"] == "account"
    assert error["fields"][0]["code"] == "account_not_found"
    assert balance(rig) == before
    with rig.container.db.connect(write=False) as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM orders")).scalar_one() == 0


def test_a_closed_denomination_is_refused_before_payment(rig: Rig) -> None:
    sku, their = topup_sku(rig)
    rig.sim.configure_sku(their, maintenance_now=True)
    before = balance(rig)
    resp = post(
        rig,
        "/api/v1/orders",
        {"sku": sku, "fields": {"account": "13912345678"}},
        idempotency_key=secrets.token_hex(8),
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["precheck"] == "denomination_closed"
    assert balance(rig) == before
    rig.sim.configure_sku(their, maintenance_now=False)
    placed = rig.order(sku, fields={"account": "13912345678"})
    assert rig.wait_status(placed["order_no"], {"delivered"}) == "delivered"


def stuck_order(rig: Rig) -> tuple[str, str]:
    """An order paid with an account the supplier refuses at purchase (its pre-check is down,
    so the refusal only comes after payment)."""
    sku, their = topup_sku(rig, precheck_error_rate=1.0)
    placed = rig.order(sku, fields={"account": "13700000000"})
    rig.wait_status(placed["order_no"], {"needs_buyer_action"})
    return placed["order_no"], their


def test_corrected_fields_resume_the_order(rig: Rig) -> None:
    order_no, their = stuck_order(rig)
    before = balance(rig)
    view = rig.get(order_no)
    assert view["reason"] == "buyer_info_invalid"
    assert view["next_action_at"]  # the buyer's own deadline, then an automatic refund
    path = f"/api/v1/orders/{order_no}/fields"

    same = post(rig, path, {"fields": {"account": "13700000000"}})
    assert same.status_code == 422 and same.json()["error"]["fields"][0]["code"] == "unchanged"

    bad = post(rig, path, {"fields": {"account": ""}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_fields"

    # The supplier's pre-check is back: a second wrong account is refused before resuming.
    rig.sim.configure_sku(their, precheck_error_rate=0.0)
    wrong = post(rig, path, {"fields": {"account": "13600000000"}})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"]["fields"][0]["field"] == "account"
    assert rig.status(order_no) == "needs_buyer_action"

    good = post(rig, path, {"fields": {"account": "13912345678"}})
    assert good.status_code == 200, good.text
    assert good.json()["fields"] == {"account": "13912345678"}
    assert rig.wait_status(order_no, {"delivered"}) == "delivered"
    assert balance(rig) == before  # the held money was taken, nothing more
    reasons = [e["reason"] for e in rig.get(order_no)["timeline"]]
    assert "buyer_info_invalid" in reasons and "buyer_info_corrected" in reasons
    # Asked again under a new out-trade-no: the first purchase was refused, never repeated.
    purchases = [p for no, p in rig.purchases().items() if no.startswith(order_no)]
    assert len(purchases) == 2
    factories.assert_books_clean(rig.container)


def test_a_delivered_order_cannot_be_corrected(rig: Rig) -> None:
    sku, _ = topup_sku(rig)
    placed = rig.order(sku, fields={"account": "13911112222"})
    rig.wait_status(placed["order_no"], {"delivered"})
    resp = post(rig, f"/api/v1/orders/{placed['order_no']}/fields", {"fields": {"account": "1"}})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "order_not_fixable"


def test_another_resellers_order_is_not_found(rig: Rig) -> None:
    order_no, _ = stuck_order(rig)
    other = factories.add_reseller(rig.container, balance_cents=0)
    client = factories.client_for(rig.url, other)
    resp = client.request(
        "POST", f"/api/v1/orders/{order_no}/fields", body={"fields": {"account": "13912345678"}}
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "order_not_found"
    assert rig.status(order_no) == "needs_buyer_action"


def test_cancel_refunds_a_waiting_order(rig: Rig) -> None:
    before = balance(rig)
    order_no, _ = stuck_order(rig)
    assert balance(rig) == before - PRICE
    resp = post(rig, f"/api/v1/orders/{order_no}/cancel", {})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "canceled"
    assert balance(rig) == before
    factories.assert_books_clean(rig.container)


def test_the_buyer_action_sla_refunds(tmp_path: Path) -> None:
    with pipeline_rig(backend_container, "sqlite", tmp_path, buyer_action_sla_s=1) as rig:
        before = balance(rig)
        order_no, _ = stuck_order(rig)
        assert rig.wait_status(order_no, {"refunded"}) == "refunded"
        assert rig.get(order_no)["reason"] == "buyer_action_sla_expired"
        assert balance(rig) == before
        factories.assert_books_clean(rig.container)


def test_a_member_corrects_the_account_on_the_storefront(rig: Rig) -> None:
    """The storefront side of the round trip: the order page offers the form, the corrected
    account resumes the order, and the timeline says so."""
    import re

    import httpx
    from tests.support.shop import csrf_of

    from kameng.ledger import service as ledger
    from kameng.members import service as members

    sku, their = topup_sku(rig, precheck_error_rate=1.0)
    client = httpx.Client(base_url=rig.url, follow_redirects=False, timeout=15)
    page = client.get("/register")
    email = f"fix-{secrets.token_hex(3)}@example.com"
    registered = client.post(
        "/register",
        data={"csrf_token": csrf_of(page.text), "email": email, "password": "correct horse 42"},
    )
    assert registered.status_code == 303
    with rig.container.db.connect() as conn:
        member_id = members.find_member(conn, email=email)
        assert member_id is not None
        wallet = ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
        ledger.topup(
            conn,
            wallet_id=wallet,
            accounts=rig.container.accounts,
            amount=PRICE,
            now=rig.container.clock(),
            actor="staff:test",
        )
    form = client.get(f"/buy/{sku}")
    placed = client.post(
        f"/buy/{sku}",
        data={
            "csrf_token": csrf_of(form.text),
            "quantity": "1",
            "pay": "balance",
            "f_account": "13700000000",
        },
    )
    assert placed.status_code == 303, placed.text[:300]
    order_no = placed.headers["location"].removeprefix("/orders/")
    rig.wait_status(order_no, {"needs_buyer_action"})
    page = client.get(f"/orders/{order_no}")
    assert 'id="fix-form"' in page.text and 'value="13700000000"' in page.text
    assert 'id="cancel-refund"' in page.text

    no_csrf = client.post(f"/orders/{order_no}/fields", data={"f_account": "13912345678"})
    assert no_csrf.status_code == 403
    stranger = httpx.Client(base_url=rig.url, follow_redirects=False, timeout=15)
    token = csrf_of(stranger.get(f"/buy/{sku}").text)
    refused = stranger.post(
        f"/orders/{order_no}/fields", data={"csrf_token": token, "f_account": "13912345678"}
    )
    assert refused.status_code == 404
    assert rig.status(order_no) == "needs_buyer_action"

    rig.sim.configure_sku(their, precheck_error_rate=0.0)
    token = csrf_of(page.text)
    wrong = client.post(
        f"/orders/{order_no}/fields", data={"csrf_token": token, "f_account": "13600000000"}
    )
    assert wrong.status_code == 422 and "invalid_fields" in wrong.text
    fixed = client.post(
        f"/orders/{order_no}/fields", data={"csrf_token": token, "f_account": "13912345678"}
    )
    assert fixed.status_code == 303, fixed.text[:300]
    assert rig.wait_status(order_no, {"delivered"}) == "delivered"
    timeline = client.get(f"/orders/{order_no}").text
    assert re.search("已收到您修改的信息", timeline)
    factories.assert_books_clean(rig.container)


def test_corrected_information_is_screened_again(rig: Rig) -> None:
    """A refused account swapped for one the rules would flag: the order goes to review (money
    still held) instead of to the supplier; swapped for a block-listed one, it is rejected and
    refunded."""
    from kameng.risk import lists as risk_lists
    from kameng.risk import service as risk
    from kameng.risk.defaults import DEFAULT_RULES
    from kameng.risk.models import RuleSetStatus

    c = rig.container
    second_payment = {
        "code": "account_reused",
        "priority": 5,
        "action": "review",
        "category": "recharge_account",
        "when": {"attr": "account_orders_24h", "op": ">=", "value": 2},
        "explain": {"zh-CN": "同一账号 24 小时内第二笔", "en": "A second order for one account"},
    }
    with c.db.connect() as conn:
        saved = risk.save_rule_set(
            conn, rules=[second_payment, *DEFAULT_RULES], note="test", actor="t", now=c.clock()
        )
        risk.activate(
            conn, version=saved.version, mode=RuleSetStatus.live, actor="t", now=c.clock()
        )
        risk_lists.add_list_entry(
            conn,
            which="block",
            kind="account",
            value="13955550000",
            note="",
            actor="t",
            now=c.clock(),
        )
    c.risk_engine.invalidate()
    sku, their = topup_sku(rig)
    earlier = rig.order(sku, fields={"account": "13911110001"})
    rig.wait_status(earlier["order_no"], {"delivered"})

    before = balance(rig)
    rig.sim.configure_sku(their, precheck_error_rate=1.0)
    first = rig.order(sku, fields={"account": "13700000000"})
    rig.wait_status(first["order_no"], {"needs_buyer_action"})
    resp = post(
        rig, f"/api/v1/orders/{first['order_no']}/fields", {"fields": {"account": "13911110001"}}
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json()["status"], resp.json()["reason"]) == (
        "review",
        "risk_review_recharge_account",
    )
    assert balance(rig) == before - PRICE  # still held for the reviewer

    second = rig.order(sku, fields={"account": "13700000000"})
    rig.wait_status(second["order_no"], {"needs_buyer_action"})
    resp = post(
        rig, f"/api/v1/orders/{second['order_no']}/fields", {"fields": {"account": "13955550000"}}
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json()["status"], resp.json()["reason"]) == ("rejected", "risk_rejected")
    assert balance(rig) == before - PRICE  # the rejected one is back; the reviewed one held
    factories.assert_books_clean(c)

"""The storefront side of screening and qualification, through real HTTP (app on a loopback
port, browser-like client with cookies and CSRF):

- a burst of orders from one browser: the order that trips the rule waits in review, and its
  page says "审核中" with a plain reason and a decision time, never the rule;
- a product that needs a qualification document refuses guests and members without one, and
  sells to a member whose document was approved.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text, update
from tests.support import factories
from tests.support.shop import ShopRig, csrf_of, shop_rig

from kameng.catalog.models import Product
from kameng.db import table
from kameng.documents import service as documents
from kameng.ledger import service as ledger
from kameng.members import service as members

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ShopRig]:
    with shop_rig("sqlite", tmp_path, registrations_per_hour=1000) as r:
        yield r


def member(rig: ShopRig, email: str, cents: int = 0) -> httpx.Client:
    client = httpx.Client(base_url=rig.url, follow_redirects=False, timeout=15)
    page = client.get("/register")
    done = client.post(
        "/register",
        data={"csrf_token": csrf_of(page.text), "email": email, "password": "correct horse 42"},
    )
    assert done.status_code == 303, done.text[:300]
    if cents:
        with rig.container.db.connect() as conn:
            member_id = members.find_member(conn, email=email)
            assert member_id is not None
            wallet = ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=rig.container.accounts,
                amount=cents,
                now=rig.container.clock(),
                actor="staff:test",
            )
    return client


def buy(client: httpx.Client, sku: str, pay: str = "balance") -> httpx.Response:
    page = client.get(f"/buy/{sku}")
    assert page.status_code == 200, page.text[:300]
    data = {
        "csrf_token": csrf_of(page.text),
        "quantity": "1",
        "pay": pay,
        "confirm_duplicate": "1",
    }
    return client.post(f"/buy/{sku}", data=data)


def test_a_burst_from_one_browser_waits_in_review_and_says_why(rig: ShopRig) -> None:
    sku = factories.add_product(rig.container, stock=10, price_cents=1_000)
    client = member(rig, "burst@example.com", cents=100_000)
    statuses = []
    for _ in range(6):
        placed = buy(client, sku)
        assert placed.status_code == 303, placed.text[:300]
        order_no = placed.headers["location"].removeprefix("/orders/")
        page = client.get(f"/orders/{order_no}")
        assert page.status_code == 200
        statuses.append((order_no, page.text))
    first_five = [html for _, html in statuses[:5]]
    assert all('data-status="delivered"' in html for html in first_five)
    order_no, html = statuses[5]
    assert 'data-status="review"' in html
    assert "审核中" in html and "短时间内下单较多" in html
    assert "velocity_device" not in html and "device_orders_1h" not in html
    with rig.container.db.connect(write=False) as conn:
        row = conn.execute(
            text(
                "SELECT o.next_action_at, r.sla_deadline, r.rule_code FROM orders o "
                "JOIN review_items r ON r.order_id = o.id WHERE o.order_no = :n"
            ),
            {"n": order_no},
        ).one()
        held = conn.execute(
            text(
                "SELECT COUNT(*) FROM card_keys k JOIN order_lines l ON l.id = k.order_line_id "
                "JOIN orders o ON o.id = l.order_id WHERE o.order_no = :n AND k.state = 'held'"
            ),
            {"n": order_no},
        ).scalar_one()
    assert row.rule_code == "velocity_device"
    assert row.next_action_at is not None  # the decision time the page shows
    assert held == 1  # its key is set aside, not sold, not given to anyone else
    factories.assert_books_clean(rig.container)


def test_a_product_needing_a_document_is_sold_only_with_one(rig: ShopRig) -> None:
    sku = factories.add_product(rig.container, stock=3, price_cents=1_000)
    product = table(Product)
    with rig.container.db.connect() as conn:
        conn.execute(
            update(product)
            .where(product.c.slug == sku.lower())
            .values(requires_qualification=True, qualification_kind="business_license")
        )
    rig.container.invalidate_caches()

    guest = httpx.Client(base_url=rig.url, follow_redirects=False, timeout=15)
    form = guest.get(f"/buy/{sku}")
    assert 'id="needs-qualification"' in form.text
    refused = buy(guest, sku, pay="sim-epay:alipay")
    assert refused.status_code == 403
    assert 'data-code="qualification_required"' in refused.text or "资质" in refused.text

    client = member(rig, "licensed@example.com", cents=10_000)
    assert buy(client, sku).status_code == 403
    now = rig.container.clock()
    with rig.container.db.connect() as conn:
        member_id = members.find_member(conn, email="licensed@example.com")
        assert member_id is not None
        wrong_kind = documents.upload(
            conn,
            member_id=member_id,
            kind="id_card",
            filename="id.png",
            content_type="image/png",
            content=PNG,
            now=now,
        )
        documents.approve(
            conn, document_id=wrong_kind, staff="staff:test", expires_at=None, now=now
        )
    assert buy(client, sku).status_code == 403  # a document of another kind does not count
    with rig.container.db.connect() as conn:
        doc = documents.upload(
            conn,
            member_id=member_id,
            kind="business_license",
            filename="licence.png",
            content_type="image/png",
            content=PNG + b"x",
            now=now,
        )
        documents.approve(
            conn,
            document_id=doc,
            staff="staff:test",
            expires_at=now + timedelta(days=30),
            now=now,
        )
    sold = buy(client, sku)
    assert sold.status_code == 303, sold.text[:300]
    rig.clock.advance(31 * 86400)  # the document expired
    assert buy(client, sku).status_code == 403
    with rig.container.db.connect(write=False) as conn:
        orders = conn.execute(text("SELECT COUNT(*) FROM orders")).scalar_one()
    assert orders == 1

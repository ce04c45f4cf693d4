"""End-to-end smoke test of the buy path on both backends, over real HTTP."""

from __future__ import annotations

from tests.support import factories

from kameng.container import Container


def test_buy_a_key_and_read_it_back(container: Container, server: str) -> None:
    sku = factories.add_product(container, price_cents=1000, stock=3)
    creds = factories.add_reseller(container, balance_cents=5000)
    client = factories.client_for(server, creds)
    created = client.create_order(sku, 2)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "delivered"
    assert len(body["keys"]) == 2
    again = client.order(body["order_no"])
    assert again.status_code == 200
    assert again.json()["keys"] == body["keys"]
    assert factories.wallet_balance(container, creds.reseller_id) == (3000, 0)
    factories.assert_books_clean(container)

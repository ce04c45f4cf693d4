"""Idempotency-Key on POST /api/v1/orders (DESIGN §5.5), over real HTTP.

Same key and body -> the original response; same key, other body -> 422; in flight -> 409;
scoped per reseller; refusals are not stored. "Exactly one order, exactly one debit" is checked
through the API (order list, balance) and the ledger's own verification.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kameng.container import Container
from tests.api.helpers import all_orders, balance, error_of, new_key
from tests.support import factories

ORDERS = "/api/v1/orders"


def test_missing_idempotency_key_is_refused(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, stock=2)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    resp = client.request("POST", ORDERS, body={"sku": sku, "quantity": 1})
    error_of(resp, 400, "idempotency_key_required")
    assert all_orders(client) == []
    assert balance(client) == ("50.00", "0.00")


@pytest.mark.parametrize("bad", [b"", b"x" * 256, b"tab\there", b"nel\x85here"])
def test_malformed_idempotency_key_is_refused(
    lite_db: Container, lite_url: str, bad: bytes
) -> None:
    sku = factories.add_product(lite_db, stock=2)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    headers: dict = {"Idempotency-Key": bad}
    resp = client.request("POST", ORDERS, body={"sku": sku}, headers=headers)
    error_of(resp, 400, "idempotency_key_invalid")
    assert all_orders(client) == []


def test_same_key_same_body_replays_the_original(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=5)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    key = new_key()
    first = client.create_order(sku, 2, idempotency_key=key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    original = first.json()
    assert original["status"] == "delivered" and len(original["keys"]) == 2

    for _ in range(10):
        again = client.create_order(sku, 2, idempotency_key=key)
        assert again.status_code == 201, again.text
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json() == original

    orders = all_orders(client)
    assert [o["order_no"] for o in orders] == [original["order_no"]]
    assert balance(client) == ("30.00", "0.00")
    assert factories.wallet_balance(any_db, creds.reseller_id) == (3000, 0)
    factories.assert_books_clean(any_db)


def test_replay_of_a_backordered_order_is_identical(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, price_cents=1000, stock=0)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    key = new_key()
    first = client.create_order(sku, 1, idempotency_key=key)
    assert first.status_code == 201 and first.json()["status"] == "backordered", first.text
    again = client.create_order(sku, 1, idempotency_key=key)
    assert again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert balance(client) == ("40.00", "10.00")


def test_same_key_different_body_is_refused(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=5)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    key = new_key()
    first = client.create_order(sku, 1, idempotency_key=key)
    assert first.status_code == 201, first.text
    for changed in (
        {"quantity": 2},
        {"customer_ref": "someone-else"},
        {"confirm_duplicate": True},
    ):
        resp = client.create_order(sku, idempotency_key=key, **{"quantity": 1, **changed})
        error_of(resp, 422, "idempotency_key_reused")
    # Same JSON, different bytes (whitespace) is a different body as far as the key goes.
    spaced = (
        b'{ "sku": "' + sku.encode() + b'", "quantity": 1, "fields": {} }'
    )  # fmt: skip
    resp = client.request("POST", ORDERS, raw_body=spaced, idempotency_key=key)
    error_of(resp, 422, "idempotency_key_reused")
    assert [o["order_no"] for o in all_orders(client)] == [first.json()["order_no"]]
    assert balance(client) == ("40.00", "0.00")


def test_keys_are_scoped_per_reseller(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=5)
    a = factories.add_reseller(any_db, balance_cents=5000)
    b = factories.add_reseller(any_db, balance_cents=5000)
    ca, cb = factories.client_for(any_url, a), factories.client_for(any_url, b)
    key = new_key()
    ra = ca.create_order(sku, 1, idempotency_key=key)
    rb = cb.create_order(sku, 1, idempotency_key=key)
    assert ra.status_code == 201 and rb.status_code == 201, (ra.text, rb.text)
    assert "idempotent-replayed" not in rb.headers
    assert ra.json()["order_no"] != rb.json()["order_no"]
    assert ra.json()["keys"] != rb.json()["keys"]
    assert [o["order_no"] for o in all_orders(cb)] == [rb.json()["order_no"]]
    assert balance(ca) == ("40.00", "0.00")
    assert balance(cb) == ("40.00", "0.00")
    # And B's later request under the same key replays B's order, not A's.
    again = cb.create_order(sku, 1, idempotency_key=key)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == rb.json()


def test_refused_request_is_not_stored(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=3000, stock=2)
    creds = factories.add_reseller(any_db, balance_cents=1000)
    client = factories.client_for(any_url, creds)
    key = new_key()
    refused = client.create_order(sku, 1, idempotency_key=key)
    error_of(refused, 402, "insufficient_balance")
    again = client.create_order(sku, 1, idempotency_key=key)
    error_of(again, 402, "insufficient_balance")  # re-evaluated, not a stored 402
    factories.topup(any_db, creds.reseller_id, 5000)
    ok = client.create_order(sku, 1, idempotency_key=key)
    assert ok.status_code == 201, ok.text
    assert "idempotent-replayed" not in ok.headers
    assert ok.json()["status"] == "delivered"
    assert balance(client) == ("30.00", "0.00")
    replay = client.create_order(sku, 1, idempotency_key=key)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json() == ok.json()


def test_concurrent_replays_create_exactly_one_order(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=20)
    creds = factories.add_reseller(any_db, balance_cents=50_000)
    key = new_key()
    n = 10
    barrier = threading.Barrier(n)
    clients = [
        factories.client_for(any_url, creds)
        for _ in range(n)  # one connection each, so the requests really overlap
    ]

    def send(i: int) -> httpx.Response:
        barrier.wait(timeout=10)
        return clients[i].create_order(sku, 1, idempotency_key=key)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(send, range(n)))
    for c in clients:
        c.close()

    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {201, 409}, [(r.status_code, r.text) for r in answers]
    created = [r.json() for r in answers if r.status_code == 201]
    assert created, statuses
    assert len({body["order_no"] for body in created}) == 1
    assert all(body == created[0] for body in created)
    fresh = [r for r in answers if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1, "exactly one answer is the original, the rest are replays"
    for r in answers:
        if r.status_code == 409:
            error_of(r, 409, "idempotency_in_flight")

    client = factories.client_for(any_url, creds)
    assert [o["order_no"] for o in all_orders(client)] == [created[0]["order_no"]]
    assert factories.wallet_balance(any_db, creds.reseller_id) == (49_000, 0)
    # A retry after the storm replays the one order.
    after = client.create_order(sku, 1, idempotency_key=key)
    assert after.status_code == 201
    assert after.headers.get("Idempotent-Replayed") == "true"
    assert after.json() == created[0]
    factories.assert_books_clean(any_db)

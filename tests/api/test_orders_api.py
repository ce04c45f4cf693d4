"""Orders, products and balance endpoints of Reseller API v1, over real HTTP.

Money is checked through GET /api/v1/balance (what the reseller sees) and through the ledger's
own verification; every refusal is checked for its exact status and code, and for having
changed nothing.
"""

from __future__ import annotations

import base64
import itertools
import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from kameng.catalog.service import set_enabled
from kameng.container import Container
from tests.api.helpers import all_orders, balance, error_of, new_key
from tests.support import factories

ORDERS = "/api/v1/orders"


def _at(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value[:-1] + "+00:00")


def _product_entry(client: Any, sku: str) -> dict[str, Any] | None:
    resp = client.products()
    assert resp.status_code == 200, resp.text
    for product in resp.json()["products"]:
        for entry in product["skus"]:
            if entry["sku"] == sku:
                return {**entry, "product": product}
    return None


# -- the happy path -----------------------------------------------------------------------------


def test_delivered_order_with_keys(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=5)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    resp = client.create_order(sku, 3, customer_ref="cust-1")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["status"] == "delivered"
    assert body["stage"] == "delivered"
    assert body["reason"] == "own_stock"
    assert body["status_text"] == "已发货"
    assert (body["sku"], body["quantity"], body["customer_ref"]) == (sku, 3, "cust-1")
    assert (body["unit_price"], body["amount"], body["currency"]) == ("10.00", "30.00", "CNY")
    assert body["next_action_at"] is None and body["sla_deadline"] is None
    assert body["delivered_at"] == body["created_at"]
    assert body["lookup_secret"]
    codes = [k["code"] for k in body["keys"]]
    assert len(codes) == 3 and len(set(codes)) == 3
    assert all(code.startswith(sku + "-") for code in codes)

    again = client.order(body["order_no"])
    assert again.status_code == 200, again.text
    fetched = again.json()
    assert fetched["keys"] == body["keys"]
    assert fetched.get("lookup_secret") is None  # given once, at creation
    assert balance(client) == ("20.00", "0.00")
    entry = _product_entry(client, sku)
    assert entry is not None and entry["stock"] == 2
    listed = all_orders(client)
    assert [o["order_no"] for o in listed] == [body["order_no"]]
    assert listed[0]["keys"] is None  # lists never carry keys
    factories.assert_books_clean(any_db)


def test_english_texts(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, stock=1)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds, language="en")
    body = client.create_order(sku, 1).json()
    assert body["status_text"] == "Delivered"
    assert body["reason_text"] == "Keys delivered from stock"
    got = client.order(body["order_no"]).json()
    assert got["timeline"][0]["reason_text"] == "Paid from balance"


# -- backorders and cancel ----------------------------------------------------------------------


def test_stock_short_backorders_and_holds_money(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=1, sla_seconds=900)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    resp = client.create_order(sku, 2)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["status"], body["stage"], body["reason"]) == (
        "backordered",
        "waiting_stock",
        "out_of_stock",
    )
    assert body["keys"] is None
    assert body["delivered_at"] is None
    created = _at(body["created_at"])
    assert _at(body["next_action_at"]) > created
    assert _at(body["sla_deadline"]) - created == timedelta(seconds=900)
    assert balance(client) == ("30.00", "20.00")
    # All or nothing: the one key in stock was not taken by the short order.
    entry = _product_entry(client, sku)
    assert entry is not None and entry["stock"] == 1
    factories.assert_books_clean(any_db)


def test_cancel_backordered_then_again_then_delivered(any_db: Container, any_url: str) -> None:
    waiting_sku = factories.add_product(any_db, price_cents=1000, stock=0)
    stocked_sku = factories.add_product(any_db, price_cents=500, cost_cents=0, stock=1)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    order_no = client.create_order(waiting_sku, 2).json()["order_no"]
    assert balance(client) == ("30.00", "20.00")

    canceled = client.cancel(order_no)
    assert canceled.status_code == 200, canceled.text
    body = canceled.json()
    assert (body["status"], body["reason"]) == ("canceled", "canceled_by_buyer")
    assert body["next_action_at"] is None and body["sla_deadline"] is None
    assert balance(client) == ("50.00", "0.00")

    again = client.cancel(order_no)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "canceled"
    assert again.json()["timeline"] == body["timeline"]  # no second event
    assert balance(client) == ("50.00", "0.00")  # no second refund

    delivered = client.create_order(stocked_sku, 1).json()["order_no"]
    error = error_of(client.cancel(delivered), 409, "order_not_cancelable")
    assert "delivered" in error["message"]
    assert client.order(delivered).json()["status"] == "delivered"
    assert balance(client) == ("45.00", "0.00")
    error_of(client.cancel("K20260101ABCDEFGHJK"), 404, "order_not_found")
    factories.assert_books_clean(any_db)


def test_timeline_has_one_event_per_transition(any_db: Container, any_url: str) -> None:
    stocked = factories.add_product(any_db, stock=1)
    empty = factories.add_product(any_db, stock=0)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    me = f"reseller:{creds.name}"

    delivered = client.create_order(stocked, 1).json()["order_no"]
    events = client.order(delivered).json()["timeline"]
    assert [(e["from_status"], e["to_status"], e["reason"]) for e in events] == [
        (None, "paid", "paid_from_balance"),
        ("paid", "fulfilling", "allocating_own_stock"),
        ("fulfilling", "delivered", "own_stock"),
    ]
    assert events[0]["actor"] == me

    waiting = client.create_order(empty, 1).json()["order_no"]
    client.cancel(waiting)
    client.cancel(waiting)
    events = client.order(waiting).json()["timeline"]
    assert [(e["from_status"], e["to_status"], e["reason"]) for e in events] == [
        (None, "paid", "paid_from_balance"),
        ("paid", "backordered", "out_of_stock"),
        ("backordered", "canceled", "canceled_by_buyer"),
    ]
    assert events[-1]["actor"] == me
    assert [e["stage"] for e in events] == ["payment_received", "waiting_stock", "closed"]
    for earlier, later in itertools.pairwise(events):
        assert later["from_status"] == earlier["to_status"]
        assert _at(later["at"]) >= _at(earlier["at"])


# -- the duplicate-order guard ------------------------------------------------------------------


def test_duplicate_guard(any_db: Container, any_url: str) -> None:
    fields = [{"name": "phone", "type": "phone_cn", "label": "手机号", "label_en": "Mobile"}]
    sku = factories.add_product(any_db, price_cents=1000, stock=10, fields=fields)
    creds = factories.add_reseller(any_db, balance_cents=10_000)
    client = factories.client_for(any_url, creds, language="en")
    phone = {"phone": "13800138000"}
    first = client.create_order(sku, 1, phone, customer_ref="c-1")
    assert first.status_code == 201, first.text
    first_no = first.json()["order_no"]

    # Same SKU, same (normalised) fields, same customer: suspected.
    same = client.create_order(sku, 1, {"phone": "+86 138-0013-8000"}, customer_ref="c-1")
    error = error_of(same, 409, "duplicate_order_suspected")
    assert error["existing_order_no"] == first_no
    assert first_no in error["message"] and "10 minutes" in error["message"]
    assert balance(client) == ("90.00", "0.00")
    # A different quantity is still the same purchase for the guard.
    error_of(
        client.create_order(sku, 2, phone, customer_ref="c-1"), 409, "duplicate_order_suspected"
    )

    confirmed = client.create_order(sku, 1, phone, customer_ref="c-1", confirm_duplicate=True)
    assert confirmed.status_code == 201, confirmed.text
    assert confirmed.json()["order_no"] != first_no
    # The newest matching order is the one named next time.
    again = error_of(
        client.create_order(sku, 1, phone, customer_ref="c-1"), 409, "duplicate_order_suspected"
    )
    assert again["existing_order_no"] == confirmed.json()["order_no"]

    other_ref = client.create_order(sku, 1, phone, customer_ref="c-2")
    assert other_ref.status_code == 201, other_ref.text
    other_phone = client.create_order(sku, 1, {"phone": "13900139000"}, customer_ref="c-1")
    assert other_phone.status_code == 201, other_phone.text
    assert balance(client) == ("60.00", "0.00")
    assert len(all_orders(client)) == 4

    # Another reseller's identical purchase is not a duplicate of ours.
    other = factories.client_for(any_url, factories.add_reseller(any_db, balance_cents=5000))
    assert other.create_order(sku, 1, phone, customer_ref="c-1").status_code == 201


def test_canceled_order_does_not_count_as_duplicate(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=0)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    first = client.create_order(sku, 1, customer_ref="c-9").json()["order_no"]
    pending = error_of(
        client.create_order(sku, 1, customer_ref="c-9"), 409, "duplicate_order_suspected"
    )
    assert pending["existing_order_no"] == first  # a backordered order counts
    assert client.cancel(first).status_code == 200
    second = client.create_order(sku, 1, customer_ref="c-9")
    assert second.status_code == 201, second.text
    assert second.json()["order_no"] != first
    assert balance(client) == ("40.00", "10.00")


# -- refusals -----------------------------------------------------------------------------------

FIELDS = [
    {"name": "phone", "type": "phone_cn", "label": "手机号", "label_en": "Mobile"},
    {"name": "qq", "type": "qq", "label": "QQ号", "label_en": "QQ"},
    {
        "name": "region",
        "type": "select",
        "options": ["north", "south"],
        "label": "区服",
        "label_en": "Region",
    },
    {"name": "note", "type": "text", "required": False, "max_length": 5, "label_en": "Note"},
]


def test_invalid_fields_lists_every_problem(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, price_cents=1000, stock=3, fields=FIELDS)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    zh = factories.client_for(lite_url, creds)
    en = factories.client_for(lite_url, creds, language="en")
    bad = {"phone": "12345", "region": "west", "note": "far too long", "bogus": "x"}
    expected = {
        "phone": "format",
        "qq": "required",
        "region": "not_in_options",
        "note": "too_long",
        "bogus": "unknown",
    }
    error = error_of(zh.create_order(sku, 1, bad), 422, "invalid_fields")
    assert {f["field"]: f["code"] for f in error["fields"]} == expected
    assert len(error["fields"]) == len(expected)
    by_field = {f["field"]: f for f in error["fields"]}
    assert "手机号" in by_field["phone"]["message"]
    assert set(by_field["phone"]) == {"field", "code", "message"}
    error_en = error_of(en.create_order(sku, 1, bad), 422, "invalid_fields")
    by_field_en = {f["field"]: f for f in error_en["fields"]}
    assert "Mobile" in by_field_en["phone"]["message"]
    assert "north" in by_field_en["region"]["message"]
    assert balance(zh) == ("50.00", "0.00")
    assert all_orders(zh) == []

    good = zh.create_order(sku, 1, {"phone": "+86 138-0013-8000", "qq": 12345, "region": "north"})
    assert good.status_code == 201, good.text
    assert good.json()["fields"] == {"phone": "13800138000", "qq": "12345", "region": "north"}


def test_unknown_sku(lite_db: Container, lite_url: str) -> None:
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    error = error_of(client.create_order("NO-SUCH-SKU"), 404, "sku_not_found")
    assert "NO-SUCH-SKU" in error["message"]
    error_of(client.orders(sku="NO-SUCH-SKU"), 404, "sku_not_found")


def test_disabled_sku(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=3)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    with any_db.db.unit_of_work() as session:
        set_enabled(session, sku_code=sku, enabled=False)
    any_db.invalidate_caches()
    error = error_of(client.create_order(sku, 1), 409, "sku_disabled")
    assert sku in error["message"]
    assert balance(client) == ("50.00", "0.00")
    assert _product_entry(client, sku) is None  # not offered either
    with any_db.db.unit_of_work() as session:
        set_enabled(session, sku_code=sku, enabled=True)
    any_db.invalidate_caches()
    assert client.create_order(sku, 1).status_code == 201


def test_quantity_out_of_range(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, price_cents=100, cost_cents=0, stock=10, max_quantity=5)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds, language="en")
    error = error_of(client.create_order(sku, 6), 422, "quantity_out_of_range")
    assert error["message"] == "Quantity must be between 1 and 5"
    # Outside what the API accepts at all: a schema error, not a business one.
    for quantity in (0, -1, 1001):
        error_of(client.create_order(sku, quantity), 400, "invalid_request")
    assert balance(client) == ("50.00", "0.00")
    assert client.create_order(sku, 5).status_code == 201


def test_insufficient_balance(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=5)
    creds = factories.add_reseller(any_db, balance_cents=500)
    client = factories.client_for(any_url, creds)
    error = error_of(client.create_order(sku, 3), 402, "insufficient_balance")
    assert (error["needed"], error["available"]) == ("30.00", "5.00")
    assert "30.00" in error["message"] and "5.00" in error["message"]
    assert balance(client) == ("5.00", "0.00")
    assert all_orders(client) == []
    entry = _product_entry(client, sku)
    assert entry is not None and entry["stock"] == 5
    # Held money is not available: a backorder holds it, then the next order is refused.
    empty = factories.add_product(any_db, price_cents=400, cost_cents=0, stock=0)
    assert client.create_order(empty, 1).json()["status"] == "backordered"
    error = error_of(client.create_order(sku, 1), 402, "insufficient_balance")
    assert (error["needed"], error["available"]) == ("10.00", "1.00")


BAD_BODIES = {
    "not-json": b"{not json",
    "empty": b"",
    "array": b"[]",
    "null": b"null",
    "string": b'"GC-100"',
    "bad-utf8": b'{"sku": "\xff\xfe"}',
    # Under the 64 KiB body cap, so it reaches the JSON parser (past it: 413 unread).
    "deeply-nested": b'{"sku":"a","fields":{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}}",
    "extra-property": b'{"sku": "S", "quantity": 1, "discount": 100}',
    "quantity-text": b'{"sku": "S", "quantity": "abc"}',
    "quantity-float": b'{"sku": "S", "quantity": 1.5}',
    "quantity-list": b'{"sku": "S", "quantity": [1]}',
    "quantity-null": b'{"sku": "S", "quantity": null}',
    "quantity-huge": b'{"sku": "S", "quantity": 1' + b"0" * 400 + b"}",
    "sku-number": b'{"sku": 123}',
    "sku-empty": b'{"sku": ""}',
    "sku-too-long": b'{"sku": "' + b"S" * 65 + b'"}',
    "sku-missing": b'{"quantity": 1}',
    "fields-list": b'{"sku": "S", "fields": ["a"]}',
    "fields-nested": b'{"sku": "S", "fields": {"a": {"b": 1}}}',
    "customer-ref-too-long": b'{"sku": "S", "customer_ref": "' + b"x" * 129 + b'"}',
    "confirm-duplicate-text": b'{"sku": "S", "confirm_duplicate": "maybe"}',
}


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_malformed_bodies_are_invalid_request(
    lite_db: Container, lite_url: str, raw: bytes
) -> None:
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    resp = client.request("POST", ORDERS, raw_body=raw, idempotency_key=new_key())
    error_of(resp, 400, "invalid_request")
    assert balance(client) == ("50.00", "0.00")


def test_wrong_content_type_is_invalid_request(lite_db: Container, lite_url: str) -> None:
    sku = factories.add_product(lite_db, stock=1)
    creds = factories.add_reseller(lite_db, balance_cents=5000)
    client = factories.client_for(lite_url, creds)
    resp = client.request(
        "POST",
        ORDERS,
        raw_body=json.dumps({"sku": sku}).encode(),
        idempotency_key=new_key(),
        headers={"Content-Type": "text/plain"},
    )
    error_of(resp, 400, "invalid_request")


def test_nul_characters_are_refused_not_500(
    request: pytest.FixtureRequest, any_db: Container, any_url: str
) -> None:
    sku = factories.add_product(any_db, stock=2)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    answers = [
        client.create_order("A\x00B"),
        client.create_order(sku, 1, customer_ref="c\x00"),
        client.orders(customer_ref="c\x00"),
        client.orders(sku="A\x00B"),
        client.request("GET", "/api/v1/orders/K2026%00"),
        client.request("POST", "/api/v1/orders/K2026%00/cancel"),
    ]
    # Refusing (4xx) or accepting a NUL is a policy choice; a 500 is not.
    for resp in answers:
        assert resp.status_code < 500, resp.text
    factories.assert_books_clean(any_db)


# -- listing ------------------------------------------------------------------------------------


def test_pagination_and_filters(any_db: Container, any_url: str) -> None:
    stocked = factories.add_product(any_db, price_cents=100, cost_cents=0, stock=5)
    empty = factories.add_product(any_db, price_cents=100, cost_cents=0, stock=0)
    creds = factories.add_reseller(any_db, balance_cents=5000)
    client = factories.client_for(any_url, creds)
    created: list[str] = []
    for i in range(7):
        sku = stocked if i % 3 else empty  # 0, 3, 6 wait for stock
        resp = client.create_order(sku, 1, customer_ref=f"ref-{i}")
        assert resp.status_code == 201, resp.text
        created.append(resp.json()["order_no"])
    newest_first = list(reversed(created))

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        resp = client.orders(limit=3, cursor=cursor)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["orders"]) <= 3
        seen.extend(o["order_no"] for o in page["orders"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == newest_first
    assert pages == 3

    # An exact multiple of the page size ends without an empty extra page.
    first = client.orders(limit=7).json()
    assert [o["order_no"] for o in first["orders"]] == newest_first
    assert first["next_cursor"] is None

    waiting = [o["order_no"] for o in all_orders(client, status="backordered")]
    assert waiting == [created[6], created[3], created[0]]
    paged = []
    cursor = None
    while True:
        page = client.orders(status="backordered", limit=1, cursor=cursor).json()
        paged.extend(o["order_no"] for o in page["orders"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == waiting
    delivered = all_orders(client, status="delivered")
    assert {o["status"] for o in delivered} == {"delivered"} and len(delivered) == 4
    assert all_orders(client, status="canceled") == []
    by_ref = all_orders(client, customer_ref="ref-4")
    assert [o["order_no"] for o in by_ref] == [created[4]]
    assert all_orders(client, customer_ref="nobody") == []
    assert [o["order_no"] for o in all_orders(client, sku=empty)] == waiting
    now = datetime.now().astimezone()
    window = {"created_from": (now - timedelta(hours=1)).isoformat()}
    assert len(all_orders(client, **window)) == 7
    assert all_orders(client, created_from=(now + timedelta(hours=1)).isoformat()) == []


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "!!!"},
        {"cursor": "bm90LWEtY3Vyc29y"},  # "not-a-cursor"
        {"cursor": base64.urlsafe_b64encode(b"o:abc").decode()},
        {"cursor": base64.urlsafe_b64encode(b"\xff\xfe:1").decode()},
        {"cursor": "x" * 65},
        {"limit": 0},
        {"limit": 101},
        {"limit": "ten"},
        {"status": "lost"},
        {"created_from": "yesterday"},
        {"created_from": "2026-01-01T00:00:00"},  # no timezone
    ],
    ids=lambda p: "-".join(f"{k}={str(v)[:12]}" for k, v in p.items()),
)
def test_bad_list_parameters(lite_db: Container, lite_url: str, params: dict[str, Any]) -> None:
    creds = factories.add_reseller(lite_db)
    client = factories.client_for(lite_url, creds)
    error_of(client.orders(**params), 400, "invalid_request")


def test_cursor_beyond_any_id_is_refused_not_500(any_db: Container, any_url: str) -> None:
    creds = factories.add_reseller(any_db)
    client = factories.client_for(any_url, creds)
    for digits in ("9" * 19, "9" * 40):
        cursor = base64.urlsafe_b64encode(f"o:{digits}".encode()).decode().rstrip("=")
        resp = client.orders(cursor=cursor)
        assert resp.status_code in (200, 400), resp.text


# -- products and balance -----------------------------------------------------------------------


def test_products_show_tier_price_and_stock(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, cost_cents=800, stock=3)
    empty = factories.add_product(any_db, price_cents=1000, cost_cents=800, stock=0)
    gold = factories.add_reseller(any_db, tier="gold", balance_cents=5000)
    normal = factories.add_reseller(any_db, tier="normal", balance_cents=5000)
    gc, nc = factories.client_for(any_url, gold), factories.client_for(any_url, normal)

    g = _product_entry(gc, sku)
    n = _product_entry(nc, sku)
    assert g is not None and n is not None
    assert (g["price"], n["price"]) == ("9.50", "10.00")
    assert (g["stock"], g["available"], g["currency"]) == (3, True, "CNY")
    e = _product_entry(gc, empty)
    assert e is not None and (e["stock"], e["available"]) == (0, False)
    product = g["product"]
    assert product["delivery_kind"] == "card_key"
    assert (product["min_quantity"], product["max_quantity"]) == (1, 10)
    # Tenant isolation covers cost prices too (DESIGN §8).
    listing = gc.products().text
    assert "cost" not in listing and "8.00" not in listing

    bought = gc.create_order(sku, 2).json()
    assert (bought["unit_price"], bought["amount"]) == ("9.50", "19.00")
    assert balance(gc) == ("31.00", "0.00")
    entry = _product_entry(nc, sku)
    assert entry is not None and entry["stock"] == 1
    factories.assert_books_clean(any_db)


def test_balance_shape(lite_db: Container, lite_url: str) -> None:
    creds = factories.add_reseller(lite_db, balance_cents=12_345)
    resp = factories.client_for(lite_url, creds).balance()
    assert resp.status_code == 200
    assert resp.json() == {"available": "123.45", "held": "0.00", "currency": "CNY"}

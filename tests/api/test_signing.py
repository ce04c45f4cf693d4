"""Request signing (DESIGN §7) and tenant isolation (§8), over real HTTP.

Every refusal is checked for its exact status and stable error code, and for having changed
nothing (no order, no debit) where money was at stake.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import httpx
import pytest

from kameng.container import Container
from kameng.resellers.service import revoke_credentials
from kameng.security.signing import signed_headers
from tests.api.helpers import all_orders, error_of, new_key, order_json, signed_send
from tests.support import factories

BALANCE = "/api/v1/balance"
SIGNATURE_HEADERS = ("X-Api-Key", "X-Timestamp", "X-Nonce", "X-Signature")


@pytest.fixture
def creds(lite_db: Container) -> factories.ResellerCreds:
    return factories.add_reseller(lite_db, balance_cents=5000)


@pytest.fixture
def creds_any(any_db: Container) -> factories.ResellerCreds:
    return factories.add_reseller(any_db, balance_cents=5000)


# -- header and clock checks --------------------------------------------------------------------


@pytest.mark.parametrize("missing", SIGNATURE_HEADERS)
def test_each_missing_signature_header_is_auth_missing(
    lite_url: str, creds: factories.ResellerCreds, missing: str
) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, drop=(missing,))
    error = error_of(resp, 401, "auth_missing")
    assert missing in error["message"]


def test_no_headers_at_all_is_auth_missing(lite_url: str) -> None:
    for method, path in (
        ("GET", BALANCE),
        ("GET", "/api/v1/products"),
        ("GET", "/api/v1/orders"),
        ("GET", "/api/v1/orders/K20260101ABCDEFGHJK"),
        ("POST", "/api/v1/orders/K20260101ABCDEFGHJK/cancel"),
    ):
        resp = httpx.request(method, lite_url + path)
        error = error_of(resp, 401, "auth_missing")
        for header in SIGNATURE_HEADERS:
            assert header in error["message"]


def test_unsigned_order_creation_is_refused_and_changes_nothing(
    lite_db: Container, lite_url: str, creds: factories.ResellerCreds
) -> None:
    sku = factories.add_product(lite_db, stock=1)
    resp = httpx.post(
        lite_url + "/api/v1/orders",
        content=order_json(sku),
        headers={"Content-Type": "application/json", "Idempotency-Key": new_key()},
    )
    error_of(resp, 401, "auth_missing")
    assert factories.wallet_balance(lite_db, creds.reseller_id) == (5000, 0)


def test_unknown_api_key(lite_url: str, creds: factories.ResellerCreds) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, api_key="ak_" + secrets.token_hex(12))
    error_of(resp, 401, "auth_invalid_key")


def test_wrong_secret(lite_url: str, creds: factories.ResellerCreds) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, secret="sk_" + secrets.token_hex(20))
    error = error_of(resp, 401, "auth_bad_signature")
    # The hint helps a client debug its string-to-sign, but never contains the secret.
    assert creds.api_secret not in resp.text
    assert error.get("string_to_sign", "").startswith("GET\n/api/v1/balance\n")


def test_another_resellers_secret_does_not_sign_for_this_key(
    lite_db: Container, lite_url: str, creds: factories.ResellerCreds
) -> None:
    other = factories.add_reseller(lite_db)
    resp = signed_send(lite_url, creds, "GET", BALANCE, secret=other.api_secret)
    error_of(resp, 401, "auth_bad_signature")


def test_signature_is_case_insensitive_hex_and_valid_request_passes(
    lite_url: str, creds: factories.ResellerCreds
) -> None:
    """Control for the negatives: the same helper with nothing altered is accepted."""
    resp = signed_send(lite_url, creds, "GET", BALANCE)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"available": "50.00", "held": "0.00", "currency": "CNY"}


def test_body_altered_after_signing(
    lite_db: Container, lite_url: str, creds: factories.ResellerCreds
) -> None:
    sku = factories.add_product(lite_db, price_cents=1000, stock=5)
    signed = order_json(sku, 1)
    sent = order_json(sku, 3)
    resp = signed_send(
        lite_url,
        creds,
        "POST",
        "/api/v1/orders",
        body=sent,
        sign_body=signed,
        headers={"Idempotency-Key": new_key()},
    )
    error_of(resp, 401, "auth_bad_signature")
    assert factories.wallet_balance(lite_db, creds.reseller_id) == (5000, 0)
    assert all_orders(factories.client_for(lite_url, creds)) == []


def test_single_byte_of_body_changed_is_detected(
    lite_db: Container, lite_url: str, creds: factories.ResellerCreds
) -> None:
    sku = factories.add_product(lite_db, stock=2)
    signed = order_json(sku, 1, customer_ref="a")
    sent = order_json(sku, 1, customer_ref="b")
    assert len(signed) == len(sent)
    resp = signed_send(
        lite_url,
        creds,
        "POST",
        "/api/v1/orders",
        body=sent,
        sign_body=signed,
        headers={"Idempotency-Key": new_key()},
    )
    error_of(resp, 401, "auth_bad_signature")


def test_query_string_altered_after_signing(lite_url: str, creds: factories.ResellerCreds) -> None:
    resp = signed_send(
        lite_url,
        creds,
        "GET",
        "/api/v1/orders?limit=50",
        sign_path="/api/v1/orders?limit=5",
    )
    error_of(resp, 401, "auth_bad_signature")
    # Dropping the query entirely is also a change.
    resp = signed_send(lite_url, creds, "GET", "/api/v1/orders", sign_path="/api/v1/orders?limit=5")
    error_of(resp, 401, "auth_bad_signature")
    # Control: signing exactly what is sent passes.
    resp = signed_send(lite_url, creds, "GET", "/api/v1/orders?limit=5")
    assert resp.status_code == 200, resp.text


def test_path_and_method_are_signed(lite_url: str, creds: factories.ResellerCreds) -> None:
    resp = signed_send(lite_url, creds, "GET", "/api/v1/products", sign_path=BALANCE)
    error_of(resp, 401, "auth_bad_signature")
    resp = signed_send(
        lite_url,
        creds,
        "POST",
        "/api/v1/orders/K20260101ABCDEFGHJK/cancel",
        sign_method="GET",
    )
    error_of(resp, 401, "auth_bad_signature")


@pytest.fixture
def frozen_now(lite_db: Container, monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin the server's clock, so a window edge is exact instead of racing a second boundary."""
    now = datetime.now(UTC).replace(microsecond=0)
    monkeypatch.setattr(lite_db, "clock", lambda: now)
    return int(now.timestamp())


@pytest.mark.parametrize("offset", [-301, 301, -3600, 86400])
def test_timestamp_outside_window(
    lite_url: str, creds: factories.ResellerCreds, frozen_now: int, offset: int
) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, timestamp=frozen_now + offset)
    error = error_of(resp, 401, "auth_timestamp_out_of_window")
    assert "300" in error["message"]


@pytest.mark.parametrize("offset", [-300, -1, 0, 1, 300])
def test_timestamp_inside_window_is_accepted(
    lite_url: str, creds: factories.ResellerCreds, frozen_now: int, offset: int
) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, timestamp=frozen_now + offset)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("bad", ["abc", "-5", "1.7e9", "17 00000000", "0x10", "+1700000000"])
def test_malformed_timestamp_is_out_of_window(
    lite_url: str, creds: factories.ResellerCreds, bad: str
) -> None:
    resp = signed_send(lite_url, creds, "GET", BALANCE, headers={"X-Timestamp": bad})
    error_of(resp, 401, "auth_timestamp_out_of_window")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("\xb2", id="superscript-two"),
        pytest.param("1\xb9\xb3", id="superscript-one-three"),
        pytest.param(
            "9" * 5000,
            id="5000-digits",
        ),
    ],
)
def test_timestamp_that_isdigit_but_not_int_is_refused_not_500(
    lite_url: str, creds: factories.ResellerCreds, bad: str
) -> None:
    headers = signed_headers(
        api_key=creds.api_key,
        secret=creds.api_secret,
        method="GET",
        path_with_query=BALANCE,
        body=b"",
        timestamp=int(time.time()),
        nonce=secrets.token_hex(8),
    )
    raw = {k: v.encode("latin-1") for k, v in headers.items()}
    raw["X-Timestamp"] = bad.encode("latin-1")
    resp = httpx.get(lite_url + BALANCE, headers=raw)
    error_of(resp, 401, "auth_timestamp_out_of_window")


# -- nonces -------------------------------------------------------------------------------------


def test_replayed_nonce_is_refused(
    any_db: Container, any_url: str, creds_any: factories.ResellerCreds
) -> None:
    ts, nonce = int(time.time()), secrets.token_hex(12)
    first = signed_send(any_url, creds_any, "GET", BALANCE, timestamp=ts, nonce=nonce)
    assert first.status_code == 200, first.text
    again = signed_send(any_url, creds_any, "GET", BALANCE, timestamp=ts, nonce=nonce)
    error_of(again, 401, "auth_nonce_reused")
    # A nonce is burnt for the key, whatever else changes (another endpoint, new timestamp).
    other = signed_send(any_url, creds_any, "GET", "/api/v1/products", nonce=nonce)
    error_of(other, 401, "auth_nonce_reused")


def test_replayed_order_request_creates_nothing(
    any_db: Container, any_url: str, creds_any: factories.ResellerCreds
) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=3)
    ts, nonce, key = int(time.time()), secrets.token_hex(12), new_key()
    body = order_json(sku, 1)
    kw = {"body": body, "timestamp": ts, "nonce": nonce, "headers": {"Idempotency-Key": key}}
    first = signed_send(any_url, creds_any, "POST", "/api/v1/orders", **kw)
    assert first.status_code == 201, first.text
    again = signed_send(any_url, creds_any, "POST", "/api/v1/orders", **kw)
    error_of(again, 401, "auth_nonce_reused")
    assert factories.wallet_balance(any_db, creds_any.reseller_id) == (4000, 0)
    assert len(all_orders(factories.client_for(any_url, creds_any))) == 1


def test_refused_request_burns_its_nonce(
    any_db: Container, any_url: str, creds_any: factories.ResellerCreds
) -> None:
    """An order refused for insufficient balance cannot be replayed later, even once the
    balance would allow it."""
    sku = factories.add_product(any_db, price_cents=100_00, stock=3)
    ts, nonce, key = int(time.time()), secrets.token_hex(12), new_key()
    kw = {
        "body": order_json(sku, 1),
        "timestamp": ts,
        "nonce": nonce,
        "headers": {"Idempotency-Key": key},
    }
    refused = signed_send(any_url, creds_any, "POST", "/api/v1/orders", **kw)
    error_of(refused, 402, "insufficient_balance")
    factories.topup(any_db, creds_any.reseller_id, 200_00)
    replay = signed_send(any_url, creds_any, "POST", "/api/v1/orders", **kw)
    error_of(replay, 401, "auth_nonce_reused")
    assert factories.wallet_balance(any_db, creds_any.reseller_id) == (250_00, 0)
    assert all_orders(factories.client_for(any_url, creds_any)) == []


def test_other_refusals_burn_the_nonce_too(
    any_db: Container, any_url: str, creds_any: factories.ResellerCreds
) -> None:
    """Refusals decided after authentication (checks that need no caller, like a malformed
    cursor, refuse a replay the same way anyway)."""
    cases = [
        ("GET", "/api/v1/orders/K20260101ABCDEFGHJK", b"", 404),
        ("POST", "/api/v1/orders/K20260101ABCDEFGHJK/cancel", b"", 404),
        ("POST", "/api/v1/orders", order_json("NO-SUCH-SKU"), 404),
    ]
    for method, path, body, status in cases:
        kw = {
            "body": body,
            "timestamp": int(time.time()),
            "nonce": secrets.token_hex(12),
            "headers": {"Idempotency-Key": new_key()},
        }
        first = signed_send(any_url, creds_any, method, path, **kw)
        assert first.status_code == status, first.text
        again = signed_send(any_url, creds_any, method, path, **kw)
        error_of(again, 401, "auth_nonce_reused")


def test_bad_signature_does_not_burn_the_nonce(
    lite_url: str, creds: factories.ResellerCreds
) -> None:
    """Otherwise anyone who sees a nonce in flight could spoil the genuine request."""
    ts, nonce = int(time.time()), secrets.token_hex(12)
    forged = signed_send(
        lite_url, creds, "GET", BALANCE, timestamp=ts, nonce=nonce, secret="sk_forged"
    )
    error_of(forged, 401, "auth_bad_signature")
    genuine = signed_send(lite_url, creds, "GET", BALANCE, timestamp=ts, nonce=nonce)
    assert genuine.status_code == 200, genuine.text


def test_nonce_is_scoped_per_key(lite_db: Container, lite_url: str) -> None:
    a = factories.add_reseller(lite_db)
    b = factories.add_reseller(lite_db)
    ts, nonce = int(time.time()), secrets.token_hex(12)
    assert signed_send(lite_url, a, "GET", BALANCE, timestamp=ts, nonce=nonce).is_success
    assert signed_send(lite_url, b, "GET", BALANCE, timestamp=ts, nonce=nonce).is_success


# -- revoked keys -------------------------------------------------------------------------------


def test_revoked_key_is_refused_immediately(
    any_db: Container, any_url: str, creds_any: factories.ResellerCreds
) -> None:
    client = factories.client_for(any_url, creds_any)
    assert client.balance().status_code == 200  # warms the in-memory secret cache
    with any_db.db.unit_of_work() as s:
        revoked = revoke_credentials(s, name=creds_any.name, actor="staff:t")
    assert revoked == [creds_any.api_key]
    error_of(client.balance(), 401, "auth_key_revoked")
    sku = factories.add_product(any_db, stock=1)
    error_of(client.create_order(sku, 1), 401, "auth_key_revoked")
    assert factories.wallet_balance(any_db, creds_any.reseller_id) == (5000, 0)


# -- tenant isolation ---------------------------------------------------------------------------


def test_another_resellers_order_is_not_found(any_db: Container, any_url: str) -> None:
    sku = factories.add_product(any_db, price_cents=1000, stock=1)
    out_of_stock = factories.add_product(any_db, price_cents=1000, stock=0)
    a = factories.add_reseller(any_db, balance_cents=5000)
    b = factories.add_reseller(any_db, balance_cents=5000)
    ca, cb = factories.client_for(any_url, a), factories.client_for(any_url, b)
    delivered = ca.create_order(sku, 1).json()["order_no"]
    waiting = ca.create_order(out_of_stock, 1)
    assert waiting.json()["status"] == "backordered", waiting.text
    waiting_no = waiting.json()["order_no"]

    never = "K20260101ABCDEFGHJK"
    not_found = error_of(cb.order(never), 404, "order_not_found")
    for order_no in (delivered, waiting_no, delivered.lower()):
        assert error_of(cb.order(order_no), 404, "order_not_found") == not_found
        assert error_of(cb.cancel(order_no), 404, "order_not_found") == not_found

    # A's backordered order is untouched by B's attempt to cancel it; A still owns its money.
    still = ca.order(waiting_no).json()
    assert still["status"] == "backordered"
    assert factories.wallet_balance(any_db, a.reseller_id) == (3000, 1000)
    assert factories.wallet_balance(any_db, b.reseller_id) == (5000, 0)

    # Listings never cross tenants, whatever the filters.
    assert all_orders(cb) == []
    assert all_orders(cb, status="delivered") == []
    assert all_orders(cb, sku=sku) == []
    own = factories.add_product(any_db, price_cents=1000, stock=1)
    mine = cb.create_order(own, 1).json()["order_no"]
    assert [o["order_no"] for o in all_orders(cb)] == [mine]
    assert {o["order_no"] for o in all_orders(ca)} == {delivered, waiting_no}


# -- languages ----------------------------------------------------------------------------------


def test_messages_are_zh_cn_by_default_and_english_on_request(
    lite_db: Container, lite_url: str, creds: factories.ResellerCreds
) -> None:
    unknown = "ak_" + secrets.token_hex(12)
    zh = signed_send(lite_url, creds, "GET", BALANCE, api_key=unknown)
    assert error_of(zh, 401, "auth_invalid_key")["message"] == "API Key 无效"
    en = signed_send(
        lite_url, creds, "GET", BALANCE, api_key=unknown, headers={"Accept-Language": "en"}
    )
    assert error_of(en, 401, "auth_invalid_key")["message"] == "Unknown API key"
    en_us = signed_send(
        lite_url,
        creds,
        "GET",
        BALANCE,
        api_key=unknown,
        headers={"Accept-Language": "en-US,en;q=0.9"},
    )
    assert error_of(en_us, 401, "auth_invalid_key")["message"] == "Unknown API key"

    missing = httpx.get(lite_url + BALANCE)
    assert error_of(missing, 401, "auth_missing")["message"].startswith("缺少签名头")
    missing_en = httpx.get(lite_url + BALANCE, headers={"Accept-Language": "en"})
    assert error_of(missing_en, 401, "auth_missing")["message"].startswith(
        "Missing signature headers"
    )

    # Business errors too, through the signed client.
    zh_client = factories.client_for(lite_url, creds)
    en_client = factories.client_for(lite_url, creds, language="en")
    assert error_of(zh_client.create_order("NOPE-1"), 404, "sku_not_found")["message"] == (
        "商品规格 NOPE-1 不存在"
    )
    assert error_of(en_client.create_order("NOPE-1"), 404, "sku_not_found")["message"] == (
        "SKU NOPE-1 does not exist"
    )

"""The order of checks on the Reseller API's money-moving POSTs, through real HTTP with the
real worker and the bundled supplier simulator, on SQLite and PostgreSQL:

signature (key, timestamp, signature) -> nonce -> idempotency lookup -> validation ->
the supplier's pre-check -> the effect.

- a retry of a placed order is answered with that order, whatever the supplier now says about
  its account or denomination (it used to answer `422 invalid_fields` for a charged order);
- a request that fails authentication, or replays a nonce, never reaches the supplier;
- a reseller's pre-checks are limited; past the limit the order is placed unchecked;
- a retry is answered before its body is validated, and a key in flight during the
  pre-check answers 409;
- field corrections and cancels accept an `Idempotency-Key` with the same order of checks.

One rig per backend serves the module; each test makes its own SKU (with its own simulator
SKU) and its own resellers, and reads the simulator's pre-check counter as a difference.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.api.helpers import all_orders, error_of, new_key, signed_send
from tests.conftest import backend_container
from tests.support import factories
from tests.support.factories import ResellerCreds
from tests.support.pipeline import Rig, pipeline_rig, wait_for

from kameng.apiclient import ResellerClient
from kameng.catalog.models import DeliveryKind
from kameng.resellers import service as resellers

pytestmark = pytest.mark.timeout(120)

ORDERS = "/api/v1/orders"
FIELDS = [{"name": "account", "type": "text", "label": "充值账号", "label_en": "Account"}]
PRICE = 5_000
LIMIT = 3  # pre-checks per reseller per minute in this module
NOT_THERE = "13800000000"  # the simulator's accounts ending in 0000 never exist
SLOW = {"dist": "fixed", "ms": 2000}  # a pre-check slow enough to act while it runs

_accounts = itertools.count(1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    data_dir = tmp_path_factory.mktemp(f"check-order-{request.param}")
    with pipeline_rig(
        backend_container, request.param, data_dir, prechecks_per_minute=LIMIT
    ) as rig:
        rig.add_supplier("sim")
        yield rig


def topup(rig: Rig, **sim: Any) -> tuple[str, str]:
    """A direct top-up of this test's own, bought from the simulator, whose pre-check checks
    the `account` field; returns (our SKU, the simulator's SKU)."""
    their = f"CO-{secrets.token_hex(3).upper()}"
    rig.sim.configure_sku(
        their, price_cents=1000, kind="direct_topup", account_field="account", **sim
    )
    sku = factories.add_product(
        rig.container, kind=DeliveryKind.direct_topup, fields=FIELDS, price_cents=PRICE
    )
    rig.add_offer(sku, "sim", their)
    return sku, their


def reseller(rig: Rig) -> tuple[ResellerCreds, ResellerClient]:
    creds = factories.add_reseller(rig.container, balance_cents=1_000_000)
    return creds, factories.client_for(rig.url, creds)


def account() -> str:
    return f"13912{next(_accounts):06d}"


def order_body(sku: str, acct: str, ref: str = "") -> bytes:
    return json.dumps(
        {"sku": sku, "quantity": 1, "fields": {"account": acct}, "customer_ref": ref or acct},
        ensure_ascii=False,
    ).encode()


def order(client: ResellerClient, sku: str, acct: str, key: str, **kw: Any) -> httpx.Response:
    return client.request("POST", ORDERS, raw_body=order_body(sku, acct), idempotency_key=key, **kw)


def prechecks(rig: Rig) -> int:
    """How many pre-checks the simulator has answered so far."""
    return int(rig.sim.state()["stats"]["prechecks"])


def skipped_prechecks(rig: Rig) -> float:
    metrics = httpx.get(f"{rig.url}/metrics", timeout=10).text
    found = re.search(
        r'^kameng_api_prechecks_total\{outcome="rate_limited"\} (\S+)$', metrics, re.MULTILINE
    )
    return float(found.group(1)) if found else 0.0


def balance(rig: Rig, creds: ResellerCreds) -> int:
    return factories.wallet_balance(rig.container, creds.reseller_id)[0]


def assert_replayed(resp: httpx.Response, original: httpx.Response) -> None:
    assert resp.status_code == original.status_code, resp.text
    assert resp.headers.get("Idempotent-Replayed") == "true"
    assert resp.json() == original.json()


def nonce_recorded(rig: Rig, nonce: str) -> bool:
    with rig.container.db.connect(write=False) as conn:
        return (
            conn.execute(
                text("SELECT COUNT(*) FROM api_nonces WHERE nonce = :n"), {"n": nonce}
            ).scalar_one()
            > 0
        )


def stuck_order(rig: Rig, client: ResellerClient) -> tuple[str, str]:
    """An order the supplier refused after payment (its pre-check was down), waiting in
    `needs_buyer_action`; the pre-check works again afterwards."""
    sku, their = topup(rig, precheck_error_rate=1.0)
    placed = order(client, sku, "13700000000", new_key())
    assert placed.status_code == 201, placed.text
    order_no = placed.json()["order_no"]
    rig.wait_status(order_no, {"needs_buyer_action"})
    rig.sim.configure_sku(their, precheck_error_rate=0.0)
    return order_no, their


# -- a retry is answered with the order, whatever the supplier says now ----------------------


@pytest.mark.parametrize("change", ["account_refused", "denomination_closed"])
def test_a_retry_after_the_supplier_changed_its_answer_replays_the_order(
    rig: Rig, change: str
) -> None:
    sku, their = topup(rig)
    creds, client = reseller(rig)
    acct, key = account(), new_key()
    before = balance(rig, creds)
    first = order(client, sku, acct, key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    if change == "account_refused":
        rig.sim.missing_accounts(add=[acct])
    else:
        rig.sim.configure_sku(their, denomination_closed=True)
    checked = prechecks(rig)

    again = order(client, sku, acct, key)

    assert_replayed(again, first)  # not `422 invalid_fields` for an order that exists
    assert prechecks(rig) == checked  # the replay answered before the supplier was asked
    # A new order (new key) is still checked, and refused before any money moves.
    refused = order(client, sku, acct, new_key(), headers={"Accept-Language": "en"})
    error_of(refused, 422, "invalid_fields")
    assert prechecks(rig) == checked + 1
    assert [o["order_no"] for o in all_orders(client)] == [first.json()["order_no"]]
    assert balance(rig, creds) == before - PRICE


# -- a request that is not authentic never reaches the supplier ------------------------------


def test_requests_failing_authentication_never_reach_the_supplier(rig: Rig) -> None:
    sku, _ = topup(rig)
    creds, client = reseller(rig)
    body = order_body(sku, account())
    key = {"Idempotency-Key": new_key()}
    checked = prechecks(rig)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("auth_invalid_key", {"api_key": f"ak_{secrets.token_hex(8)}", "headers": key}),
        ("auth_bad_signature", {"secret": "not-the-secret", "headers": key}),
        ("auth_bad_signature", {"sign_body": order_body(sku, account()), "headers": key}),
        ("auth_timestamp_out_of_window", {"timestamp": int(time.time()) - 3600, "headers": key}),
        ("auth_missing", {"drop": ("X-Signature",), "headers": key}),
    ]
    for code, kw in cases:
        resp = signed_send(rig.url, creds, "POST", ORDERS, **{"body": body, **kw})
        error_of(resp, 401, code)
    assert prechecks(rig) == checked, "an unauthenticated request made a supplier call"
    # Neither a missing Idempotency-Key nor a malformed body is looked at before the
    # signature: both are 401, not 400.
    for kw in ({}, {"headers": key, "body": b"{no"}):
        resp = signed_send(rig.url, creds, "POST", ORDERS, **{"body": body, **kw}, secret="x")
        error_of(resp, 401, "auth_bad_signature")
    assert prechecks(rig) == checked

    # A replayed nonce: the first request is checked and placed, its replay reaches nothing.
    nonce = secrets.token_hex(12)
    placed = signed_send(rig.url, creds, "POST", ORDERS, body=body, nonce=nonce, headers=key)
    assert placed.status_code == 201, placed.text
    checked = prechecks(rig)
    for headers in (key, {"Idempotency-Key": new_key()}):
        replay = signed_send(
            rig.url, creds, "POST", ORDERS, body=body, nonce=nonce, headers=headers
        )
        error_of(replay, 401, "auth_nonce_reused")
    assert prechecks(rig) == checked
    assert [o["order_no"] for o in all_orders(client)] == [placed.json()["order_no"]]


def test_a_correction_checks_the_signature_before_the_body(rig: Rig) -> None:
    creds, client = reseller(rig)
    order_no, _ = stuck_order(rig, client)
    path = f"{ORDERS}/{order_no}/fields"
    checked = prechecks(rig)
    for body in (b"{no", json.dumps({"fields": {"account": account()}}).encode()):
        resp = signed_send(rig.url, creds, "POST", path, body=body, secret="not-the-secret")
        error_of(resp, 401, "auth_bad_signature")
    assert prechecks(rig) == checked
    assert rig.status(order_no) == "needs_buyer_action"


# -- the per-reseller limit on pre-checks -----------------------------------------------------


def test_prechecks_past_a_resellers_limit_are_skipped_and_the_order_placed(rig: Rig) -> None:
    sku, _ = topup(rig)
    _, client = reseller(rig)
    checked, skipped = prechecks(rig), skipped_prechecks(rig)
    for _ in range(LIMIT):
        resp = order(client, sku, account(), new_key())
        assert resp.status_code == 201, resp.text
    assert prechecks(rig) == checked + LIMIT

    past = order(client, sku, NOT_THERE, new_key())

    # Not asked, so not refused either (and no 429): the order is placed unchecked ...
    assert past.status_code == 201, past.text
    assert prechecks(rig) == checked + LIMIT
    assert skipped_prechecks(rig) == skipped + 1
    # ... and the purchase catches the account after payment, as when a check cannot run.
    order_no = past.json()["order_no"]
    assert rig.wait_status(order_no, {"needs_buyer_action"}) == "needs_buyer_action"
    # Another reseller has its own share.
    _, other = reseller(rig)
    error_of(order(other, sku, NOT_THERE, new_key()), 422, "invalid_fields")
    assert prechecks(rig) == checked + LIMIT + 1


# -- idempotency before validation and pre-check ---------------------------------------------


def test_a_retry_is_answered_before_its_request_is_validated_again(rig: Rig) -> None:
    sku, _ = topup(rig)
    _, client = reseller(rig)
    acct, key = account(), new_key()
    first = order(client, sku, acct, key)
    assert first.status_code == 201, first.text
    checked = prechecks(rig)

    # The same key and body, declared as text: the content type is validation, and validation
    # comes after the lookup.
    assert_replayed(order(client, sku, acct, key, headers={"Content-Type": "text/plain"}), first)
    # The SKU taken off sale since: still the original answer, the supplier not asked.
    with rig.container.db.connect() as conn:
        conn.execute(text("UPDATE skus SET enabled = false WHERE code = :c"), {"c": sku})
    rig.container.invalidate_caches()
    assert_replayed(order(client, sku, acct, key), first)
    error_of(order(client, sku, account(), new_key()), 409, "sku_disabled")
    # The same key with another body is refused as such before that body is validated or
    # put to the supplier: a malformed body, an account the supplier refuses.
    malformed = client.request("POST", ORDERS, raw_body=b'{"sku": 1', idempotency_key=key)
    error_of(malformed, 422, "idempotency_key_reused")
    error_of(order(client, sku, NOT_THERE, key), 422, "idempotency_key_reused")
    assert prechecks(rig) == checked
    assert [o["order_no"] for o in all_orders(client)] == [first.json()["order_no"]]


def test_a_retry_while_the_supplier_is_asked_is_in_flight(rig: Rig) -> None:
    sku, _ = topup(rig, precheck_latency_ms=SLOW)
    creds, client = reseller(rig)
    acct, key, nonce = account(), new_key(), secrets.token_hex(12)
    checked = prechecks(rig)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(order, factories.client_for(rig.url, creds), sku, acct, key, nonce=nonce)
        # Its checks have committed (the nonce is spent): it is now waiting on the supplier.
        wait_for(lambda: nonce_recorded(rig, nonce) or slow.done(), timeout=10)
        assert not slow.done(), slow.result().text
        error_of(order(client, sku, acct, key), 409, "idempotency_in_flight")
        first = slow.result(timeout=30)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert_replayed(order(client, sku, acct, key), first)
    assert prechecks(rig) == checked + 1  # the 409 did not ask the supplier a second time


def test_a_key_revoked_while_the_supplier_answers_places_nothing(rig: Rig) -> None:
    # The pre-check sits between two transactions; the second reads the credential again.
    sku, _ = topup(rig, precheck_latency_ms=SLOW)
    creds, client = reseller(rig)
    before = balance(rig, creds)
    nonce = secrets.token_hex(12)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(order, client, sku, account(), new_key(), nonce=nonce)
        wait_for(lambda: nonce_recorded(rig, nonce) or slow.done(), timeout=10)
        with rig.container.db.unit_of_work() as session:
            resellers.revoke_credentials(session, name=creds.name, actor="staff:test")
        error_of(slow.result(timeout=30), 401, "auth_key_revoked")
    with rig.container.db.connect(write=False) as conn:
        count = conn.execute(
            text("SELECT COUNT(*) FROM orders WHERE reseller_id = :r"), {"r": creds.reseller_id}
        ).scalar_one()
    assert count == 0
    assert balance(rig, creds) == before


# -- field corrections and cancels -------------------------------------------------------------


def test_a_retried_correction_answers_with_the_correction(rig: Rig) -> None:
    _, client = reseller(rig)
    order_no, _ = stuck_order(rig, client)
    path = f"{ORDERS}/{order_no}/fields"
    acct, key = account(), new_key()
    good = client.request("POST", path, body={"fields": {"account": acct}}, idempotency_key=key)
    assert good.status_code == 200, good.text
    assert "idempotent-replayed" not in good.headers
    checked = prechecks(rig)

    again = client.request("POST", path, body={"fields": {"account": acct}}, idempotency_key=key)

    assert_replayed(again, good)  # not `409 order_not_fixable` for a correction applied
    reused = client.request(
        "POST", path, body={"fields": {"account": account()}}, idempotency_key=key
    )
    error_of(reused, 422, "idempotency_key_reused")
    assert prechecks(rig) == checked
    # Without a key a retry is judged afresh, as before.
    unkeyed = client.request("POST", path, body={"fields": {"account": acct}})
    error_of(unkeyed, 409, "order_not_fixable")
    assert rig.wait_status(order_no, {"delivered"}) == "delivered"


def test_a_cancel_under_a_key_replays_and_never_cancels_another_order(rig: Rig) -> None:
    sku = factories.add_product(rig.container, price_cents=PRICE, stock=0)  # no stock, no offer
    creds, client = reseller(rig)
    a, b = (
        client.create_order(
            sku, 1, idempotency_key=new_key(), customer_ref=ref, confirm_duplicate=True
        )
        for ref in ("a", "b")
    )
    assert a.json()["status"] == b.json()["status"] == "backordered", (a.text, b.text)
    before = balance(rig, creds)
    key = new_key()
    first = client.request("POST", f"{ORDERS}/{a.json()['order_no']}/cancel", idempotency_key=key)
    assert first.status_code == 200 and first.json()["status"] == "canceled", first.text
    assert "idempotent-replayed" not in first.headers

    again = client.request("POST", f"{ORDERS}/{a.json()['order_no']}/cancel", idempotency_key=key)
    other = client.request("POST", f"{ORDERS}/{b.json()['order_no']}/cancel", idempotency_key=key)

    assert_replayed(again, first)
    error_of(other, 422, "idempotency_key_reused")
    assert client.order(b.json()["order_no"]).json()["status"] == "backordered"
    assert balance(rig, creds) == before + PRICE
    factories.assert_books_clean(rig.container)

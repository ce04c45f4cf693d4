"""Buyer lookup (查单): POST /api/v1/lookup, unsigned, rate-limited per IP, over real HTTP.

Every test here builds its own app: the rate limiter lives in the app and counts every
attempt from 127.0.0.1, so a shared server would make the tests depend on each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kameng.container import Container
from tests.api.helpers import error_of
from tests.support import factories

LOOKUP = "/api/v1/lookup"


@pytest.fixture
def lookup_app(tmp_path: Path) -> Iterator[tuple[Container, str]]:
    container = factories.make_container(tmp_path, lookup_rate_per_minute=50)
    with factories.live_server(container) as url:
        yield container, url
    container.close()


def _lookup(url: str, order_no: str, secret: str, **headers: str) -> httpx.Response:
    return httpx.post(url + LOOKUP, json={"order_no": order_no, "secret": secret}, headers=headers)


def test_lookup_shows_status_timeline_and_keys(lookup_app: tuple[Container, str]) -> None:
    container, url = lookup_app
    sku = factories.add_product(container, price_cents=1000, stock=2)
    creds = factories.add_reseller(container, balance_cents=5000)
    created = factories.client_for(url, creds).create_order(sku, 2).json()

    resp = _lookup(url, created["order_no"], created["lookup_secret"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["order_no"] == created["order_no"]
    assert body["status"] == "delivered"
    assert body["status_text"] == "已发货"
    assert body["keys"] == created["keys"]
    assert [e["to_status"] for e in body["timeline"]] == ["paid", "fulfilling", "delivered"]
    assert body.get("lookup_secret") is None
    # The seller's credentials never reach the buyer.
    assert creds.api_key not in resp.text

    en = _lookup(url, created["order_no"], created["lookup_secret"], **{"Accept-Language": "en"})
    assert en.json()["status_text"] == "Delivered"


def test_lookup_of_a_backordered_order_has_no_keys(lookup_app: tuple[Container, str]) -> None:
    container, url = lookup_app
    sku = factories.add_product(container, stock=0)
    creds = factories.add_reseller(container, balance_cents=5000)
    created = factories.client_for(url, creds).create_order(sku, 1).json()
    body = _lookup(url, created["order_no"], created["lookup_secret"]).json()
    assert body["status"] == "backordered"
    assert body["keys"] is None
    assert body["next_action_at"] is not None


def test_wrong_secret_and_unknown_order_look_the_same(lookup_app: tuple[Container, str]) -> None:
    container, url = lookup_app
    sku = factories.add_product(container, stock=1)
    creds = factories.add_reseller(container, balance_cents=5000)
    created = factories.client_for(url, creds).create_order(sku, 1).json()
    order_no, secret = created["order_no"], created["lookup_secret"]

    wrong = _lookup(url, order_no, "AAAA-BBBB-CCCC-DDDD")
    unknown = _lookup(url, "K20260101ABCDEFGHJK", secret)
    other_secret = _lookup(url, order_no, secret[:-1] + ("0" if secret[-1] != "0" else "1"))
    error_of(wrong, 404, "order_not_found")
    assert wrong.json() == unknown.json() == other_secret.json()
    assert wrong.headers.get("content-type") == unknown.headers.get("content-type")
    assert len(wrong.content) == len(unknown.content)
    # And the real secret still works after failed attempts.
    assert _lookup(url, order_no, secret).status_code == 200


def test_order_number_as_a_buyer_types_it(lookup_app: tuple[Container, str]) -> None:
    container, url = lookup_app
    sku = factories.add_product(container, stock=1)
    creds = factories.add_reseller(container, balance_cents=5000)
    created = factories.client_for(url, creds).create_order(sku, 1).json()
    order_no, secret = created["order_no"], created["lookup_secret"]
    typed = [
        order_no.lower(),
        f"{order_no[:9]}-{order_no[9:]}".lower(),
        f"  {order_no[:9]} {order_no[9:]}  ",
    ]
    for variant in typed:
        resp = _lookup(url, variant, secret)
        assert resp.status_code == 200, (variant, resp.text)
        assert resp.json()["order_no"] == order_no
    assert _lookup(url, order_no, secret.lower()).status_code == 200


MALFORMED = [
    {},
    {"order_no": "K2026"},
    {"order_no": "", "secret": "x"},
    {"order_no": "K2026", "secret": ""},
    {"order_no": "K2026", "secret": "x", "extra": 1},
    {"order_no": "K" * 41, "secret": "x"},
    {"order_no": 123, "secret": "x"},
    ["K2026", "x"],
]


def test_malformed_lookup_is_invalid_request(lookup_app: tuple[Container, str]) -> None:
    _, url = lookup_app
    for payload in MALFORMED:
        error_of(httpx.post(url + LOOKUP, json=payload), 400, "invalid_request")
    resp = httpx.post(url + LOOKUP, content=b"{oops", headers={"Content-Type": "application/json"})
    error_of(resp, 400, "invalid_request")


def test_lookup_is_rate_limited_per_ip(tmp_path: Path) -> None:
    container = factories.make_container(tmp_path, lookup_rate_per_minute=3)
    try:
        sku = factories.add_product(container, stock=1)
        creds = factories.add_reseller(container, balance_cents=5000)
        with factories.live_server(container) as url:
            created = factories.client_for(url, creds).create_order(sku, 1).json()
            order_no, secret = created["order_no"], created["lookup_secret"]
            assert _lookup(url, order_no, "AAAA-BBBB-CCCC-DDDD").status_code == 404
            assert _lookup(url, "K20260101ABCDEFGHJK", secret).status_code == 404
            assert _lookup(url, order_no, secret).status_code == 200
            for attempt in (
                _lookup(url, order_no, secret),  # even the right secret, once over the limit
                _lookup(url, order_no, "AAAA-BBBB-CCCC-DDDD"),
            ):
                error = error_of(attempt, 429, "rate_limited")
                retry_after = int(attempt.headers["Retry-After"])
                assert 1 <= retry_after <= 60
                assert error["retry_after"] == retry_after
                assert str(retry_after) in error["message"]
                assert "keys" not in attempt.text
            en = _lookup(url, order_no, secret, **{"Accept-Language": "en"})
            assert error_of(en, 429, "rate_limited")["message"].startswith("Too many requests")
            # The signed API is not affected by the buyer-lookup limiter.
            assert factories.client_for(url, creds).order(order_no).status_code == 200
    finally:
        container.close()

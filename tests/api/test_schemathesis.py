"""Property-based fuzzing of Reseller API v1 from its own OpenAPI document (schemathesis 4).

The fuzzed schema is the app's own document, checked equal to what the live server publishes at
/api/v1/openapi.json; requests go over real HTTP to that server. Every generated request is
signed with a real reseller's secret (method, path+query exactly as sent, body bytes), so the
fuzzer gets past authentication into the handlers; the reseller has money and the schema's
example SKU exists with stock, so order creation runs to the end. The property that must always
hold: no 5xx. Responses must also match the documented schema, status codes and content type.
"""

from __future__ import annotations

import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kameng.container import Container
from kameng.security.signing import signed_headers
from tests.support import factories

EXAMPLE_SKU = "GC-100"  # the example in CreateOrderRequest, which schemathesis sends first


class SigningSession(requests.Session):
    """Signs each request as it leaves, over exactly the bytes that go on the wire."""

    def __init__(self, base_url: str, api_key: str, secret: str) -> None:
        super().__init__()
        self.base_url = base_url
        self.api_key = api_key
        self.secret = secret
        self.known_orders: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        path = request.path_url
        request.headers.update(
            signed_headers(
                api_key=self.api_key,
                secret=self.secret,
                method=str(request.method),
                path_with_query=path,
                body=body,
                timestamp=int(time.time()),
                nonce=secrets.token_hex(12),
            )
        )
        return super().send(request, **kwargs)


@pytest.fixture(scope="module")
def signing(lite_db: Container, lite_url: str) -> SigningSession:
    """A funded reseller, the example SKU in stock, and a few real orders (delivered,
    backordered) that some generated requests are pointed at."""
    factories.add_product(lite_db, sku=EXAMPLE_SKU, price_cents=1000, stock=300)
    empty = factories.add_product(lite_db, price_cents=1000, stock=0)
    creds = factories.add_reseller(lite_db, balance_cents=10_000_000)
    session = SigningSession(lite_url, creds.api_key, creds.api_secret)
    client = factories.client_for(lite_url, creds)
    for sku, ref in ((EXAMPLE_SKU, "a"), (empty, "b"), (empty, "c")):
        resp = client.create_order(sku, 1, customer_ref=ref)
        assert resp.status_code == 201, resp.text
        session.known_orders.append(resp.json()["order_no"])
    return session


def _steer(case: schemathesis.Case, known_orders: list[str]) -> None:
    """Point some generated requests at real data, so handlers run to the end rather than stop
    at "not found". Decided from the generated values, so a failing case replays the same."""
    params = case.path_parameters or {}
    if "order_no" in params:
        raw = str(params["order_no"])
        if len(raw) % 2 == 0:
            params["order_no"] = known_orders[len(raw) % len(known_orders)]
    if case.method.upper() == "POST" and case.operation.path == "/api/v1/orders":
        if isinstance(case.body, dict) and len(str(case.body.get("sku", ""))) % 4:
            case.body["sku"] = EXAMPLE_SKU
            case.body.setdefault("confirm_duplicate", True)  # else most are 409 duplicates
        headers = dict(case.headers or {})
        if "Idempotency-Key" not in headers and len(str(case.body)) % 5:
            headers["Idempotency-Key"] = uuid.uuid4().hex
            case.headers = headers


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, built once at collection from a throwaway container.

    `schema.parametrize()` needs the schema when tests are collected, before any server runs
    (and schemathesis' lazy `from_fixture` loader fails on pytest 9: `Function._nodeid`).
    `test_fuzzed_schema_is_the_live_one` proves this is exactly what the live server serves.
    """
    from kameng.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        container = factories.make_container(Path(tmp))
        try:
            return create_app(container).openapi()
        finally:
            container.close()


DOCUMENT = _openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_fuzzed_schema_is_the_live_one(lite_url: str) -> None:
    live = requests.get(f"{lite_url}/api/v1/openapi.json", timeout=10)
    assert live.status_code == 200
    assert live.json() == DOCUMENT
    paths = DOCUMENT["paths"]
    assert {"/api/v1/orders", "/api/v1/lookup", "/api/v1/balance"} <= set(paths)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_signed(case: schemathesis.Case, signing: SigningSession) -> None:
    _steer(case, signing.known_orders)
    response = case.call(base_url=signing.base_url, session=signing)
    assert response.status_code < 500, response.text
    # Whatever the fuzzer puts in the path, query or body, a correct signature is accepted.
    assert response.status_code != 401, response.text
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_unsigned(case: schemathesis.Case, lite_url: str) -> None:
    response = case.call(base_url=lite_url)
    assert response.status_code < 500, response.text
    case.validate_response(response, checks=CHECKS)

"""What each supplier answer means: the simulator and kameng adapters' mapping tables, checked
against a real HTTP server that returns canned answers, plus callback verification and the
plain-language texts for every reason the pipeline writes.

The canned server is a small Starlette app on a loopback port (`ServerThread`); the adapters
are the real classes on a real `SignedHttp`, so status codes, bodies, headers and signatures
all cross a socket exactly as in production.
"""

from __future__ import annotations

import ast
import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import kameng
from kameng.orders.explain import REASON_TEXT, STATUS_TEXT, reason_text, status_text
from kameng.orders.state import Status
from kameng.security.signing import sign_request, webhook_header
from kameng.suppliers.adapters.kameng import KamengSupplier
from kameng.suppliers.adapters.signed_http import SignedHttp
from kameng.suppliers.adapters.simulator import SimulatorSupplier, parse_keys, result_from_body
from kameng.suppliers.port import CallbackRefused, Outcome, Result, SupplierKey
from kameng.suppliers.service import SUPPLIER_WIDE
from kameng.suppliers.simulator.runner import ServerThread
from tests.support import factories

pytestmark = pytest.mark.timeout(60)

KEY, SECRET = "canned-key", "canned-secret-0123456789"
NOW = 1_900_000_000


# -- a canned supplier ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    delay_s: float = 0.0


@dataclass
class Seen:
    method: str
    path_with_query: str
    headers: dict[str, str]
    body: bytes
    signed_ok: bool

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Canned:
    """Answers each (method, path) with what the test set; records every request and whether
    its kameng request signature checks out."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Answer] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        app = Starlette(
            routes=[Route("/{path:path}", self.endpoint, methods=["GET", "POST", "PUT"])]
        )
        self.server = ServerThread(app).start()
        self.url = self.server.url

    def answer(
        self,
        method: str,
        path: str,
        status: int,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        delay_s: float = 0.0,
    ) -> None:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        with self.lock:
            self.answers[(method, path)] = Answer(status, data, content_type, delay_s)

    def reset(self) -> None:
        with self.lock:
            self.answers.clear()
            self.seen.clear()

    async def endpoint(self, request: Request) -> Response:
        raw_path = request.scope["raw_path"].decode()
        query = request.scope["query_string"].decode()
        path_with_query = raw_path + (f"?{query}" if query else "")
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        expected = sign_request(
            SECRET,
            request.method,
            path_with_query,
            headers.get("x-timestamp", ""),
            headers.get("x-nonce", ""),
            body,
        )
        signed_ok = headers.get("x-api-key") == KEY and headers.get("x-signature") == expected
        with self.lock:
            self.seen.append(Seen(request.method, path_with_query, headers, body, signed_ok))
            answer = self.answers.get((request.method, raw_path))
        if answer is None:
            return Response(b'{"status":"no canned answer"}', status_code=599)
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)

    def run(
        self,
        kind: str,
        call: Callable[[Any], Awaitable[Any]],
        *,
        url: str | None = None,
        timeout_s: float = 5.0,
    ) -> Any:
        async def go() -> Any:
            http = SignedHttp(
                base_url=url or self.url, api_key=KEY, secret=SECRET, timeout_s=timeout_s
            )
            adapter = SimulatorSupplier(http) if kind == "simulator" else KamengSupplier(http)
            try:
                return await call(adapter)
            finally:
                await adapter.aclose()

        return asyncio.run(go())

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def canned_server() -> Iterator[Canned]:
    server = Canned()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def canned(canned_server: Canned) -> Canned:
    canned_server.reset()
    return canned_server


def sim_buy(canned: Canned, *, callback_url: str | None = "http://cb.example/x") -> Result:
    async def call(adapter: SimulatorSupplier) -> Result:
        return await adapter.purchase(
            order_no="K-1", sku="THEIR-SKU", quantity=2, fields={"account": "a1"},
            callback_url=callback_url,
        )  # fmt: skip

    result: Result = canned.run("simulator", call)
    return result


def kameng_buy(canned: Canned, *, callback_url: str | None = "http://cb.example/x") -> Result:
    async def call(adapter: KamengSupplier) -> Result:
        return await adapter.purchase(
            order_no="K-1", sku="THEIR-SKU", quantity=2, fields={"account": "a1"},
            callback_url=callback_url,
        )  # fmt: skip

    result: Result = canned.run("kameng", call)
    return result


KEYS = [{"code": "CODE-1", "secret": "PIN-1"}, {"code": "CODE-2"}]
PARSED_KEYS = (SupplierKey("CODE-1", "PIN-1"), SupplierKey("CODE-2", None))


# -- simulator: result_from_body and parse_keys (pure) -------------------------------------------


@pytest.mark.parametrize(
    ("body", "http_status", "outcome", "reason"),
    [
        ({"status": "delivered", "keys": KEYS}, 200, Outcome.delivered, ""),
        ({"status": "partial", "keys": KEYS[:1]}, 200, Outcome.partial, ""),
        ({"status": "accepted"}, 200, Outcome.accepted, ""),
        ({"status": "processing", "keys": []}, 200, Outcome.accepted, ""),
        ({"status": "rejected", "reason": "out_of_stock", "keys": []}, 200, Outcome.rejected,
         "out_of_stock"),
        ({"status": "rejected"}, 200, Outcome.rejected, ""),
        ({"status": "delivered", "keys": KEYS, "reason": "ignored"}, 200, Outcome.delivered, ""),
        ({"status": "not_found"}, 404, Outcome.not_found, ""),
        ({"status": "rejected", "reason": "unknown_sku"}, 404, Outcome.rejected, "unknown_sku"),
        # `not_found` is only believed with a 404: on a 200 it is a garbled answer
        ({"status": "not_found"}, 200, Outcome.unknown, ""),
        # a 5xx may have come after the purchase: whatever the body says, ask again later
        ({"status": "delivered", "keys": KEYS}, 500, Outcome.unknown, ""),
        ({"status": "rejected", "reason": "out_of_stock"}, 503, Outcome.unknown, ""),
        ({"status": "error"}, 503, Outcome.unknown, ""),
        (None, 200, Outcome.unknown, ""),
        (None, 502, Outcome.unknown, ""),
        ({}, 200, Outcome.unknown, ""),
        ({"keys": KEYS}, 200, Outcome.unknown, ""),
        ({"status": None}, 200, Outcome.unknown, ""),
        ({"status": 1}, 200, Outcome.unknown, ""),
        ({"status": "DELIVERED", "keys": KEYS}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": "CODE-1"}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": {"code": "CODE-1"}}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": ["CODE-1"]}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": [{"code": 7}]}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": [{"secret": "x"}]}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": [{"code": "   "}]}, 200, Outcome.unknown, ""),
        ({"status": "delivered", "keys": [{"code": "A", "secret": 5}]}, 200, Outcome.unknown, ""),
        ({"status": "partial", "keys": [*KEYS, None]}, 200, Outcome.unknown, ""),
        ({"status": "rejected", "keys": "junk", "reason": "x"}, 200, Outcome.unknown, ""),
    ],
)  # fmt: skip
def test_simulator_body_mapping(
    body: dict[str, Any] | None, http_status: int, outcome: Outcome, reason: str
) -> None:
    result = result_from_body(body, http_status=http_status)
    assert result.outcome is outcome, result
    assert result.reason == reason
    if outcome is Outcome.unknown:
        assert result.keys == () and result.detail
    if outcome in (Outcome.delivered, Outcome.partial):
        assert result.keys == PARSED_KEYS[: len(body["keys"])]  # type: ignore[index]


def test_simulator_body_fields_are_normalised() -> None:
    result = result_from_body(
        {
            "status": "delivered",
            "keys": [{"code": "  A-1 ", "secret": "  "}, {"code": "B-2", "secret": " 99 "}],
            "trade_no": None,
            "cost_cents": "990",
        },
        http_status=200,
    )
    assert result.keys == (SupplierKey("A-1", None), SupplierKey("B-2", "99"))
    assert result.trade_no == "" and result.cost_cents is None
    result = result_from_body(
        {"status": "accepted", "trade_no": 12345, "cost_cents": 990}, http_status=200
    )
    assert (result.trade_no, result.cost_cents, result.keys) == ("12345", 990, ())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ()),
        ([], ()),
        (KEYS, PARSED_KEYS),
        ([{"code": "X", "secret": None}], (SupplierKey("X", None),)),
        ("X", None),
        ({"code": "X"}, None),
        ([{"code": ""}], None),
        ([{"code": ["X"]}], None),
        ([{"code": "X", "secret": 1}], None),
        ([{"code": "X"}, "Y"], None),
    ],
)
def test_parse_keys(raw: Any, expected: tuple[SupplierKey, ...] | None) -> None:
    assert parse_keys(raw) == expected


# -- simulator over HTTP --------------------------------------------------------------------------

SIM_ORDERS = "/v1/orders"


@pytest.mark.parametrize(
    ("status", "body", "outcome", "reason"),
    [
        (200, {"status": "delivered", "keys": KEYS, "trade_no": "T1"}, Outcome.delivered, ""),
        (200, {"status": "partial", "keys": KEYS[:1]}, Outcome.partial, ""),
        (200, {"status": "accepted", "trade_no": "T1"}, Outcome.accepted, ""),
        (200, {"status": "processing"}, Outcome.accepted, ""),
        (200, {"status": "rejected", "reason": "maintenance", "keys": []}, Outcome.rejected,
         "maintenance"),
        (200, {"status": "rejected", "reason": "insufficient_balance"}, Outcome.rejected,
         "insufficient_balance"),
        (200, {"status": "delivered", "keys": [{"code": ""}]}, Outcome.unknown, ""),
        (200, {"out_trade_no": "K-1"}, Outcome.unknown, ""),
        (200, b"<html>gateway</html>", Outcome.unknown, ""),
        (200, b"[]", Outcome.unknown, ""),
        (200, b"", Outcome.unknown, ""),
        # refused before anything was done
        (400, {"status": "rejected", "reason": "bad_request"}, Outcome.rejected, "bad_request"),
        (400, {"status": "rejected", "code": "invalid_fields"}, Outcome.rejected,
         "invalid_fields"),
        (400, None, Outcome.rejected, "http_400"),
        (403, b"forbidden", Outcome.rejected, "supplier_auth_failed"),
        (404, {"status": "rejected", "reason": "unknown_sku"}, Outcome.rejected, "unknown_sku"),
        (404, {"status": "not_found"}, Outcome.rejected, "unknown_sku"),
        (404, None, Outcome.rejected, "unknown_sku"),
        # may or may not have been bought
        (500, {"status": "error"}, Outcome.unknown, ""),
        (500, {"status": "delivered", "keys": KEYS}, Outcome.unknown, ""),
        (502, b"bad gateway", Outcome.unknown, ""),
        (503, {"status": "error"}, Outcome.unknown, ""),
        (429, {"status": "error"}, Outcome.unknown, ""),
    ],
)  # fmt: skip
def test_simulator_purchase_mapping(
    canned: Canned, status: int, body: Any, outcome: Outcome, reason: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    canned.answer("POST", SIM_ORDERS, status, None if raw is not None else body, raw=raw)
    result = sim_buy(canned)
    assert (result.outcome, result.reason) == (outcome, reason), result
    if outcome is Outcome.delivered:
        assert result.keys == PARSED_KEYS and result.trade_no == "T1"


def test_simulator_purchase_request_is_signed_and_complete(canned: Canned) -> None:
    canned.answer("POST", SIM_ORDERS, 200, {"status": "accepted"})
    sim_buy(canned)
    sim_buy(canned, callback_url=None)
    first, second = canned.seen
    assert first.signed_ok and second.signed_ok
    assert first.path_with_query == SIM_ORDERS
    assert first.headers["content-type"] == "application/json"
    assert first.json == {
        "out_trade_no": "K-1",
        "sku": "THEIR-SKU",
        "quantity": 2,
        "fields": {"account": "a1"},
        "callback_url": "http://cb.example/x",
    }
    assert second.json["callback_url"] is None
    assert first.headers["x-nonce"] != second.headers["x-nonce"]


def test_simulator_401_is_a_refusal_with_the_suppliers_code(canned: Canned) -> None:
    canned.answer("POST", SIM_ORDERS, 401, {"status": "error", "code": "bad_signature"})
    result = sim_buy(canned)
    assert result.outcome is Outcome.rejected  # nothing was bought: safe to try elsewhere
    assert result.reason  # never empty


@pytest.mark.parametrize("status", [401, 403])
def test_simulator_auth_failure_is_supplier_wide(canned: Canned, status: int) -> None:
    canned.answer("POST", SIM_ORDERS, status, {"status": "error", "code": "bad_signature"})
    result = sim_buy(canned)
    assert (result.outcome, result.reason) == (Outcome.rejected, "supplier_auth_failed")
    assert result.reason in SUPPLIER_WIDE


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {"status": "delivered", "keys": KEYS}, Outcome.delivered),
        (200, {"status": "processing"}, Outcome.accepted),
        (200, {"status": "rejected", "reason": "upstream_failed"}, Outcome.rejected),
        (404, {"status": "not_found"}, Outcome.not_found),
        (404, b"not found", Outcome.unknown),
        (500, {"status": "error"}, Outcome.unknown),
        (401, {"status": "error", "code": "bad_signature"}, Outcome.unknown),
    ],
)
def test_simulator_query_mapping(canned: Canned, status: int, body: Any, outcome: Outcome) -> None:
    raw = body if isinstance(body, bytes) else None
    canned.answer("GET", "/v1/orders/K-1", status, None if raw is not None else body, raw=raw)
    result = canned.run("simulator", lambda a: a.query(order_no="K-1"))
    assert result.outcome is outcome, result
    assert canned.seen[-1].signed_ok


def test_transport_failures_are_unknown_never_rejected(canned: Canned) -> None:
    dead = f"http://127.0.0.1:{factories.free_port()}"  # nothing listens there
    for kind in ("simulator", "kameng"):
        refused = canned.run(
            kind,
            lambda a: a.purchase(order_no="K-1", sku="S", quantity=1, fields={}, callback_url=None),
            url=dead,
        )
        assert refused.outcome is Outcome.unknown and refused.detail
        queried = canned.run(kind, lambda a: a.query(order_no="K-1"), url=dead)
        assert queried.outcome is Outcome.unknown
    canned.answer("POST", SIM_ORDERS, 200, {"status": "delivered", "keys": KEYS}, delay_s=0.6)
    slow = canned.run(
        "simulator",
        lambda a: a.purchase(order_no="K-2", sku="S", quantity=1, fields={}, callback_url=None),
        timeout_s=0.15,
    )
    assert slow.outcome is Outcome.unknown
    assert "Timeout" in slow.detail


# -- kameng over HTTP -----------------------------------------------------------------------------

K_ORDERS = "/api/v1/orders"


def error(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": "…"}}


@pytest.mark.parametrize(
    ("status", "body", "outcome", "reason"),
    [
        (201, {"order_no": "KM1", "status": "delivered", "keys": KEYS}, Outcome.delivered, ""),
        (200, {"order_no": "KM1", "status": "completed", "keys": KEYS}, Outcome.delivered, ""),
        (201, {"order_no": "KM1", "status": "canceled"}, Outcome.rejected, "order_canceled"),
        (201, {"order_no": "KM1", "status": "refunded"}, Outcome.rejected, "order_refunded"),
        (201, {"order_no": "KM1", "status": "rejected"}, Outcome.rejected, "order_rejected"),
        (201, {"order_no": "KM1", "status": "expired"}, Outcome.rejected, "order_expired"),
        (201, {"order_no": "KM1", "status": "paid"}, Outcome.accepted, ""),
        (201, {"order_no": "KM1", "status": "fulfilling", "reason": "awaiting_supplier"},
         Outcome.accepted, "awaiting_supplier"),
        (201, {"order_no": "KM1", "status": "backordered", "reason": "out_of_stock"},
         Outcome.accepted, "out_of_stock"),
        (201, {"order_no": "KM1", "status": "needs_buyer_action"}, Outcome.accepted, ""),
        (201, {"order_no": "KM1", "status": "delivered", "keys": [{"code": 1}]},
         Outcome.unknown, ""),
        (201, {"order_no": "KM1"}, Outcome.unknown, ""),
        (201, b"<html>", Outcome.unknown, ""),
        # refusals that prove nothing was bought
        (402, error("insufficient_balance"), Outcome.rejected, "insufficient_balance"),
        (404, error("sku_not_found"), Outcome.rejected, "unknown_sku"),
        (422, error("invalid_fields"), Outcome.rejected, "invalid_fields"),
        (422, error("quantity_out_of_range"), Outcome.rejected, "bad_request"),
        (400, error("invalid_request"), Outcome.rejected, "bad_request"),
        (422, error("price_below_cost"), Outcome.rejected, "price_below_cost"),
        (400, None, Outcome.rejected, "bad_request"),
        (400, b"not json", Outcome.rejected, "bad_request"),
        # our credentials: the whole supplier is unusable, not this SKU
        (401, error("auth_bad_signature"), Outcome.rejected, "supplier_auth_failed"),
        (401, error("auth_invalid_key"), Outcome.rejected, "supplier_auth_failed"),
        (403, None, Outcome.rejected, "supplier_auth_failed"),
        # an order under this key may exist: resolve by query, never buy again
        (422, error("idempotency_key_reused"), Outcome.unknown, ""),
        (409, error("idempotency_in_flight"), Outcome.unknown, ""),
        (408, None, Outcome.unknown, ""),
        (429, error("rate_limited"), Outcome.unknown, ""),
        (500, error("internal_error"), Outcome.unknown, ""),
        (502, b"bad gateway", Outcome.unknown, ""),
        (503, None, Outcome.unknown, ""),
    ],
)  # fmt: skip
def test_kameng_purchase_mapping(
    canned: Canned, status: int, body: Any, outcome: Outcome, reason: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    canned.answer("POST", K_ORDERS, status, None if raw is not None else body, raw=raw)
    result = kameng_buy(canned)
    assert (result.outcome, result.reason) == (outcome, reason), result
    if outcome is Outcome.delivered:
        assert result.keys == PARSED_KEYS and result.trade_no == "KM1"
    if outcome is Outcome.unknown:
        assert result.detail


def test_kameng_sku_disabled_409_is_a_refusal(canned: Canned) -> None:
    canned.answer("POST", K_ORDERS, 409, error("sku_disabled"))
    result = kameng_buy(canned)
    assert (result.outcome, result.reason) == (Outcome.rejected, "unknown_sku")


def test_kameng_purchase_request_carries_our_number_as_key_and_reference(canned: Canned) -> None:
    canned.answer("POST", K_ORDERS, 201, {"order_no": "KM1", "status": "paid"})
    kameng_buy(canned)
    kameng_buy(canned, callback_url=None)
    first, second = canned.seen
    assert first.signed_ok and second.signed_ok
    assert first.headers["idempotency-key"] == "K-1"
    assert first.json == {
        "sku": "THEIR-SKU",
        "quantity": 2,
        "fields": {"account": "a1"},
        "customer_ref": "K-1",
        "confirm_duplicate": True,
        "notify_url": "http://cb.example/x",
    }
    assert "notify_url" not in second.json


def test_kameng_query_finds_the_order_by_our_reference(canned: Canned) -> None:
    async def query(adapter: KamengSupplier) -> Result:
        return await adapter.query(order_no="K-1")

    canned.answer("GET", K_ORDERS, 200, {"orders": []})
    assert canned.run("kameng", query).outcome is Outcome.not_found
    listed = canned.seen[-1]
    assert listed.signed_ok
    assert listed.path_with_query in (
        "/api/v1/orders?customer_ref=K-1&limit=1",
        "/api/v1/orders?limit=1&customer_ref=K-1",
    )

    canned.answer("GET", K_ORDERS, 200, {"orders": [{"order_no": "KM7"}]})
    for status, body, outcome in [
        (200, {"order_no": "KM7", "status": "delivered", "keys": KEYS}, Outcome.delivered),
        (200, {"order_no": "KM7", "status": "fulfilling"}, Outcome.accepted),
        (200, {"order_no": "KM7", "status": "refunded"}, Outcome.rejected),
        (404, error("order_not_found"), Outcome.unknown),
        (500, error("internal_error"), Outcome.unknown),
    ]:
        canned.answer("GET", f"{K_ORDERS}/KM7", status, body)
        result = canned.run("kameng", query)
        assert result.outcome is outcome, (status, body, result)
        assert canned.seen[-1].path_with_query == f"{K_ORDERS}/KM7"
        assert canned.seen[-1].signed_ok

    for status, body in [(500, error("internal_error")), (401, error("auth_bad_signature"))]:
        canned.answer("GET", K_ORDERS, status, body)
        assert canned.run("kameng", query).outcome is Outcome.unknown


# -- callbacks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters() -> Iterator[dict[str, Any]]:
    made = {
        "simulator": SimulatorSupplier(
            SignedHttp(base_url="http://127.0.0.1:9", api_key=KEY, secret=SECRET, timeout_s=1)
        ),
        "kameng": KamengSupplier(
            SignedHttp(base_url="http://127.0.0.1:9", api_key=KEY, secret=SECRET, timeout_s=1)
        ),
    }
    yield made
    for adapter in made.values():
        asyncio.run(adapter.aclose())


def signed(
    payload: Any, *, secret: str = SECRET, ts: int = NOW, header: str = "X-Kameng-Signature"
) -> tuple[dict[str, str], bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return {header: webhook_header(secret, ts, body), "Content-Type": "application/json"}, body


SIM_EVENT = {
    "event_id": "evt-1",
    "out_trade_no": "K-1",
    "trade_no": "T-1",
    "status": "delivered",
    "keys": KEYS,
    "reason": None,
    "sequence": 2,
}
KAMENG_EVENT = {"event_id": "evt-9", "type": "order.updated", "customer_ref": "K-1"}


def refusal(adapter: Any, headers: dict[str, str], body: bytes, now: int = NOW) -> str:
    with pytest.raises(CallbackRefused) as caught:
        adapter.parse_callback(headers=headers, body=body, now=now)
    return caught.value.code


def test_simulator_callback_accepted(adapters: dict[str, Any]) -> None:
    sim = adapters["simulator"]
    for header in ("X-Kameng-Signature", "x-kameng-signature"):
        headers, body = signed(SIM_EVENT, header=header)
        event = sim.parse_callback(headers=headers, body=body, now=NOW)
        assert (event.event_id, event.out_trade_no, event.sequence) == ("evt-1", "K-1", 2)
        assert event.result is not None
        assert event.result.outcome is Outcome.delivered and event.result.keys == PARSED_KEYS
    rejected = {**SIM_EVENT, "status": "rejected", "reason": "upstream_failed", "keys": []}
    headers, body = signed(rejected)
    event = sim.parse_callback(headers=headers, body=body, now=NOW)
    assert event.result is not None
    assert (event.result.outcome, event.result.reason) == (Outcome.rejected, "upstream_failed")
    long_id = {**SIM_EVENT, "event_id": "e" * 300, "sequence": "2"}
    headers, body = signed(long_id)
    event = sim.parse_callback(headers=headers, body=body, now=NOW)
    assert event.event_id == "e" * 128 and event.sequence is None


@pytest.mark.parametrize("kind", ["simulator", "kameng"])
def test_callback_signature_and_window(adapters: dict[str, Any], kind: str) -> None:
    adapter = adapters[kind]
    payload = SIM_EVENT if kind == "simulator" else KAMENG_EVENT
    headers, body = signed(payload)
    assert adapter.parse_callback(headers=headers, body=body, now=NOW).out_trade_no == "K-1"
    # ±300 s is allowed, one second more is not (either direction)
    for now in (NOW - 300, NOW + 300):
        assert adapter.parse_callback(headers=headers, body=body, now=now).event_id
    for now in (NOW - 301, NOW + 301, NOW + 86_400):
        assert refusal(adapter, headers, body, now) == "bad_signature"
    wrong_secret, _ = signed(payload, secret="not-" + SECRET)
    assert refusal(adapter, wrong_secret, body) == "bad_signature"
    assert refusal(adapter, headers, body.replace(b"K-1", b"K-2")) == "bad_signature"
    assert refusal(adapter, {}, body) == "bad_signature"
    assert refusal(adapter, {"X-Kameng-Signature": ""}, body) == "bad_signature"
    assert refusal(adapter, {"X-Kameng-Signature": f"t={NOW}"}, body) == "bad_signature"
    stale, _ = signed(payload, ts=NOW - 301)
    assert refusal(adapter, stale, body) == "bad_signature"


@pytest.mark.parametrize("kind", ["simulator", "kameng"])
@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"",
        [SIM_EVENT],
        "evt-1",
        42,
        None,
        {k: v for k, v in {**SIM_EVENT, **KAMENG_EVENT}.items() if k != "event_id"},
        {**SIM_EVENT, **KAMENG_EVENT, "event_id": ""},
        {**SIM_EVENT, **KAMENG_EVENT, "event_id": 17},
    ],
    ids=["not-json", "empty", "list", "string", "number", "null", "no-event-id",
         "empty-event-id", "int-event-id"],
)  # fmt: skip
def test_callback_malformed_bodies_are_refused(
    adapters: dict[str, Any], kind: str, payload: Any
) -> None:
    headers, body = signed(payload)
    assert refusal(adapters[kind], headers, body) == "malformed_body"


@pytest.mark.parametrize(
    "change",
    [
        {"out_trade_no": None},
        {"out_trade_no": 5},
        {"status": "weird"},
        {"status": None},
        {"keys": "CODE-1"},
        {"keys": [{"code": ""}]},
    ],
)
def test_simulator_callback_with_an_untrustworthy_result_is_refused(
    adapters: dict[str, Any], change: dict[str, Any]
) -> None:
    payload = {**SIM_EVENT, **change}
    headers, body = signed(payload)
    assert refusal(adapters["simulator"], headers, body) == "malformed_body"


def test_kameng_callback_is_only_a_nudge(adapters: dict[str, Any]) -> None:
    kameng_adapter = adapters["kameng"]
    forged_result = {**KAMENG_EVENT, "status": "delivered", "keys": KEYS}
    headers, body = signed(forged_result)
    event = kameng_adapter.parse_callback(headers=headers, body=body, now=NOW)
    assert (event.event_id, event.out_trade_no, event.result) == ("evt-9", "K-1", None)
    for change in ({"customer_ref": ""}, {"customer_ref": None}, {"customer_ref": 1}):
        headers, body = signed({**KAMENG_EVENT, **change})
        assert refusal(kameng_adapter, headers, body) == "malformed_body"
    headers, body = signed({k: v for k, v in KAMENG_EVENT.items() if k != "customer_ref"})
    assert refusal(kameng_adapter, headers, body) == "malformed_body"


# -- reason texts ---------------------------------------------------------------------------------

SRC = Path(kameng.__file__).parent
# Procurement-row reasons (never an order's reason, never shown to a reseller).
PROCUREMENT_ONLY = {"update_procurement"}


def _string_values(node: ast.AST) -> set[str]:
    """String constants a `reason` expression can evaluate to (not f-strings, not `x or "y"`
    fallbacks of another variable's value, which are handled where they are formatted)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _string_values(node.body) | _string_values(node.orelse)
    return set()


def _is_reason(name: str) -> bool:
    """`reason`, or a local such as `accepted_reason` that is later passed as `reason=`."""
    return name == "reason" or name.endswith("_reason")


def written_reasons() -> set[str]:
    """Every literal an order's `reason` is set to in the pipeline and the order code."""
    found: set[str] = set()
    files = [*(SRC / "pipeline").glob("*.py"), *(SRC / "orders").glob("*.py")]
    for path in files:
        if path.name == "explain.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in PROCUREMENT_ONLY:
                    continue
                for kw in node.keywords:
                    if kw.arg == "reason":
                        found |= _string_values(kw.value)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and _is_reason(target.id):
                        found |= _string_values(node.value)
                    elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        for t, v in zip(target.elts, node.value.elts, strict=False):
                            if isinstance(t, ast.Name) and _is_reason(t.id):
                                found |= _string_values(v)
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "reason" and v is not None:
                        found |= _string_values(v)
    return found


# What `f"upstream_{reason}"` becomes for the refusals suppliers are known to send.
UPSTREAM_REFUSALS = {
    "upstream_out_of_stock",
    "upstream_maintenance",
    "upstream_insufficient_balance",
    "upstream_not_received",  # a query's not_found
}


def test_the_scan_finds_the_reasons_we_know_about() -> None:
    reasons = written_reasons()
    for expected in (
        "paid_from_balance",
        "own_stock",
        "out_of_stock",
        "awaiting_staff",
        "awaiting_supplier",
        "awaiting_supplier_callback",
        "upstream_delivered",
        "upstream_partial",
        "upstream_partial_refunded",
        "upstream_unknown_outcome",
        "upstream_out_of_stock",
        "upstream_unavailable",
        "no_supplier",
        "restocked",
        "sla_expired_refund",
        "staff_sla_expired",
        "buyer_info_invalid",
        "buyer_action_sla_expired",
    ):
        assert expected in reasons, expected
    assert "order_deadline" not in reasons  # a procurement's reason, not an order's


def test_every_reason_the_pipeline_writes_has_a_sentence_in_both_languages() -> None:
    reasons = written_reasons() | UPSTREAM_REFUSALS | {"canceled_by_buyer", "canceled_by_staff"}
    missing = sorted(r for r in reasons if r not in REASON_TEXT)
    assert not missing, f"reasons without a text: {missing}"
    for reason in reasons:
        zh, en = reason_text(reason, "zh-CN"), reason_text(reason, "en")
        assert zh and en and zh != en, reason
        assert zh != reason and en != reason, reason
        assert any("\u4e00" <= ch <= "\u9fff" for ch in zh), (reason, zh)
        assert en.isascii(), (reason, en)


@pytest.mark.parametrize(
    "code", ["unknown_sku", "bad_request", "supplier_auth_failed", "order_canceled", "rejected"]
)
def test_upstream_codes_without_a_sentence_still_say_what_happened(code: str) -> None:
    reason = f"upstream_{code}"
    assert reason not in REASON_TEXT
    zh, en = reason_text(reason, "zh-CN"), reason_text(reason, "en")
    assert zh == f"上游拒绝（{code}），正在切换其他货源"
    assert en == f"Supplier refused ({code}); trying another source"


def test_reason_text_fallbacks_and_language_choice() -> None:
    assert reason_text("", "en") == "" and reason_text("", "zh-CN") == ""
    assert reason_text("something_new", "en") == "something_new"  # the code, never silence
    assert reason_text("something_new", "zh-CN") == "something_new"
    # a sentence in the table wins over the generic upstream fallback
    assert reason_text("upstream_maintenance", "en") == REASON_TEXT["upstream_maintenance"][1]
    assert "Supplier refused" not in reason_text("upstream_maintenance", "en")
    # anything but "en" reads Chinese
    assert (
        reason_text("restocked", "zh-CN")
        == reason_text("restocked", "ja")
        == "已补货并按排队顺序发货"
    )
    for status in Status:
        assert status.value in STATUS_TEXT, status
        assert status_text(status.value, "en") != status_text(status.value, "zh-CN")
    assert status_text("weird", "en") == "weird"

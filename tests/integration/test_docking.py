"""Two kameng sites docked over real HTTP on loopback: site A buys from site B through B's
Reseller API v1 with the `kameng` supplier adapter.

Each site has its own database (and data dir), its own app on its own port and its own
worker. B sells card keys from stock to A's reseller account; A sells the same keys under its
own SKU to its buyers and procures them from B. We check the keys a buyer gets at A are
exactly the keys B delivered to A, that A never buys twice, that B running out of stock and
recovering reaches A through B's signed webhook, and that A refuses webhooks it cannot trust.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.holding_proxy import HoldingProxy
from tests.support.pipeline import FAST, WorkerThread, wait_for

from kameng.apiclient import ResellerClient
from kameng.app import create_app
from kameng.container import Container
from kameng.pipeline.registry import Adapters
from kameng.pipeline.supplier_checks import reconcile_suppliers
from kameng.security.signing import webhook_header
from kameng.suppliers import service as suppliers
from kameng.suppliers.adapters.kameng import KamengSupplier
from kameng.suppliers.adapters.signed_http import SignedHttp
from kameng.suppliers.port import Outcome
from kameng.suppliers.simulator.runner import ServerThread

B_PRICE = 1_000  # what B charges A per key
A_PRICE = 1_500  # what A charges its buyer per key
SUPPLIER = "siteb"
# B's rows about the order it holds for A's order number :n.
OF_A_ORDER = "order_id IN (SELECT id FROM orders WHERE customer_ref = :n)"

# A's first poll of an accepted purchase after 60 s, later ones at least 30 s apart: anything
# A learns sooner came through B's webhook.
SLOW_POLLS = {"supplier_poll_s": 60, "supplier_retry_cap_s": 120}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.pg),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the two sites ------------------------------------------------------------------------------


@dataclass
class Site:
    name: str
    container: Container
    url: str

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.container.db.connect(write=False) as conn:
            return list(conn.execute(text(query), params).all())


@dataclass
class Docked:
    a: Site
    b: Site
    a_sku: str  # A's SKU code, mapped by offer to…
    b_sku: str  # …B's SKU code
    a_at_b: factories.ResellerCreds  # A's reseller account at B
    buyer: factories.ResellerCreds  # a buyer at A
    callback_url: str  # A's callback endpoint for B

    def __post_init__(self) -> None:
        self.buyer_at_a = ResellerClient(self.a.url, self.buyer.api_key, self.buyer.api_secret)
        self.a_as_reseller_at_b = ResellerClient(
            self.b.url, self.a_at_b.api_key, self.a_at_b.api_secret
        )

    def close(self) -> None:
        # Idle keep-alive connections would hold up each server's graceful shutdown.
        self.buyer_at_a.http.close()
        self.a_as_reseller_at_b.http.close()

    # -- acting as A's buyer -----------------------------------------------------------------
    def order_at_a(self, quantity: int = 1) -> dict[str, Any]:
        resp = self.buyer_at_a.request(
            "POST",
            "/api/v1/orders",
            body={
                "sku": self.a_sku,
                "quantity": quantity,
                "fields": {},
                "customer_ref": "buyer-" + secrets.token_hex(4),
            },
            idempotency_key=secrets.token_hex(8),
        )
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def get_at_a(self, order_no: str) -> dict[str, Any]:
        resp = self.buyer_at_a.request("GET", f"/api/v1/orders/{order_no}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def a_status(self, order_no: str) -> str:
        rows = self.a.sql("SELECT status FROM orders WHERE order_no = :n", n=order_no)
        return str(rows[0][0])

    def wait_a(self, order_no: str, statuses: set[str], timeout: float = 15) -> str:
        return str(
            wait_for(
                lambda: (s := self.a_status(order_no)) in statuses and s,
                timeout,
                lambda: (
                    f"A's {order_no} still {self.a_status(order_no)}: "
                    f"{self.get_at_a(order_no)['timeline']}"
                ),
            )
        )

    # -- looking at B with A's credentials ---------------------------------------------------
    def b_orders_for(self, a_order_no: str) -> list[dict[str, Any]]:
        resp = self.a_as_reseller_at_b.request(
            "GET", "/api/v1/orders", params={"customer_ref": a_order_no, "limit": 100}
        )
        assert resp.status_code == 200, resp.text
        found: list[dict[str, Any]] = resp.json()["orders"]
        return found

    def the_b_order_for(self, a_order_no: str) -> dict[str, Any]:
        found = self.b_orders_for(a_order_no)
        assert len(found) == 1, f"B holds {len(found)} orders for A's {a_order_no}"
        resp = self.a_as_reseller_at_b.request("GET", f"/api/v1/orders/{found[0]['order_no']}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def b_order_count(self) -> int:
        rows = self.b.sql(
            "SELECT count(*) FROM orders WHERE reseller_id = :r", r=self.a_at_b.reseller_id
        )
        return int(rows[0][0])

    def a_balance_at_b(self) -> int:
        return factories.wallet_balance(self.b.container, self.a_at_b.reseller_id)[0]

    def books_clean(self) -> None:
        factories.assert_books_clean(self.a.container)
        factories.assert_books_clean(self.b.container)


def key_set(keys: list[dict[str, Any]] | None) -> set[tuple[str, str | None]]:
    return {(k["code"], k.get("secret")) for k in keys or []}


@contextmanager
def docked(
    backend: str,
    tmp_path: Path,
    *,
    b_stock: int,
    a_settings: dict[str, Any] | None = None,
    supplier_url: str | None = None,
    timeout_ms: int = 5_000,
    workers: bool = True,
    b_port: int | None = None,
) -> Iterator[Docked]:
    """B (with `b_stock` keys) and A (buying from B at `supplier_url`, default B's own URL)."""
    with ExitStack() as stack:
        sites: dict[str, Site] = {}
        for name, extra in (("b", {}), ("a", a_settings or {})):
            port = b_port if name == "b" and b_port else factories.free_port()
            url = f"http://127.0.0.1:{port}"
            container = stack.enter_context(
                backend_container(backend, tmp_path / name, **{**FAST, "public_url": url, **extra})
            )
            server = ServerThread(create_app(container), port=port).start()
            stack.callback(server.stop)
            assert server.url == url
            sites[name] = Site(name, container, url)
        a, b = sites["a"], sites["b"]

        # B: a card-key product and A's reseller account, funded.
        b_sku = factories.add_product(
            b.container, price_cents=B_PRICE, cost_cents=600, stock=b_stock
        )
        a_at_b = factories.add_reseller(b.container, name="site-a", balance_cents=100_000)

        # A: its own SKU, B as a supplier (adapter `kameng`) with an offer for B's SKU.
        a_sku = factories.add_product(a.container, price_cents=A_PRICE, cost_cents=B_PRICE)
        with a.container.db.connect() as conn:
            supplier_id = suppliers.create_supplier(
                conn,
                a.container.vault,
                code=SUPPLIER,
                name="Site B",
                adapter="kameng",
                base_url=supplier_url or b.url,
                api_key=a_at_b.api_key,
                secret=a_at_b.api_secret,
                timeout_ms=timeout_ms,
                now=a.container.clock(),
            )
            suppliers.add_offer(
                conn,
                sku_id=a.container.sku(a_sku).id,
                supplier_id=supplier_id,
                supplier_sku=b_sku,
                cost_cents=B_PRICE,
                now=a.container.clock(),
            )
        a.container.invalidate_caches()
        buyer = factories.add_reseller(a.container, name="buyer", balance_cents=100_000)

        if workers:
            for site in (b, a):
                thread = WorkerThread(site.container).start()
                stack.callback(thread.stop)
        pair = Docked(
            a=a,
            b=b,
            a_sku=a_sku,
            b_sku=b_sku,
            a_at_b=a_at_b,
            buyer=buyer,
            callback_url=f"{a.url}/api/v1/callbacks/suppliers/{SUPPLIER}",
        )
        stack.callback(pair.close)
        yield pair


# -- 1. happy path --------------------------------------------------------------------------------


def test_a_buys_from_b_and_delivers_b_keys(backend: str, tmp_path: Path) -> None:
    with docked(backend, tmp_path, b_stock=5) as d:
        placed = [d.order_at_a(quantity=2), d.order_at_a(quantity=1)]
        for p in placed:
            assert (p["status"], p["stage"]) == ("fulfilling", "procuring"), p
        for p in placed:
            d.wait_a(p["order_no"], {"delivered"})

        seen: set[tuple[str, str | None]] = set()
        for p in placed:
            at_a = d.get_at_a(p["order_no"])
            at_b = d.the_b_order_for(p["order_no"])  # exactly one B order per A order
            assert at_b["status"] == "delivered"
            assert at_b["customer_ref"] == p["order_no"]
            assert len(at_a["keys"]) == at_a["quantity"] == at_b["quantity"]
            assert key_set(at_a["keys"]) == key_set(at_b["keys"])
            assert not seen & key_set(at_a["keys"]), "a key was sold twice"
            seen |= key_set(at_a["keys"])
            assert at_a["timeline"][-1]["reason"] == "upstream_delivered"
        assert d.b_order_count() == 2
        # A paid B once per order, its buyer paid A once per order.
        assert d.a_balance_at_b() == 100_000 - 3 * B_PRICE
        assert factories.wallet_balance(d.a.container, d.buyer.reseller_id)[0] == (
            100_000 - 3 * A_PRICE
        )
        d.books_clean()


# -- 2. B out of stock, then restocked; B's webhook brings A the news ---------------------------


def test_b_out_of_stock_then_restocked_reaches_a_by_webhook(backend: str, tmp_path: Path) -> None:
    # With SLOW_POLLS, a delivery within seconds of the restock can only come from B's webhook.
    with docked(backend, tmp_path, b_stock=0, a_settings=SLOW_POLLS) as d:
        placed = d.order_at_a(quantity=2)
        no = placed["order_no"]

        # B holds A's order as a backorder; A says it is waiting on its supplier, and why.
        wait_for(lambda: d.b_orders_for(no), 10, lambda: f"no order at B for {no}")
        at_b = d.the_b_order_for(no)
        assert (at_b["status"], at_b["reason"]) == ("backordered", "out_of_stock")
        # B announces each of its order's changes (paid, then backordered): two nudges that
        # make A ask at once; A then waits for the next news or its own (slow) poll.
        wait_for(
            lambda: len(d.a.sql("SELECT event_id FROM supplier_events")) == 2,
            10,
            lambda: f"A's callbacks: {d.a.sql('SELECT event_id FROM supplier_events')}",
        )

        def settled_at_a() -> dict[str, Any] | None:
            at_a = d.get_at_a(no)
            if at_a["stage"] != "awaiting_supplier" or not at_a["next_action_at"]:
                return None
            next_poll = datetime.fromisoformat(at_a["next_action_at"])
            return at_a if next_poll - datetime.now(UTC) > timedelta(seconds=25) else None

        at_a = wait_for(settled_at_a, 10, lambda: f"A's order: {d.get_at_a(no)}")
        assert at_a["status"] == "fulfilling" and at_a["keys"] is None
        assert at_a["reason"], "A's buyer must be told why the order waits"
        last = at_a["timeline"][-1]
        assert last["stage"] == "awaiting_supplier" and last["reason"] and last["reason_text"]
        proc = d.a.sql("SELECT state, trade_no FROM procurements WHERE out_trade_no = :n", n=no)
        assert [(r.state, r.trade_no) for r in proc] == [("accepted", at_b["order_no"])]
        before_restock = len(d.a.sql("SELECT event_id FROM supplier_events"))

        # A will not look at B again on its own for a long while.
        next_poll = datetime.fromisoformat(at_a["next_action_at"])

        # B restocks; B's worker serves its backorder and tells A.
        factories.add_stock(
            d.b.container, d.b_sku, [f"RESTOCK-{i}-{secrets.token_hex(4)}" for i in range(3)]
        )
        d.wait_a(no, {"delivered"}, timeout=20)
        delivered_at = datetime.fromisoformat(d.get_at_a(no)["delivered_at"])
        assert delivered_at < next_poll, "A learnt it from a scheduled poll, not from B"

        at_b = d.the_b_order_for(no)  # still exactly one purchase at B
        at_a = d.get_at_a(no)
        assert at_b["status"] == "delivered"
        assert len(at_a["keys"]) == 2
        assert key_set(at_a["keys"]) == key_set(at_b["keys"])
        assert all(code.startswith("RESTOCK-") for code, _ in key_set(at_a["keys"]))
        assert at_a["timeline"][-1]["reason"] == "upstream_delivered"

        # The path was B's outbox → A's callback endpoint → A's poll.
        sent = d.b.sql(f"SELECT event_id, target_url, state FROM outbox WHERE {OF_A_ORDER}", n=no)
        assert sent and all(r.target_url == d.callback_url for r in sent), sent
        received = d.a.sql("SELECT event_id, out_trade_no, outcome FROM supplier_events")
        assert received and all((r.out_trade_no, r.outcome) == (no, "nudge") for r in received)
        assert {r.event_id for r in received} <= {r.event_id for r in sent}
        assert len(received) > before_restock, "no news from B after its restock"
        wait_for(
            lambda: all(
                r.state == "sent"
                for r in d.b.sql(f"SELECT state FROM outbox WHERE {OF_A_ORDER}", n=no)
            ),
            10,
        )

        assert d.b_order_count() == 1
        assert d.a_balance_at_b() == 100_000 - 2 * B_PRICE
        d.books_clean()


# -- 3. a lost answer never buys twice ----------------------------------------------------------


class LosingProxy:
    """A loopback hop between A and B that forwards everything except A's first order
    placement, which it loses one of two ways:

    * `answer`: forwarded, but answered only after A has given up (B bought, A never heard);
    * `request`: never forwarded, answered 502 (B never heard of it).
    """

    def __init__(self, target: str, *, lose: str, late_s: float = 3.0) -> None:
        self.target = target
        self.lose = lose
        self.late_s = late_s
        self.lost: list[str] = []
        self.placements: list[str] = []  # customer_ref of every order placement A sent

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["raw_path"].decode()
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode()
        headers = [
            (k.decode(), v.decode())
            for k, v in scope["headers"]
            if k.lower() not in (b"host", b"content-length", b"connection")
        ]
        placing = scope["method"] == "POST" and scope["path"] == "/api/v1/orders"
        if placing:
            self.placements.append(json.loads(body)["customer_ref"])
        losing = placing and not self.lost
        if losing:
            self.lost.append(self.placements[-1])
            if self.lose == "request":
                await send({"type": "http.response.start", "status": 502, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        async with httpx.AsyncClient(base_url=self.target, timeout=10, trust_env=False) as c:
            resp = await c.request(scope["method"], path, content=body, headers=headers)
        if losing:
            await asyncio.sleep(self.late_s)
        await send(
            {
                "type": "http.response.start",
                "status": resp.status_code,
                "headers": [
                    (b"content-type", resp.headers.get("content-type", "").encode()),
                    (b"content-length", str(len(resp.content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": resp.content})


@pytest.mark.parametrize("lose", ["answer", "request"])
def test_a_lost_purchase_is_resolved_by_query_never_bought_twice(
    backend: str, tmp_path: Path, lose: str
) -> None:
    """`answer`: the query finds B's order and A takes its keys. `request`: the query finds
    nothing, so A re-sends under the same number (B deduplicates on it) and B sells once."""
    # The proxy needs B's URL and A's supplier row needs the proxy's: start the proxy on a
    # port of its own first, pointing at a port picked for B.
    b_port = factories.free_port()
    proxy = LosingProxy(f"http://127.0.0.1:{b_port}", lose=lose, late_s=2.5)
    with ServerThread(proxy) as hop:
        hop.start()
        with docked(
            backend,
            tmp_path,
            b_stock=3,
            supplier_url=hop.url,
            timeout_ms=1_000,
            b_port=b_port,
        ) as d:
            placed = d.order_at_a(quantity=2)
            no = placed["order_no"]
            d.wait_a(no, {"delivered"}, timeout=20)
            assert proxy.lost == [no], "the first purchase answer was not the one lost"

            at_a = d.get_at_a(no)
            at_b = d.the_b_order_for(no)  # one order at B despite the lost answer
            assert key_set(at_a["keys"]) == key_set(at_b["keys"]) and len(at_a["keys"]) == 2
            reasons = [e["reason"] for e in at_a["timeline"]]
            assert "upstream_unknown_outcome" in reasons, reasons
            assert reasons[-1] == "upstream_delivered"
            proc = d.a.sql(
                "SELECT state, trade_no, attempts FROM procurements WHERE out_trade_no = :n",
                n=no,
            )
            assert [(r.state, r.trade_no) for r in proc] == [("delivered", at_b["order_no"])]
            # `attempts`: the first send, +1 per unknown outcome, +1 per re-send (so at least
            # 2 when the answer was lost, 3 when the request was lost and sent again).
            assert proc[0].attempts >= (2 if lose == "answer" else 3), proc
            # On the wire: after a lost answer A only asked; after a lost request it sent the
            # same order once more.
            assert proxy.placements == ([no] if lose == "answer" else [no, no])
            assert d.b_order_count() == 1
            assert d.a_balance_at_b() == 100_000 - 2 * B_PRICE
            d.books_clean()


def test_purchases_held_in_the_network_are_bought_once_at_b(backend: str, tmp_path: Path) -> None:
    """Every copy of A's order placement sits in the network for seconds past A's timeout
    (re-sent copies too), and then reaches B. A keeps re-sending under its own number and
    asking; B's Idempotency-Key turns every copy into the one order; nothing is bought twice,
    and A's reconciliation of B's books against its own is clean."""
    b_port = factories.free_port()
    proxy = HoldingProxy(
        f"http://127.0.0.1:{b_port}",
        lambda method, path, body: 5.0 if (method, path) == ("POST", "/api/v1/orders") else 0.0,
    )
    with ServerThread(proxy) as hop:
        hop.start()
        with docked(
            backend, tmp_path, b_stock=6, supplier_url=hop.url, timeout_ms=1_000, b_port=b_port
        ) as d:
            placed = [d.order_at_a(quantity=q)["order_no"] for q in (1, 2, 1)]
            for no in placed:
                d.wait_a(no, {"delivered"}, timeout=40)
            wait_for(lambda: proxy.pending == 0, 30, lambda: f"{proxy.pending} still held")
            time.sleep(0.5)
            assert len(proxy.held) > len(placed), proxy.held  # copies re-sent while held
            # Each late copy is answered with the one order (201, or 200 replayed), or 409
            # when it lands while another copy of the same number is being placed.
            assert proxy.late_answers and set(proxy.late_answers) <= {200, 201, 409}, (
                proxy.late_answers
            )

            for no in placed:
                at_a, at_b = d.get_at_a(no), d.the_b_order_for(no)  # one B order per A order
                assert key_set(at_a["keys"]) == key_set(at_b["keys"])
            assert d.b_order_count() == 3
            assert d.a_balance_at_b() == 100_000 - 4 * B_PRICE
            procs = d.a.sql("SELECT out_trade_no, state FROM procurements ORDER BY id")
            assert [(p.out_trade_no, p.state) for p in procs] == [
                (no, "delivered") for no in placed
            ]
            d.books_clean()
            adapters = Adapters(d.a.container.vault)

            async def reconcile() -> list[Any]:
                try:
                    now = d.a.container.clock()
                    return await reconcile_suppliers(
                        d.a.container, adapters.get, since=now - timedelta(hours=1), until=now
                    )
                finally:
                    await adapters.aclose()

            (report,) = asyncio.run(reconcile())
            assert report.ok and report.checked == 3, report.as_dict()


def test_adapter_purchase_retried_under_the_same_number_is_one_order(
    backend: str, tmp_path: Path
) -> None:
    with docked(backend, tmp_path, b_stock=3, workers=False) as d:
        order_no = "A-RETRY-" + secrets.token_hex(4)
        callback = d.callback_url

        async def talk() -> list[Any]:
            adapter = KamengSupplier(
                SignedHttp(
                    base_url=d.b.url,
                    api_key=d.a_at_b.api_key,
                    secret=d.a_at_b.api_secret,
                    timeout_s=10,
                )
            )
            try:
                first = await adapter.purchase(
                    order_no=order_no, sku=d.b_sku, quantity=2, fields={}, callback_url=callback
                )
                again = await adapter.purchase(
                    order_no=order_no, sku=d.b_sku, quantity=2, fields={}, callback_url=callback
                )
                # The same number with a different request must not buy either: "maybe bought".
                changed = await adapter.purchase(
                    order_no=order_no, sku=d.b_sku, quantity=1, fields={}, callback_url=callback
                )
                found = await adapter.query(order_no=order_no)
                missing = await adapter.query(order_no="A-NEVER-" + secrets.token_hex(4))
                return [first, again, changed, found, missing]
            finally:
                await adapter.aclose()

        first, again, changed, found, missing = asyncio.run(talk())
        assert first.outcome is Outcome.delivered and len(first.keys) == 2
        assert again.outcome is Outcome.delivered
        assert first.trade_no and again.trade_no == first.trade_no == found.trade_no
        assert again.keys == first.keys == found.keys
        assert changed.outcome is Outcome.unknown and changed.detail == "idempotency_key_reused"
        assert missing.outcome is Outcome.not_found
        assert d.b_order_count() == 1
        assert d.the_b_order_for(order_no)["order_no"] == first.trade_no
        assert d.a_balance_at_b() == 100_000 - 2 * B_PRICE
        factories.assert_books_clean(d.b.container)


# -- 4. webhooks A cannot trust --------------------------------------------------------------------


def test_forged_webhooks_to_a_change_nothing(backend: str, tmp_path: Path) -> None:
    with docked(backend, tmp_path, b_stock=0, a_settings=SLOW_POLLS) as d:
        placed = d.order_at_a(quantity=1)
        no = placed["order_no"]
        wait_for(
            lambda: d.get_at_a(no)["stage"] == "awaiting_supplier",
            10,
            lambda: f"A's order: {d.get_at_a(no)}",
        )
        b_no = d.the_b_order_for(no)["order_no"]
        # B's own news of the order (paid, backordered) reaches A first; let it settle.
        wait_for(
            lambda: (
                len(d.a.sql("SELECT event_id FROM supplier_events")) == 2
                and all(
                    r.state == "sent"
                    for r in d.b.sql(f"SELECT state FROM outbox WHERE {OF_A_ORDER}", n=no)
                )
            ),
            10,
        )
        wait_for(
            lambda: (
                datetime.fromisoformat(d.get_at_a(no)["next_action_at"])
                > datetime.now(UTC) + timedelta(seconds=25)
            ),
            10,
            lambda: f"A's order: {d.get_at_a(no)}",
        )

        def version_of(order_no: str) -> int:
            rows = d.a.sql("SELECT version FROM orders WHERE order_no = :n", n=order_no)
            return int(rows[0][0])

        def snapshot() -> tuple[Any, ...]:
            order = d.a.sql(
                "SELECT status, stage, reason, version FROM orders WHERE order_no = :n", n=no
            )
            procs = d.a.sql("SELECT state, keys_received FROM procurements")
            events = d.a.sql("SELECT count(*) FROM supplier_events")
            return tuple(tuple(r) for r in (*order, *procs, *events))

        payload = {
            "event_id": "evt_" + secrets.token_hex(8),
            "type": "order.updated",
            "order_no": b_no,
            "customer_ref": no,
            "status": "delivered",
            "stage": "delivered",
            "reason": "restocked",
            "keys": [{"code": "FORGED-KEY", "secret": None}],
            "at": "2030-01-01T00:00:00+00:00",
        }
        body = json.dumps(payload).encode()
        now = int(time.time())

        def post(header: str, raw: bytes = body, code: str = SUPPLIER) -> httpx.Response:
            return httpx.post(
                f"{d.a.url}/api/v1/callbacks/suppliers/{code}",
                content=raw,
                headers={"Content-Type": "application/json", "X-Kameng-Signature": header},
                timeout=10,
                trust_env=False,
            )

        # Wrong secret, no signature, a stale one, a tampered body: 401, nothing changes.
        before, version = snapshot(), version_of(no)
        refused = [
            post(webhook_header("not-" + d.a_at_b.api_secret, now, body)),
            post(webhook_header(d.buyer.api_secret, now, body)),
            post(""),
            post(webhook_header(d.a_at_b.api_secret, now - 3_600, body)),
            post(webhook_header(d.a_at_b.api_secret, now, body), raw=body + b" "),
        ]
        for resp in refused:
            assert resp.status_code == 401, resp.text
            assert resp.json() == {"status": "refused", "code": "bad_signature"}
        # A supplier A does not have at all: 404, nothing changes.
        ghost = post(webhook_header(d.a_at_b.api_secret, now, body), code="nosuch")
        assert ghost.status_code == 404
        assert snapshot() == before  # (A's own polls are a minute apart here)
        assert d.a_status(no) == "fulfilling"

        # Even correctly signed, a webhook is only a nudge: A asks B, B says "still waiting",
        # so the made-up "delivered" with a made-up key delivers nothing.
        nudge = post(webhook_header(d.a_at_b.api_secret, now, body))
        assert nudge.status_code == 200 and nudge.json()["outcome"] == "nudged", nudge.text
        replay = post(webhook_header(d.a_at_b.api_secret, now, body))
        assert replay.json()["outcome"] == "duplicate"
        other = dict(payload, event_id="evt_" + secrets.token_hex(8), customer_ref="NOT-OURS")
        raw = json.dumps(other).encode()
        unknown = post(webhook_header(d.a_at_b.api_secret, now, raw), raw=raw)
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_order"
        # The nudge made the order due now (version +1), A's worker asked B and rescheduled
        # it (+1 again): only then is there anything to look at.
        wait_for(lambda: version_of(no) >= version + 2, 10, lambda: f"{version_of(no)}")
        at_a = d.get_at_a(no)
        assert at_a["status"] == "fulfilling" and at_a["keys"] is None
        # B's two own nudges, and the one forged-but-signed webhook above.
        assert d.a.sql("SELECT count(*) FROM supplier_events")[0][0] == 3
        assert d.a.sql("SELECT count(*) FROM card_keys")[0][0] == 0
        assert d.b_order_count() == 1
        d.books_clean()

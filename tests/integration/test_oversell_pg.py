"""No overselling on PostgreSQL: hundreds of concurrent purchases racing for 50 keys.

DESIGN §5.2 (a key goes to at most one order line; never oversold) and §5.1 (money) under
real concurrency: many threads, many resellers, real HTTP against the live server, and the
same race again at the service level without HTTP.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from tests.support import factories

from kameng.apiclient import ResellerClient
from kameng.container import Container
from kameng.ledger.service import InsufficientFunds
from kameng.orders import fulfil
from kameng.orders import service as orders
from kameng.resellers import service as resellers

pytestmark = pytest.mark.pg

N_KEYS = 50
N_ORDERS = 220
N_RESELLERS = 20
N_THREADS = 64
PRICE = 1000
INITIAL = 60_000  # more than any reseller can spend here (at most ~20 orders x 3 keys)


@dataclass
class Outcome:
    ref: str
    reseller: int
    quantity: int
    status_code: int
    body: dict[str, Any]


def _orders_of_sku(container: Container, sku_code: str) -> list[Any]:
    sku = container.sku(sku_code)
    with container.db.connect(write=False) as conn:
        return list(
            conn.execute(
                text(
                    "SELECT o.id, o.order_no, o.reseller_id, o.customer_ref, o.status, "
                    "o.amount_cents, o.paid_cents, o.hold_id, o.next_action_at, l.id AS line_id, "
                    "l.quantity, h.state AS hold_state, h.amount_cents AS hold_amount, "
                    "h.account_id AS hold_account "
                    "FROM orders o JOIN order_lines l ON l.order_id = o.id "
                    "LEFT JOIN ledger_holds h ON h.id = o.hold_id "
                    "WHERE o.sku_id = :sku ORDER BY o.id"
                ),
                {"sku": sku.id},
            )
        )


def _key_rows(container: Container, sku_code: str) -> list[Any]:
    sku = container.sku(sku_code)
    with container.db.connect(write=False) as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, state, order_line_id, fingerprint FROM card_keys "
                    "WHERE sku_id = :sku ORDER BY id"
                ),
                {"sku": sku.id},
            )
        )


def _assert_race_outcome(
    container: Container,
    sku_code: str,
    creds: list[factories.ResellerCreds],
    n_orders: int,
) -> tuple[int, int, int]:
    """Every invariant of the race; returns (delivered orders, backordered orders, keys sold)."""
    rows = _orders_of_sku(container, sku_code)
    assert len(rows) == n_orders
    statuses = Counter(r.status for r in rows)
    assert set(statuses) <= {"delivered", "backordered"}, statuses

    keys = _key_rows(container, sku_code)
    assert len(keys) == N_KEYS
    sold = [k for k in keys if k.state == "sold"]
    available = [k for k in keys if k.state == "available"]
    assert len(sold) + len(available) == N_KEYS
    # A key row names one line; each line holds exactly its quantity, and only delivered lines.
    per_line = Counter(k.order_line_id for k in sold)
    assert None not in per_line
    delivered = [r for r in rows if r.status == "delivered"]
    backordered = [r for r in rows if r.status == "backordered"]
    assert per_line == Counter({r.line_id: r.quantity for r in delivered})
    assert len({bytes(k.fingerprint) for k in keys}) == N_KEYS

    delivered_keys = sum(r.quantity for r in delivered)
    assert delivered_keys == len(sold) <= N_KEYS
    demand = sum(r.quantity for r in rows)
    assert demand >= N_KEYS
    if not backordered:
        assert delivered_keys == demand

    wallets: dict[int, int] = {}
    with container.db.connect(write=False) as conn:
        for c in creds:
            wallets[c.reseller_id] = resellers.reseller_wallet(conn, reseller_id=c.reseller_id)
    for r in backordered:
        assert r.hold_id is not None
        assert r.hold_state == "pending"
        assert r.hold_amount == r.amount_cents == r.paid_cents == r.quantity * PRICE
        assert r.hold_account == wallets[r.reseller_id]
        assert r.next_action_at is not None
    for r in delivered:
        assert r.hold_id is None

    spent: dict[int, int] = defaultdict(int)
    held: dict[int, int] = defaultdict(int)
    for r in delivered:
        spent[r.reseller_id] += r.amount_cents
    for r in backordered:
        held[r.reseller_id] += r.amount_cents
    for c in creds:
        balance, on_hold = factories.wallet_balance(container, c.reseller_id)
        assert on_hold == held[c.reseller_id]
        assert balance + on_hold == INITIAL - spent[c.reseller_id], c.name
    factories.assert_books_clean(container)
    return len(delivered), len(backordered), delivered_keys


def _assert_queue_head_is_short_or_served(container: Container, sku_code: str) -> None:
    """New orders queue behind waiting ones (FIFO per SKU), so keys may be left while a later,
    smaller order waits. What must hold: the head of the queue cannot be served from what is
    left — or, where racing commits left it servable, the worker's next pass over the queue
    (oldest first) serves exactly it first."""
    waiting = [r for r in _orders_of_sku(container, sku_code) if r.status == "backordered"]
    available = [k for k in _key_rows(container, sku_code) if k.state == "available"]
    if not waiting or len(available) < waiting[0].quantity:
        return
    with container.db.connect() as conn:
        served = fulfil.serve_backorders(
            conn,
            sku_id=container.sku(sku_code).id,
            accounts=container.accounts,
            now=container.clock(),
        )
    assert served and served[0] == waiting[0].id, (len(available), waiting[0].quantity, served)
    factories.assert_books_clean(container)


def _setup(container: Container, rng: random.Random) -> tuple[str, list[Any], list[Any]]:
    sku = factories.add_product(container, price_cents=PRICE, stock=N_KEYS, max_quantity=3)
    creds = [factories.add_reseller(container, balance_cents=INITIAL) for _ in range(N_RESELLERS)]
    plan = [(rng.randrange(N_RESELLERS), rng.randint(1, 3)) for _ in range(N_ORDERS)]
    return sku, creds, plan


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_http_race_for_fifty_keys_never_oversells(pg_container: Container, seed: int) -> None:
    rng = random.Random(seed)
    sku, creds, plan = _setup(pg_container, rng)
    pg_container.invalidate_caches()  # start cold, as after a restart
    start = threading.Barrier(N_THREADS, timeout=30)
    local = threading.local()
    opened: list[httpx.Client] = []

    with factories.live_server(pg_container) as url:

        def buy(job: tuple[int, tuple[int, int]]) -> Outcome:
            i, (who, qty) = job
            if i < N_THREADS:
                start.wait()  # the first wave leaves together
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=url, timeout=60)
                opened.append(local.http)
            c = creds[who]
            client = ResellerClient(url, c.api_key, c.api_secret, client=local.http)
            ref = f"seed{seed}-order{i}"
            resp = client.create_order(sku, qty, customer_ref=ref)
            body = resp.json() if resp.headers.get("content-type", "").startswith("app") else {}
            return Outcome(ref, creds[who].reseller_id, qty, resp.status_code, body)

        try:
            with ThreadPoolExecutor(N_THREADS) as pool:
                outcomes = list(pool.map(buy, enumerate(plan)))
        finally:
            for http in opened:
                http.close()

    bad = [(o.ref, o.status_code, o.body) for o in outcomes if o.status_code != 201]
    assert not bad, bad[:5]
    by_status = Counter(o.body["status"] for o in outcomes)
    # What the buyers were told matches what the database holds.
    rows = {r.customer_ref: r for r in _orders_of_sku(pg_container, sku)}
    codes: list[str] = []
    for o in outcomes:
        row = rows[o.ref]
        assert row.status == o.body["status"]
        assert row.reseller_id == o.reseller and row.quantity == o.quantity
        if o.body["status"] == "delivered":
            assert len(o.body["keys"]) == o.quantity
            codes.extend(k["code"] for k in o.body["keys"])
        else:
            assert o.body["keys"] is None
            assert o.body["next_action_at"] is not None
    assert len(codes) == len(set(codes)), "a key was delivered twice"

    n_delivered, n_backordered, n_keys = _assert_race_outcome(pg_container, sku, creds, N_ORDERS)
    assert len(codes) == n_keys
    assert by_status == Counter({"delivered": n_delivered, "backordered": n_backordered})
    print(
        f"seed {seed}: delivered {n_delivered} orders / {n_keys} keys, backordered {n_backordered}"
    )
    _assert_queue_head_is_short_or_served(pg_container, sku)


@pytest.mark.parametrize("seed", [7])
def test_service_race_for_fifty_keys_never_oversells(pg_container: Container, seed: int) -> None:
    """The same race straight through `orders.place_order`, one transaction per thread."""
    rng = random.Random(seed)
    sku_code, creds, plan = _setup(pg_container, rng)
    sku = pg_container.sku(sku_code)
    accounts = pg_container.accounts
    with pg_container.db.connect(write=False) as conn:
        wallets = [resellers.reseller_wallet(conn, reseller_id=c.reseller_id) for c in creds]
    start = threading.Barrier(16, timeout=30)

    def buy(job: tuple[int, tuple[int, int]]) -> str:
        i, (who, qty) = job
        if i < 16:
            start.wait()
        with pg_container.db.connect() as conn:
            placed = orders.place_order(
                conn,
                buyer=orders.Buyer(creds[who].reseller_id, wallets[who], "reseller:test"),
                cmd=orders.PlaceOrder(
                    sku=sku,
                    unit_price_cents=PRICE,
                    quantity=qty,
                    fields={},
                    customer_ref=f"svc{seed}-{i}",
                ),
                accounts=accounts,
                vault=pg_container.vault,
                policy=pg_container.policy,
                now=pg_container.clock(),
            )
        return placed.status.value

    with ThreadPoolExecutor(16) as pool:
        statuses = Counter(pool.map(buy, enumerate(plan)))
    n_delivered, n_backordered, n_keys = _assert_race_outcome(
        pg_container, sku_code, creds, N_ORDERS
    )
    assert statuses == Counter({"delivered": n_delivered, "backordered": n_backordered})
    print(
        f"service seed {seed}: delivered {n_delivered} orders / {n_keys} keys, "
        f"backordered {n_backordered}"
    )
    _assert_queue_head_is_short_or_served(pg_container, sku_code)


def test_refused_buyers_roll_back_and_never_keep_a_key(pg_container: Container) -> None:
    """Orders refused for lack of funds roll back completely, even mid-race."""
    sku_code = factories.add_product(pg_container, price_cents=PRICE, stock=10, max_quantity=3)
    sku = pg_container.sku(sku_code)
    rich = factories.add_reseller(pg_container, balance_cents=INITIAL)
    poor = factories.add_reseller(pg_container, balance_cents=PRICE)  # can afford one key
    accounts = pg_container.accounts
    with pg_container.db.connect(write=False) as conn:
        wallet = {
            c.reseller_id: resellers.reseller_wallet(conn, reseller_id=c.reseller_id)
            for c in (rich, poor)
        }
    start = threading.Barrier(16, timeout=30)

    def buy(job: tuple[int, factories.ResellerCreds]) -> str:
        i, who = job
        if i < 16:
            start.wait()
        try:
            with pg_container.db.connect() as conn:
                placed = orders.place_order(
                    conn,
                    buyer=orders.Buyer(who.reseller_id, wallet[who.reseller_id], "reseller:t"),
                    cmd=orders.PlaceOrder(
                        sku=sku,
                        unit_price_cents=PRICE,
                        quantity=1,
                        fields={},
                        customer_ref=f"p{i}",
                    ),
                    accounts=accounts,
                    vault=pg_container.vault,
                    policy=pg_container.policy,
                    now=pg_container.clock(),
                )
                return placed.status.value
        except InsufficientFunds:
            return "refused"

    jobs = [(i, poor if i % 2 else rich) for i in range(30)]
    with ThreadPoolExecutor(16) as pool:
        results = Counter(pool.map(buy, jobs))
    assert results["refused"] == 14, results  # the poor reseller can pay for one order only
    assert results["delivered"] + results["backordered"] == 16, results
    assert factories.wallet_balance(pg_container, poor.reseller_id) in {(0, 0), (0, PRICE)}
    rows = _orders_of_sku(pg_container, sku_code)
    assert len(rows) == 16  # refused orders left no row behind
    keys = _key_rows(pg_container, sku_code)
    sold = Counter(k.order_line_id for k in keys if k.state == "sold")
    assert sold == Counter({r.line_id: 1 for r in rows if r.status == "delivered"})
    factories.assert_books_clean(pg_container)


def test_a_request_never_needs_two_pooled_connections(pg_container: Container) -> None:
    """A request holds one connection at a time, so a busy pool slows requests, never kills them.

    Deterministic form of what 64 concurrent buyers do to a pool of 16: every connection but
    one is busy, and the caches are cold (as after start-up or every CATALOG_TTL_S seconds).
    Found by the race above (the catalog cache used to load on a second pooled connection;
    fixed in c00083b); kept as a regression test.
    """
    sku = factories.add_product(pg_container, price_cents=PRICE, stock=3)
    creds = factories.add_reseller(pg_container, balance_cents=INITIAL)
    pool: Any = pg_container.db.engine.pool
    pool._timeout = 3  # fail in seconds instead of the default 30
    capacity = pool.size() + pool._max_overflow
    with factories.live_server(pg_container) as url:
        client = factories.client_for(url, creds)
        pg_container.invalidate_caches()
        busy = [pg_container.db.engine.connect() for _ in range(capacity - 1)]
        try:
            resp = client.create_order(sku, 1, customer_ref="one-connection")
        finally:
            for conn in busy:
                conn.close()
    assert resp.status_code == 201, resp.text

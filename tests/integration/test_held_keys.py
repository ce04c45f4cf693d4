"""Keys held for an order line (set aside at screening, or bought from a supplier and waiting
for the rest): counted, sold and returned per line, never another line's.

Every function that touches held keys filters on the line; with one line in the database a
missing filter goes unnoticed, so every test here holds keys for several lines at once. A
claim with `hold=True` that comes back short must hand back exactly what it took.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.lab import Lab

from kameng.container import Container
from kameng.inventory import service as inventory
from kameng.orders import service as orders
from kameng.resellers import service as resellers

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]
PROXY_IP = "198.51.100.7"


@pytest.fixture(params=BACKENDS)
def any_container(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    with backend_container(request.param, tmp_path) as container:
        yield container


def _waiting_lines(container: Container, sku: str, quantities: list[int]) -> list[int]:
    """Lines of real orders waiting for stock (placed while the SKU has none)."""
    info = container.sku(sku)
    creds = factories.add_reseller(container, balance_cents=1_000_000)
    lines = []
    with container.db.connect() as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
        for n, quantity in enumerate(quantities):
            placed = orders.place_order(
                conn,
                buyer=orders.Buyer(creds.reseller_id, wallet, "reseller:test"),
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=quantity,
                    fields={},
                    customer_ref=f"held-{n}",
                ),
                accounts=container.accounts,
                vault=container.vault,
                policy=container.policy,
                now=container.clock(),
            )
            assert placed.status.value == "backordered"
            lines.append(placed.line_id)
    return lines


def _claim(container: Container, sku: str, quantity: int, line: int, *, hold: bool) -> list[int]:
    with container.db.connect() as conn:
        got = inventory.claim(
            conn,
            sku_id=container.sku(sku).id,
            quantity=quantity,
            line_id=line,
            now=container.clock(),
            hold=hold,
        )
    return [] if got is None else sorted(k.id for k in got)


def _keys(container: Container, sku: str) -> dict[str, dict[int | None, list[int]]]:
    """state -> line -> key ids, for the SKU."""
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            text("SELECT state, order_line_id, id FROM card_keys WHERE sku_id = :s ORDER BY id"),
            {"s": container.sku(sku).id},
        ).all()
    out: dict[str, dict[int | None, list[int]]] = {}
    for state, line, key in rows:
        out.setdefault(state, {}).setdefault(line, []).append(key)
    return out


def _held(container: Container, line: int) -> int:
    with container.db.connect(write=False) as conn:
        return inventory.held_count(conn, line_id=line)


def test_held_keys_are_counted_sold_and_returned_per_line(any_container: Container) -> None:
    c = any_container
    sku = factories.add_product(c)
    a, b, mixed = _waiting_lines(c, sku, [2, 3, 2])
    factories.add_stock(c, sku, [f"{sku}-{i}" for i in range(8)])
    held_a = _claim(c, sku, 2, a, hold=True)
    held_b = _claim(c, sku, 3, b, hold=True)
    # A line with a sold key and a held one (the primitives allow it): held_to_stock must
    # never put a sold key back on sale, whatever line it is asked about.
    sold = _claim(c, sku, 1, mixed, hold=False)
    held_mixed = _claim(c, sku, 1, mixed, hold=True)
    assert (len(held_a), len(held_b), len(sold), len(held_mixed)) == (2, 3, 1, 1)

    # Counted per line, not for the SKU.
    assert (_held(c, a), _held(c, b), _held(c, mixed)) == (2, 3, 1)

    # Returning one line's held keys leaves the other lines' held and sold keys alone.
    with c.db.connect() as conn:
        assert inventory.held_to_stock(conn, line_id=a) == 2
    assert (_held(c, a), _held(c, b), _held(c, mixed)) == (0, 3, 1)
    keys = _keys(c, sku)
    assert keys["held"] == {b: held_b, mixed: held_mixed}
    assert keys["sold"] == {mixed: sold}
    assert set(held_a) <= set(keys["available"][None])
    assert len(keys["available"][None]) == 8 - 3 - 1 - 1

    # Selling one line's held keys sells only those, while another line still holds some.
    with c.db.connect() as conn:
        assert inventory.held_to_stock(conn, line_id=a) == 0  # nothing left to return
        assert inventory.sell_held(conn, line_id=b, now=c.clock()) == 3
    assert (_held(c, b), _held(c, mixed)) == (0, 1)
    assert _keys(c, sku)["sold"] == {b: held_b, mixed: sold}

    # The held key of the mixed line goes back; its sold key stays sold.
    with c.db.connect() as conn:
        assert inventory.held_to_stock(conn, line_id=mixed) == 1
    keys = _keys(c, sku)
    assert "held" not in keys
    assert keys["sold"] == {b: held_b, mixed: sold}

    # The orders are still waiting: put their keys back before the books are checked.
    with c.db.connect() as conn:
        assert inventory.release(conn, line_id=b) == 3
        assert inventory.release(conn, line_id=mixed) == 1
    assert set(_keys(c, sku)) == {"available"}
    factories.assert_books_clean(c)


def test_a_short_held_claim_takes_nothing_and_leaves_other_lines_alone(
    any_container: Container,
) -> None:
    """On SQLite the claim takes the 2 keys there are before it sees it is short, then hands
    them back (`held_to_stock`, not `release`: they were never sold); on PostgreSQL it counts
    first and takes nothing. Either way: no key held for the line, the other line's key kept."""
    c = any_container
    sku = factories.add_product(c)
    short_line, other = _waiting_lines(c, sku, [3, 1])
    factories.add_stock(c, sku, [f"{sku}-{i}" for i in range(3)])
    kept = _claim(c, sku, 1, other, hold=True)

    assert _claim(c, sku, 3, short_line, hold=True) == []

    assert (_held(c, short_line), _held(c, other)) == (0, 1)
    keys = _keys(c, sku)
    assert keys["held"] == {other: kept}
    assert len(keys["available"][None]) == 2
    # ... and the keys it handed back can be claimed whole at once.
    assert len(_claim(c, sku, 2, short_line, hold=True)) == 2
    with c.db.connect() as conn:
        inventory.held_to_stock(conn, line_id=short_line)
        inventory.held_to_stock(conn, line_id=other)
    factories.assert_books_clean(c)


# -- approving an order whose keys ran short ------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    with backend_container(request.param, tmp_path) as container:
        bench = Lab(container)
        bench.listed("proxy", "ip", "198.51.100.0/24")
        yield bench


def test_approval_short_of_keys_queues_the_order_and_holds_nothing(lab: Lab) -> None:
    """Stock was short when the order was screened (nothing held) and is still short when the
    reviewer approves: the approval's claim comes back short, the order waits in the backorder
    queue with its money held, and the one key there is stays on sale."""
    sku = lab.product(stock=1)
    flagged = lab.place(lab.member(), sku, ip=PROXY_IP, quantity=2)
    assert lab.status(flagged) == "review"
    assert lab.stock(sku) == {"available": 1}  # the short claim at screening took nothing

    assert lab.decide(flagged, approve=True)["order"] == "backordered"

    order = lab.order(flagged)
    assert (order.status, order.reason, order.next_action_at is not None) == (
        "backordered",
        "out_of_stock",
        True,
    )
    assert lab.stock(sku) == {"available": 1}
    on_line = "SELECT COUNT(*) FROM card_keys WHERE order_line_id = :l"
    assert lab.read(on_line, l=flagged.line_id) == [(0,)]
    assert lab.read("SELECT state FROM ledger_holds WHERE id = :h", h=order.hold_id) == [
        ("pending",)
    ]
    factories.assert_books_clean(lab.c)

    # The restock it waits for serves it whole.
    factories.add_stock(lab.c, sku, [f"{sku}-late"])
    assert lab.plan(flagged.order_id).label == "delivered_from_stock"
    assert lab.stock(sku) == {"sold": 2}
    factories.assert_books_clean(lab.c)


def test_approval_takes_keys_that_arrived_while_the_order_was_in_review(lab: Lab) -> None:
    """Short at screening, restocked during the review: the approval claims the keys itself
    and delivers at once instead of queueing an order that stock could serve."""
    sku = lab.product(stock=1)
    flagged = lab.place(lab.member(), sku, ip=PROXY_IP, quantity=2)
    assert lab.stock(sku) == {"available": 1}
    factories.add_stock(lab.c, sku, [f"{sku}-restock"])

    assert lab.decide(flagged, approve=True)["order"] == "delivered"

    assert lab.stock(sku) == {"sold": 2}
    assert lab.read(
        "SELECT key_count FROM deliveries WHERE order_line_id = :l", l=flagged.line_id
    ) == [(2,)]
    factories.assert_books_clean(lab.c)

"""The "request already in flight" lock across processes (DESIGN §5.5), on PostgreSQL.

Within one process the `InFlight` registry answers 409 for a key whose first request is still
running; across processes (several `kameng serve` workers behind one proxy) only the database
can. `lock_across_processes` takes a transaction-scoped advisory lock on (scope, key) without
waiting: a second transaction that cannot take it is refused with 409 instead of placing the
order a second time. Another process is stood in for by a second database connection holding
the lock, which is exactly what that process's transaction would be doing.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from tests.api.helpers import all_orders, balance, error_of
from tests.support import factories

from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.idempotency import service as idem


@contextmanager
def _transaction(container: Container) -> Iterator[Connection]:
    """A transaction of "another process": open until the block ends, then rolled back."""
    with container.db.engine.connect() as conn:
        conn.begin()
        try:
            yield conn
        finally:
            conn.rollback()


@pytest.mark.pg
def test_a_key_locked_by_another_transaction_is_in_flight(pg_container: Container) -> None:
    with _transaction(pg_container) as first, _transaction(pg_container) as second:
        idem.lock_across_processes(first, scope="reseller:1", key="k-1")
        with pytest.raises(KamengError) as caught:
            idem.lock_across_processes(second, scope="reseller:1", key="k-1")
        assert caught.value.code is ErrorCode.idempotency_in_flight
        # Only that key, in that scope: other keys and other callers' same key go through.
        idem.lock_across_processes(second, scope="reseller:1", key="k-2")
        idem.lock_across_processes(second, scope="reseller:2", key="k-1")
        # Taking it again in its own transaction is fine (re-entrant for its holder).
        idem.lock_across_processes(first, scope="reseller:1", key="k-1")
    # Transaction-scoped: gone with the transaction that took it, nothing to release by hand.
    with _transaction(pg_container) as later:
        idem.lock_across_processes(later, scope="reseller:1", key="k-1")


def test_sqlite_needs_no_lock(sqlite_container: Container) -> None:
    """SQLite has one writer: a second request waits for the first's transaction and then
    finds its record, so there is nothing to lock (and no advisory-lock function to call)."""
    with sqlite_container.db.connect(write=False) as conn:
        idem.lock_across_processes(conn, scope="reseller:1", key="k-1")
        idem.lock_across_processes(conn, scope="reseller:1", key="k-1")


def _advisory_key(scope: str, key: str) -> int:
    """The lock id `lock_across_processes` derives (sha256 of the scope and key)."""
    digest = hashlib.sha256(f"idem|{scope}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@pytest.mark.pg
def test_an_order_whose_key_another_process_is_placing_gets_409_and_nothing_moves(
    pg_container: Container,
) -> None:
    sku = factories.add_product(pg_container, price_cents=1_000, stock=2)
    creds = factories.add_reseller(pg_container, balance_cents=5_000)
    key = f"idem-{secrets.token_hex(6)}"
    with factories.live_server(pg_container) as url:
        client = factories.client_for(url, creds)
        with _transaction(pg_container) as other_process:
            other_process.execute(
                text("SELECT pg_advisory_xact_lock(:k)"),
                {"k": _advisory_key(f"reseller:{creds.reseller_id}", key)},
            )
            refused = client.create_order(sku, 1, idempotency_key=key)
            error_of(refused, 409, "idempotency_in_flight")
            assert all_orders(client) == []
            assert balance(client) == ("50.00", "0.00")
        # The other process finished without placing it (rolled back): the retry places it.
        placed = client.create_order(sku, 1, idempotency_key=key)
        assert placed.status_code == 201, placed.text
        assert len(all_orders(client)) == 1
    factories.assert_books_clean(pg_container)

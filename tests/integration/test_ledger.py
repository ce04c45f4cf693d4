"""The money ledger (DESIGN §5.1, reliability.md §1) on both backends.

Postings balance, refusals write nothing, holds resolve at most once, concurrent money movement
on PostgreSQL ends balanced, `verify` detects every violation it claims to check, history tables
refuse edits at the database, and `kameng ledger verify` reports through its exit code.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from tests.integration._helpers import run_cli
from tests.support import factories

from kameng.catalog.models import DeliveryKind
from kameng.container import Container
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.ledger.models import Account, AccountKind, Entry, Hold, LedgerTransaction
from kameng.ledger.verify import CHECKS, STOCK_CHECKS, verify
from kameng.orders import service as orders
from kameng.resellers import service as resellers

_acc = table(Account)
_txn = table(LedgerTransaction)
_entry = table(Entry)
_hold = table(Hold)


# -- helpers ---------------------------------------------------------------------------------


def _wallet(container: Container, reseller_id: int) -> int:
    with container.db.connect(write=False) as conn:
        return resellers.reseller_wallet(conn, reseller_id=reseller_id)


def _new_wallet(container: Container, balance: int = 0) -> int:
    creds = factories.add_reseller(container, balance_cents=balance)
    return _wallet(container, creds.reseller_id)


def _counts(container: Container) -> dict[str, int]:
    with container.db.connect(write=False) as conn:
        return {
            t: int(conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one())
            for t in ("ledger_transactions", "ledger_entries", "ledger_holds", "orders")
        }


def _balance(container: Container, account_id: int) -> int:
    with container.db.connect(write=False) as conn:
        return int(
            conn.execute(select(_acc.c.balance_cents).where(_acc.c.id == account_id)).scalar_one()
        )


def _hold_row(container: Container, hold_id: int) -> Any:
    with container.db.connect(write=False) as conn:
        return conn.execute(select(_hold).where(_hold.c.id == hold_id)).one()


def _failing(report: Any) -> set[str]:
    return {name for name, rows in report.violations.items() if rows}


@contextmanager
def _rolled_back(container: Container) -> Iterator[Connection]:
    """A write transaction that is always rolled back (for injecting damage, then looking)."""
    with container.db.engine.connect() as conn:
        conn.begin()
        try:
            yield conn
        finally:
            conn.rollback()
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")


# -- postings --------------------------------------------------------------------------------


def test_postings_balance_and_update_stored_balances(container: Container) -> None:
    accounts = container.accounts
    a = _new_wallet(container, 10_000)
    b = _new_wallet(container, 0)
    now = container.clock()
    with container.db.connect() as conn:
        txn = ledger.post(
            conn,
            kind="transfer",
            legs=[(a, -2_500), (b, 1_000), (accounts.revenue, 1_500)],
            now=now,
            ref_type="test",
        )
    with container.db.connect(write=False) as conn:
        legs = conn.execute(
            select(_entry.c.account_id, _entry.c.amount_cents, _entry.c.balance_after_cents).where(
                _entry.c.transaction_id == txn
            )
        ).all()
    assert sorted((acc, amt) for acc, amt, _ in legs) == sorted(
        [(a, -2_500), (b, 1_000), (accounts.revenue, 1_500)]
    )
    assert sum(amt for _, amt, _ in legs) == 0
    after = {acc: bal for acc, _, bal in legs}
    assert after[a] == _balance(container, a) == 7_500
    assert after[b] == _balance(container, b) == 1_000
    assert sum(_balance(container, a) for a in accounts.revenue_shards) == 1_500
    assert _balance(container, accounts.funding) == -10_000
    report = factories.assert_books_clean(container)
    assert report.figures["transactions"] == 2  # the top-up and the transfer


@pytest.mark.parametrize(
    "legs",
    [
        [(1, -100), (2, 99)],
        [(1, -100), (2, 101)],
        [(1, 100), (2, 100)],
        [(1, -100), (2, 100), (2, 1)],
        [(1, -100)],
        [(1, 0), (2, 0)],
        [],
    ],
    # Money destroyed (-1) and money created (+1, +200, +1 on a third leg) are both refused: a
    # check that only looked for a deficit would let a posting mint money.
    ids=[
        "short-by-one",
        "over-by-one",
        "all-credits",
        "third-leg-over",
        "one-leg",
        "zero-legs",
        "empty",
    ],
)
def test_unbalanced_postings_are_refused_and_write_nothing(
    container: Container, legs: list[tuple[int, int]]
) -> None:
    a = _new_wallet(container, 1_000)
    b = _new_wallet(container)
    ids = {1: a, 2: b}
    before = _counts(container)
    with pytest.raises(ValueError), container.db.connect() as conn:
        ledger.post(
            conn,
            kind="bad",
            legs=[(ids[acc], amt) for acc, amt in legs],
            now=container.clock(),
        )
    assert _counts(container) == before
    factories.assert_books_clean(container)


def test_insufficient_funds_raises_and_leaves_nothing_written(container: Container) -> None:
    accounts = container.accounts
    wallet = _new_wallet(container, 500)
    other = _new_wallet(container, 0)
    before = _counts(container)
    now = container.clock()
    with pytest.raises(ledger.InsufficientFunds) as exc, container.db.connect() as conn:
        # The credit leg on the other wallet is applied first (descending ids): it must go too.
        ledger.post(conn, kind="sale", legs=[(wallet, -501), (other, 501)], now=now)
    assert exc.value.code is ErrorCode.insufficient_balance
    with pytest.raises(ledger.InsufficientFunds), container.db.connect() as conn:
        ledger.place_hold(
            conn,
            wallet_id=wallet,
            holds_account=accounts.holds,
            amount=501,
            ref_type="test",
            ref_id=1,
            now=now,
        )
    assert _counts(container) == before
    assert _balance(container, wallet) == 500
    assert _balance(container, other) == 0
    assert _balance(container, accounts.holds) == 0
    factories.assert_books_clean(container)


def test_an_order_the_buyer_cannot_pay_writes_nothing(container: Container) -> None:
    sku_code = factories.add_product(container, price_cents=1_000, stock=3)
    creds = factories.add_reseller(container, balance_cents=1_999)
    wallet = _wallet(container, creds.reseller_id)
    before = _counts(container)
    with pytest.raises(ledger.InsufficientFunds), container.db.connect() as conn:
        orders.place_order(
            conn,
            buyer=orders.Buyer(creds.reseller_id, wallet, "reseller:test"),
            cmd=orders.PlaceOrder(
                sku=container.sku(sku_code), unit_price_cents=1_000, quantity=2, fields={}
            ),
            accounts=container.accounts,
            vault=container.vault,
            policy=container.policy,
            now=container.clock(),
        )
    assert _counts(container) == before
    with container.db.connect(write=False) as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM order_events")).scalar_one() == 0
        assert (
            conn.execute(
                text("SELECT COUNT(*) FROM card_keys WHERE state = 'available'")
            ).scalar_one()
            == 3
        )
    assert factories.wallet_balance(container, creds.reseller_id) == (1_999, 0)
    factories.assert_books_clean(container)


def test_topup_refuses_non_positive_amounts(container: Container) -> None:
    wallet = _new_wallet(container)
    before = _counts(container)
    for amount in (0, -5):
        with pytest.raises(KamengError) as exc, container.db.connect() as conn:
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=container.accounts,
                amount=amount,
                now=container.clock(),
                actor="staff:test",
            )
        assert exc.value.code is ErrorCode.invalid_amount
    assert _counts(container) == before


# -- holds -----------------------------------------------------------------------------------


def _place_hold(container: Container, wallet: int, amount: int) -> int:
    with container.db.connect() as conn:
        return ledger.place_hold(
            conn,
            wallet_id=wallet,
            holds_account=container.accounts.holds,
            amount=amount,
            ref_type="test",
            ref_id=wallet,
            now=container.clock(),
        )


def _capture(container: Container, hold_id: int) -> int:
    with container.db.connect() as conn:
        return ledger.capture_hold(
            conn, hold_id=hold_id, accounts=container.accounts, now=container.clock()
        )


def _void(container: Container, hold_id: int, wallet: int) -> int:
    with container.db.connect() as conn:
        return ledger.void_hold(
            conn,
            hold_id=hold_id,
            wallet_id=wallet,
            accounts=container.accounts,
            now=container.clock(),
        )


def test_hold_then_capture_moves_money_to_revenue_once(container: Container) -> None:
    accounts = container.accounts
    wallet = _new_wallet(container, 5_000)
    hold = _place_hold(container, wallet, 1_200)
    assert _balance(container, wallet) == 3_800
    assert _balance(container, accounts.holds) == 1_200
    row = _hold_row(container, hold)
    assert (row.state, row.resolve_txn_id, row.amount_cents) == ("pending", None, 1_200)
    factories.assert_books_clean(container)

    txn = _capture(container, hold)
    row = _hold_row(container, hold)
    assert (row.state, row.resolve_txn_id) == ("captured", txn)
    assert row.resolved_at is not None
    assert _balance(container, wallet) == 3_800
    assert _balance(container, accounts.holds) == 0
    assert sum(_balance(container, a) for a in accounts.revenue_shards) == 1_200
    factories.assert_books_clean(container)

    before = _counts(container)
    for again in (lambda: _capture(container, hold), lambda: _void(container, hold, wallet)):
        with pytest.raises(KamengError) as exc:
            again()
        assert exc.value.code is ErrorCode.invalid_transition
    assert _counts(container) == before
    assert _hold_row(container, hold).resolve_txn_id == txn
    assert _balance(container, wallet) == 3_800
    assert sum(_balance(container, a) for a in accounts.revenue_shards) == 1_200
    factories.assert_books_clean(container)


def test_hold_then_void_returns_the_money_once(container: Container) -> None:
    accounts = container.accounts
    wallet = _new_wallet(container, 5_000)
    hold = _place_hold(container, wallet, 1_200)
    txn = _void(container, hold, wallet)
    row = _hold_row(container, hold)
    assert (row.state, row.resolve_txn_id) == ("voided", txn)
    assert _balance(container, wallet) == 5_000
    assert _balance(container, accounts.holds) == 0
    assert sum(_balance(container, a) for a in accounts.revenue_shards) == 0
    factories.assert_books_clean(container)

    before = _counts(container)
    for again in (lambda: _void(container, hold, wallet), lambda: _capture(container, hold)):
        with pytest.raises(KamengError) as exc:
            again()
        assert exc.value.code is ErrorCode.invalid_transition
    assert _counts(container) == before
    assert _balance(container, wallet) == 5_000
    factories.assert_books_clean(container)


def test_a_missing_hold_cannot_be_resolved(container: Container) -> None:
    wallet = _new_wallet(container, 100)
    before = _counts(container)
    with pytest.raises(KamengError) as exc:
        _void(container, 987_654, wallet)
    assert exc.value.code is ErrorCode.invalid_transition
    assert _counts(container) == before


def test_a_void_returns_the_money_to_the_wallet_it_came_from(container: Container) -> None:
    owner = _new_wallet(container, 1_000)
    other = _new_wallet(container, 0)
    hold = _place_hold(container, owner, 600)
    try:
        _void(container, hold, other)  # naming the wrong wallet: refuse it, or ignore it
    except KamengError:
        assert _hold_row(container, hold).state == "pending"
    state = _hold_row(container, hold).state
    assert _balance(container, other) == 0
    assert _balance(container, owner) == (400 if state == "pending" else 1_000)
    factories.assert_books_clean(container)


@pytest.mark.pg
def test_racing_resolutions_of_one_hold_resolve_it_exactly_once(pg_container: Container) -> None:
    """Sixteen threads try to capture or void the same hold at once; one wins, none double-pays."""
    accounts = pg_container.accounts
    wallet = _new_wallet(pg_container, 10_000)
    for _ in range(5):
        hold = _place_hold(pg_container, wallet, 700)
        barrier = threading.Barrier(16, timeout=30)

        def attempt(i: int, hold: int = hold, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            try:
                if i % 2:
                    _capture(pg_container, hold)
                    return "captured"
                _void(pg_container, hold, wallet)
                return "voided"
            except KamengError as exc:
                # The hold row is locked before its state is read: the loser is told why.
                assert exc.code in (ErrorCode.invalid_transition, ErrorCode.concurrent_update)
                return "refused"

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(attempt, range(16)))
        winners = [r for r in results if r != "refused"]
        assert len(winners) == 1, results
        assert _hold_row(pg_container, hold).state == winners[0]
        factories.assert_books_clean(pg_container)
    revenue = sum(_balance(pg_container, a) for a in accounts.revenue_shards)
    assert _balance(pg_container, wallet) + revenue == 10_000
    assert _balance(pg_container, accounts.holds) == 0


def _wait_until_blocked_on_a_lock(container: Container, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with container.db.connect(write=False) as conn:
            waiting = conn.execute(
                text(
                    "SELECT COUNT(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the second resolution never blocked on the first")


@pytest.mark.pg
def test_a_concurrent_second_resolution_is_refused_as_a_transition(
    pg_container: Container,
) -> None:
    """Void a hold; while that transaction is open, capture it from another thread.

    The capture must wait, then be refused because the hold is no longer pending — not report
    that some account lacks money (what a caller, or a buyer canceling, would be told).
    """
    wallet = _new_wallet(pg_container, 1_000)
    hold = _place_hold(pg_container, wallet, 700)
    with ThreadPoolExecutor(1) as pool:
        with pg_container.db.connect() as first:
            ledger.void_hold(
                first,
                hold_id=hold,
                wallet_id=wallet,
                accounts=pg_container.accounts,
                now=pg_container.clock(),
            )
            second = pool.submit(_capture, pg_container, hold)
            _wait_until_blocked_on_a_lock(pg_container)
        with pytest.raises(KamengError) as exc:
            second.result(timeout=30)
    assert _hold_row(pg_container, hold).state == "voided"
    factories.assert_books_clean(pg_container)
    assert exc.value.code in (ErrorCode.invalid_transition, ErrorCode.concurrent_update)


# -- concurrency (pgledger-style) --------------------------------------------------------------


def _concurrent_workload(container: Container, threads: int, ops: int, seed: int) -> None:
    """Random top-ups, transfers (many in opposite directions), holds, captures and voids.

    Each successful operation is recorded after its commit; replaying the record must give
    exactly the stored balances (the Jepsen bank check), and `verify` must find nothing.
    """
    accounts = container.accounts
    wallets = [_new_wallet(container, 5_000) for _ in range(10)]
    initial = dict.fromkeys(wallets, 5000)
    done: list[tuple[str, tuple[Any, ...]]] = []
    done_lock = threading.Lock()
    pending: list[tuple[int, int, int]] = []  # (hold, wallet, amount)
    pending_lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads, timeout=30)

    def record(kind: str, *args: Any) -> None:
        with done_lock:
            done.append((kind, args))

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        barrier.wait()
        for _ in range(ops):
            op = rng.choice(["topup", "transfer", "transfer", "swap", "hold", "resolve"])
            amount = rng.randint(1, 3_000)
            a, b = rng.sample(wallets, 2)
            try:
                if op == "topup":
                    with container.db.connect() as conn:
                        ledger.topup(
                            conn,
                            wallet_id=a,
                            accounts=accounts,
                            amount=amount,
                            now=container.clock(),
                            actor="staff:test",
                        )
                    record("topup", a, amount)
                elif op in ("transfer", "swap"):
                    if op == "swap":  # opposite transfers between the same two wallets
                        a, b = sorted((a, b), reverse=bool(n % 2))
                    with container.db.connect() as conn:
                        ledger.post(
                            conn,
                            kind="transfer",
                            legs=[(a, -amount), (b, amount)],
                            now=container.clock(),
                            ref_type="test",
                        )
                    record("transfer", a, b, amount)
                elif op == "hold":
                    hold = _place_hold(container, a, amount)
                    with pending_lock:
                        pending.append((hold, a, amount))
                    record("hold", a, amount)
                else:
                    with pending_lock:
                        if not pending:
                            continue
                        hold, owner, held = pending[rng.randrange(len(pending))]
                    if rng.random() < 0.5:
                        _capture(container, hold)
                        record("capture", owner, held)
                    else:
                        _void(container, hold, owner)
                        record("void", owner, held)
                    with pending_lock:
                        pending.remove((hold, owner, held))
            except ledger.InsufficientFunds:
                pass
            except KamengError as exc:  # another thread resolved the same hold first
                if exc.code not in (ErrorCode.invalid_transition, ErrorCode.concurrent_update):
                    raise
            except BaseException as exc:  # deadlocks, serialization failures, anything else
                errors.append(exc)
                raise

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    assert not errors, errors[:3]

    expected = dict(initial)
    revenue = 0
    held: dict[int, int] = defaultdict(int)
    for kind, args in done:
        if kind == "topup":
            expected[args[0]] += args[1]
        elif kind == "transfer":
            expected[args[0]] -= args[2]
            expected[args[1]] += args[2]
        elif kind == "hold":
            expected[args[0]] -= args[1]
            held[args[0]] += args[1]
        elif kind == "capture":
            held[args[0]] -= args[1]
            revenue += args[1]
        else:
            held[args[0]] -= args[1]
            expected[args[0]] += args[1]
    with container.db.connect(write=False) as conn:
        for w in wallets:
            assert ledger.balances(conn, wallet_id=w) == (expected[w], held[w])
            assert expected[w] >= 0
    assert sum(_balance(container, a) for a in accounts.revenue_shards) == revenue
    assert _balance(container, accounts.holds) == sum(held.values())
    kinds = {kind for kind, _ in done}
    assert kinds >= {"topup", "transfer", "hold", "capture", "void"}, kinds
    report = factories.assert_books_clean(container)
    with container.db.connect(write=False) as conn:
        total = conn.execute(text("SELECT SUM(balance_cents) FROM ledger_accounts")).scalar_one()
    assert total == 0
    assert report.figures["transactions"] >= len(done)
    print(
        f"{threads}x{ops} ops on {container.db.engine.dialect.name}: "
        f"{dict(Counter(kind for kind, _ in done))} committed"
    )


@pytest.mark.pg
def test_concurrent_money_movement_on_postgresql_stays_balanced(pg_container: Container) -> None:
    _concurrent_workload(pg_container, threads=8, ops=100, seed=1)


def test_concurrent_money_movement_on_sqlite_stays_balanced(sqlite_container: Container) -> None:
    _concurrent_workload(sqlite_container, threads=4, ops=40, seed=2)


# -- verify detects what it claims to check ----------------------------------------------------


class Scene:
    """A small, clean world to damage: orders of every kind, holds in every state, stock."""

    def __init__(self, container: Container) -> None:
        self.container = container
        accounts = container.accounts
        self.accounts = accounts
        self.sku = factories.add_product(container, price_cents=1_000, stock=5)
        self.other_sku = factories.add_product(container, price_cents=1_000, stock=1)
        self.topup_sku = factories.add_product(
            container, price_cents=2_000, kind=DeliveryKind.direct_topup
        )
        creds = factories.add_reseller(container, balance_cents=50_000)
        self.reseller_id = creds.reseller_id
        self.wallet = _wallet(container, creds.reseller_id)
        self.delivered = self._order(self.sku, 2, "delivered")
        self.fulfilling = self._order(self.topup_sku, 1, "fulfilling")
        self.pending_hold = _place_hold(container, self.wallet, 300)
        self.voided_hold = _place_hold(container, self.wallet, 400)
        _void(container, self.voided_hold, self.wallet)
        with container.db.connect(write=False) as conn:
            self.delivered_line = conn.execute(
                text("SELECT id FROM order_lines WHERE order_id = :o"), {"o": self.delivered}
            ).scalar_one()
            self.sold_keys = list(
                conn.execute(
                    text("SELECT id FROM card_keys WHERE order_line_id = :l ORDER BY id"),
                    {"l": self.delivered_line},
                ).scalars()
            )
            self.available_key = conn.execute(
                text("SELECT MIN(id) FROM card_keys WHERE state = 'available'")
            ).scalar_one()
            self.other_sku_id = container.sku(self.other_sku).id
            self.pending_place_txn = conn.execute(
                select(_hold.c.place_txn_id).where(_hold.c.id == self.pending_hold)
            ).scalar_one()
        factories.assert_books_clean(container)

    def _order(self, sku_code: str, quantity: int, expect: str) -> int:
        sku = self.container.sku(sku_code)
        with self.container.db.connect() as conn:
            placed = orders.place_order(
                conn,
                buyer=orders.Buyer(self.reseller_id, self.wallet, "reseller:test"),
                cmd=orders.PlaceOrder(
                    sku=sku, unit_price_cents=sku.price_cents, quantity=quantity, fields={}
                ),
                accounts=self.accounts,
                vault=self.container.vault,
                policy=self.container.policy,
                now=self.container.clock(),
            )
        assert placed.status.value == expect
        return placed.order_id


def _raw_txn(
    conn: Connection, legs: list[tuple[int, int]], *, chain_error: int = 0, now: datetime
) -> int:
    """Append a transaction the way `post` does, but with no checks at all."""
    txn = conn.execute(
        insert(_txn)
        .values(kind="tamper", ref_type="test", ref_id=0, actor="test", memo="", created_at=now)
        .returning(_txn.c.id)
    ).scalar_one()
    for i, (account, amount) in enumerate(legs):
        bal, ver = conn.execute(
            select(_acc.c.balance_cents, _acc.c.version).where(_acc.c.id == account)
        ).one()
        conn.execute(
            insert(_entry).values(
                transaction_id=txn,
                account_id=account,
                amount_cents=amount,
                balance_after_cents=bal + amount + (chain_error if i == 0 else 0),
                account_version=ver + 1,
                created_at=now,
            )
        )
        conn.execute(
            update(_acc)
            .where(_acc.c.id == account)
            .values(balance_cents=bal + amount, version=ver + 1)
        )
    return int(txn)


def _drop_wallet_check(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
    else:
        conn.exec_driver_sql(
            "ALTER TABLE ledger_accounts DROP CONSTRAINT ck_ledger_accounts_non_negative"
        )


Injection = Callable[[Connection, Scene], None]


def _inject_empty_txn(conn: Connection, s: Scene) -> None:
    _raw_txn(conn, [], now=s.container.clock())


def _inject_one_legged_txn(conn: Connection, s: Scene) -> None:
    _raw_txn(conn, [(s.wallet, 100)], now=s.container.clock())


def _inject_cross_currency(conn: Connection, s: Scene) -> None:
    usd = ledger.ensure_account(
        conn,
        kind=AccountKind.funding,
        owner_type="platform",
        owner_id=0,
        currency="USD",
        allow_negative=True,
    )
    _raw_txn(conn, [(s.wallet, 100), (usd, -100)], now=s.container.clock())


def _inject_balance_drift(conn: Connection, s: Scene) -> None:
    conn.execute(
        update(_acc).where(_acc.c.id == s.wallet).values(balance_cents=_acc.c.balance_cents + 100)
    )
    conn.execute(
        update(_acc)
        .where(_acc.c.id == s.accounts.funding)
        .values(balance_cents=_acc.c.balance_cents - 100)
    )


def _inject_negative_wallet(conn: Connection, s: Scene) -> None:
    _drop_wallet_check(conn)
    bal = conn.execute(select(_acc.c.balance_cents).where(_acc.c.id == s.wallet)).scalar_one()
    _raw_txn(
        conn, [(s.wallet, -(bal + 100)), (s.accounts.funding, bal + 100)], now=s.container.clock()
    )


def _inject_broken_chain(conn: Connection, s: Scene) -> None:
    _raw_txn(
        conn,
        [(s.wallet, 100), (s.accounts.funding, -100)],
        chain_error=1,
        now=s.container.clock(),
    )


def _inject_pending_hold_with_resolution(conn: Connection, s: Scene) -> None:
    conn.execute(
        update(_hold).where(_hold.c.id == s.pending_hold).values(resolve_txn_id=s.pending_place_txn)
    )


def _inject_hold_amount_edit(conn: Connection, s: Scene) -> None:
    conn.execute(
        update(_hold)
        .where(_hold.c.id == s.voided_hold)
        .values(amount_cents=_hold.c.amount_cents + 1)
    )


def _inject_reopened_hold(conn: Connection, s: Scene) -> None:
    conn.execute(
        update(_hold)
        .where(_hold.c.id == s.voided_hold)
        .values(state="pending", resolve_txn_id=None, resolved_at=None)
    )


def _inject_negative_refund(conn: Connection, s: Scene) -> None:
    # Keeps refunded - paid equal to the wallet's net, so only the refund check can see it.
    conn.execute(
        text("UPDATE orders SET refunded_cents = -1, paid_cents = paid_cents - 1 WHERE id = :o"),
        {"o": s.delivered},
    )


def _inject_refund_above_paid(conn: Connection, s: Scene) -> None:
    conn.execute(
        text("UPDATE orders SET refunded_cents = paid_cents + 1 WHERE id = :o"),
        {"o": s.delivered},
    )


def _inject_paid_without_money(conn: Connection, s: Scene) -> None:
    conn.execute(
        text("UPDATE orders SET paid_cents = paid_cents + 100 WHERE id = :o"), {"o": s.delivered}
    )


def _inject_held_order_without_hold(conn: Connection, s: Scene) -> None:
    conn.execute(text("UPDATE orders SET hold_id = NULL WHERE id = :o"), {"o": s.fulfilling})


def _inject_key_taken_back(conn: Connection, s: Scene) -> None:
    conn.execute(
        text(
            "UPDATE card_keys SET state = 'available', order_line_id = NULL, sold_at = NULL "
            "WHERE id = :k"
        ),
        {"k": s.sold_keys[0]},
    )


def _inject_sold_key_without_line(conn: Connection, s: Scene) -> None:
    conn.execute(text("UPDATE card_keys SET state = 'sold' WHERE id = :k"), {"k": s.available_key})


def _inject_missing_delivery(conn: Connection, s: Scene) -> None:
    conn.execute(text("DELETE FROM deliveries WHERE order_line_id = :l"), {"l": s.delivered_line})


def _inject_key_of_other_sku(conn: Connection, s: Scene) -> None:
    conn.execute(
        text("UPDATE card_keys SET sku_id = :s WHERE id = :k"),
        {"s": s.other_sku_id, "k": s.sold_keys[0]},
    )


def _inject_forgotten_order(conn: Connection, s: Scene) -> None:
    conn.execute(text("UPDATE orders SET next_action_at = NULL WHERE id = :o"), {"o": s.fulfilling})


def _purchases(conn: Connection, s: Scene, *rows: tuple[str, bool]) -> list[int]:
    """Procurements of the fulfilling order's line at a made-up supplier: (state, charged)."""
    conn.execute(
        text(
            "INSERT INTO suppliers (code, name, adapter, base_url, api_key, sealed_secret, "
            "enabled, timeout_ms, circuit_state, failures, circuit_opened_count, "
            "low_balance_cents, created_at) VALUES ('x', 'x', 'simulator', 'http://x', 'k', "
            ":b, true, 1000, 'closed', 0, 0, 0, :t)"
        ),
        {"b": b"x", "t": s.container.clock()},
    )
    sid = conn.execute(text("SELECT id FROM suppliers WHERE code = 'x'")).scalar_one()
    sku_id = s.container.sku(s.topup_sku).id
    conn.execute(
        text(
            "INSERT INTO supplier_offers (sku_id, supplier_id, supplier_sku, cost_cents, "
            "priority, enabled, created_at) VALUES (:k, :s, 'X', 1, 1, true, :t)"
        ),
        {"k": sku_id, "s": sid, "t": s.container.clock()},
    )
    oid = conn.execute(
        text("SELECT id FROM supplier_offers WHERE supplier_id = :s"), {"s": sid}
    ).scalar_one()
    line = conn.execute(
        text("SELECT id FROM order_lines WHERE order_id = :o"), {"o": s.fulfilling}
    ).scalar_one()
    ids = []
    for n, (state, charged) in enumerate(rows, start=1):
        ids.append(
            conn.execute(
                text(
                    "INSERT INTO procurements (order_id, order_line_id, supplier_id, offer_id, "
                    "out_trade_no, trade_no, state, quantity, keys_received, cost_cents, "
                    "reason, attempts, created_at, updated_at, charged_at) VALUES (:o, :l, :s, "
                    ":f, :n, '', :state, 1, 0, 1, '', 1, :t, :t, :charged) RETURNING id"
                ),
                {
                    "o": s.fulfilling,
                    "l": line,
                    "s": sid,
                    "f": oid,
                    "n": f"N{n}",
                    "state": state,
                    "t": s.container.clock(),
                    "charged": s.container.clock() if charged else None,
                },
            ).scalar_one()
        )
    return [int(i) for i in ids]


def _inject_second_purchase(conn: Connection, s: Scene) -> None:
    # The schema refuses a second live purchase for a line; drop that guard (inside the
    # rolled-back transaction) to prove the check would still see one.
    conn.execute(text("DROP INDEX uq_procurements_live_line"))
    _purchases(conn, s, ("accepted", False), ("accepted", False))


def _claim(conn: Connection, s: Scene, procurement_id: int) -> None:
    conn.execute(
        text(
            "INSERT INTO supplier_claims (supplier_id, procurement_id, order_id, kind, state, "
            "amount_cents, keys_count, note, created_at, resolved_by) SELECT supplier_id, id, "
            "order_id, 'overcharge', 'open', 1, 0, '', created_at, '' FROM procurements "
            "WHERE id = :p"
        ),
        {"p": procurement_id},
    )


def _inject_line_charged_twice(conn: Connection, s: Scene) -> None:
    # A refused purchase whose late success was caught (claimed), and another charge for the
    # same line: the supplier took money twice for one line's worth.
    _, late = _purchases(conn, s, ("delivered", True), ("rejected", True))
    _claim(conn, s, late)


def _inject_unclaimed_late_success(conn: Connection, s: Scene) -> None:
    _purchases(conn, s, ("rejected", True))


# (damage, the checks that must report it). Most damage is seen by exactly one check; where a
# violation necessarily implies another (an unbalanced transaction whose balances were applied
# makes the accounts not sum to zero), both are named.
def _gateway_payment(conn: Connection, s: Scene, *, state: str) -> int:
    from kameng.payments import service as payments
    from kameng.payments.models import PaymentPurpose

    now = s.container.clock()
    gw = payments.add_gateway(
        conn,
        vault=s.container.vault,
        code="inject",
        name="x",
        base_url="http://x",
        merchant_id="1",
        key="k",
        now=now,
    )
    gateway = payments.get_gateway(conn, gateway_id=gw)
    number = payments.open_payment(
        conn,
        gateway=gateway,
        purpose=PaymentPurpose.topup,
        pay_type="alipay",
        amount_cents=500,
        currency="CNY",
        expires_at=now,
        now=now,
        checks=payments.CheckPolicy(),
        wallet_id=s.wallet,
    )
    conn.execute(
        text("UPDATE payments SET state = :s WHERE payment_no = :n"), {"s": state, "n": number}
    )
    return int(payments.find_payment(conn, payment_no=number).id)


def _inject_paid_payment_not_posted(conn: Connection, s: Scene) -> None:
    _gateway_payment(conn, s, state="paid")


def _inject_payment_posted_for_another_amount(conn: Connection, s: Scene) -> None:
    # Paid and posted once, but a cent short of what the gateway reported (500).
    payment = _gateway_payment(conn, s, state="paid")
    ledger.post(
        conn,
        kind="payment",
        legs=[(s.container.accounts.gateway_clearing, -499), (s.wallet, 499)],
        now=s.container.clock(),
        ref_type="payment",
        ref_id=payment,
        actor="test",
    )


def _inject_delivered_with_pending_hold(conn: Connection, s: Scene) -> None:
    # Delivered (with its delivery row), but the held money was never captured.
    conn.execute(
        text("UPDATE orders SET status = 'delivered', stage = 'delivered' WHERE id = :o"),
        {"o": s.fulfilling},
    )
    conn.execute(
        text(
            "INSERT INTO deliveries (order_line_id, source, key_count, delivered_at) "
            "SELECT id, 'supplier:x', 0, :t FROM order_lines WHERE order_id = :o"
        ),
        {"o": s.fulfilling, "t": s.container.clock()},
    )


def _inject_paid_order_without_hold(conn: Connection, s: Scene) -> None:
    conn.execute(
        text("UPDATE orders SET status = 'paid', hold_id = NULL WHERE id = :o"),
        {"o": s.fulfilling},
    )


def _inject_undelivered_with_voided_hold(conn: Connection, s: Scene) -> None:
    # Still waiting for its goods, but the hold it points at was already given back.
    conn.execute(
        text("UPDATE orders SET hold_id = :h WHERE id = :o"),
        {"h": s.voided_hold, "o": s.fulfilling},
    )


def _inject_payment_txn_without_payment(conn: Connection, s: Scene) -> None:
    ledger.post(
        conn,
        kind="payment",
        legs=[(s.container.accounts.gateway_clearing, -100), (s.wallet, 100)],
        now=s.container.clock(),
        ref_type="payment",
        ref_id=987654,
        actor="test",
    )


INJECTIONS: dict[str, tuple[Injection, set[str]]] = {
    "empty_transaction": (_inject_empty_txn, {"transactions_balance"}),
    "one_legged_transaction": (
        _inject_one_legged_txn,
        {"transactions_balance", "accounts_sum_to_zero"},
    ),
    "cross_currency_transaction": (_inject_cross_currency, {"accounts_sum_to_zero"}),
    "balance_drift": (_inject_balance_drift, {"balance_equals_entries"}),
    "negative_wallet": (_inject_negative_wallet, {"no_negative_wallets"}),
    "broken_entry_chain": (_inject_broken_chain, {"entry_chains"}),
    "pending_hold_with_resolution": (
        _inject_pending_hold_with_resolution,
        {"holds_resolved_once"},
    ),
    "hold_amount_edited": (_inject_hold_amount_edit, {"holds_match_their_transactions"}),
    "voided_hold_reopened": (_inject_reopened_hold, {"holds_account_equals_pending_holds"}),
    "negative_refund": (_inject_negative_refund, {"refund_not_above_paid"}),
    "refund_above_paid": (
        _inject_refund_above_paid,
        {"refund_not_above_paid", "order_money_matches_ledger"},
    ),
    "paid_without_money": (_inject_paid_without_money, {"order_money_matches_ledger"}),
    "held_order_without_hold": (
        _inject_held_order_without_hold,
        {"held_orders_have_pending_hold"},
    ),
    "delivered_key_taken_back": (_inject_key_taken_back, {"delivered_lines_have_their_keys"}),
    "sold_key_without_line": (_inject_sold_key_without_line, {"sold_keys_belong_to_a_line"}),
    "delivery_row_missing": (_inject_missing_delivery, {"one_delivery_per_delivered_line"}),
    "key_of_another_sku": (_inject_key_of_other_sku, {"key_sku_matches_line"}),
    "paid_order_forgotten": (_inject_forgotten_order, {"undelivered_orders_are_due"}),
    "second_purchase_for_a_line": (_inject_second_purchase, {"one_purchase_per_line"}),
    "line_charged_twice": (_inject_line_charged_twice, {"one_charged_purchase_per_line"}),
    "late_success_without_claim": (_inject_unclaimed_late_success, {"late_successes_claimed"}),
    "paid_payment_not_posted": (_inject_paid_payment_not_posted, {"payments_posted_once"}),
    # The other direction of the same checks: money posted, but for the wrong amount; a hold
    # left pending after delivery; a paid order with no hold, or with one already voided.
    "payment_posted_for_another_amount": (
        _inject_payment_posted_for_another_amount,
        {"payments_posted_once"},
    ),
    "delivered_with_pending_hold": (
        _inject_delivered_with_pending_hold,
        {"held_orders_have_pending_hold"},
    ),
    "paid_order_without_hold": (_inject_paid_order_without_hold, {"held_orders_have_pending_hold"}),
    "undelivered_with_voided_hold": (
        _inject_undelivered_with_voided_hold,
        {"held_orders_have_pending_hold"},
    ),
    "payment_txn_without_payment": (
        _inject_payment_txn_without_payment,
        {"payment_transactions_have_payments"},
    ),
}


def test_every_check_has_an_injection() -> None:
    covered = set().union(*(expected for _, expected in INJECTIONS.values()))
    assert covered == set(CHECKS) | set(STOCK_CHECKS)


def test_verify_detects_each_injected_violation(container: Container) -> None:
    scene = Scene(container)
    wrong: dict[str, tuple[set[str], set[str]]] = {}
    for name, (inject, expected) in INJECTIONS.items():
        with _rolled_back(container) as conn:
            inject(conn, scene)
            found = _failing(verify(conn, include_stock=True))
        if found != expected:
            wrong[name] = (expected, found)
    assert not wrong, "expected vs found: " + repr(wrong)
    factories.assert_books_clean(container)  # every injection was rolled back


def test_verify_without_stock_checks_skips_them(container: Container) -> None:
    scene = Scene(container)
    with _rolled_back(container) as conn:
        _inject_sold_key_without_line(conn, scene)
        report = verify(conn, include_stock=False)
    assert report.ok
    assert set(report.violations) == set(CHECKS)


# -- what the schema itself refuses ------------------------------------------------------------


def test_schema_refuses_a_negative_wallet(container: Container) -> None:
    wallet = _new_wallet(container, 100)
    with pytest.raises(IntegrityError), container.db.connect() as conn:
        conn.execute(update(_acc).where(_acc.c.id == wallet).values(balance_cents=-1))
    assert _balance(container, wallet) == 100
    # Platform accounts that mirror outside money may go negative; revenue and holds may not.
    accounts = container.accounts
    for account in (accounts.revenue, accounts.holds):
        with pytest.raises(IntegrityError), container.db.connect() as conn:
            conn.execute(update(_acc).where(_acc.c.id == account).values(balance_cents=-1))


def test_schema_refuses_malformed_ledger_rows(container: Container) -> None:
    wallet = _new_wallet(container, 1_000)
    hold = _place_hold(container, wallet, 100)
    _void(container, hold, wallet)
    now = container.clock()
    with container.db.connect(write=False) as conn:
        txn, version = conn.execute(
            select(_entry.c.transaction_id, _entry.c.account_version)
            .where(_entry.c.account_id == wallet)
            .order_by(_entry.c.id.desc())
        ).first()
        resolve_txn = conn.execute(
            select(_hold.c.resolve_txn_id).where(_hold.c.id == hold)
        ).scalar_one()
    attempts: dict[str, Callable[[Connection], object]] = {
        "zero entry": lambda c: c.execute(
            insert(_entry).values(
                transaction_id=txn,
                account_id=wallet,
                amount_cents=0,
                balance_after_cents=1_000,
                account_version=version + 1,
                created_at=now,
            )
        ),
        "two entries with one account version": lambda c: c.execute(
            insert(_entry).values(
                transaction_id=txn,
                account_id=wallet,
                amount_cents=5,
                balance_after_cents=1_005,
                account_version=version,
                created_at=now,
            )
        ),
        "zero hold": lambda c: c.execute(
            insert(_hold).values(
                account_id=wallet,
                amount_cents=0,
                state="pending",
                ref_type="test",
                ref_id=0,
                place_txn_id=txn,
                created_at=now,
                details={},
            )
        ),
        "two holds resolved by one transaction": lambda c: c.execute(
            insert(_hold).values(
                account_id=wallet,
                amount_cents=100,
                state="voided",
                ref_type="test",
                ref_id=0,
                place_txn_id=txn,
                resolve_txn_id=resolve_txn,
                created_at=now,
                details={},
            )
        ),
    }
    before = _counts(container)
    for name, attempt in attempts.items():
        with pytest.raises(IntegrityError), container.db.connect() as conn:
            attempt(conn)
            pytest.fail(f"{name} was accepted")  # pragma: no cover
    assert _counts(container) == before
    factories.assert_books_clean(container)


@pytest.mark.parametrize("tbl", ["ledger_entries", "ledger_transactions", "order_events"])
@pytest.mark.parametrize("verb", ["UPDATE", "DELETE"])
def test_history_tables_refuse_edits(container: Container, tbl: str, verb: str) -> None:
    sku = factories.add_product(container, price_cents=1_000, stock=1)
    creds = factories.add_reseller(container, balance_cents=5_000)
    wallet = _wallet(container, creds.reseller_id)
    with container.db.connect() as conn:
        orders.place_order(
            conn,
            buyer=orders.Buyer(creds.reseller_id, wallet, "reseller:test"),
            cmd=orders.PlaceOrder(
                sku=container.sku(sku), unit_price_cents=1_000, quantity=1, fields={}
            ),
            accounts=container.accounts,
            vault=container.vault,
            policy=container.policy,
            now=container.clock(),
        )
    column = {"ledger_entries": "amount_cents", "ledger_transactions": "memo"}.get(tbl, "reason")
    value = 1 if column == "amount_cents" else "'edited'"
    statement = f"UPDATE {tbl} SET {column} = {value}" if verb == "UPDATE" else f"DELETE FROM {tbl}"
    with container.db.connect(write=False) as conn:
        snapshot = [tuple(r) for r in conn.execute(text(f"SELECT * FROM {tbl} ORDER BY id"))]
    assert snapshot
    with pytest.raises(DBAPIError) as exc, container.db.connect() as conn:
        conn.execute(text(statement))
    assert "append-only" in str(exc.value)
    with container.db.connect(write=False) as conn:
        assert [tuple(r) for r in conn.execute(text(f"SELECT * FROM {tbl} ORDER BY id"))] == (
            snapshot
        )
    factories.assert_books_clean(container)


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_ledger_verify_exit_codes(container: Container) -> None:
    scene = Scene(container)
    clean = run_cli(container, "ledger", "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "transactions_balance" in clean.stdout

    with container.db.connect() as conn:
        _inject_empty_txn(conn, scene)
    broken = run_cli(container, "ledger", "verify")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "transactions_balance" in broken.stderr

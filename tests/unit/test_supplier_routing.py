"""Choosing a supplier: `route`, `next_reopen`, the circuit breaker, callback dedupe, health,
and the backoff arithmetic the pipeline schedules with.

The pure functions are tested on hand-built `Offer`s; the breaker, `remember_event` and
`health` run against the real schema on both backends (SQLite and PostgreSQL).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kameng.container import Container
from kameng.db import table
from kameng.orders import service as orders
from kameng.pipeline import apply, outbox
from kameng.resellers import service as resellers
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import CircuitState, ProcurementState, Supplier
from tests.conftest import backend_container
from tests.support import factories

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CLOSED, OPEN = CircuitState.closed.value, CircuitState.open.value

_ids = itertools.count(1)


def offer(
    *,
    id: int | None = None,
    priority: int = 100,
    state: str = CLOSED,
    open_until: datetime | None = None,
    balance: int | None = None,
    low: int = 10_000,
    cost: int = 500,
) -> suppliers.Offer:
    oid = next(_ids) if id is None else id
    return suppliers.Offer(
        id=oid,
        supplier_id=oid,
        supplier_code=f"s{oid}",
        supplier_sku=f"X{oid}",
        cost_cents=cost,
        priority=priority,
        circuit_state=state,
        circuit_open_until=open_until,
        balance_cents=balance,
        low_balance_cents=low,
    )


def half_open(**kw: Any) -> suppliers.Offer:
    """An open circuit whose rest is over: a probe may go through."""
    return offer(state=OPEN, open_until=T0 - timedelta(seconds=1), **kw)


def resting(**kw: Any) -> suppliers.Offer:
    return offer(state=OPEN, open_until=T0 + timedelta(seconds=30), **kw)


# -- route (pure) ---------------------------------------------------------------------------------


def test_priority_beats_health_balance_and_cost() -> None:
    first = half_open(priority=1, balance=1, cost=9_999)  # sick, poor and dear, but preferred
    second = offer(priority=2, cost=1)
    assert suppliers.route([second, first], now=T0, exclude=set()) == [first, second]


def test_closed_before_half_open_at_equal_priority() -> None:
    probe = half_open(cost=1, balance=1_000_000)
    healthy = offer(cost=9_000, balance=1)  # low balance and dear, but its circuit is closed
    assert suppliers.route([probe, healthy], now=T0, exclude=set()) == [healthy, probe]


def test_enough_balance_before_low_balance_then_cost() -> None:
    low = offer(balance=9_999, low=10_000, cost=1)
    unknown_balance = offer(balance=None, cost=300)  # never checked: not "low"
    rich_dear = offer(balance=10_000, low=10_000, cost=400)  # exactly at the threshold: not low
    rich_cheap = offer(balance=50_000, cost=200)
    routed = suppliers.route([low, rich_dear, unknown_balance, rich_cheap], now=T0, exclude=set())
    assert routed == [rich_cheap, unknown_balance, rich_dear, low]
    assert low.low_balance and not unknown_balance.low_balance and not rich_dear.low_balance


def test_cost_then_id_break_the_last_ties() -> None:
    a, b, c = offer(id=30, cost=100), offer(id=10, cost=100), offer(id=20, cost=50)
    assert suppliers.route([a, b, c], now=T0, exclude=set()) == [c, b, a]


def test_refused_offers_and_resting_circuits_are_left_out() -> None:
    good, refused, rest = offer(), offer(), resting()
    ends_now = offer(state=OPEN, open_until=T0)  # the rest ends exactly now: probe allowed
    no_deadline = offer(state=OPEN, open_until=None)
    routed = suppliers.route(
        [rest, refused, good, ends_now, no_deadline], now=T0, exclude={refused.id}
    )
    assert set(routed) == {good, ends_now, no_deadline}
    assert routed[0] == good
    assert suppliers.route([rest], now=T0, exclude=set()) == []
    assert suppliers.route([rest], now=T0 + timedelta(seconds=30), exclude=set()) == [rest]
    assert suppliers.route([good], now=T0, exclude={good.id}) == []


_offers = st.lists(
    st.builds(
        offer,
        priority=st.integers(0, 3),
        state=st.sampled_from([CLOSED, OPEN]),
        open_until=st.none() | st.integers(-60, 60).map(lambda s: T0 + timedelta(seconds=s)),
        balance=st.none() | st.integers(0, 20_000),
        cost=st.integers(0, 3),
    ),
    max_size=8,
)


@settings(max_examples=100, deadline=None, database=None)
@given(offers=_offers, data=st.data())
def test_route_keeps_every_usable_offer_and_never_puts_a_worse_one_first(
    offers: list[suppliers.Offer], data: st.DataObject
) -> None:
    exclude = data.draw(
        st.sets(st.sampled_from([o.id for o in offers])) if offers else st.just(set())
    )
    routed = suppliers.route(offers, now=T0, exclude=exclude)
    usable = [
        o
        for o in offers
        if o.id not in exclude
        and (
            o.circuit_state == CLOSED or o.circuit_open_until is None or o.circuit_open_until <= T0
        )
    ]
    assert sorted(o.id for o in routed) == sorted(o.id for o in usable)

    def rank(o: suppliers.Offer) -> tuple[int, bool, bool, int]:
        return (o.priority, o.circuit_state != CLOSED, o.low_balance, o.cost_cents)

    for before, after in itertools.pairwise(routed):
        assert rank(before) <= rank(after)


# -- next_reopen (pure) ---------------------------------------------------------------------------


def test_next_reopen_is_the_earliest_rest_end_among_offers_not_excluded() -> None:
    soon = offer(state=OPEN, open_until=T0 + timedelta(seconds=10))
    later = offer(state=OPEN, open_until=T0 + timedelta(seconds=90))
    closed = offer()
    assert suppliers.next_reopen([], exclude=set()) is None
    assert suppliers.next_reopen([closed], exclude=set()) is None
    assert suppliers.next_reopen([later, closed, soon], exclude=set()) == soon.circuit_open_until
    assert suppliers.next_reopen([later, soon], exclude={soon.id}) == later.circuit_open_until
    assert suppliers.next_reopen([later, soon], exclude={soon.id, later.id}) is None


# -- backoff arithmetic (pure) --------------------------------------------------------------------


@settings(max_examples=150, deadline=None, database=None)
@given(
    attempt=st.integers(-2, 80),
    first=st.floats(0.4, 120, allow_nan=False),
    cap=st.floats(0.4, 3_600, allow_nan=False),
)
def test_apply_backoff_is_jittered_within_half_to_full_step_and_capped(
    attempt: int, first: float, cap: float
) -> None:
    step = min(cap, first * 2 ** max(attempt - 1, 0))
    delay = apply.backoff(attempt, first=first, cap=cap).total_seconds()
    assert step / 2 - 1e-6 <= delay <= step + 1e-6
    assert delay <= cap + 1e-6
    assert delay > 0


def test_apply_backoff_grows_then_flattens_at_the_cap() -> None:
    for _ in range(50):
        assert 0.5 <= apply.backoff(1, first=1.0, cap=300).total_seconds() <= 1.0
        assert 4.0 <= apply.backoff(4, first=1.0, cap=300).total_seconds() <= 8.0
        assert 150 <= apply.backoff(30, first=1.0, cap=300).total_seconds() <= 300
        # attempt 0 (or below) behaves like the first attempt
        assert 2.5 <= apply.backoff(0, first=5.0, cap=300).total_seconds() <= 5.0


@settings(max_examples=150, deadline=None, database=None)
@given(
    attempt=st.integers(-2, 200),
    base=st.floats(0.5, 60, allow_nan=False),
    cap=st.floats(0.5, 3_600, allow_nan=False),
)
def test_outbox_backoff_is_positive_and_capped(attempt: int, base: float, cap: float) -> None:
    delay = outbox.backoff_s(attempt, base=base, cap=cap)
    assert 0 < delay <= cap
    assert delay <= base * 2 ** max(attempt - 1, 0) or delay == 0.5


def test_outbox_backoff_defaults_stay_under_fifteen_minutes() -> None:
    delays = [outbox.backoff_s(a) for a in range(1, outbox.MAX_ATTEMPTS + 20) for _ in range(20)]
    assert min(delays) >= 0.5 and max(delays) <= 900


@settings(max_examples=100, deadline=None, database=None)
@given(
    offset_s=st.integers(-10_000, 10_000),
    deadline_s=st.none() | st.integers(-10_000, 10_000),
)
def test_cap_at_deadline_never_schedules_past_the_deadline(
    offset_s: int, deadline_s: int | None
) -> None:
    deadline = None if deadline_s is None else T0 + timedelta(seconds=deadline_s)
    order = SimpleNamespace(sla_deadline=deadline)
    when = T0 + timedelta(seconds=offset_s)
    capped = apply.cap_at_deadline(order, when)
    if deadline is None:
        assert capped == when
    else:
        assert capped <= deadline
        assert capped == min(when, deadline)


def test_cap_at_deadline_with_a_backoff_lands_on_the_deadline() -> None:
    order = SimpleNamespace(sla_deadline=T0 + timedelta(seconds=3))
    later = T0 + apply.backoff(20, first=1.0, cap=300)
    assert apply.cap_at_deadline(order, later) == order.sla_deadline


# -- DB-backed: offers, the breaker, callback dedupe -----------------------------------------------

_supplier = table(Supplier)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """One migrated container per backend for the module (building one costs ~0.5 s); tests
    stay independent by using suppliers and SKUs of their own and never counting globally."""
    with backend_container(request.param, tmp_path_factory.mktemp(request.param)) as c:
        yield c


def add_supplier(container: Container, code: str, **kw: Any) -> int:
    with container.db.connect() as conn:
        return suppliers.create_supplier(
            conn,
            container.vault,
            code=code,
            name=code,
            adapter=kw.pop("adapter", "simulator"),
            base_url="http://127.0.0.1:9",
            api_key=f"key-{code}",
            secret=f"secret-{code}",
            now=T0,
            **kw,
        )


def add_offer(container: Container, sku: str, supplier_id: int, **kw: Any) -> int:
    with container.db.connect() as conn:
        return suppliers.add_offer(
            conn,
            sku_id=container.sku(sku).id,
            supplier_id=supplier_id,
            supplier_sku=kw.pop("their", f"THEIRS-{supplier_id}"),
            cost_cents=kw.pop("cost", 500),
            now=T0,
            **kw,
        )


def fail(container: Container, supplier_id: int, now: datetime) -> str | None:
    with container.db.connect() as conn:
        return suppliers.record_call(conn, supplier_id=supplier_id, ok=False, now=now)


def succeed(container: Container, supplier_id: int, now: datetime) -> str | None:
    with container.db.connect() as conn:
        return suppliers.record_call(conn, supplier_id=supplier_id, ok=True, now=now)


def circuit(container: Container, supplier_id: int) -> Any:
    with container.db.connect(write=False) as conn:
        return conn.execute(
            select(
                _supplier.c.circuit_state,
                _supplier.c.failures,
                _supplier.c.circuit_open_until,
                _supplier.c.circuit_opened_count,
            ).where(_supplier.c.id == supplier_id)
        ).one()


def routed(container: Container, sku: str, now: datetime, exclude: set[int] | None = None) -> Any:
    with container.db.connect(write=False) as conn:
        offers = suppliers.offers_for(conn, sku_id=container.sku(sku).id)
    return offers, suppliers.route(offers, now=now, exclude=exclude or set())


def test_offers_from_the_db_route_by_priority_health_balance_and_cost(
    shared: Container,
) -> None:
    sku = factories.add_product(shared)
    other_sku = factories.add_product(shared)
    ids = {c: add_supplier(shared, c) for c in ("cheap", "dear", "poor", "sick", "backup")}
    offer_ids = {
        "cheap": add_offer(shared, sku, ids["cheap"], cost=100),
        "dear": add_offer(shared, sku, ids["dear"], cost=900),
        "poor": add_offer(shared, sku, ids["poor"], cost=50),
        "sick": add_offer(shared, sku, ids["sick"], cost=10),
        "backup": add_offer(shared, sku, ids["backup"], cost=1, priority=500),
    }
    add_offer(shared, other_sku, ids["cheap"], cost=1)  # another SKU: not an offer for `sku`
    with shared.db.connect() as conn:
        suppliers.record_balance(conn, supplier_id=ids["poor"], balance=5, now=T0)
        suppliers.record_balance(conn, supplier_id=ids["cheap"], balance=10**7, now=T0)
    for _ in range(suppliers.FAILURES_TO_OPEN):
        fail(shared, ids["sick"], T0)

    offers, now_routed = routed(shared, sku, T0)
    assert {o.id for o in offers} == set(offer_ids.values())
    by_code = {o.supplier_code: o for o in offers}
    assert by_code["poor"].low_balance and not by_code["cheap"].low_balance
    assert by_code["sick"].circuit_state == OPEN
    assert by_code["sick"].circuit_open_until == T0 + timedelta(seconds=15)
    assert [o.supplier_code for o in now_routed] == ["cheap", "dear", "poor", "backup"]

    # Once its rest is over the sick supplier is probed, after the closed ones of its priority.
    _, later = routed(shared, sku, T0 + timedelta(seconds=15))
    assert [o.supplier_code for o in later] == ["cheap", "dear", "poor", "sick", "backup"]
    # Offers refused in this round are skipped; the backup is the last resort.
    _, rest = routed(shared, sku, T0, exclude={offer_ids["cheap"], offer_ids["dear"]})
    assert [o.supplier_code for o in rest] == ["poor", "backup"]
    assert suppliers.next_reopen(offers, exclude=set()) == T0 + timedelta(seconds=15)
    assert suppliers.next_reopen(offers, exclude={offer_ids["sick"]}) is None


def test_add_offer_updates_the_same_row_and_reenables_it(shared: Container) -> None:
    sku = factories.add_product(shared)
    sid = add_supplier(shared, "upd")
    first = add_offer(shared, sku, sid, their="T-1", cost=700, priority=100)
    again = add_offer(shared, sku, sid, their="T-1", cost=650, priority=5)
    other = add_offer(shared, sku, sid, their="T-2", cost=1)
    assert again == first and other != first
    offers, _ = routed(shared, sku, T0)
    by_id = {o.id: o for o in offers}
    assert (by_id[first].cost_cents, by_id[first].priority) == (650, 5)
    with shared.db.connect(write=False) as conn:
        assert suppliers.skus_of_supplier(conn, supplier_id=sid) == [shared.sku(sku).id]
        assert shared.sku(sku).id in suppliers.skus_with_offers(conn)


def test_breaker_opens_on_the_fifth_failure_and_backs_off_up_to_ten_minutes(
    shared: Container,
) -> None:
    sid = add_supplier(shared, "flaky")
    now = T0
    for n in range(1, suppliers.FAILURES_TO_OPEN):
        assert fail(shared, sid, now) is None
        state, failures, until, opened = circuit(shared, sid)
        assert (state, failures, until, opened) == (CLOSED, n, None, 0)
    assert fail(shared, sid, now) == OPEN
    state, failures, until, opened = circuit(shared, sid)
    assert (state, failures, opened) == (OPEN, 5, 1)
    assert until == now + timedelta(seconds=15)

    # Each failed probe after a rest re-opens it for twice as long, capped at 600 s.
    expected = []
    for _ in range(8):
        now = until  # the rest is over: this is the half-open probe
        assert fail(shared, sid, now) == OPEN
        state, _, until, opened = circuit(shared, sid)
        assert state == OPEN
        expected.append((until - now).total_seconds())
    assert expected == [30, 60, 120, 240, 480, 600, 600, 600]
    assert opened == 9

    # A success closes it and forgets the history: five failures again, and 15 s again.
    assert succeed(shared, sid, now) == CLOSED
    assert tuple(circuit(shared, sid)) == (CLOSED, 0, None, 0)
    assert succeed(shared, sid, now) is None  # nothing changed
    for _ in range(suppliers.FAILURES_TO_OPEN - 1):
        assert fail(shared, sid, now) is None
    assert fail(shared, sid, now) == OPEN
    assert circuit(shared, sid).circuit_open_until == now + timedelta(seconds=15)


def test_a_success_resets_the_failure_count_without_a_state_change(shared: Container) -> None:
    sid = add_supplier(shared, "wobbly")
    assert succeed(shared, sid, T0) is None  # healthy: nothing to reset, nothing written
    for _ in range(4):
        assert fail(shared, sid, T0) is None
    # The reset is reported (orders waiting on this supplier get another look); one
    # conditional UPDATE decides it, so the healthy path above never reads the row.
    assert succeed(shared, sid, T0) == CLOSED
    assert tuple(circuit(shared, sid)) == (CLOSED, 0, None, 0)
    for _ in range(4):
        assert fail(shared, sid, T0) is None  # counting starts over
    assert circuit(shared, sid).circuit_state == CLOSED


def test_record_call_for_an_unknown_supplier_changes_nothing(shared: Container) -> None:
    with shared.db.connect() as conn:
        assert suppliers.record_call(conn, supplier_id=999_999, ok=False, now=T0) is None
        assert suppliers.record_call(conn, supplier_id=999_999, ok=True, now=T0) is None


def test_remember_event_is_true_once_per_supplier_and_event(shared: Container) -> None:
    a, b = add_supplier(shared, "ev-a"), add_supplier(shared, "ev-b")

    def remember(supplier_id: int, event_id: str) -> bool:
        with shared.db.connect() as conn:
            return suppliers.remember_event(
                conn,
                supplier_id=supplier_id,
                event_id=event_id,
                out_trade_no="K1",
                outcome="delivered",
                now=T0,
            )

    assert remember(a, "evt-1") is True
    assert remember(a, "evt-1") is False
    assert remember(a, "evt-1") is False
    assert remember(b, "evt-1") is True  # ids are per supplier
    assert remember(a, "evt-2") is True
    # A duplicate inside a larger transaction must not poison the rest of it (savepoint).
    with shared.db.connect() as conn:
        dup = suppliers.remember_event(
            conn, supplier_id=a, event_id="evt-2", out_trade_no="K1", outcome="x", now=T0
        )
        fresh = suppliers.remember_event(
            conn, supplier_id=a, event_id="evt-3", out_trade_no="K1", outcome="x", now=T0
        )
    assert (dup, fresh) == (False, True)
    assert remember(a, "evt-3") is False


def test_create_supplier_refuses_duplicates_bad_adapters_and_urls(shared: Container) -> None:
    from kameng.errors import ErrorCode, KamengError

    add_supplier(shared, "dup")
    for kw, code in [
        ({"code": "dup", "adapter": "simulator", "base_url": "http://x"}, ErrorCode.already_exists),
        ({"code": "z1", "adapter": "soap", "base_url": "http://x"}, ErrorCode.invalid_request),
        ({"code": "z2", "adapter": "kameng", "base_url": "ftp://x"}, ErrorCode.invalid_request),
    ]:
        with pytest.raises(KamengError) as caught, shared.db.connect() as conn:
            suppliers.create_supplier(
                conn, shared.vault, name="n", api_key="k", secret="s", now=T0, **kw
            )
        assert caught.value.code is code
    with shared.db.connect(write=False) as conn:
        codes = {s.code for s in suppliers.all_suppliers(conn)}
    assert "dup" in codes and not codes & {"z1", "z2"}


# -- health ---------------------------------------------------------------------------------------


def _lines(container: Container, sku: str, n: int) -> list[tuple[int, int]]:
    """`n` real (backordered) orders for `sku`: procurements need an order and a line."""
    creds = factories.add_reseller(container, balance_cents=100_000)
    with container.db.connect(write=False) as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
    buyer = orders.Buyer(creds.reseller_id, wallet, "reseller:test")
    info = container.sku(sku)
    out = []
    for i in range(n):
        with container.db.connect() as conn:
            placed = orders.place_order(
                conn,
                buyer=buyer,
                cmd=orders.PlaceOrder(
                    sku=info,
                    unit_price_cents=info.price_cents,
                    quantity=1,
                    fields={},
                    customer_ref=f"h-{i}",
                ),
                accounts=container.accounts,
                vault=container.vault,
                policy=container.policy,
                now=container.clock(),
            )
        out.append((placed.order_id, placed.line_id))
    return out


def test_health_rates_latency_and_balance(container: Container) -> None:
    sku = factories.add_product(container)
    sid = add_supplier(container, "measured")
    add_supplier(container, "idle", low_balance_cents=500)
    add_offer(container, sku, sid)
    with container.db.connect(write=False) as conn:
        the_offer = suppliers.offers_for(conn, sku_id=container.sku(sku).id)[0]
    lines = iter(_lines(container, sku, 7))
    shared = next(lines)  # rejected procurements may share a line
    seq = itertools.count(1)

    def proc(state: ProcurementState, *, line: tuple[int, int] | None = None, reason: str = "",
             latency: int | None = None, at: datetime = T0) -> None:  # fmt: skip
        order_id, line_id = line or next(lines)
        with container.db.connect() as conn:
            pid = suppliers.start_procurement(
                conn,
                order_id=order_id,
                line_id=line_id,
                offer=the_offer,
                out_trade_no=f"OTN-{next(seq)}",
                quantity=1,
                now=at,
            )
            if state is not ProcurementState.sending:
                extra: dict[str, Any] = {"reason": reason}
                if latency is not None:
                    extra["latency_ms"] = latency
                suppliers.update_procurement(conn, procurement_id=pid, state=state, now=at, **extra)

    proc(ProcurementState.delivered, latency=100)
    proc(ProcurementState.delivered, latency=200)
    proc(ProcurementState.accepted, latency=300)
    proc(ProcurementState.unknown, latency=400)  # no answer: a failure
    for latency, reason in [
        (500, "out_of_stock"),  # about one SKU: the supplier itself is fine
        (600, "maintenance"),
        (700, "insufficient_balance"),
        (800, "supplier_auth_failed"),
    ]:
        proc(ProcurementState.rejected, line=shared, reason=reason, latency=latency)
    proc(ProcurementState.sending)  # in flight: counted as a purchase, not yet decided
    proc(ProcurementState.unknown, latency=5, at=T0 - timedelta(hours=1))  # outside the window
    with container.db.connect() as conn:
        suppliers.record_balance(conn, supplier_id=sid, balance=9_999, now=T0)

    with container.db.connect(write=False) as conn:
        report = {h.code: h for h in suppliers.health(conn, now=T0 + timedelta(seconds=5))}
    measured = report["measured"]
    assert measured.purchases == 9
    assert measured.success_rate == pytest.approx(4 / 8)  # delivered×2, accepted, out_of_stock
    assert (measured.latency_p50_ms, measured.latency_p95_ms) == (500, 800)
    assert measured.circuit_state == CLOSED and measured.circuit_open_until is None
    assert measured.balance_cents == 9_999 and measured.low_balance
    idle = report["idle"]
    assert (idle.purchases, idle.success_rate, idle.latency_p50_ms, idle.latency_p95_ms) == (
        0,
        None,
        None,
        None,
    )
    assert idle.balance_cents is None and not idle.low_balance

"""What a supplier's "not found" and refusals mean for one of our purchases (DESIGN §5.3), and
the pure comparison behind supplier reconciliation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from kameng.suppliers import service as suppliers
from kameng.suppliers.port import SupplierRecord
from kameng.suppliers.reconcile import MismatchKind, Ours, compare
from kameng.suppliers.service import NotFound, Promises

T0 = datetime(2026, 12, 8, 2, 0, tzinfo=UTC)


def proc(**kw: Any) -> Any:
    base = {
        "created_at": T0,
        "updated_at": T0,
        "last_sent_at": T0,
        "finished_at": None,
        "state": "unknown",
        "settles_at": None,
        "late_check_at": None,
        "attempts": 1,
    }
    return SimpleNamespace(**{**base, **kw})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- not found ---------------------------------------------------------------------------------


def test_not_found_is_resent_for_as_long_as_the_supplier_deduplicates_forever() -> None:
    forever = Promises(request_ttl_s=300, dedup_window_s=None)
    for seconds in (0, 5, 3600, 30 * 86_400):
        assert suppliers.not_found_means(proc(), forever, now=at(seconds)) is NotFound.resend


def test_not_found_past_the_dedup_window_waits_until_no_copy_can_land() -> None:
    week = Promises(request_ttl_s=300, dedup_window_s=7 * 86_400)
    # A re-send must itself land inside the window: they stop one request lifetime before.
    assert suppliers.not_found_means(proc(), week, now=at(7 * 86_400 - 301)) is NotFound.resend
    last_sent = at(7 * 86_400 - 400)
    p = proc(last_sent_at=last_sent)
    assert suppliers.not_found_means(p, week, now=at(7 * 86_400 - 299)) is NotFound.wait
    settled = last_sent + timedelta(seconds=300) + suppliers.SETTLE_MARGIN
    assert suppliers.not_found_means(p, week, now=settled - timedelta(seconds=1)) is NotFound.wait
    assert suppliers.not_found_means(p, week, now=settled) is NotFound.never_arrived


def test_a_short_dedup_window_never_resends_and_trusts_not_found_only_after_the_ttl() -> None:
    short = Promises(request_ttl_s=60, dedup_window_s=60)
    p = proc()
    assert suppliers.not_found_means(p, short, now=at(1)) is NotFound.wait
    assert suppliers.not_found_means(p, short, now=at(119)) is NotFound.wait
    assert suppliers.not_found_means(p, short, now=at(120)) is NotFound.never_arrived


def test_the_newest_copy_counts_not_the_first() -> None:
    short = Promises(request_ttl_s=60, dedup_window_s=60)
    p = proc(last_sent_at=at(100))  # re-sent at 100 s (inside an older window)
    assert suppliers.not_found_means(p, short, now=at(150)) is NotFound.wait
    assert suppliers.not_found_means(p, short, now=at(220)) is NotFound.never_arrived
    # No last_sent_at (a row from before it was recorded): its last update stands in.
    legacy = proc(last_sent_at=None, updated_at=at(100))
    assert suppliers.not_found_means(legacy, short, now=at(150)) is NotFound.wait


# -- refusals ----------------------------------------------------------------------------------


def test_a_binding_refusal_settles_at_once_a_forgettable_one_after_the_last_copy() -> None:
    promises = Promises(request_ttl_s=300)
    p = proc(last_sent_at=at(10))
    assert suppliers.refusal_settles_at(p, promises, binding=True, now=at(12)) == at(12)
    later = suppliers.refusal_settles_at(p, promises, binding=False, now=at(12))
    assert later == at(10 + 300) + suppliers.SETTLE_MARGIN
    # Long after every copy expired, it is settled now.
    assert suppliers.refusal_settles_at(p, promises, binding=False, now=at(9999)) == at(9999)


def test_a_line_waits_for_a_refused_purchase_that_may_still_be_charged() -> None:
    now = at(100)
    done = proc(state="rejected", settles_at=at(50))
    assert suppliers.unsettled_until([done], now=now) is None
    settling = proc(state="rejected", settles_at=at(400))
    assert suppliers.unsettled_until([done, settling], now=now) == at(400)
    # A late check still due keeps the question open, even once settled.
    asked = proc(state="rejected", settles_at=at(50), late_check_at=at(90))
    assert suppliers.unsettled_until([asked], now=now) == now + suppliers.LATE_CHECK_WAIT
    # Only refusals count: a live purchase is the step's own business.
    assert suppliers.unsettled_until([proc(state="unknown", settles_at=at(400))], now=now) is None


@pytest.mark.parametrize(
    ("outcome", "seconds_after", "expect_none"),
    [
        ("delivered", 10, True),
        ("rejected", 10, True),
        ("not_found", 10, False),  # a copy may still land
        ("not_found", 10_000, True),  # none can any more
        ("accepted", 10_000, False),  # bought, not delivered yet: keep asking
        ("unknown", 10, False),
        ("partial", 10, False),
    ],
)
def test_a_given_up_purchase_is_asked_about_until_its_outcome_is_final(
    outcome: str, seconds_after: float, expect_none: bool
) -> None:
    p = proc(state="abandoned", finished_at=T0, last_sent_at=T0)
    now = at(seconds_after)
    nxt = suppliers.next_late_check(p, outcome, Promises(request_ttl_s=300), now=now)
    if expect_none:
        assert nxt is None
    else:
        assert nxt is not None
        gap = (nxt - now).total_seconds()
        assert suppliers.LATE_CHECK_FIRST_S <= gap <= suppliers.LATE_CHECK_CAP_S
        # asked again after about half the time since it was given up on
        assert gap == pytest.approx(
            min(max(seconds_after / 2, suppliers.LATE_CHECK_FIRST_S), suppliers.LATE_CHECK_CAP_S)
        )


def test_promises_default_per_protocol_and_are_read_from_the_row() -> None:
    from kameng.suppliers.models import AdapterKind

    assert suppliers.DEFAULT_PROMISES[AdapterKind.simulator].dedup_window_s is None
    assert suppliers.DEFAULT_PROMISES[AdapterKind.kameng].dedup_window_s == 7 * 86_400
    row = SimpleNamespace(request_ttl_s=120, dedup_window_s=3600)
    assert Promises.of(row) == Promises(request_ttl_s=120, dedup_window_s=3600)


# -- reconciliation ----------------------------------------------------------------------------


def ours(no: str, line: int, state: str, *, charged: bool, cents: int = 700) -> Ours:
    return Ours(out_trade_no=no, order_line_id=line, state=state, charged=charged, cents=cents)


def theirs(no: str, *, charged: bool = True, cents: int | None = 700) -> SupplierRecord:
    status = "delivered" if charged else "rejected"
    return SupplierRecord(out_trade_no=no, status=status, charged=charged, cost_cents=cents)


def kinds(mismatches: list[Any]) -> list[tuple[str, str]]:
    return sorted((m.kind.value, m.out_trade_no) for m in mismatches)


def test_matching_books_are_clean() -> None:
    mine = {
        "A": ours("A", 1, "delivered", charged=True),
        "B": ours("B", 2, "rejected", charged=False),  # refused on both sides
        "C": ours("C", 3, "abandoned", charged=True),  # a late success we caught
    }
    checked, found = compare(mine, [theirs("A"), theirs("B", charged=False), theirs("C")])
    assert (checked, found) == (3, [])


def test_every_kind_of_mismatch_is_named() -> None:
    mine = {
        "LOST": ours("LOST", 1, "abandoned", charged=False),  # they charged, we gave up
        "GONE": ours("GONE", 2, "delivered", charged=True),  # we charged, they do not show
        "REFUNDED": ours("REFUNDED", 3, "delivered", charged=True),
        "PRICE": ours("PRICE", 4, "delivered", charged=True, cents=700),
        "TWICE": ours("TWICE", 5, "delivered", charged=True),
        "TWICE-2": ours("TWICE-2", 5, "rejected", charged=False),
    }
    records = [
        theirs("LOST"),
        theirs("STRANGER"),  # a number we never used
        theirs("REFUNDED", charged=False),
        theirs("PRICE", cents=750),
        theirs("TWICE"),
        theirs("TWICE-2"),
    ]
    checked, found = compare(mine, records)
    assert checked == 7
    assert kinds(found) == [
        ("amount_differs", "PRICE"),
        ("bought_twice", "TWICE"),
        ("charged_not_recorded", "LOST"),
        ("charged_not_recorded", "STRANGER"),
        ("charged_not_recorded", "TWICE-2"),
        ("recorded_not_charged", "GONE"),
        ("recorded_not_charged", "REFUNDED"),
    ]
    twice = next(m for m in found if m.kind is MismatchKind.bought_twice)
    assert "TWICE" in twice.detail and "TWICE-2" in twice.detail and twice.supplier_cents == 1400


def test_purchases_still_in_flight_are_not_judged_yet() -> None:
    mine = {
        "SENDING": ours("SENDING", 1, "sending", charged=False),
        "ACCEPTED": ours("ACCEPTED", 2, "accepted", charged=False),
    }
    # They have one already, not the other: both are for the pipeline to resolve first.
    assert compare(mine, [theirs("SENDING")]) == (2, [])
    # A live purchase we already hold a charge for (a part delivered) is judged.
    part = {"PART": ours("PART", 3, "partial", charged=True)}
    assert kinds(compare(part, [])[1]) == [("recorded_not_charged", "PART")]


def test_a_supplier_listing_a_number_twice_counts_the_charged_entry() -> None:
    mine = {"A": ours("A", 1, "delivered", charged=True)}
    assert compare(mine, [theirs("A", charged=False), theirs("A")]) == (1, [])

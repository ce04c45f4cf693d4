"""Every edge of the order state table, walked through the services that perform it.

`tests/unit/test_state.py` pins the table itself; this file pins who uses it. Each scenario
below moves real orders with the real services (placing, paying, a worker's step, a
supplier's answer, a review decision, a cancel, the buyer's corrected information) and checks
the moves it made. At the end the set of moves found in `order_events` must be exactly
`PERFORMED`: a service that stops making a move, or starts making one nobody expected, fails
here. Every other edge of the table is in `NOT_PERFORMED` with the reason it exists, and where a
service would be asked to make it (a buyer's cancel), the test checks that it refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import backend_container
from tests.support import factories
from tests.support.lab import Lab

from kameng.catalog.models import DeliveryKind
from kameng.errors import ErrorCode, KamengError
from kameng.orders.state import LATE_PAYMENT, TRANSITIONS, Status
from kameng.suppliers.port import Outcome, Result, SupplierKey

Edge = tuple[str | None, str]
PROXY_NET, PROXY_IP = "198.51.100.0/24", "198.51.100.7"

PERFORMED: frozenset[Edge] = frozenset(
    {
        (None, "pending_payment"),  # checkout.place_pending
        (None, "paid"),  # orders.place_order
        ("pending_payment", "pending_payment"),  # a payment that needs staff (wrong amount)
        ("pending_payment", "paid"),  # checkout.accept_payment
        ("pending_payment", "expired"),  # plan_step -> checkout.expire_unpaid
        ("pending_payment", "canceled"),  # cancel_order
        ("paid", "screening"),  # screening.divert
        ("paid", "fulfilling"),  # start_fulfilment: own stock, upstream or staff
        ("paid", "backordered"),  # start_fulfilment: out of stock
        ("screening", "review"),  # screening.divert
        ("screening", "rejected"),  # screening.divert (block)
        ("review", "fulfilling"),  # review_actions.resume: upstream
        ("review", "backordered"),  # review_actions.resume: the stock went meanwhile
        ("review", "delivered"),  # review_actions.resume: its held keys
        ("review", "rejected"),  # review_actions.reject
        ("review", "refunded"),  # review_actions.apply_sla over the amount
        ("fulfilling", "fulfilling"),  # apply_result: a stage change
        ("fulfilling", "delivered"),  # own stock, or apply_result
        ("fulfilling", "backordered"),  # plan_step: no offer left to try
        ("fulfilling", "needs_buyer_action"),  # apply_result: invalid_fields
        ("fulfilling", "refunded"),  # plan_step: past its SLA
        ("backordered", "fulfilling"),  # plan_step: a supplier can have it
        ("backordered", "delivered"),  # serve_backorders
        ("backordered", "canceled"),  # cancel_order
        ("backordered", "refunded"),  # plan_step: past its SLA
        ("needs_buyer_action", "fulfilling"),  # buyer_info.correct_fields
        ("needs_buyer_action", "review"),  # correct_fields: screened again, flagged
        ("needs_buyer_action", "rejected"),  # correct_fields: screened again, blocked
        ("needs_buyer_action", "canceled"),  # cancel_order
        ("needs_buyer_action", "refunded"),  # plan_step: past the buyer's time
        # late payments (LATE_PAYMENT), all through checkout.accept_payment / note_payment_problem
        ("expired", "paid"),
        ("expired", "refunded"),
        ("expired", "expired"),
        ("canceled", "refunded"),
        ("canceled", "canceled"),
    }
)

# In the table, made by no service today. Why each exists:
NOT_PERFORMED: dict[Edge, str] = {
    # `paid` and `screening` never commit: placing and paying run screening and the first move
    # in the transaction that takes the money (checked below: no order rests in either). The
    # table keeps their exits so a move written out of order is still refused, and so an
    # asynchronous screening could rest there without a table change.
    ("paid", "delivered"): "start_fulfilment writes paid -> fulfilling -> delivered",
    ("paid", "canceled"): "paid never commits, and is not CANCELABLE",
    ("paid", "refunded"): "paid never commits; a refusal at screening is `rejected`",
    ("screening", "fulfilling"): "screening never commits; an allowed order skips it",
    ("screening", "canceled"): "screening never commits, and is not CANCELABLE",
    ("screening", "refunded"): "screening never commits; a block is `rejected`",
    # Allowed by the table (DESIGN §4: any pre-delivery state -> canceled), refused by the
    # cancel policy (CANCELABLE): checked below, the buyer's cancel is refused.
    ("review", "canceled"): "cancel_order refuses an order in review",
    ("fulfilling", "canceled"): "cancel_order refuses an order being fulfilled",
    # DESIGN §4's after-sales flow (delivered -> disputed -> replaced|refunded|completed) has
    # no service yet; the pipeline leaves a delivered order alone (checked below).
    ("delivered", "completed"): "no confirmation flow yet",
    ("delivered", "disputed"): "no dispute flow yet",
    ("disputed", "replaced"): "no dispute flow yet",
    ("disputed", "refunded"): "no dispute flow yet",
    ("disputed", "completed"): "no dispute flow yet",
}

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    with backend_container(request.param, tmp_path) as container:
        yield Lab(container)


def _refused(code: ErrorCode, job: object, *args: object) -> None:
    with pytest.raises(KamengError) as caught:
        job(*args)  # type: ignore[operator]
    assert caught.value.code is code, caught.value


def test_the_edge_lists_cover_the_table_exactly() -> None:
    """Every edge of the table (and of the late-payment doors) is either performed by some
    service or documented as not performed: a new edge needs a scenario or a reason."""
    table: set[Edge] = {(None, "pending_payment"), (None, "paid")}
    for origin, targets in TRANSITIONS.items():
        table |= {(origin.value, t.value) for t in targets}
    for origin, targets in LATE_PAYMENT.items():
        table |= {(origin.value, t.value) for t in targets}
    assert not PERFORMED & set(NOT_PERFORMED)
    assert PERFORMED | set(NOT_PERFORMED) == table


def test_every_edge_is_walked_by_the_service_that_makes_it(lab: Lab) -> None:
    card = wait = DeliveryKind.card_key
    lab.listed("proxy", "ip", PROXY_NET)
    lab.listed("block", "ip", "203.0.113.66")

    # -- balance orders: own stock, backorders ----------------------------------------------
    # A new buyer for every order: one buyer's burst of orders would be flagged for velocity.
    buyer = lab.member
    sold = lab.place(buyer(), lab.product(card, stock=1))
    assert lab.moves(sold) == [(None, "paid"), ("paid", "fulfilling"), ("fulfilling", "delivered")]
    _refused(ErrorCode.order_not_cancelable, lab.cancel, sold)
    assert lab.plan(sold.order_id).label == "nothing_due"  # no after-sales step exists
    assert lab.status(sold) == "delivered"

    canceled = lab.place(buyer(), lab.product(wait))
    assert lab.status(canceled) == "backordered"
    assert lab.cancel(canceled) is True
    assert lab.moves(canceled)[-1] == ("backordered", "canceled")

    restocked_sku = lab.product(wait)
    restocked = lab.place(buyer(), restocked_sku)
    factories.add_stock(lab.c, restocked_sku, [f"{restocked_sku}-R1"])
    assert lab.plan(restocked.order_id).label == "delivered_from_stock"
    assert lab.moves(restocked)[-1] == ("backordered", "delivered")

    routed_sku = lab.product(wait)
    routed = lab.place(buyer(), routed_sku)
    lab.offer(routed_sku)  # a supplier can have it now
    plan = lab.plan(routed.order_id)
    assert plan.kind == "purchase"
    assert lab.moves(routed)[-1] == ("backordered", "fulfilling")
    delivered = Result(Outcome.delivered, keys=(SupplierKey(f"{routed_sku}-UP1"),), cost_cents=100)
    assert lab.answer(plan, delivered) == "delivered"
    assert lab.moves(routed)[-1] == ("fulfilling", "delivered")

    late = lab.place(buyer(), lab.product(wait, sla_seconds=60))
    lab.advance(61)
    assert lab.plan(late.order_id).label == "refunded"
    assert lab.moves(late)[-1] == ("backordered", "refunded")

    # -- upstream: accepted, delivered, refused, buyer information ----------------------------
    topup = lab.product(DeliveryKind.direct_topup, offer=True)
    bought = lab.place(buyer(), topup)
    assert lab.moves(bought) == [(None, "paid"), ("paid", "fulfilling")]
    plan = lab.plan(bought.order_id)
    assert lab.answer(plan, Result(Outcome.accepted, trade_no="U-1")) == "accepted"
    assert lab.answer(plan, Result(Outcome.delivered, trade_no="U-1", cost_cents=100)) == (
        "delivered"
    )
    assert lab.moves(bought)[-2:] == [("fulfilling", "fulfilling"), ("fulfilling", "delivered")]

    no_offer_left = lab.place(buyer(), topup)
    plan = lab.plan(no_offer_left.order_id)
    assert lab.answer(plan, Result(Outcome.rejected, reason="out_of_stock")) == "rejected"
    assert lab.plan(no_offer_left.order_id).label == "backordered"
    assert lab.moves(no_offer_left)[-2:] == [
        ("fulfilling", "fulfilling"),
        ("fulfilling", "backordered"),
    ]

    refused_info = Result(Outcome.rejected, reason="invalid_fields")
    fixing = lab.place(buyer(), topup, fields={"qq": "100000001"})
    assert lab.answer(lab.plan(fixing.order_id), refused_info) == "needs_buyer_action"
    lab.correct(fixing, topup, {"qq": "100000002"})
    plan = lab.plan(fixing.order_id)
    assert plan.procurement.out_trade_no == f"{fixing.order_no}-2"
    assert lab.answer(plan, refused_info) == "needs_buyer_action"
    assert lab.cancel(fixing) is True
    assert lab.moves(fixing)[2:] == [
        ("fulfilling", "needs_buyer_action"),
        ("needs_buyer_action", "fulfilling"),  # the corrected information...
        ("fulfilling", "fulfilling"),  # ... is sent upstream again, under a new number
        ("fulfilling", "needs_buyer_action"),
        ("needs_buyer_action", "canceled"),
    ]

    silent = lab.place(buyer(), topup)
    assert lab.answer(lab.plan(silent.order_id), refused_info) == "needs_buyer_action"
    lab.advance(lab.ctx.timing.buyer_action_s + 1)
    assert lab.plan(silent.order_id).label == "refunded"
    assert lab.moves(silent)[-1] == ("needs_buyer_action", "refunded")

    # Corrected information is screened again: what it hid may now be listed.
    hiding = lab.member()
    rescreened = lab.place(hiding, topup, ip="192.0.2.77")
    assert lab.answer(lab.plan(rescreened.order_id), refused_info) == "needs_buyer_action"
    lab.listed("proxy", "ip", "192.0.2.77")
    lab.correct(rescreened, topup, {"qq": "100000003"})
    assert lab.moves(rescreened)[-1] == ("needs_buyer_action", "review")
    assert lab.decide(rescreened, approve=True)["order"] == "procuring"
    assert lab.moves(rescreened)[-1] == ("review", "fulfilling")

    blocked_buyer = lab.member()
    blocked = lab.place(blocked_buyer, topup)
    assert lab.answer(lab.plan(blocked.order_id), refused_info) == "needs_buyer_action"
    lab.listed("block", "buyer", f"m{blocked_buyer.member_id}")
    lab.correct(blocked, topup, {"qq": "100000004"})
    assert lab.moves(blocked)[-1] == ("needs_buyer_action", "rejected")

    # -- screening and review -------------------------------------------------------------
    flagged_buyer = lab.member
    approved = lab.place(flagged_buyer(), lab.product(card, stock=1), ip=PROXY_IP)
    assert lab.moves(approved) == [(None, "paid"), ("paid", "screening"), ("screening", "review")]
    _refused(ErrorCode.order_not_cancelable, lab.cancel, approved)
    assert lab.status(approved) == "review"
    assert lab.decide(approved, approve=True)["order"] == "delivered"
    assert lab.moves(approved)[-1] == ("review", "delivered")

    rejected = lab.place(flagged_buyer(), lab.product(card, stock=1), ip=PROXY_IP)
    lab.decide(rejected, approve=False)
    assert lab.moves(rejected)[-1] == ("review", "rejected")

    starved = lab.place(flagged_buyer(), lab.product(card), ip=PROXY_IP)
    assert lab.decide(starved, approve=True)["order"] == "backordered"
    assert lab.moves(starved)[-1] == ("review", "backordered")

    big = lab.c.review_policy.auto_approve_below_cents
    undecided = lab.place(flagged_buyer(), lab.product(card, stock=1, price_cents=big), ip=PROXY_IP)
    lab.advance(lab.c.settings.review_sla_s + 1)
    assert lab.plan(undecided.order_id).label == "refunded"
    assert lab.moves(undecided)[-1] == ("review", "refunded")

    block = lab.place(lab.member(), lab.product(card, stock=1), ip="203.0.113.66")
    assert lab.moves(block) == [(None, "paid"), ("paid", "screening"), ("screening", "rejected")]

    # -- staff goods ------------------------------------------------------------------------
    by_hand = lab.place(buyer(), lab.product(DeliveryKind.manual, sla_seconds=60))
    assert lab.order(by_hand).stage == "staff_processing"
    _refused(ErrorCode.order_not_cancelable, lab.cancel, by_hand)
    assert lab.status(by_hand) == "fulfilling"
    lab.advance(61)
    assert lab.plan(by_hand.order_id).label == "refunded"
    assert lab.moves(by_hand)[-1] == ("fulfilling", "refunded")

    # -- gateway orders, and payments that arrive late ------------------------------------------
    gw_paid = lab.pending(lab.product(card, stock=1))
    assert lab.pay(gw_paid) == "fulfilment_started"
    assert lab.moves(gw_paid) == [
        (None, "pending_payment"),
        ("pending_payment", "paid"),
        ("paid", "fulfilling"),
        ("fulfilling", "delivered"),
    ]

    short = lab.pending(lab.product(card, stock=1))
    assert lab.pay(short, cents=short.amount_cents - 1) == "amount_mismatch"
    assert lab.moves(short)[-1] == ("pending_payment", "pending_payment")

    closed = lab.pending(lab.product(card, stock=1))
    assert lab.cancel(closed) is True
    assert lab.pay(closed) == "late_payment_credited"
    assert lab.moves(closed)[-2:] == [("pending_payment", "canceled"), ("canceled", "refunded")]

    closed_short = lab.pending(lab.product(card, stock=1))
    assert lab.cancel(closed_short) is True
    assert lab.pay(closed_short, cents=1) == "amount_mismatch"
    assert lab.moves(closed_short)[-1] == ("canceled", "canceled")

    revived = lab.pending(lab.product(card, stock=1))
    too_late = lab.pending(lab.product(card))
    late_short = lab.pending(lab.product(card, stock=1))
    lab.advance(lab.c.settings.payment_window_s + 11 * 60)  # past the final check's grace
    for placed in (revived, too_late, late_short):
        assert lab.plan(placed.order_id).label == "payment_expired"
        assert lab.moves(placed)[-1] == ("pending_payment", "expired")
    assert lab.pay(revived) == "late_fulfilment_started"
    assert lab.moves(revived)[-3:] == [
        ("expired", "paid"),
        ("paid", "fulfilling"),
        ("fulfilling", "delivered"),
    ]
    assert lab.pay(too_late) == "late_payment_credited"
    assert lab.moves(too_late)[-1] == ("expired", "refunded")
    assert lab.pay(late_short, cents=1) == "amount_mismatch"
    assert lab.moves(late_short)[-1] == ("expired", "expired")

    # -- what was walked ----------------------------------------------------------------------
    walked = {
        (row[0], row[1])
        for row in lab.read("SELECT DISTINCT from_status, to_status FROM order_events")
    }
    assert walked - PERFORMED == set(), "moves nobody expected"
    assert PERFORMED - walked == set(), "moves no scenario made"
    # `paid` and `screening` are transient: no order rests in them after its transaction.
    resting = {row[0] for row in lab.read("SELECT DISTINCT status FROM orders")}
    assert not resting & {Status.paid.value, Status.screening.value}
    factories.assert_books_clean(lab.c)

"""The order state machine (`orders/state.py`): the pure table is the whole truth (DESIGN §4)."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kameng.orders.state import (
    CANCELABLE,
    DEFAULT_STAGE,
    LATE_PAYMENT,
    NOT_A_DUPLICATE,
    PAID_UNDELIVERED,
    STAGES,
    TERMINAL,
    TRANSITIONS,
    Move,
    Stage,
    Status,
    TransitionError,
    check_transition,
    is_terminal,
)

ALL_STATUSES: list[Status] = list(Status)
ORIGINS: list[Status | None] = [None, *ALL_STATUSES]
CREATION_TARGETS = frozenset({Status.pending_payment, Status.paid})

# -- the expected table, written out by hand ----------------------------------------------------
#
# Deliberately not derived from `orders/state.py`: a test that reads its expected answers from
# the table under test passes whatever the table says. Changing a move below is a decision
# (DESIGN §4) and must be made twice, here and there; a change made only there fails.
S = Status
EXPECTED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.pending_payment: frozenset({S.pending_payment, S.paid, S.expired, S.canceled}),
    S.paid: frozenset(
        {S.screening, S.fulfilling, S.backordered, S.delivered, S.canceled, S.refunded}
    ),
    S.screening: frozenset({S.review, S.fulfilling, S.rejected, S.canceled, S.refunded}),
    S.review: frozenset(
        {S.fulfilling, S.backordered, S.delivered, S.rejected, S.canceled, S.refunded}
    ),
    S.fulfilling: frozenset(
        {S.fulfilling, S.delivered, S.backordered, S.needs_buyer_action, S.canceled, S.refunded}
    ),
    S.backordered: frozenset({S.fulfilling, S.delivered, S.canceled, S.refunded}),
    S.needs_buyer_action: frozenset({S.fulfilling, S.review, S.rejected, S.canceled, S.refunded}),
    S.delivered: frozenset({S.completed, S.disputed}),
    S.disputed: frozenset({S.replaced, S.refunded, S.completed}),
    S.completed: frozenset(),
    S.expired: frozenset(),
    S.rejected: frozenset(),
    S.canceled: frozenset(),
    S.refunded: frozenset(),
    S.replaced: frozenset(),
}
# The only doors out of a closed order: money that arrives late (and a same-status note).
EXPECTED_LATE_PAYMENT: dict[Status, frozenset[Status]] = {
    S.expired: frozenset({S.paid, S.refunded, S.expired}),
    S.canceled: frozenset({S.refunded, S.canceled}),
}
EXPECTED_TERMINAL = frozenset(
    {S.completed, S.expired, S.rejected, S.canceled, S.refunded, S.replaced}
)
EXPECTED_CANCELABLE = frozenset({S.pending_payment, S.backordered, S.needs_buyer_action})
EXPECTED_PAID_UNDELIVERED = frozenset(
    {S.paid, S.screening, S.review, S.fulfilling, S.backordered, S.needs_buyer_action}
)
EXPECTED_NOT_A_DUPLICATE = frozenset({S.canceled, S.expired, S.rejected, S.refunded})
EXPECTED_STAGES: dict[Status, frozenset[Stage]] = {
    S.fulfilling: frozenset(
        {Stage.allocating, Stage.procuring, Stage.awaiting_supplier, Stage.staff_processing}
    ),
}


def _allowed(origin: Status | None, target: Status, *, late_payment: bool = False) -> bool:
    """The expected answer of `check_transition`, from the hand-written table."""
    if origin is None:
        return target in CREATION_TARGETS
    if target in EXPECTED_TRANSITIONS[origin]:
        return True
    return late_payment and target in EXPECTED_LATE_PAYMENT.get(origin, frozenset())


def _drift(
    actual: dict[Status, frozenset[Status]], expected: dict[Status, frozenset[Status]]
) -> list[str]:
    """Readable differences between two transition tables: `paid: +{x} -{y}` per status."""
    lines = []
    for status in Status:
        got, want = actual.get(status, frozenset()), expected.get(status, frozenset())
        if got != want:
            added = sorted(s.value for s in got - want)
            lost = sorted(s.value for s in want - got)
            lines.append(f"{status.value}: added {added} removed {lost}")
    return lines


def _reachable(start: Status) -> set[Status]:
    """Every status reachable from `start` in one or more moves (breadth-first search)."""
    seen: set[Status] = set()
    queue = deque(TRANSITIONS[start])
    while queue:
        status = queue.popleft()
        if status in seen:
            continue
        seen.add(status)
        queue.extend(TRANSITIONS[status])
    return seen


# -- the table itself -------------------------------------------------------------------------


def test_transitions_are_exactly_the_expected_table() -> None:
    """Any added or removed move fails here, naming the status and the edge."""
    drift = _drift(TRANSITIONS, EXPECTED_TRANSITIONS)
    assert not drift, "TRANSITIONS changed:\n" + "\n".join(drift)


def test_late_payment_doors_are_exactly_the_expected_ones() -> None:
    """A late payment may reopen only an expired or canceled order, and only to these."""
    drift = _drift(LATE_PAYMENT, EXPECTED_LATE_PAYMENT)
    assert not drift, "LATE_PAYMENT changed:\n" + "\n".join(drift)


@pytest.mark.parametrize(
    ("name", "actual", "expected"),
    [
        pytest.param(name, actual, expected, id=name)
        for name, actual, expected in (
            ("TERMINAL", TERMINAL, EXPECTED_TERMINAL),
            ("CANCELABLE", CANCELABLE, EXPECTED_CANCELABLE),
            ("PAID_UNDELIVERED", PAID_UNDELIVERED, EXPECTED_PAID_UNDELIVERED),
            ("NOT_A_DUPLICATE", NOT_A_DUPLICATE, EXPECTED_NOT_A_DUPLICATE),
        )
    ],
)
def test_status_sets_are_exactly_the_expected_ones(
    name: str, actual: frozenset[Status], expected: frozenset[Status]
) -> None:
    """Each of these sets decides money or stock somewhere (cancel, verify, the duplicate
    guard): a status slipping in or out is a behaviour change, not a refactoring."""
    added = sorted(s.value for s in actual - expected)
    lost = sorted(s.value for s in expected - actual)
    assert actual == expected, f"{name}: added {added} removed {lost}"


def test_stages_within_a_status_are_exactly_the_expected_ones() -> None:
    assert {s: set(v) for s, v in STAGES.items()} == {s: set(v) for s, v in EXPECTED_STAGES.items()}


def test_table_covers_every_status() -> None:
    """A status missing from the table would make check_transition crash with KeyError."""
    assert set(TRANSITIONS) == set(Status)
    assert set(DEFAULT_STAGE) == set(Status)
    for successors in TRANSITIONS.values():
        assert successors <= set(Status)


def test_every_stage_is_used() -> None:
    """A stage no status can be in is dead weight (or a forgotten entry in STAGES)."""
    used = set(DEFAULT_STAGE.values())
    for stages in STAGES.values():
        used |= stages
    assert used == set(Stage)


@pytest.mark.parametrize(
    ("origin", "target"),
    [
        (Status.pending_payment, Status.paid),
        (Status.pending_payment, Status.expired),
        (Status.paid, Status.screening),
        (Status.screening, Status.review),
        (Status.screening, Status.rejected),
        (Status.review, Status.fulfilling),
        (Status.review, Status.rejected),
        (Status.fulfilling, Status.delivered),
        (Status.fulfilling, Status.backordered),
        (Status.fulfilling, Status.needs_buyer_action),
        (Status.backordered, Status.fulfilling),
        (Status.needs_buyer_action, Status.fulfilling),
        (Status.delivered, Status.completed),
        (Status.delivered, Status.disputed),
        (Status.disputed, Status.replaced),
        (Status.disputed, Status.refunded),
        (Status.disputed, Status.completed),
    ],
)
def test_design_edges_exist(origin: Status, target: Status) -> None:
    """The lifecycle drawn in DESIGN §4 must be expressible; a lost edge strands orders."""
    assert target in TRANSITIONS[origin]
    assert check_transition(origin, target).to_status is target


@pytest.mark.parametrize(
    ("origin", "target"),
    [
        (Status.delivered, Status.canceled),  # after delivery only a dispute can refund
        (Status.delivered, Status.refunded),
        (Status.delivered, Status.fulfilling),
        (Status.pending_payment, Status.refunded),  # nothing was paid
        (Status.pending_payment, Status.delivered),  # never deliver unpaid
        (Status.pending_payment, Status.fulfilling),
        (Status.expired, Status.paid),
        (Status.canceled, Status.paid),
        (Status.refunded, Status.delivered),
        (Status.completed, Status.disputed),
        (Status.paid, Status.pending_payment),
        (Status.paid, Status.paid),
    ],
)
def test_dangerous_edges_are_absent(origin: Status, target: Status) -> None:
    """Moves that would lose money or deliver unpaid goods must be impossible."""
    assert target not in TRANSITIONS[origin]
    with pytest.raises(TransitionError):
        check_transition(origin, target)


def test_only_pending_payment_leads_to_paid() -> None:
    """Paying is the single entry into `paid` (besides creation in the same transaction)."""
    sources = {s for s, nxt in TRANSITIONS.items() if Status.paid in nxt}
    assert sources == {Status.pending_payment}


def test_nothing_returns_to_pending_payment() -> None:
    """Only an unpaid order itself stays unpaid (a new reason, e.g. a payment held for staff);
    nothing paid or closed ever goes back to waiting for payment."""
    sources = {s for s, nxt in TRANSITIONS.items() if Status.pending_payment in nxt}
    assert sources == {Status.pending_payment}


# -- check_transition, exhaustively -------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "target"),
    list(itertools.product(ORIGINS, ALL_STATUSES)),
    ids=lambda v: str(v),
)
def test_check_transition_accepts_exactly_the_table(origin: Status | None, target: Status) -> None:
    """Every (from, to) pair: allowed iff in the expected table (or a creation target for
    None), and never through a late-payment door unless the caller asks for one."""
    if _allowed(origin, target):
        move = check_transition(origin, target)
        assert move == Move(origin, target, DEFAULT_STAGE[target])
    else:
        with pytest.raises(TransitionError) as info:
            check_transition(origin, target)
        assert info.value.from_status == origin
        assert info.value.to_status == target
        assert str(target) in str(info.value)


@pytest.mark.parametrize(
    ("origin", "target"),
    list(itertools.product(ORIGINS, ALL_STATUSES)),
    ids=lambda v: str(v),
)
def test_late_payment_opens_exactly_the_expected_doors(
    origin: Status | None, target: Status
) -> None:
    """With `late_payment`, every (from, to) pair is allowed iff the ordinary table or the
    late-payment doors allow it: the flag widens nothing else (a late payment cannot, say,
    deliver a refunded order)."""
    if _allowed(origin, target, late_payment=True):
        assert check_transition(origin, target, late_payment=True).to_status is target
    else:
        with pytest.raises(TransitionError):
            check_transition(origin, target, late_payment=True)


def test_transition_error_is_a_value_error() -> None:
    """Callers that catch ValueError for bad input also catch forbidden moves."""
    with pytest.raises(ValueError, match="not allowed"):
        check_transition(Status.completed, Status.paid)


def test_creation_only_as_pending_payment_or_paid() -> None:
    assert check_transition(None, Status.pending_payment).stage is Stage.awaiting_payment
    assert check_transition(None, Status.paid).stage is Stage.payment_received
    for status in set(Status) - CREATION_TARGETS:
        with pytest.raises(TransitionError):
            check_transition(None, status)


def test_check_transition_accepts_plain_strings() -> None:
    """Status values read back from the database are plain strings; StrEnum makes them equal."""
    move = check_transition(Status("paid"), Status("screening"))
    assert move.to_status is Status.screening
    assert check_transition("paid", "screening").stage is Stage.risk_check  # type: ignore[arg-type]


def test_unknown_target_is_refused() -> None:
    with pytest.raises(TransitionError):
        check_transition(Status.paid, "teleported")  # type: ignore[arg-type]
    with pytest.raises(TransitionError):
        check_transition(None, "teleported")  # type: ignore[arg-type]


# -- stages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ALL_STATUSES)
def test_default_stage_is_allowed_for_its_status(status: Status) -> None:
    allowed = STAGES.get(status, frozenset({DEFAULT_STAGE[status]}))
    assert DEFAULT_STAGE[status] in allowed


@pytest.mark.parametrize(
    ("status", "stage"),
    [
        (Status.pending_payment, Stage.awaiting_payment),
        (Status.paid, Stage.payment_received),
        (Status.screening, Stage.risk_check),
        (Status.review, Stage.manual_review),
        (Status.fulfilling, Stage.allocating),
        (Status.backordered, Stage.waiting_stock),
        (Status.needs_buyer_action, Stage.waiting_buyer),
        (Status.delivered, Stage.delivered),
        (Status.completed, Stage.confirmed),
        (Status.disputed, Stage.dispute_open),
        (Status.expired, Stage.closed),
        (Status.rejected, Stage.closed),
        (Status.canceled, Stage.closed),
        (Status.refunded, Stage.closed),
        (Status.replaced, Stage.closed),
    ],
)
def test_default_stage_per_status(status: Status, stage: Stage) -> None:
    """Pinned so a silent change of a buyer-visible stage shows up in review."""
    assert DEFAULT_STAGE[status] is stage


FULFILLING_STAGES = frozenset(
    {Stage.allocating, Stage.procuring, Stage.awaiting_supplier, Stage.staff_processing}
)


@pytest.mark.parametrize("stage", list(Stage))
def test_only_fulfilling_stages_within_fulfilling(stage: Stage) -> None:
    """Inside `fulfilling` the four work stages are allowed, nothing else."""
    for origin in (Status.paid, Status.backordered, Status.needs_buyer_action, Status.review):
        if stage in FULFILLING_STAGES:
            move = check_transition(origin, Status.fulfilling, stage)
            assert move.stage is stage
        else:
            with pytest.raises(TransitionError):
                check_transition(origin, Status.fulfilling, stage)


@pytest.mark.parametrize(
    ("origin", "target"),
    [
        (o, t)
        for o in ORIGINS
        for t in ALL_STATUSES
        if _allowed(o, t) and t is not Status.fulfilling
    ],
    ids=lambda v: str(v),
)
def test_other_statuses_only_take_their_default_stage(
    origin: Status | None, target: Status
) -> None:
    """Outside `fulfilling`, naming any stage but the default is refused."""
    assert check_transition(origin, target, DEFAULT_STAGE[target]).stage is DEFAULT_STAGE[target]
    for stage in set(Stage) - {DEFAULT_STAGE[target]}:
        with pytest.raises(TransitionError):
            check_transition(origin, target, stage)


def test_stage_does_not_rescue_a_forbidden_move() -> None:
    with pytest.raises(TransitionError):
        check_transition(Status.pending_payment, Status.fulfilling, Stage.allocating)
    with pytest.raises(TransitionError):
        check_transition(Status.completed, Status.fulfilling, Stage.procuring)


# -- graph properties ---------------------------------------------------------------------------


def test_terminal_is_exactly_the_statuses_without_successors() -> None:
    assert {s for s in Status if not TRANSITIONS[s]} == TERMINAL
    assert TERMINAL == {
        Status.completed,
        Status.expired,
        Status.rejected,
        Status.canceled,
        Status.refunded,
        Status.replaced,
    }
    for status in Status:
        assert is_terminal(status) is (status in TERMINAL)


@pytest.mark.parametrize("status", [s for s in Status if s not in TERMINAL])
def test_every_non_terminal_status_can_finish(status: Status) -> None:
    """Progress (invariant 4): no status is a trap from which no order can ever end."""
    assert _reachable(status) & TERMINAL


def test_every_status_is_reachable_from_creation() -> None:
    """A status no order can reach is a table error (or dead code elsewhere)."""
    reachable = set(CREATION_TARGETS)
    for start in CREATION_TARGETS:
        reachable |= _reachable(start)
    assert reachable == set(Status)


@pytest.mark.parametrize("status", sorted(PAID_UNDELIVERED))
def test_paid_money_can_always_be_returned(status: Status) -> None:
    """Money held for an undelivered order can always go back to the buyer."""
    assert {Status.refunded, Status.canceled} & _reachable(status)
    # ... and directly, without having to pass through delivery first.
    assert {Status.refunded, Status.canceled} & TRANSITIONS[status]


def test_paid_undelivered_is_neither_terminal_nor_delivered() -> None:
    assert not PAID_UNDELIVERED & TERMINAL
    assert Status.pending_payment not in PAID_UNDELIVERED
    assert Status.delivered not in PAID_UNDELIVERED


@pytest.mark.parametrize("status", sorted(CANCELABLE))
def test_cancelable_statuses_can_be_canceled(status: Status) -> None:
    assert status not in TERMINAL
    assert Status.canceled in TRANSITIONS[status]
    assert check_transition(status, Status.canceled).stage is Stage.closed


def test_cancelable_never_includes_delivered_goods() -> None:
    assert not CANCELABLE & {Status.delivered, Status.completed, Status.disputed}


def test_not_a_duplicate_statuses_are_terminal() -> None:
    """Only finished orders without goods are ignored by the duplicate-order guard."""
    assert NOT_A_DUPLICATE <= TERMINAL
    assert Status.completed not in NOT_A_DUPLICATE
    assert Status.replaced not in NOT_A_DUPLICATE


# -- random walks -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_walks_never_leave_the_table(data: st.DataObject) -> None:
    """Following allowed moves from creation always stays valid and ends only in TERMINAL."""
    current: Status | None = None
    for _ in range(40):
        choices = sorted(CREATION_TARGETS if current is None else TRANSITIONS[current])
        if not choices:
            assert current in TERMINAL
            return
        target = data.draw(st.sampled_from(choices))
        stage_options = sorted(STAGES.get(target, frozenset({DEFAULT_STAGE[target]})))
        stage = data.draw(st.one_of(st.none(), st.sampled_from(stage_options)))
        move = check_transition(current, target, stage)
        assert move.from_status == current
        assert move.to_status is target
        assert move.stage is (stage or DEFAULT_STAGE[target])
        current = target
    assert current is not None
    assert current in TRANSITIONS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALL_STATUSES), min_size=1, max_size=30))
def test_arbitrary_attempts_are_accepted_iff_allowed(attempts: list[Status]) -> None:
    """Random attempted moves: each succeeds exactly when the table allows it; state holds."""
    current: Status | None = None
    for target in attempts:
        if _allowed(current, target):
            assert check_transition(current, target).to_status is target
            current = target
        else:
            with pytest.raises(TransitionError):
                check_transition(current, target)
    if current is not None:
        assert current in TRANSITIONS

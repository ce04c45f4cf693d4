"""The order state machine: one pure table, no I/O.

`status` is what the buyer sees; `stage` is the fine-grained step within it. Every move goes
through `check_transition`, so a forbidden move is impossible wherever it is attempted, and the
table below is the whole truth about which moves exist (tests walk it exhaustively).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    pending_payment = "pending_payment"
    paid = "paid"
    screening = "screening"
    review = "review"
    fulfilling = "fulfilling"
    backordered = "backordered"
    needs_buyer_action = "needs_buyer_action"
    delivered = "delivered"
    completed = "completed"
    disputed = "disputed"
    expired = "expired"
    rejected = "rejected"
    canceled = "canceled"
    refunded = "refunded"
    replaced = "replaced"


class Stage(StrEnum):
    awaiting_payment = "awaiting_payment"
    payment_received = "payment_received"
    risk_check = "risk_check"
    manual_review = "manual_review"
    allocating = "allocating"  # claiming own stock
    procuring = "procuring"  # purchase request sent upstream
    awaiting_supplier = "awaiting_supplier"  # supplier accepted; waiting for callback / poll
    staff_processing = "staff_processing"  # manual products: staff deliver by hand
    waiting_stock = "waiting_stock"  # backordered until stock or a supplier is available
    waiting_buyer = "waiting_buyer"
    delivered = "delivered"
    confirmed = "confirmed"
    dispute_open = "dispute_open"
    closed = "closed"


# Which statuses may follow which. Terminal statuses have no successors.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.pending_payment: frozenset(
        {
            Status.pending_payment,  # a new reason: e.g. a payment that needs staff to check it
            Status.paid,
            Status.expired,
            Status.canceled,
        }
    ),
    Status.paid: frozenset(
        {
            Status.screening,
            Status.fulfilling,
            Status.backordered,
            Status.delivered,
            Status.canceled,
            Status.refunded,
        }
    ),
    Status.screening: frozenset(
        {Status.review, Status.fulfilling, Status.rejected, Status.canceled, Status.refunded}
    ),
    Status.review: frozenset(
        {
            Status.fulfilling,
            Status.backordered,  # approved, but the stock went while it waited (no keys held)
            Status.delivered,  # approved with its keys held
            Status.rejected,
            Status.canceled,
            Status.refunded,
        }
    ),
    Status.fulfilling: frozenset(
        {
            Status.fulfilling,  # a stage change: allocating -> procuring -> awaiting_supplier
            Status.delivered,
            Status.backordered,
            Status.needs_buyer_action,
            Status.canceled,
            Status.refunded,
        }
    ),
    Status.backordered: frozenset(
        {Status.fulfilling, Status.delivered, Status.canceled, Status.refunded}
    ),
    Status.needs_buyer_action: frozenset(
        {
            Status.fulfilling,
            # corrected information is screened again: it may be what the first one hid
            Status.review,
            Status.rejected,
            Status.canceled,
            Status.refunded,
        }
    ),
    Status.delivered: frozenset({Status.completed, Status.disputed}),
    Status.disputed: frozenset({Status.replaced, Status.refunded, Status.completed}),
    Status.completed: frozenset(),
    Status.expired: frozenset(),
    Status.rejected: frozenset(),
    Status.canceled: frozenset(),
    Status.refunded: frozenset(),
    Status.replaced: frozenset(),
}

TERMINAL: frozenset[Status] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

# The only way out of a terminal status: money that arrives after the order was closed. A
# gateway can confirm a payment after the payment window (a slow bank, a lost notify found by
# the active query); that money is never ignored. The order is fulfilled if it still can be
# (expired -> paid), otherwise the money is credited back and the order says so (-> refunded).
# Kept apart from TRANSITIONS so nothing but a payment that arrives late can use these doors.
LATE_PAYMENT: dict[Status, frozenset[Status]] = {
    # ... and a same-status event says what became of money that could not be applied.
    Status.expired: frozenset({Status.paid, Status.refunded, Status.expired}),
    Status.canceled: frozenset({Status.refunded, Status.canceled}),
}

# Statuses in which the buyer has paid and nothing has been delivered yet: money is held.
PAID_UNDELIVERED: frozenset[Status] = frozenset(
    {
        Status.paid,
        Status.screening,
        Status.review,
        Status.fulfilling,
        Status.backordered,
        Status.needs_buyer_action,
    }
)

# A buyer (or reseller) may cancel while nothing has been delivered.
CANCELABLE: frozenset[Status] = frozenset(
    {Status.pending_payment, Status.backordered, Status.needs_buyer_action}
)

# Statuses that do not count as an earlier order for the duplicate-order guard.
NOT_A_DUPLICATE: frozenset[Status] = frozenset(
    {Status.canceled, Status.expired, Status.rejected, Status.refunded}
)

# The stage each status starts in unless the caller names a more precise one.
DEFAULT_STAGE: dict[Status, Stage] = {
    Status.pending_payment: Stage.awaiting_payment,
    Status.paid: Stage.payment_received,
    Status.screening: Stage.risk_check,
    Status.review: Stage.manual_review,
    Status.fulfilling: Stage.allocating,
    Status.backordered: Stage.waiting_stock,
    Status.needs_buyer_action: Stage.waiting_buyer,
    Status.delivered: Stage.delivered,
    Status.completed: Stage.confirmed,
    Status.disputed: Stage.dispute_open,
    Status.expired: Stage.closed,
    Status.rejected: Stage.closed,
    Status.canceled: Stage.closed,
    Status.refunded: Stage.closed,
    Status.replaced: Stage.closed,
}

# Stages allowed within each status (a stage change inside a status is also a transition).
STAGES: dict[Status, frozenset[Stage]] = {
    Status.fulfilling: frozenset(
        {Stage.allocating, Stage.procuring, Stage.awaiting_supplier, Stage.staff_processing}
    ),
}


class TransitionError(ValueError):
    def __init__(self, from_status: Status | None, to_status: Status) -> None:
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"{from_status} -> {to_status} is not allowed")


@dataclass(frozen=True, slots=True)
class Move:
    from_status: Status | None
    to_status: Status
    stage: Stage


def check_transition(
    from_status: Status | None,
    to_status: Status,
    stage: Stage | None = None,
    *,
    late_payment: bool = False,
) -> Move:
    """Validate a move and resolve its stage. `None` as origin means the order is being created.

    A new order starts as `pending_payment` (gateway) or `paid` (balance, in the same
    transaction as the debit). `late_payment` additionally opens the `LATE_PAYMENT` doors.
    """
    if from_status is None:
        if to_status not in (Status.pending_payment, Status.paid):
            raise TransitionError(from_status, to_status)
    elif to_status not in TRANSITIONS[from_status] and not (
        late_payment and to_status in LATE_PAYMENT.get(from_status, frozenset())
    ):
        raise TransitionError(from_status, to_status)
    resolved = stage or DEFAULT_STAGE[to_status]
    allowed = STAGES.get(to_status, frozenset({DEFAULT_STAGE[to_status]}))
    if resolved not in allowed:
        raise TransitionError(from_status, to_status)
    return Move(from_status, to_status, resolved)


def is_terminal(status: Status) -> bool:
    return status in TERMINAL

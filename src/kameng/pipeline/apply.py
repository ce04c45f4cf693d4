"""Applying a supplier's answer to a procurement and its order, in one transaction.

Used for purchase answers, poll answers and callbacks alike, so all three paths share one
set of rules. Every rule is monotonic — keys only accumulate (deduplicated by fingerprint),
a final procurement never changes again — which is what makes duplicate, late and
out-of-order answers harmless.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.orders import fulfil
from kameng.orders import service as orders
from kameng.orders.state import TERMINAL, Stage, Status
from kameng.security.crypto import Vault
from kameng.suppliers import claims
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import LIVE_STATES, ProcurementState
from kameng.suppliers.port import Outcome, Result

log = logging.getLogger("kameng.pipeline")

# Rejection reasons that are about the buyer's information, not about supply.
BUYER_INFO_REASONS = frozenset({"invalid_fields"})


@dataclass(frozen=True, slots=True)
class Timing:
    """The pipeline's clock settings, passed down so tests can shrink them."""

    poll_s: int = 30
    retry_cap_s: int = 300
    backorder_retry_s: int = 60
    buyer_action_s: int = 86_400  # how long a buyer has to correct refused information


def backoff(attempt: int, *, first: float, cap: float) -> timedelta:
    """Capped exponential backoff with jitter in [50 %, 100 %] of the step (never a storm)."""
    step = min(cap, first * 2 ** max(attempt - 1, 0))
    return timedelta(seconds=max(0.2, random.uniform(step / 2, step)))


def cap_at_deadline(order: Any, when: datetime) -> datetime:
    """Never schedule past the order's SLA deadline: the deadline itself is an action time."""
    deadline = order.sla_deadline
    return min(when, deadline) if deadline is not None else when


def transition(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    to_status: Status,
    stage: Stage | None,
    reason: str,
    now: datetime,
    next_action_at: datetime | None,
    details: dict[str, Any] | None = None,
    extra_values: dict[str, Any] | None = None,
    actor: str = "system",
) -> None:
    """An order move (its notification is written by the move itself)."""
    orders.transition(
        conn,
        order=loaded.order,
        to_status=to_status,
        stage=stage,
        reason=reason,
        actor=actor,
        now=now,
        next_action_at=next_action_at,
        details=details,
        extra_values=extra_values,
    )


def deliver(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    accounts: ledger.PlatformAccounts,
    source: str,
    reason: str,
    now: datetime,
    details: dict[str, Any] | None = None,
    allow_partial: bool = False,
) -> None:
    fulfil.deliver(
        conn,
        loaded=loaded,
        accounts=accounts,
        source=source,
        reason=reason,
        now=now,
        details=details,
        allow_partial=allow_partial,
    )


def refund(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    accounts: ledger.PlatformAccounts,
    reason: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    fulfil.refund(conn, loaded=loaded, accounts=accounts, reason=reason, now=now, details=details)


def apply_result(
    conn: Connection,
    *,
    vault: Vault,
    accounts: ledger.PlatformAccounts,
    procurement: Any,
    supplier_code: str,
    result: Result,
    now: datetime,
    timing: Timing,
    via: str,
    latency_ms: int | None = None,
    resent: bool = False,
    promises: suppliers.Promises | None = None,
) -> str:
    """Apply one answer about `procurement`. Returns a short label of what happened.

    Locks are always taken order first, then procurement (a callback and a poll racing on the
    same purchase would otherwise deadlock), and the procurement is read only once the order
    is locked, so an answer applied meanwhile by the other path is seen, never overwritten.
    `resent` counts a re-sent purchase as one more attempt (and a new copy in flight).
    `promises` are the supplier's (docs/suppliers.md): they decide what "not found" means.
    """
    promises = promises or suppliers.Promises()
    loaded = fulfil.load(conn, order_id=procurement.order_id)
    if loaded is None or loaded.line is None:
        return "order_missing"
    proc = suppliers.procurement_by_out_trade_no(
        conn, supplier_id=procurement.supplier_id, out_trade_no=procurement.out_trade_no
    )
    if proc is None:
        return "procurement_missing"
    order = loaded.order
    state = ProcurementState(proc.state)
    extra: dict[str, Any] = {}
    if resent:
        extra["attempts"] = proc.attempts + 1
        extra["last_sent_at"] = now
    if result.outcome in (Outcome.delivered, Outcome.partial) and proc.charged_at is None:
        # They kept our money for it, whatever we make of the answer below (DESIGN §5.3).
        extra["charged_at"] = now
        extra["charged_cents"] = (
            result.cost_cents if result.cost_cents is not None else proc.cost_cents
        )
    if latency_ms is not None and proc.latency_ms is None:
        extra["latency_ms"] = latency_ms
    if result.trade_no and not proc.trade_no:
        extra["trade_no"] = result.trade_no[:64]
    source = f"supplier:{supplier_code}"
    keys = [(k.code, k.secret) for k in result.keys]

    succeeded = result.outcome in (Outcome.delivered, Outcome.partial)
    if succeeded and _revivable(conn, loaded=loaded, proc=proc, state=state):
        # Refused in a way a late copy could undo, and a copy did succeed before the line was
        # bought anywhere else (no new purchase starts while such a question is open): this
        # purchase serves its line after all.
        suppliers.update_procurement(
            conn,
            procurement_id=proc.id,
            state=ProcurementState.accepted,
            now=now,
            settles_at=None,
            late_check_at=None,
        )
        state = ProcurementState.accepted
        proc = suppliers.procurement_by_out_trade_no(
            conn, supplier_id=proc.supplier_id, out_trade_no=proc.out_trade_no
        )

    if state not in LIVE_STATES:
        # Final already. A success now, for a purchase we had given up on (refused, never
        # arrived, abandoned at the deadline), is a late success: caught, never lost.
        if succeeded and state is not ProcurementState.delivered:
            return _late_success(
                conn, vault, loaded=loaded, proc=proc, keys=keys, source=source, now=now, **extra
            )
        if keys and succeeded:
            # A duplicate purchase's keys (or a repeat of delivered ones, refused by their
            # fingerprints): ours, put on sale rather than lost.
            added = _keys_to_stock(conn, vault, order=order, keys=keys, source=source, now=now)
            if added:
                log.warning("%d late key(s) for %s went to stock", added, proc.out_trade_no)
            return "late_keys_to_stock"
        return "ignored_final"

    if Status(order.status) in TERMINAL or order.status == Status.delivered.value:
        # The order ended (refunded at its deadline, canceled) while this purchase was open.
        if result.outcome in (Outcome.delivered, Outcome.partial):
            extra["finished_state"] = ProcurementState.abandoned
            return _late_success(
                conn, vault, loaded=loaded, proc=proc, keys=keys, source=source, now=now, **extra
            )
        if result.outcome is Outcome.rejected:
            suppliers.update_procurement(
                conn,
                procurement_id=proc.id,
                state=ProcurementState.rejected,
                now=now,
                reason=result.reason[:64] or "order_closed",
                **_refusal_times(proc, promises, binding=result.binding, now=now),
                **extra,
            )
        else:
            # Still open at the supplier, for an order that no longer wants it: give it up and
            # keep asking until its outcome is known (a late success is caught, never lost).
            suppliers.update_procurement(
                conn,
                procurement_id=proc.id,
                state=ProcurementState.abandoned,
                now=now,
                reason="order_closed",
                late_check_at=now,
                **extra,
            )
        return "order_closed"

    outcome = result.outcome
    is_card = loaded.delivery_kind == DeliveryKind.card_key.value
    if outcome in (Outcome.delivered, Outcome.partial):
        held = proc.keys_received
        if is_card:
            held = fulfil.store_supplier_keys(
                conn,
                vault,
                order=order,
                line=loaded.line,
                keys=keys,
                source=source,
                unit_cost_cents=proc.cost_cents // max(proc.quantity, 1),
                now=now,
            )
        complete = (not is_card and outcome is Outcome.delivered) or (
            is_card and held >= loaded.line.quantity
        )
        _feed_breaker(conn, supplier_id=proc.supplier_id, ok=True, now=now)
        if complete:
            suppliers.update_procurement(
                conn,
                procurement_id=proc.id,
                state=ProcurementState.delivered,
                now=now,
                keys_received=held,
                **extra,
            )
            deliver(
                conn,
                loaded=loaded,
                accounts=accounts,
                source=source,
                reason="upstream_delivered",
                now=now,
                details={"supplier": supplier_code, "via": via},
            )
            return "delivered"
        suppliers.update_procurement(
            conn,
            procurement_id=proc.id,
            state=ProcurementState.partial,
            now=now,
            keys_received=held,
            **extra,
        )
        # Keep polling for the rest; the deadline decides what to do with a part.
        again = cap_at_deadline(
            order,
            now + backoff(proc.attempts, first=min(timing.poll_s, 5), cap=timing.retry_cap_s),
        )
        if order.reason == "upstream_partial" and held == proc.keys_received:
            fulfil.reschedule(conn, order=loaded.order, next_action_at=again)
            return "partial"
        transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.awaiting_supplier,
            reason="upstream_partial",
            now=now,
            next_action_at=cap_at_deadline(
                order,
                now + backoff(proc.attempts, first=min(timing.poll_s, 5), cap=timing.retry_cap_s),
            ),
            details={"supplier": supplier_code, "received": held, "of": loaded.line.quantity},
        )
        return "partial"

    if outcome is Outcome.accepted:
        if state is not ProcurementState.partial:
            suppliers.update_procurement(
                conn, procurement_id=proc.id, state=ProcurementState.accepted, now=now, **extra
            )
        _feed_breaker(conn, supplier_id=proc.supplier_id, ok=True, now=now)
        # The supplier took the order but says why it is not done yet (a kameng site that is
        # itself out of stock): the buyer should read that, not just "accepted".
        accepted_reason = (
            "upstream_backordered"
            if result.reason == "out_of_stock"
            else "awaiting_supplier_callback"
        )
        waiting = order.stage == Stage.awaiting_supplier.value and order.reason in (
            accepted_reason,
            "upstream_partial",
        )
        next_at = cap_at_deadline(
            order,
            now
            + (
                timedelta(seconds=timing.poll_s)
                if not waiting
                else backoff(proc.attempts + 1, first=timing.poll_s, cap=timing.retry_cap_s)
            ),
        )
        if waiting:
            fulfil.reschedule(conn, order=loaded.order, next_action_at=next_at)
        else:
            transition(
                conn,
                loaded=loaded,
                to_status=Status.fulfilling,
                stage=Stage.awaiting_supplier,
                reason=accepted_reason,
                now=now,
                next_action_at=next_at,
                details={"supplier": supplier_code},
            )
        return "accepted"

    settles_at = now
    refusal: dict[str, Any] = {"settles_at": now}
    if outcome is Outcome.not_found:
        # "Not found" is not a refusal while a copy of our request may still arrive and buy
        # (DESIGN §5.3): only once none can is it known that nothing was bought.
        verdict = suppliers.not_found_means(proc, promises, now=now)
        if state is ProcurementState.partial or verdict is not suppliers.NotFound.never_arrived:
            return _still_a_question(
                conn, loaded=loaded, proc=proc, state=state, timing=timing, now=now, **extra
            )
    elif outcome is Outcome.rejected:
        refusal = _refusal_times(proc, promises, binding=result.binding, now=now)
        settles_at = refusal["settles_at"]

    if outcome in (Outcome.rejected, Outcome.not_found):
        reason = result.reason or ("not_received" if outcome is Outcome.not_found else "rejected")
        if state is ProcurementState.partial:
            # They delivered part and now refuse the rest: deliver the part, refund the rest.
            suppliers.update_procurement(
                conn,
                procurement_id=proc.id,
                state=ProcurementState.delivered,
                now=now,
                reason=reason[:64],
                **extra,
            )
            deliver(
                conn,
                loaded=loaded,
                accounts=accounts,
                source=source,
                reason="upstream_partial_refunded",
                now=now,
                details={"supplier": supplier_code},
                allow_partial=True,
            )
            return "partial_delivered"
        suppliers.update_procurement(
            conn,
            procurement_id=proc.id,
            state=ProcurementState.rejected,
            now=now,
            reason=reason[:64],
            **refusal,
            **extra,
        )
        supplier_fault = reason in suppliers.SUPPLIER_WIDE
        _feed_breaker(conn, supplier_id=proc.supplier_id, ok=not supplier_fault, now=now)
        if reason in BUYER_INFO_REASONS:
            # The buyer gets their own time to answer (their own SLA, then an automatic refund);
            # the delivery SLA starts again when they have corrected the information.
            wait_until = now + timedelta(seconds=timing.buyer_action_s)
            transition(
                conn,
                loaded=loaded,
                to_status=Status.needs_buyer_action,
                stage=None,
                reason="buyer_info_invalid",
                now=now,
                next_action_at=wait_until,
                details={"supplier": supplier_code, "answer_by": wait_until.isoformat()},
                extra_values={"sla_deadline": wait_until},
            )
            return "needs_buyer_action"
        # Try the next offer right away (the step after this one routes again) — or, when a
        # copy of the refused request could still be accepted, once none can.
        transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.procuring,
            reason=f"upstream_{reason}"[:64],
            now=now,
            next_action_at=cap_at_deadline(order, max(now, settles_at)),
            details={"supplier": supplier_code}
            | ({"settles_at": settles_at.isoformat()} if settles_at > now else {}),
        )
        return "rejected" if settles_at <= now else "rejected_settling"

    # unknown: resolve by query after a backoff, never by buying again
    return _still_a_question(
        conn,
        loaded=loaded,
        proc=proc,
        state=state,
        timing=timing,
        now=now,
        failure=True,
        supplier_code=supplier_code,
        detail=result.detail,
        **extra,
    )


def _revivable(
    conn: Connection, *, loaded: fulfil.Loaded, proc: Any, state: ProcurementState
) -> bool:
    """A refused purchase that succeeded late can still serve its line when the order is
    waiting to be procured and no other purchase of the line is open or done."""
    if state is not ProcurementState.rejected or loaded.order.status not in (
        Status.fulfilling.value,
        Status.backordered.value,
    ):
        return False
    if loaded.order.stage == Stage.staff_processing.value:
        return False
    others = suppliers.procurements_of_line(conn, line_id=loaded.line.id)
    return not any(
        p.id != proc.id and (p.state != ProcurementState.rejected.value or p.charged_at)
        for p in others
    )


def _refusal_times(
    proc: Any, promises: suppliers.Promises, *, binding: bool, now: datetime
) -> dict[str, Any]:
    """When a refused purchase is settled, and — when a late copy could still undo the
    refusal — when the worker asks the supplier about it once more (after it settled)."""
    settles_at = suppliers.refusal_settles_at(proc, promises, binding=binding, now=now)
    return {"settles_at": settles_at, "late_check_at": None if binding else settles_at}


def _still_a_question(
    conn: Connection,
    *,
    loaded: fulfil.Loaded,
    proc: Any,
    state: ProcurementState,
    timing: Timing,
    now: datetime,
    failure: bool = False,
    supplier_code: str = "",
    detail: str = "",
    **extra: Any,
) -> str:
    """The purchase may or may not have happened: ask again after a backoff, never buy again.

    `failure` (a timeout or a garbled answer) counts against the supplier's circuit; a clear
    "not found" while our request may still be in flight does not — the supplier answered.
    """
    order = loaded.order
    attempts = proc.attempts + 1
    extra.pop("attempts", None)
    suppliers.update_procurement(
        conn,
        procurement_id=proc.id,
        state=ProcurementState.unknown
        if state is not ProcurementState.partial
        else ProcurementState.partial,
        now=now,
        attempts=attempts,
        **extra,
    )
    if failure:
        _feed_breaker(conn, supplier_id=proc.supplier_id, ok=False, now=now)
    next_at = cap_at_deadline(order, now + backoff(attempts, first=1.0, cap=timing.retry_cap_s))
    if order.reason == "upstream_unknown_outcome":
        fulfil.reschedule(conn, order=loaded.order, next_action_at=next_at)
    else:
        transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.awaiting_supplier,
            reason="upstream_unknown_outcome",
            now=now,
            next_action_at=next_at,
            details={"supplier": supplier_code or str(proc.supplier_id), "detail": detail[:100]}
            if failure
            else {"detail": "not_found_yet"},
        )
    return "unknown" if failure else "not_found_yet"


def _late_success(
    conn: Connection,
    vault: Vault,
    *,
    loaded: fulfil.Loaded,
    proc: Any,
    keys: list[tuple[str, str | None]],
    source: str,
    now: datetime,
    finished_state: ProcurementState | None = None,
    **extra: Any,
) -> str:
    """A purchase succeeded after its line was served another way, refunded, or given up on.

    Caught, never lost: card keys go to our own stock (ours to sell), a top-up is money the
    supplier took for nothing we can use — a claim staff recover. Either way the procurement
    counts as charged, so `kameng verify` and reconciliation see it.
    """
    order = loaded.order
    is_card = loaded.delivery_kind == DeliveryKind.card_key.value
    added = 0
    if keys and is_card:
        added = _keys_to_stock(conn, vault, order=order, keys=keys, source=source, now=now)
    if finished_state is not None:
        extra["reason"] = proc.reason or "order_closed"
        suppliers.update_procurement(
            conn, procurement_id=proc.id, state=finished_state, now=now, **extra
        )
    elif extra:
        suppliers.update_procurement(
            conn, procurement_id=proc.id, state=ProcurementState(proc.state), now=now, **extra
        )
    charged = extra.get("charged_cents", proc.charged_cents)
    claims.record_late_success(
        conn,
        procurement=proc,
        stocked_keys=added if is_card else None,
        amount_cents=int(charged if charged is not None else proc.cost_cents),
        now=now,
    )
    log.warning(
        "late success for %s (order %s): %s",
        proc.out_trade_no,
        order.order_no,
        f"{added} key(s) to stock" if is_card else "top-up to recover from the supplier",
    )
    return "late_keys_to_stock" if is_card else "late_overcharge"


def _keys_to_stock(
    conn: Connection,
    vault: Vault,
    *,
    order: Any,
    keys: list[tuple[str, str | None]],
    source: str,
    now: datetime,
) -> int:
    batch_id, aead = inventory.new_batch(
        conn,
        vault,
        sku_id=order.sku_id,
        source=f"{source} (late)",
        unit_cost_cents=None,
        imported_by="system",
        now=now,
    )
    return inventory.insert_keys(
        conn, vault, aead, sku_id=order.sku_id, batch_id=batch_id, keys=keys, now=now
    )


def _feed_breaker(conn: Connection, *, supplier_id: int, ok: bool, now: datetime) -> None:
    """Count the answer for the supplier's circuit; when a resting supplier answers well again,
    orders waiting for what it sells become due now ("fulfilled when a supplier recovers")."""
    changed = suppliers.record_call(conn, supplier_id=supplier_id, ok=ok, now=now)
    if changed == "closed":
        log.info("supplier %s recovered", supplier_id)
        fulfil.nudge_backorders(
            conn, sku_ids=suppliers.skus_of_supplier(conn, supplier_id=supplier_id), now=now
        )
    elif changed == "open":
        log.warning("supplier %s circuit opened", supplier_id)

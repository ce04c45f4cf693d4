"""One step of one due order: plan (short transaction) → talk to a supplier (no transaction)
→ apply the answer (short transaction).

The plan writes the procurement row *before* the request leaves, so whatever happens next —
a crash, a timeout, a callback racing the response — the next step finds it and resolves it by
querying. Nothing here holds a database transaction open across network I/O (DESIGN §6).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.orders import checkout, fulfil
from kameng.orders.models import OrderEvent
from kameng.orders.state import TERMINAL, Stage, Status
from kameng.payments import service as payments
from kameng.pipeline import apply, review_actions
from kameng.pipeline.apply import Timing, cap_at_deadline
from kameng.pipeline.registry import Adapters
from kameng.review.service import ReviewPolicy
from kameng.security.crypto import Vault
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import ProcurementState, Supplier, SupplierOffer
from kameng.suppliers.port import Outcome, Result

log = logging.getLogger("kameng.pipeline")
T = TypeVar("T")

_event = table(OrderEvent)
_supplier = table(Supplier)
_offer_table = table(SupplierOffer)

# At a payment deadline the gateway is asked once more before the order closes; the order
# waits this long for the answer, and never more than the grace in all.
FINAL_CHECK_WAIT = timedelta(seconds=15)
FINAL_CHECK_GRACE = timedelta(minutes=10)


@dataclass
class Plan:
    kind: str  # done | purchase | query
    label: str = ""
    deadline: datetime | None = None
    procurement: Any = None
    supplier: Any = None
    supplier_sku: str = ""
    quantity: int = 0
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step needs; built once per worker."""

    run: Callable[[Callable[[Connection], Any]], Awaitable[Any]]
    vault: Vault
    accounts: ledger.PlatformAccounts
    adapters: Adapters
    clock: Callable[[], datetime]
    callback_base_url: str
    timing: Timing = field(default_factory=Timing)
    lease_s: int = 120
    review_policy: ReviewPolicy = field(default_factory=ReviewPolicy)
    default_sla_s: int = 1800
    escalation_url: str = ""
    # Supplier rows and offers change rarely and are read by every step: keep them a second.
    cache_ttl_s: float = 1.0
    _cache: dict[tuple[str, int], tuple[float, Any]] = field(default_factory=dict)

    def cached(self, kind: str, key: int, load: Callable[[], Any]) -> Any:
        hit = self._cache.get((kind, key))
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load()
        self._cache[(kind, key)] = (now + self.cache_ttl_s, value)
        return value


def _supplier_row(conn: Connection, ctx: StepContext, supplier_id: int) -> Any:
    return ctx.cached(
        "supplier",
        supplier_id,
        lambda: conn.execute(select(_supplier).where(_supplier.c.id == supplier_id)).one(),
    )


def _offers(conn: Connection, ctx: StepContext, sku_id: int) -> list[suppliers.Offer]:
    offers: list[suppliers.Offer] = ctx.cached(
        "offers", sku_id, lambda: suppliers.offers_for(conn, sku_id=sku_id)
    )
    return offers


@dataclass(frozen=True, slots=True)
class ProcView:
    """The procurement a step works on, as far as the step needs it."""

    id: int
    order_id: int
    supplier_id: int
    offer_id: int
    out_trade_no: str
    state: str
    attempts: int
    quantity: int


def _round_start(conn: Connection, order: Any) -> datetime:
    """Offers refused since the order last came out of the backorder queue (or out of waiting
    for the buyer's corrected information) are not retried in this round; a new round tries
    everyone again."""
    last = conn.execute(
        select(_event.c.at)
        .where(
            _event.c.order_id == order.id,
            _event.c.from_status.in_((Status.backordered.value, Status.needs_buyer_action.value)),
        )
        .order_by(_event.c.id.desc())
        .limit(1)
    ).scalar()
    return last if last is not None else order.created_at


def plan_step(conn: Connection, ctx: StepContext, *, order_id: int, now: datetime) -> Plan:
    # Read, then lock: a SKU's backorder queue lock must be taken before any of its orders'
    # row locks (see fulfil.lock_backorder_queue), so the status decides what to lock first.
    peek = fulfil.load(conn, order_id=order_id, lock=False)
    if peek is None:
        return Plan("done", "missing")
    if peek.order.status == Status.backordered.value:
        fulfil.lock_backorder_queue(conn, sku_id=peek.order.sku_id)
    loaded = fulfil.lock_order(conn, loaded=peek)
    if loaded is None:
        return Plan("done", "missing")
    if (
        loaded.order.status == Status.backordered.value
        and peek.order.status != Status.backordered.value
    ):
        # It joined the queue in between, without us holding the queue lock: next round.
        fulfil.reschedule(conn, order=loaded.order, next_action_at=now)
        return Plan("done", "retry")
    order = loaded.order
    status = Status(order.status)
    if status in TERMINAL or status in (Status.delivered, Status.disputed):
        return Plan("done", "nothing_due")
    overdue = order.sla_deadline is not None and order.sla_deadline <= now

    if status is Status.backordered:
        if overdue:
            apply.refund(
                conn, loaded=loaded, accounts=ctx.accounts, reason="sla_expired_refund", now=now
            )
            return Plan("done", "refunded")
        served = fulfil.serve_backorders(conn, sku_id=order.sku_id, accounts=ctx.accounts, now=now)
        if order_id in served:
            return Plan("done", "delivered_from_stock")
        offers = suppliers.offers_for(conn, sku_id=order.sku_id)
        if not suppliers.route(offers, now=now, exclude=set()):
            reopen = suppliers.next_reopen(offers, exclude=set())
            wait = now + timedelta(seconds=ctx.timing.backorder_retry_s)
            if reopen is not None and reopen > now:
                wait = min(wait, reopen)
            fulfil.reschedule(conn, order=order, next_action_at=cap_at_deadline(order, wait))
            return Plan("done", "waiting_stock")
        apply.transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.procuring,
            reason="awaiting_supplier",
            now=now,
            next_action_at=now + timedelta(seconds=ctx.lease_s),
        )
        loaded = fulfil.load(conn, order_id=order_id)
        assert loaded is not None
        order = loaded.order
        status = Status.fulfilling

    if status is Status.fulfilling and order.stage == Stage.staff_processing.value:
        if overdue:
            apply.refund(
                conn, loaded=loaded, accounts=ctx.accounts, reason="staff_sla_expired", now=now
            )
            return Plan("done", "refunded")
        fulfil.reschedule(conn, order=order, next_action_at=order.sla_deadline or now)
        return Plan("done", "waiting_staff")

    if status is Status.pending_payment:
        deadline = order.sla_deadline
        if (
            deadline is not None
            and deadline <= now < deadline + FINAL_CHECK_GRACE
            and payments.request_final_check(conn, order_id=order.id, deadline=deadline, now=now)
        ):
            # Ask the gateway once more before closing: a buyer who paid in time is not late.
            fulfil.reschedule(conn, order=order, next_action_at=now + FINAL_CHECK_WAIT)
            return Plan("done", "final_payment_check")
        expired = checkout.expire_unpaid(conn, order=order, now=now)
        return Plan("done", "payment_expired" if expired else "awaiting_payment")

    if status is Status.review:
        fulfil_sla_s = ctx.default_sla_s
        sla = ctx.cached(
            "sla", order.sku_id, lambda: review_actions.product_sla(conn, sku_id=order.sku_id)
        )
        if sla:
            fulfil_sla_s = int(sla)
        label = review_actions.apply_sla(
            conn,
            loaded=loaded,
            policy=ctx.review_policy,
            accounts=ctx.accounts,
            fulfil_sla_s=fulfil_sla_s,
            escalation_url=ctx.escalation_url,
            now=now,
        )
        return Plan("done", label)

    if status is Status.needs_buyer_action:
        if overdue:
            apply.refund(
                conn,
                loaded=loaded,
                accounts=ctx.accounts,
                reason="buyer_action_sla_expired",
                now=now,
            )
            return Plan("done", "refunded")
        fulfil.reschedule(
            conn, order=order, next_action_at=order.sla_deadline or now + timedelta(hours=1)
        )
        return Plan("done", "waiting_buyer")

    if status is not Status.fulfilling:
        log.warning(
            "order %s is due in %s/%s, which the pipeline does not drive yet",
            order.order_no,
            order.status,
            order.stage,
        )
        return Plan("done", "not_driven")

    procs = suppliers.procurements_of_line(conn, line_id=loaded.line.id)
    live = suppliers.live_procurement(procs)
    if live is not None:
        known = {o.id: o.supplier_sku for o in _offers(conn, ctx, order.sku_id)}
        return Plan(
            "query",
            procurement=live,
            supplier=_supplier_row(conn, ctx, live.supplier_id),
            supplier_sku=known.get(live.offer_id) or _offer_sku(conn, live.offer_id),
            quantity=live.quantity,
            fields=dict(loaded.line.fields or {}),
            deadline=order.sla_deadline,
        )
    if overdue:
        apply.refund(
            conn, loaded=loaded, accounts=ctx.accounts, reason="sla_expired_refund", now=now
        )
        return Plan("done", "refunded")

    settling = suppliers.unsettled_until(procs, now=now)
    if settling is not None:
        # A refused purchase whose request could still be accepted by a copy in flight: buying
        # anywhere else now could buy twice (DESIGN §5.3). Wait until no copy can land.
        fulfil.reschedule(conn, order=order, next_action_at=cap_at_deadline(order, settling))
        return Plan("done", "settling")

    refused: set[int] = set()
    if any(p.state == "rejected" for p in procs):
        since = _round_start(conn, order)
        refused = {p.offer_id for p in procs if p.state == "rejected" and p.created_at >= since}
    offers = _offers(conn, ctx, order.sku_id)
    usable = suppliers.route(offers, now=now, exclude=refused)
    if not usable:
        last = procs[-1].reason if procs else ""
        reason = "upstream_out_of_stock" if last == "out_of_stock" else "upstream_unavailable"
        if not offers:
            reason = "no_supplier"
        wait = now + timedelta(seconds=ctx.timing.backorder_retry_s)
        reopen = suppliers.next_reopen(offers, exclude=refused)
        if reopen is not None and now < reopen < wait:
            wait = reopen
        apply.transition(
            conn,
            loaded=loaded,
            to_status=Status.backordered,
            stage=Stage.waiting_stock,
            reason=reason,
            now=now,
            next_action_at=cap_at_deadline(order, wait),
            details={"tried": len(refused)},
        )
        return Plan("done", "backordered")
    offer = usable[0]
    # Every earlier purchase of this line is settled here: refused and recorded as refused
    # under its number, or provably never arrived (see unsettled_until). A supplier answers
    # a number it has seen with what it recorded, so buying from it again needs a new one.
    earlier = sum(1 for p in procs if p.supplier_id == offer.supplier_id)
    out_trade_no = order.order_no if earlier == 0 else f"{order.order_no}-{earlier + 1}"
    proc_id = suppliers.start_procurement(
        conn,
        order_id=order.id,
        line_id=loaded.line.id,
        offer=offer,
        out_trade_no=out_trade_no,
        quantity=loaded.line.quantity,
        now=now,
    )
    if order.stage != Stage.procuring.value or order.reason != "awaiting_supplier":
        apply.transition(
            conn,
            loaded=loaded,
            to_status=Status.fulfilling,
            stage=Stage.procuring,
            reason="awaiting_supplier",
            now=now,
            next_action_at=now + timedelta(seconds=ctx.lease_s),
            details={"supplier": offer.supplier_code},
        )
    proc = ProcView(
        id=proc_id,
        order_id=order.id,
        supplier_id=offer.supplier_id,
        offer_id=offer.id,
        out_trade_no=out_trade_no,
        state=ProcurementState.sending.value,
        attempts=1,
        quantity=loaded.line.quantity,
    )
    return Plan(
        "purchase",
        procurement=proc,
        supplier=_supplier_row(conn, ctx, offer.supplier_id),
        supplier_sku=offer.supplier_sku,
        quantity=loaded.line.quantity,
        fields=dict(loaded.line.fields or {}),
        deadline=order.sla_deadline,
    )


def _offer_sku(conn: Connection, offer_id: int) -> str:
    return str(
        conn.execute(
            select(_offer_table.c.supplier_sku).where(_offer_table.c.id == offer_id)
        ).scalar_one()
    )


def expire_if_overdue(conn: Connection, ctx: StepContext, *, order_id: int, now: datetime) -> str:
    """At the deadline an order still waiting on a supplier is settled now: a part that
    arrived is delivered with the rest refunded, otherwise everything is refunded. The open
    purchase is marked abandoned; keys that still come later go to stock."""
    loaded = fulfil.load(conn, order_id=order_id)
    if loaded is None or loaded.order.status != Status.fulfilling.value:
        return ""
    order = loaded.order
    if order.sla_deadline is None or order.sla_deadline > now:
        return ""
    procs = suppliers.procurements_of_line(conn, line_id=loaded.line.id)
    live = suppliers.live_procurement(procs)
    if live is not None:
        suppliers.update_procurement(
            conn,
            procurement_id=live.id,
            state=ProcurementState.abandoned,
            now=now,
            reason="order_deadline",
            # It may still succeed: the worker keeps asking, and a late success is caught.
            late_check_at=now,
        )
    if (
        live is not None
        and live.keys_received > 0
        and loaded.delivery_kind == DeliveryKind.card_key.value
    ):
        apply.deliver(
            conn,
            loaded=loaded,
            accounts=ctx.accounts,
            source=f"supplier:{live.supplier_id}",
            reason="upstream_partial_refunded",
            now=now,
            allow_partial=True,
        )
        return "partial_delivered"
    apply.refund(conn, loaded=loaded, accounts=ctx.accounts, reason="sla_expired_refund", now=now)
    return "refunded"


async def _with_retries(ctx: StepContext, job: Callable[[Connection], T]) -> T:
    """A transaction that lost a compare-and-set race (a callback or cancel got there first)
    simply runs again against the new state."""
    for attempt in range(3):
        try:
            result: T = await ctx.run(job)
            return result
        except KamengError as exc:
            if exc.code is not ErrorCode.concurrent_update or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def run_step(ctx: StepContext, order_id: int) -> str:
    plan: Plan = await _with_retries(
        ctx, lambda conn: plan_step(conn, ctx, order_id=order_id, now=ctx.clock())
    )
    if plan.kind == "done":
        return plan.label
    proc, supplier = plan.procurement, plan.supplier
    promises = suppliers.Promises.of(supplier)
    adapter = ctx.adapters.get(supplier)
    callback_url = f"{ctx.callback_base_url}/api/v1/callbacks/suppliers/{supplier.code}"
    started = time.monotonic()
    via = "purchase"
    bump = False

    async def purchase() -> Result:
        return await adapter.purchase(
            order_no=proc.out_trade_no,
            sku=plan.supplier_sku,
            quantity=plan.quantity,
            fields=plan.fields,
            callback_url=callback_url,
        )

    if plan.kind == "purchase":
        result = await purchase()
    else:
        via = "poll"
        result = await adapter.query(order_no=proc.out_trade_no)
        if (
            result.outcome is Outcome.not_found
            and proc.state in (ProcurementState.sending.value, ProcurementState.unknown.value)
            and suppliers.not_found_means(proc, promises, now=ctx.clock())
            is suppliers.NotFound.resend
        ):
            # Not there (yet): send it again under the same number. They deduplicate on it, so
            # a copy still in flight and this one buy once between them.
            via, bump = "resend", True
            result = await purchase()
    latency_ms = int((time.monotonic() - started) * 1000)

    def settle(conn: Connection) -> str:
        now = ctx.clock()
        label = apply.apply_result(
            conn,
            vault=ctx.vault,
            accounts=ctx.accounts,
            procurement=proc,
            supplier_code=supplier.code,
            result=result,
            now=now,
            timing=ctx.timing,
            via=via,
            latency_ms=latency_ms if via != "poll" else None,
            resent=bump,
            promises=promises,
        )
        if plan.deadline is None or plan.deadline > now:
            return label
        expired = expire_if_overdue(conn, ctx, order_id=proc.order_id, now=now)
        return expired or label

    return str(await _with_retries(ctx, settle))

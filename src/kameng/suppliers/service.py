"""Suppliers, offers, procurements, callbacks seen, and the circuit breaker — all in the DB.

The circuit state lives on the supplier row (not in a process) so every worker process
agrees on which supplier is resting; health figures are computed from the procurement rows
themselves, so measuring them costs no extra writes on the purchase path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from kameng.db import is_unique_violation, savepoint, table
from kameng.errors import ErrorCode, KamengError
from kameng.security.crypto import Vault
from kameng.suppliers.models import (
    AdapterKind,
    CircuitState,
    Procurement,
    ProcurementState,
    Supplier,
    SupplierEvent,
    SupplierOffer,
)

_supplier = table(Supplier)
_offer = table(SupplierOffer)
_proc = table(Procurement)
_event = table(SupplierEvent)

FAILURES_TO_OPEN = 5
BASE_COOLDOWN_S = 15
MAX_COOLDOWN_S = 600
# Rejections that say the supplier as a whole cannot serve right now (not this one SKU).
SUPPLIER_WIDE = frozenset({"maintenance", "insufficient_balance", "supplier_auth_failed"})


# A supplier's clock may run a little apart from ours, and a request that arrived just before
# its deadline may still be being processed: wait this much longer before trusting that no
# copy of a request can be charged any more.
SETTLE_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Promises:
    """What a supplier promises about our purchase requests (docs/suppliers.md).

    `request_ttl_s`: a request signed longer ago than this is refused on arrival, so a copy
    held in the network can no longer buy anything. `dedup_window_s`: for this long after our
    first send, a request with the same out-trade-no is answered with the existing order, never
    bought again (None: as long as the supplier keeps the order).
    """

    request_ttl_s: int = 300
    dedup_window_s: int | None = None

    @classmethod
    def of(cls, supplier: Any) -> Promises:
        return cls(
            request_ttl_s=int(getattr(supplier, "request_ttl_s", None) or 300),
            dedup_window_s=getattr(supplier, "dedup_window_s", None),
        )


DEFAULT_PROMISES = {
    # The bundled protocol: ±300 s signature window; orders are kept (and deduplicated) forever.
    AdapterKind.simulator: Promises(request_ttl_s=300, dedup_window_s=None),
    # A kameng site: ±300 s signature window; Idempotency-Key records are kept 7 days.
    AdapterKind.kameng: Promises(request_ttl_s=300, dedup_window_s=7 * 86_400),
}


class NotFound(StrEnum):
    """What a supplier's "no such order" means for one of our purchases, at one moment."""

    resend = "resend"  # send the same out-trade-no again: they deduplicate on it
    wait = "wait"  # a copy may still arrive and buy; ask again later
    never_arrived = "never_arrived"  # no copy can be accepted any more: nothing was bought


def may_still_land_until(proc: Any, promises: Promises) -> datetime:
    """Until when a copy of this purchase request may still be accepted by the supplier."""
    sent = proc.last_sent_at or proc.updated_at or proc.created_at
    return sent + timedelta(seconds=promises.request_ttl_s) + SETTLE_MARGIN


def not_found_means(proc: Any, promises: Promises, *, now: datetime) -> NotFound:
    """DESIGN §5.3: "not found" is not a refusal while our request may still be in flight.

    Within the supplier's dedup window the same number is sent again (a copy still in flight
    is then answered with the same order, never bought twice). Past it, the purchase stays a
    question until no copy of the request can be accepted; only then is it known to have
    bought nothing.
    """
    window = promises.dedup_window_s
    # A re-send must itself land inside the window, so stop one request lifetime before it ends.
    if window is None or now < proc.created_at + timedelta(seconds=window - promises.request_ttl_s):
        return NotFound.resend
    if now < may_still_land_until(proc, promises):
        return NotFound.wait
    return NotFound.never_arrived


def refusal_settles_at(proc: Any, promises: Promises, *, binding: bool, now: datetime) -> datetime:
    """From when a refused purchase can no longer be charged.

    A refusal the supplier records against our number (`binding`) answers every later copy
    of the request the same way: settled now. Otherwise (a refusal it does not remember, such
    as a kameng site's 4xx) a copy still in flight could be accepted once the cause is fixed,
    so the line waits until no copy can be accepted any more.
    """
    if binding:
        return now
    return max(now, may_still_land_until(proc, promises))


# How long an order waits for the worker to ask about a refused purchase whose question is due.
LATE_CHECK_WAIT = timedelta(seconds=5)


def unsettled_until(rows: list[Any], *, now: datetime) -> datetime | None:
    """When the line may be bought again, if not now: a refused purchase of it may still be
    charged by a copy in flight until it settles, and one whose late check is pending keeps
    the question open until the supplier has been asked (a copy that did succeed then serves
    the line instead of a second purchase)."""
    times = []
    for r in rows:
        if r.state != ProcurementState.rejected.value:
            continue
        if r.settles_at is not None and r.settles_at > now:
            times.append(r.settles_at)
        if r.late_check_at is not None:
            times.append(max(r.late_check_at, now) + LATE_CHECK_WAIT)
    return max(times) if times else None


def secret_context(code: str) -> str:
    return f"supplier:{code}"


def create_supplier(
    conn: Connection,
    vault: Vault,
    *,
    code: str,
    name: str,
    adapter: str,
    base_url: str,
    api_key: str,
    secret: str,
    timeout_ms: int = 10_000,
    low_balance_cents: int = 10_000,
    request_ttl_s: int | None = None,
    dedup_window_s: int | Literal["default"] | None = "default",
    now: datetime,
) -> int:
    """Connect a supplier. `request_ttl_s` and `dedup_window_s` are what it promises about our
    purchase requests (docs/suppliers.md); by default, what its protocol promises."""
    if adapter not in {a.value for a in AdapterKind}:
        raise KamengError(ErrorCode.invalid_request, detail=f"unknown adapter {adapter!r}")
    defaults = DEFAULT_PROMISES[AdapterKind(adapter)]
    ttl = defaults.request_ttl_s if request_ttl_s is None else request_ttl_s
    window = defaults.dedup_window_s if dedup_window_s == "default" else dedup_window_s
    if ttl < 1 or (window is not None and window < ttl):
        raise KamengError(
            ErrorCode.invalid_request,
            detail="request_ttl_s must be positive and dedup_window_s at least request_ttl_s",
        )
    if not base_url.startswith(("http://", "https://")):
        raise KamengError(ErrorCode.invalid_request, detail="base_url must be http(s)")
    try:
        with savepoint(conn):
            return int(
                conn.execute(
                    insert(_supplier)
                    .values(
                        code=code,
                        name=name,
                        adapter=adapter,
                        base_url=base_url.rstrip("/"),
                        api_key=api_key,
                        sealed_secret=vault.seal(secret, secret_context(code)),
                        enabled=True,
                        timeout_ms=timeout_ms,
                        circuit_state=CircuitState.closed.value,
                        failures=0,
                        circuit_opened_count=0,
                        low_balance_cents=low_balance_cents,
                        request_ttl_s=ttl,
                        dedup_window_s=window,
                        created_at=now,
                    )
                    .returning(_supplier.c.id)
                ).scalar_one()
            )
    except Exception as exc:
        if is_unique_violation(exc):
            raise KamengError(ErrorCode.already_exists, what=f"supplier {code}") from exc
        raise


def supplier_by_code(conn: Connection, code: str) -> Any:
    row = conn.execute(select(_supplier).where(_supplier.c.code == code)).first()
    if row is None:
        raise KamengError(ErrorCode.not_found, detail=f"supplier {code}")
    return row


def supplier_by_id(conn: Connection, *, supplier_id: int) -> Any:
    return conn.execute(select(_supplier).where(_supplier.c.id == supplier_id)).one()


def all_suppliers(conn: Connection) -> list[Any]:
    return list(conn.execute(select(_supplier).order_by(_supplier.c.id)))


def add_offer(
    conn: Connection,
    *,
    sku_id: int,
    supplier_id: int,
    supplier_sku: str,
    cost_cents: int,
    priority: int | None = None,
    now: datetime,
) -> int:
    """Add an offer, or update the cost of an existing one (its priority only when given,
    so a catalog sync never undoes an operator's ordering)."""
    existing = conn.execute(
        select(_offer.c.id).where(
            _offer.c.sku_id == sku_id,
            _offer.c.supplier_id == supplier_id,
            _offer.c.supplier_sku == supplier_sku,
        )
    ).scalar()
    if existing is not None:
        values: dict[str, Any] = {"cost_cents": cost_cents, "enabled": True}
        if priority is not None:
            values["priority"] = priority
        conn.execute(update(_offer).where(_offer.c.id == existing).values(**values))
        return int(existing)
    return int(
        conn.execute(
            insert(_offer)
            .values(
                sku_id=sku_id,
                supplier_id=supplier_id,
                supplier_sku=supplier_sku,
                cost_cents=cost_cents,
                priority=100 if priority is None else priority,
                enabled=True,
                created_at=now,
            )
            .returning(_offer.c.id)
        ).scalar_one()
    )


def skus_with_offers(conn: Connection) -> set[int]:
    rows = conn.execute(
        select(_offer.c.sku_id)
        .join(_supplier, _supplier.c.id == _offer.c.supplier_id)
        .where(_offer.c.enabled.is_(True), _supplier.c.enabled.is_(True))
        .distinct()
    )
    return {int(r[0]) for r in rows}


def skus_of_supplier(conn: Connection, *, supplier_id: int) -> list[int]:
    rows = conn.execute(
        select(_offer.c.sku_id)
        .where(_offer.c.supplier_id == supplier_id, _offer.c.enabled.is_(True))
        .distinct()
    )
    return [int(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class Offer:
    id: int
    supplier_id: int
    supplier_code: str
    supplier_sku: str
    cost_cents: int
    priority: int
    circuit_state: str
    circuit_open_until: datetime | None
    balance_cents: int | None
    low_balance_cents: int

    def available(self, now: datetime) -> bool:
        """Closed, or open with its rest period over (half-open: let a probe through)."""
        if self.circuit_state == CircuitState.closed.value:
            return True
        return self.circuit_open_until is None or self.circuit_open_until <= now

    @property
    def low_balance(self) -> bool:
        return self.balance_cents is not None and self.balance_cents < self.low_balance_cents


def offers_for(conn: Connection, *, sku_id: int) -> list[Offer]:
    rows = conn.execute(
        select(
            _offer.c.id,
            _offer.c.supplier_id,
            _supplier.c.code,
            _offer.c.supplier_sku,
            _offer.c.cost_cents,
            _offer.c.priority,
            _supplier.c.circuit_state,
            _supplier.c.circuit_open_until,
            _supplier.c.balance_cents,
            _supplier.c.low_balance_cents,
        )
        .join(_supplier, _supplier.c.id == _offer.c.supplier_id)
        .where(_offer.c.sku_id == sku_id, _offer.c.enabled.is_(True), _supplier.c.enabled.is_(True))
    )
    return [Offer(*tuple(r)) for r in rows]


def route(offers: list[Offer], *, now: datetime, exclude: set[int]) -> list[Offer]:
    """Offers to try, best first: priority, then health (closed before half-open, enough
    balance before low), then cost. Open circuits and offers already refused are left out."""
    usable = [o for o in offers if o.id not in exclude and o.available(now)]
    return sorted(
        usable,
        key=lambda o: (
            o.priority,
            o.circuit_state != CircuitState.closed.value,
            o.low_balance,
            o.cost_cents,
            o.id,
        ),
    )


def next_reopen(offers: list[Offer], *, exclude: set[int]) -> datetime | None:
    """When the earliest resting supplier among these offers may be tried again."""
    times = [
        o.circuit_open_until
        for o in offers
        if o.id not in exclude and o.circuit_open_until is not None
    ]
    return min(times) if times else None


# -- procurements ---------------------------------------------------------------------------------


# Statements every pipeline step runs, built once: SQLAlchemy then reuses their memoized
# cache keys instead of rebuilding and re-hashing an expression tree per call.
_PROCS_OF_LINE = (
    select(_proc).where(_proc.c.order_line_id == bindparam("line_id")).order_by(_proc.c.id)
)
_PROC_BY_NO = select(_proc).where(
    _proc.c.supplier_id == bindparam("sid"), _proc.c.out_trade_no == bindparam("no")
)
_UPDATE_PROC = update(_proc).where(_proc.c.id == bindparam("pid"))


def procurements_of_line(conn: Connection, *, line_id: int) -> list[Any]:
    return list(conn.execute(_PROCS_OF_LINE, {"line_id": line_id}))


def live_procurement(rows: list[Any]) -> Any | None:
    for row in rows:
        if row.state not in (ProcurementState.rejected.value,):
            return row
    return None


def start_procurement(
    conn: Connection,
    *,
    order_id: int,
    line_id: int,
    offer: Offer,
    out_trade_no: str,
    quantity: int,
    now: datetime,
) -> int:
    """Record the intent to buy before the request leaves (the unique index refuses a second
    live purchase for the line)."""
    return int(
        conn.execute(
            insert(_proc)
            .values(
                order_id=order_id,
                order_line_id=line_id,
                supplier_id=offer.supplier_id,
                offer_id=offer.id,
                out_trade_no=out_trade_no,
                trade_no="",
                state=ProcurementState.sending.value,
                quantity=quantity,
                keys_received=0,
                cost_cents=offer.cost_cents * quantity,
                reason="",
                attempts=1,
                created_at=now,
                updated_at=now,
                last_sent_at=now,
            )
            .returning(_proc.c.id)
        ).scalar_one()
    )


def update_procurement(
    conn: Connection,
    *,
    procurement_id: int,
    state: ProcurementState,
    now: datetime,
    **values: Any,
) -> None:
    finished = state in (
        ProcurementState.delivered,
        ProcurementState.rejected,
        ProcurementState.abandoned,
    )
    params = {"pid": procurement_id, "state": state.value, "updated_at": now, **values}
    if finished:
        params["finished_at"] = now
    conn.execute(_UPDATE_PROC, params)


def procurement_by_out_trade_no(conn: Connection, *, supplier_id: int, out_trade_no: str) -> Any:
    return conn.execute(_PROC_BY_NO, {"sid": supplier_id, "no": out_trade_no}).first()


# -- purchases given up on, asked about until their outcome is known -----------------------------

LATE_CHECK_FIRST_S = 5
LATE_CHECK_CAP_S = 900


def given_up_due(conn: Connection, *, now: datetime, limit: int) -> list[Any]:
    """Procurements given up on (abandoned, or refused in a way a late copy could undo) whose
    next question to the supplier is due."""
    return list(
        conn.execute(
            select(_proc)
            .where(_proc.c.late_check_at.is_not(None), _proc.c.late_check_at <= now)
            .order_by(_proc.c.late_check_at)
            .limit(limit)
        )
    )


def next_late_check(
    proc: Any, outcome: str, promises: Promises, *, now: datetime
) -> datetime | None:
    """When to ask about a given-up purchase again after the supplier answered `outcome`;
    None once the answer is final (delivered, refused, or not found when no copy can land)."""
    if outcome in ("delivered", "rejected"):
        return None
    if outcome == "not_found" and now >= may_still_land_until(proc, promises):
        return None
    # Ask again after half the time since we gave up on it: often at first, when a late
    # copy is most likely, then less and less (between 5 s and 15 min).
    given_up = proc.finished_at or proc.updated_at or now
    step = (now - given_up).total_seconds() / 2
    return now + timedelta(seconds=min(max(step, LATE_CHECK_FIRST_S), LATE_CHECK_CAP_S))


def set_late_check(
    conn: Connection, *, procurement_id: int, at: datetime | None, attempts: int
) -> None:
    conn.execute(
        update(_proc)
        .where(_proc.c.id == procurement_id)
        .values(late_check_at=at, attempts=attempts)
    )


def remember_event(
    conn: Connection,
    *,
    supplier_id: int,
    event_id: str,
    out_trade_no: str,
    outcome: str,
    now: datetime,
) -> bool:
    """True the first time an event id is seen for a supplier; False for a duplicate."""
    try:
        with savepoint(conn):
            conn.execute(
                insert(_event).values(
                    supplier_id=supplier_id,
                    event_id=event_id,
                    out_trade_no=out_trade_no,
                    outcome=outcome,
                    received_at=now,
                )
            )
    except Exception as exc:
        if is_unique_violation(exc):
            return False
        raise
    return True


def prune_events(conn: Connection, *, older_than: datetime) -> int:
    return conn.execute(delete(_event).where(_event.c.received_at < older_than)).rowcount


# -- circuit breaker ------------------------------------------------------------------------------


def record_call(conn: Connection, *, supplier_id: int, ok: bool, now: datetime) -> str | None:
    """Feed the breaker; returns the new circuit state when it changed ("closed" is also
    returned when a success wipes out earlier failures of a closed circuit)."""
    if ok:
        # The common case (closed, no failures) must read nothing and write nothing: one
        # conditional UPDATE that only matches a supplier with something to reset.
        reset = conn.execute(
            update(_supplier)
            .where(
                _supplier.c.id == supplier_id,
                (_supplier.c.failures > 0)
                | (_supplier.c.circuit_state != CircuitState.closed.value),
            )
            .values(
                circuit_state=CircuitState.closed.value,
                failures=0,
                circuit_open_until=None,
                circuit_opened_count=0,
            )
        ).rowcount
        return CircuitState.closed.value if reset else None
    row = conn.execute(
        select(
            _supplier.c.circuit_state,
            _supplier.c.failures,
            _supplier.c.circuit_opened_count,
            _supplier.c.circuit_open_until,
        ).where(_supplier.c.id == supplier_id)
    ).first()
    if row is None:
        return None
    state, failures, opened, open_until = row
    failures += 1
    resting = state != CircuitState.closed.value and open_until is not None and open_until > now
    if resting:
        # Answers to calls made before the circuit opened are still arriving: they are not
        # news, and must not stretch the rest period (only a failed probe after it does).
        conn.execute(
            update(_supplier).where(_supplier.c.id == supplier_id).values(failures=failures)
        )
        return None
    if state != CircuitState.closed.value or failures >= FAILURES_TO_OPEN:
        cooldown = min(BASE_COOLDOWN_S * 2**opened, MAX_COOLDOWN_S)
        conn.execute(
            update(_supplier)
            .where(_supplier.c.id == supplier_id)
            .values(
                circuit_state=CircuitState.open.value,
                failures=failures,
                circuit_open_until=now + timedelta(seconds=cooldown),
                circuit_opened_count=opened + 1,
            )
        )
        return CircuitState.open.value
    conn.execute(update(_supplier).where(_supplier.c.id == supplier_id).values(failures=failures))
    return None


def record_balance(conn: Connection, *, supplier_id: int, balance: int, now: datetime) -> None:
    conn.execute(
        update(_supplier)
        .where(_supplier.c.id == supplier_id)
        .values(balance_cents=balance, balance_checked_at=now)
    )


# -- health ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    id: int
    code: str
    circuit_state: str
    circuit_open_until: datetime | None
    balance_cents: int | None
    low_balance: bool
    purchases: int
    success_rate: float | None
    latency_p50_ms: int | None
    latency_p95_ms: int | None


def _percentile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def health(conn: Connection, *, now: datetime, window_s: int = 900) -> list[Health]:
    since = now - timedelta(seconds=window_s)
    out = []
    for s in all_suppliers(conn):
        rows = conn.execute(
            select(_proc.c.state, _proc.c.reason, _proc.c.latency_ms)
            .where(_proc.c.supplier_id == s.id, _proc.c.created_at >= since)
            .order_by(_proc.c.id.desc())
            .limit(5000)
        ).all()
        decided = [r for r in rows if r.state != ProcurementState.sending.value]
        good = [
            r
            for r in decided
            if r.state != ProcurementState.unknown.value
            and not (r.state == ProcurementState.rejected.value and r.reason in SUPPLIER_WIDE)
        ]
        latencies = [int(r.latency_ms) for r in rows if r.latency_ms is not None]
        out.append(
            Health(
                id=int(s.id),
                code=s.code,
                circuit_state=s.circuit_state,
                circuit_open_until=s.circuit_open_until,
                balance_cents=s.balance_cents,
                low_balance=s.balance_cents is not None and s.balance_cents < s.low_balance_cents,
                purchases=len(rows),
                success_rate=(len(good) / len(decided)) if decided else None,
                latency_p50_ms=_percentile(latencies, 0.50),
                latency_p95_ms=_percentile(latencies, 0.95),
            )
        )
    return out

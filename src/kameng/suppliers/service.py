"""Suppliers, offers, procurements, callbacks seen, and the circuit breaker — all in the DB.

The circuit state lives on the supplier row (not in a process) so every worker process
agrees on which supplier is resting; health figures are computed from the procurement rows
themselves, so measuring them costs no extra writes on the purchase path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
    now: datetime,
) -> int:
    if adapter not in {a.value for a in AdapterKind}:
        raise KamengError(ErrorCode.invalid_request, detail=f"unknown adapter {adapter!r}")
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

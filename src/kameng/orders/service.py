"""Order use cases: place (the hot path), cancel, read, list, buyer lookup.

Placing an order is one short write transaction built from prebuilt Core statements:
duplicate guard -> order + line -> claim keys -> events -> reveal audit -> ledger (last, since
balance rows are the busiest). Either everything commits or nothing does; plaintext keys are
decrypted only after the commit and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text, update
from sqlalchemy.engine import Connection

from kameng.catalog.models import DeliveryKind
from kameng.catalog.service import SkuInfo
from kameng.db import RawSQL, db_time, notify_due, pipelined, table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.ledger.models import Account
from kameng.notify.service import OrderTarget
from kameng.orders import queries, screening
from kameng.orders.events import Started, event_row, record
from kameng.orders.models import Delivery, Order, OrderEvent, OrderLine
from kameng.orders.numbers import new_lookup_secret, new_order_no
from kameng.orders.state import (
    NOT_A_DUPLICATE,
    Stage,
    Status,
    check_transition,
)
from kameng.risk import service as risk
from kameng.risk.rules import Action
from kameng.security.crypto import Vault

_order = table(Order)
_line = table(OrderLine)
_event = table(OrderEvent)
_delivery = table(Delivery)
_acc = table(Account)

_NOT_DUPLICATE = sorted(s.value for s in NOT_A_DUPLICATE)
_RECENT_DUPLICATE = RawSQL(
    "SELECT order_no FROM orders WHERE dedupe_key = :k AND created_at >= :since "
    f"AND status NOT IN ({', '.join(repr(s) for s in _NOT_DUPLICATE)}) "
    "ORDER BY id DESC LIMIT 1"
)
_ORDER_COLUMNS = (
    "order_no, channel, reseller_id, member_id, customer_ref, sku_id, status, stage, reason, "
    "stage_since, "
    "next_action_at, sla_deadline, attempts, version, currency, amount_cents, paid_cents, "
    "refunded_cents, hold_id, dedupe_key, lookup_hash, created_at, updated_at, delivered_at, "
    "notify_url"
)
_INSERT_ORDER = RawSQL(
    f"INSERT INTO orders ({_ORDER_COLUMNS}) VALUES "
    f"({', '.join(':' + c.strip() for c in _ORDER_COLUMNS.split(','))}) RETURNING id"
)
# PostgreSQL: order and line in one round trip (SQLite has no DML in WITH, nor round trips).
_INSERT_ORDER_AND_LINE_PG = RawSQL(
    f"WITH o AS (INSERT INTO orders ({_ORDER_COLUMNS}) VALUES "
    f"({', '.join(':' + c.strip() for c in _ORDER_COLUMNS.split(','))}) RETURNING id) "
    "INSERT INTO order_lines (order_id, sku_id, quantity, unit_price_cents, fields) "
    "SELECT o.id, :sku_id, :quantity, :unit_price_cents, CAST(:fields AS JSON) FROM o "
    "RETURNING order_id, id"
)
_INSERT_LINE = RawSQL(
    "INSERT INTO order_lines (order_id, sku_id, quantity, unit_price_cents, fields) "
    "VALUES (:order_id, :sku_id, :quantity, :unit_price_cents, :fields) RETURNING id"
)
_INSERT_DELIVERY = RawSQL(
    "INSERT INTO deliveries (order_line_id, source, key_count, delivered_at) "
    "VALUES (:order_line_id, :source, :key_count, :delivered_at)"
)
_FINISH_ORDER = RawSQL(
    "UPDATE orders SET status = :status, stage = :stage, reason = :reason, "
    "next_action_at = :next_action_at, sla_deadline = :sla_deadline, hold_id = :hold_id, "
    "delivered_at = :delivered_at, refunded_cents = :refunded, version = version + 1 "
    "WHERE id = :oid"
)


@dataclass(frozen=True, slots=True)
class Buyer:
    """Who pays, and from which wallet: a reseller (API), a member, or a guest (storefront).

    A guest's wallet is one opened for the order when its payment arrives; `guest_key` (the
    browser's anonymous id) keeps one guest's duplicate guard apart from another's."""

    reseller_id: int | None
    wallet_id: int
    actor: str
    member_id: int | None = None
    guest_key: str = ""

    @property
    def kind(self) -> str:
        if self.reseller_id is not None:
            return "reseller"
        return "member" if self.member_id is not None else "guest"

    @property
    def risk_key(self) -> str:
        """Who this buyer is to screening and its lists: r<reseller>, m<member>, g<browser>."""
        if self.reseller_id is not None:
            return f"r{self.reseller_id}"
        return self.owner

    @property
    def owner(self) -> str:
        if self.reseller_id is not None:
            return str(self.reseller_id)  # the format reseller orders always had
        if self.member_id is not None:
            return f"m{self.member_id}"
        return f"g{self.guest_key}"


@dataclass(frozen=True, slots=True)
class Policy:
    duplicate_window_s: int = 600
    backorder_retry_s: int = 60
    default_sla_s: int = 1800
    review_sla_s: int = 1800  # how long an order may wait in manual review


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    sku: SkuInfo
    unit_price_cents: int
    quantity: int
    fields: dict[str, str]
    customer_ref: str = ""
    confirm_duplicate: bool = False
    channel: str = "api"
    supplier_offers: bool = False  # the SKU can be procured upstream when own stock is short
    notify_url: str = ""


@dataclass
class Placed:
    order_id: int
    order_no: str
    line_id: int
    status: Status
    stage: Stage
    reason: str
    amount_cents: int
    lookup_secret: str
    created_at: datetime
    next_action_at: datetime | None
    sla_deadline: datetime | None
    keys: list[inventory.ClaimedKey] = field(default_factory=list)


def dedupe_key(*, owner: str, customer_ref: str, sku_id: int, fields: dict[str, str]) -> bytes:
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{owner}|{customer_ref}|{sku_id}|{canonical}".encode()).digest()


def guard_duplicates(conn: Connection, key: bytes, now: datetime, window_s: int) -> None:
    if conn.dialect.name == "postgresql":
        # Two clicks of the same button arrive together: serialise them on the guard's key so
        # the second sees the first instead of both passing the check.
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:k)"),
            {"k": int.from_bytes(key[:8], "big", signed=True)},
        )
    since = db_time(conn, now - timedelta(seconds=window_s))
    row = _RECENT_DUPLICATE.one(conn, {"k": key, "since": since})
    if row is not None:
        earlier = row[0]
        raise KamengError(
            ErrorCode.duplicate_order_suspected,
            order_no=earlier,
            minutes=window_s // 60,
            extra={"existing_order_no": earlier},
        )


def insert_order(
    conn: Connection,
    *,
    buyer: Buyer,
    cmd: PlaceOrder,
    key: bytes,
    vault: Vault,
    status: Status,
    reason: str,
    paid_cents: int,
    now: datetime,
    next_action_at: datetime | None = None,
    sla_deadline: datetime | None = None,
) -> tuple[int, int, str, str]:
    """Insert the order and its line: (order id, line id, order number, lookup secret)."""
    sku = cmd.sku
    order_no = new_order_no(now)
    lookup_secret = new_lookup_secret()
    at = db_time(conn, now)
    move = check_transition(None, status)
    order_params = {
        "order_no": order_no,
        "channel": cmd.channel,
        "reseller_id": buyer.reseller_id,
        "member_id": buyer.member_id,
        "customer_ref": cmd.customer_ref,
        "sku_id": sku.id,
        "status": status.value,
        "stage": move.stage.value,
        "reason": reason,
        "stage_since": at,
        "next_action_at": db_time(conn, next_action_at),
        "sla_deadline": db_time(conn, sla_deadline),
        "attempts": 0,
        "version": 1,
        "currency": sku.currency,
        "amount_cents": cmd.unit_price_cents * cmd.quantity,
        "paid_cents": paid_cents,
        "refunded_cents": 0,
        "hold_id": None,
        "dedupe_key": key,
        "lookup_hash": vault.lookup_hash(order_no, lookup_secret),
        "created_at": at,
        "updated_at": at,
        "delivered_at": None,
        "notify_url": cmd.notify_url,
    }
    line_params = {
        "sku_id": sku.id,
        "quantity": cmd.quantity,
        "unit_price_cents": cmd.unit_price_cents,
        "fields": json.dumps(cmd.fields, ensure_ascii=False),
    }
    if conn.dialect.name == "postgresql":
        order_id, line_id = _INSERT_ORDER_AND_LINE_PG.one(conn, {**order_params, **line_params})
    else:
        order_id = int(_INSERT_ORDER.one(conn, order_params)[0])
        line_id = int(_INSERT_LINE.one(conn, {"order_id": order_id, **line_params})[0])
    return int(order_id), int(line_id), order_no, lookup_secret


def start_fulfilment(
    conn: Connection,
    *,
    order_id: int,
    line_id: int,
    sku: SkuInfo,
    quantity: int,
    amount: int,
    wallet_id: int,
    actor: str,
    supplier_offers: bool,
    accounts: ledger.PlatformAccounts,
    policy: Policy,
    now: datetime,
    events: list[dict[str, Any]],
    screened: screening.Screened | None = None,
    notify: OrderTarget | None = None,
) -> Started:
    """What a paid order does first, whoever paid and however: claim own stock and deliver
    (a sale from `wallet_id`), or hold the money and queue it behind a backorder, send it
    upstream or hand it to staff. Writes `events` (the caller's plus these), the delivery,
    the reveal audit and the ledger; the caller writes the order row's final state. An order
    screening flagged goes to review or is rejected instead (`screening.divert`)."""
    if screened is not None and screened.action is not Action.allow:
        return screening.divert(
            conn,
            order_id=order_id,
            line_id=line_id,
            sku=sku,
            quantity=quantity,
            amount=amount,
            currency=sku.currency,
            wallet_id=wallet_id,
            actor=actor,
            screened=screened,
            accounts=accounts,
            now=now,
            events=events,
            notify=notify,
        )
    at = db_time(conn, now)
    claimed: list[inventory.ClaimedKey] | None = None
    queued = False
    if sku.delivery_kind == DeliveryKind.card_key.value:
        # Restocks never jump the queue: with orders already waiting for this SKU, a new one
        # waits behind them instead of taking keys that arrived for them.
        queued = queries.backorders_waiting(conn, sku_id=sku.id)
        if not queued:
            claimed = inventory.claim(
                conn, sku_id=sku.id, quantity=quantity, line_id=line_id, now=now
            )

    next_action_at: datetime | None = None
    sla_deadline: datetime | None = None
    hold_id: int | None = None
    if claimed is not None:
        status, stage, reason = Status.delivered, Stage.delivered, "own_stock"
        events.append(
            event_row(
                conn,
                order_id,
                Status.paid,
                Status.fulfilling,
                Stage.allocating,
                "allocating_own_stock",
                "system",
                now,
            )
        )
        events.append(
            event_row(
                conn,
                order_id,
                Status.fulfilling,
                Status.delivered,
                None,
                reason,
                "system",
                now,
                {"keys": len(claimed)},
            )
        )
        _INSERT_DELIVERY.run(
            conn,
            {
                "order_line_id": line_id,
                "source": "own_stock",
                "key_count": len(claimed),
                "delivered_at": at,
            },
        ).close()
        inventory.record_reveal(
            conn,
            order_id=order_id,
            channel="order_create",
            actor=actor,
            key_count=len(claimed),
            now=now,
        )
    else:
        sla_deadline = now + timedelta(seconds=sku.sla_seconds or policy.default_sla_s)
        if sku.delivery_kind == DeliveryKind.card_key.value and (queued or not supplier_offers):
            status, stage, reason = Status.backordered, Stage.waiting_stock, "out_of_stock"
            next_action_at = now + timedelta(seconds=policy.backorder_retry_s)
            events.append(
                event_row(
                    conn,
                    order_id,
                    Status.paid,
                    status,
                    stage,
                    reason,
                    "system",
                    now,
                    {"retry_at": next_action_at.isoformat()},
                )
            )
        else:
            status = Status.fulfilling
            if sku.delivery_kind != DeliveryKind.manual.value:
                stage, reason = Stage.procuring, "awaiting_supplier"
                next_action_at = now
                notify_due(conn)
            else:
                stage, reason = Stage.staff_processing, "awaiting_staff"
                next_action_at = sla_deadline
            events.append(
                event_row(conn, order_id, Status.paid, status, stage, reason, "system", now)
            )

    record(conn, events, notify=notify, now=now)
    # Ledger last: the wallet and platform rows are the most contended in the whole database.
    if status is Status.delivered:
        ledger.post(
            conn,
            kind="sale",
            legs=[(wallet_id, -amount), (accounts.revenue_for(order_id), amount)],
            now=now,
            ref_type="order",
            ref_id=order_id,
            actor=actor,
        )
    else:
        hold_id = ledger.place_hold(
            conn,
            wallet_id=wallet_id,
            holds_account=accounts.holds_for(order_id),
            amount=amount,
            ref_type="order",
            ref_id=order_id,
            now=now,
            actor=actor,
        )
    return Started(status, stage, reason, claimed, next_action_at, sla_deadline, hold_id)


def place_order(
    conn: Connection,
    *,
    buyer: Buyer,
    cmd: PlaceOrder,
    accounts: ledger.PlatformAccounts,
    vault: Vault,
    policy: Policy,
    now: datetime,
    engine: risk.Engine | None = None,
    context: screening.Context | None = None,
) -> Placed:
    """Place an order paid from the buyer's balance, in one transaction with its screening
    (when a risk engine is given) and its fulfilment."""
    sku = cmd.sku
    amount = cmd.unit_price_cents * cmd.quantity
    key = dedupe_key(
        owner=buyer.owner,
        customer_ref=cmd.customer_ref,
        sku_id=sku.id,
        fields=cmd.fields,
    )
    if not cmd.confirm_duplicate:
        guard_duplicates(conn, key, now, policy.duplicate_window_s)
    # No balance pre-check: the ledger's compare-and-set refuses an overdraft, and the
    # refusal rolls back everything (keys included) in the same transaction.
    order_id, line_id, order_no, lookup_secret = insert_order(
        conn,
        buyer=buyer,
        cmd=cmd,
        key=key,
        vault=vault,
        status=Status.paid,
        reason="paid_from_balance",
        paid_cents=amount,
        now=now,
    )
    events = [
        event_row(conn, order_id, None, Status.paid, None, "paid_from_balance", buyer.actor, now)
    ]
    # Rules and lists are (re)loaded before the pipeline: those reads go through the ORM.
    rules = engine.current(conn) if engine is not None else None
    with pipelined(conn):
        # Screening's inserts ride the same round trips as the order's own (PostgreSQL
        # pipeline); a counter it must read forces a sync, in order, after its locks.
        screened = None
        if engine is not None:
            subject = screening.subject_for(
                order_id=order_id,
                owner=buyer.risk_key,
                buyer_kind=buyer.kind,
                channel=cmd.channel,
                sku=sku,
                quantity=cmd.quantity,
                unit_price_cents=cmd.unit_price_cents,
                fields=cmd.fields,
                context=context or screening.Context(),
            )
            risk.serialise_counters(conn, engine=engine, subject=subject, now=now, loaded=rules)
            risk.record_facts(conn, subject=subject, now=now)
            screened = screening.screen(
                conn,
                engine=engine,
                subject=subject,
                review_sla_s=policy.review_sla_s,
                now=now,
                loaded=rules,
            )
        started = start_fulfilment(
            conn,
            order_id=order_id,
            line_id=line_id,
            sku=sku,
            quantity=cmd.quantity,
            amount=amount,
            wallet_id=buyer.wallet_id,
            actor=buyer.actor,
            supplier_offers=cmd.supplier_offers,
            accounts=accounts,
            policy=policy,
            now=now,
            events=events,
            screened=screened,
            notify=OrderTarget(order_id, order_no, cmd.customer_ref, cmd.notify_url)
            if cmd.notify_url
            else None,
        )
        _FINISH_ORDER.run(
            conn,
            {
                "oid": order_id,
                "status": started.status.value,
                "stage": started.stage.value,
                "reason": started.reason,
                "hold_id": started.hold_id,
                "next_action_at": db_time(conn, started.next_action_at),
                "sla_deadline": db_time(conn, started.sla_deadline),
                "delivered_at": db_time(conn, now) if started.status is Status.delivered else None,
                "refunded": amount if started.status is Status.rejected else 0,
            },
        ).close()
    return Placed(
        order_id=order_id,
        order_no=order_no,
        line_id=line_id,
        status=started.status,
        stage=started.stage,
        reason=started.reason,
        amount_cents=amount,
        lookup_secret=lookup_secret,
        created_at=now,
        next_action_at=started.next_action_at,
        sla_deadline=started.sla_deadline,
        keys=started.claimed or [],
    )


# -- transitions after creation -------------------------------------------------------------------


# Compare-and-set on version; the SET list comes from the parameters (built once, reused).
_TRANSITION = update(_order).where(
    _order.c.id == bindparam("oid"), _order.c.version == bindparam("expected_version")
)


def transition(
    conn: Connection,
    *,
    order: Any,
    to_status: Status,
    stage: Stage | None = None,
    reason: str,
    actor: str,
    now: datetime,
    next_action_at: datetime | None = None,
    details: dict[str, Any] | None = None,
    extra_values: dict[str, Any] | None = None,
    late_payment: bool = False,
) -> None:
    """Move an order by compare-and-set on its version, with its event row in the same txn."""
    from_status = Status(order.status)
    event = event_row(
        conn,
        order.id,
        from_status,
        to_status,
        stage,
        reason,
        actor,
        now,
        details,
        late_payment=late_payment,
    )
    changed = conn.execute(
        _TRANSITION,
        {
            "oid": order.id,
            "expected_version": order.version,
            "status": to_status.value,
            "stage": event["stage"],
            "reason": reason,
            "stage_since": now,
            "next_action_at": next_action_at,
            "version": order.version + 1,
            "updated_at": now,
            **(extra_values or {}),
        },
    ).rowcount
    if changed != 1:
        raise KamengError(ErrorCode.concurrent_update)
    record(conn, [event], notify=OrderTarget.of(order), now=now)

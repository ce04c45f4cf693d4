"""Turning order rows into the API's JSON shape (one place, so every endpoint agrees)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from kameng.catalog.models import Sku
from kameng.catalog.service import SkuInfo
from kameng.container import Container
from kameng.db import table
from kameng.inventory import service as inventory
from kameng.money import format_cents
from kameng.orders import queries as order_queries
from kameng.orders import service as orders
from kameng.orders.explain import reason_text, status_text

_sku = table(Sku)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sku_codes(conn: Connection, sku_ids: set[int]) -> dict[int, str]:
    if not sku_ids:
        return {}
    rows = conn.execute(select(_sku.c.id, _sku.c.code).where(_sku.c.id.in_(sku_ids)))
    return {int(i): c for i, c in rows}


def public_actor(actor: str, *, audience: str) -> str:
    """Who did it, as the audience may see it: staff are never named, and a buyer looking up
    an order does not learn the reseller's account name."""
    if actor.startswith("staff:"):
        return "staff"
    if audience == "buyer" and actor.startswith("reseller:"):
        return "merchant"
    if audience == "buyer" and actor.startswith("lookup:"):
        return "buyer"
    return actor


def order_body(
    order: Any,
    line: Any,
    sku_code: str,
    language: str,
    *,
    timeline: list[Any] | None = None,
    audience: str = "reseller",
) -> dict[str, Any]:
    # A guest has no balance: refunds are worded as going back the way they were paid.
    guest = getattr(order, "member_id", None) is None and order.reseller_id is None
    body: dict[str, Any] = {
        "order_no": order.order_no,
        "status": order.status,
        "status_text": status_text(order.status, language),
        "stage": order.stage,
        "reason": order.reason,
        "reason_text": reason_text(order.reason, language, guest=guest),
        "stage_since": iso(order.stage_since),
        "next_action_at": iso(order.next_action_at),
        "sla_deadline": iso(order.sla_deadline),
        "sku": sku_code,
        "quantity": line.quantity,
        "unit_price": format_cents(line.unit_price_cents),
        "amount": format_cents(order.amount_cents),
        "currency": order.currency,
        "customer_ref": order.customer_ref,
        "fields": dict(line.fields or {}),
        "created_at": iso(order.created_at),
        "delivered_at": iso(order.delivered_at),
        "keys": None,
    }
    if timeline is not None:
        body["timeline"] = [
            {
                "at": iso(e.at),
                "from_status": e.from_status,
                "to_status": e.to_status,
                "stage": e.stage,
                "reason": e.reason,
                "reason_text": reason_text(e.reason, language, guest=guest),
                "actor": public_actor(e.actor, audience=audience),
            }
            for e in timeline
        ]
    return body


DELIVERED_STATES = frozenset({"delivered", "completed", "disputed"})


def reveal_keys(
    conn: Connection, container: Container, *, order: Any, line: Any, channel: str, actor: str
) -> list[inventory.ClaimedKey]:
    """Load a delivered order's keys and record the reveal (inside the caller's transaction)."""
    if order.status not in DELIVERED_STATES:
        return []
    keys = inventory.keys_of_line(conn, line_id=line.id)
    if keys:
        container.decryptor.preload(conn, {k.batch_id for k in keys})
        inventory.record_reveal(
            conn,
            order_id=order.id,
            channel=channel,
            actor=actor,
            key_count=len(keys),
            now=container.clock(),
        )
    return keys


def decrypt_all(
    container: Container, sku_id: int, keys: list[inventory.ClaimedKey]
) -> list[dict[str, str | None]]:
    return [container.decryptor.decrypt(sku_id=sku_id, key=k) for k in keys]


def full_order(
    conn: Connection,
    container: Container,
    order: Any,
    language: str,
    *,
    channel: str,
    actor: str,
    with_timeline: bool = True,
    audience: str = "reseller",
) -> tuple[dict[str, Any], list[inventory.ClaimedKey]]:
    line = order_queries.order_line(conn, order_id=order.id)
    code = sku_codes(conn, {order.sku_id}).get(order.sku_id, "")
    events = order_queries.timeline(conn, order_id=order.id) if with_timeline else None
    body = order_body(order, line, code, language, timeline=events, audience=audience)
    keys = reveal_keys(conn, container, order=order, line=line, channel=channel, actor=actor)
    return body, keys


def placed_body(
    placed: orders.Placed,
    sku: SkuInfo,
    quantity: int,
    unit_price: int,
    fields: dict[str, str],
    language: str,
    customer_ref: str,
) -> dict[str, Any]:
    """The creation answer, built from what was just written (no re-read on the hot path)."""
    return {
        "order_no": placed.order_no,
        "status": placed.status.value,
        "status_text": status_text(placed.status.value, language),
        "stage": placed.stage.value,
        "reason": placed.reason,
        "reason_text": reason_text(placed.reason, language),
        "stage_since": iso(placed.created_at),
        "next_action_at": iso(placed.next_action_at),
        "sla_deadline": iso(placed.sla_deadline),
        "sku": sku.code,
        "quantity": quantity,
        "unit_price": format_cents(unit_price),
        "amount": format_cents(placed.amount_cents),
        "currency": sku.currency,
        "customer_ref": customer_ref,
        "fields": fields,
        "created_at": iso(placed.created_at),
        "delivered_at": iso(placed.created_at) if placed.status.value == "delivered" else None,
        "keys": [] if placed.keys else None,
        "lookup_secret": placed.lookup_secret,
    }

"""Whether a database is the demo's own, decided before `kameng demo` writes anything to it.

`kameng demo` adds an enabled simulator gateway and supplier, a funded buyer and an admin. In a
shop that takes real money those are a way to take card keys for free, so the demo seeds only a
database that holds nothing but what it made itself:

- A database the demo marked (the audit row it writes each time it seeds a database cleanly), or
  one an older `kameng demo` seeded (recognised by the caller): every product, SKU, supplier,
  gateway, reseller and staff member in it must be one the demo creates. Members, orders,
  payments, tier prices and the like are what people did with the demo, and are allowed.
- Any other database must hold none of those rows, nor members, orders, payments, stock, money
  movements, tier prices, risk lists or documents: nothing beyond what `kameng migrate` writes.

A product that merely shares a demo slug does not make a shop the demo's: without the marker
every row counts as someone else's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.audit.models import AuditEntry
from kameng.catalog.models import Product, Sku
from kameng.documents.models import BuyerDocument
from kameng.inventory.models import CardKey
from kameng.ledger.models import LedgerTransaction
from kameng.members.models import Member
from kameng.orders.models import Order
from kameng.payments.models import Payment, PaymentGateway
from kameng.pricing.models import TierPrice
from kameng.resellers.models import Reseller
from kameng.risk.models import RiskListEntry
from kameng.staff.models import StaffMember
from kameng.suppliers.models import Supplier

MARKER_ACTION = "demo.seeded"
FORCED_ACTION = "demo.seeded_forced"
EXAMPLES = 3

# Rows that say who sells what through which route, by the column that names them.
NAMED: dict[str, Any] = {
    "products": Product.slug,
    "skus": Sku.code,
    "suppliers": Supplier.code,
    "gateways": PaymentGateway.code,
    "resellers": Reseller.name,
    "staff": StaffMember.name,
}
# Rows only people using a shop create; counted, never named (member emails are personal).
ACTIVITY: dict[str, Any] = {
    "members": Member,
    "orders": Order,
    "payments": Payment,
    "card keys": CardKey,
    "ledger transactions": LedgerTransaction,
    "tier prices": TierPrice,
    "risk lists": RiskListEntry,
    "documents": BuyerDocument,
}


@dataclass(frozen=True)
class Found:
    count: int
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Census:
    demo_owned: bool
    foreign: dict[str, Found] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for what, found in self.foreign.items():
            named = f" ({', '.join(found.examples)}{', …' if found.count > EXAMPLES else ''})"
            parts.append(f"{what}: {found.count}{named if found.examples else ''}")
        return "; ".join(parts)


def is_marked(conn: Connection) -> bool:
    """Whether the demo seeded this database cleanly at least once."""
    marker = select(AuditEntry.id).where(AuditEntry.action == MARKER_ACTION).limit(1)
    return conn.execute(marker).first() is not None


def take(conn: Connection, *, own: Mapping[str, frozenset[str]], demo_owned: bool) -> Census:
    """What in the database the demo did not create. `own` names the demo's rows per NAMED
    kind; they count as the demo's only in a database that is `demo_owned`."""
    foreign: dict[str, Found] = {}
    for what, column in NAMED.items():
        mine = own.get(what, frozenset()) if demo_owned else frozenset()
        stmt = select(column).order_by(column)
        if mine:
            stmt = stmt.where(column.not_in(sorted(mine)))
        names = [str(name) for name in conn.execute(stmt).scalars()]
        if names:
            foreign[what] = Found(len(names), tuple(names[:EXAMPLES]))
    if not demo_owned:
        for what, model in ACTIVITY.items():
            count = int(conn.execute(select(func.count()).select_from(model)).scalar_one())
            if count:
                foreign[what] = Found(count)
    return Census(demo_owned=demo_owned, foreign=foreign)


def mark(conn: Connection, *, census: Census, now: datetime) -> None:
    """The audit row that records the seeding. Only a clean seeding marks the database as the
    demo's; a forced one is recorded under another action, with what it overrode."""
    forced = bool(census.foreign)
    audit.record_on(
        conn,
        actor="system:demo",
        action=FORCED_ACTION if forced else MARKER_ACTION,
        target_type="database",
        target_id="demo",
        now=now,
        details={"overrode": census.summary()} if forced else {},
    )

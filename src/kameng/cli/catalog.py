"""`kameng product …` and `kameng tier …`: the catalog and reseller prices."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from kameng.cli.base import (
    ActorOpt,
    _actor,
    _container,
    console,
    product_app,
    tier_app,
)
from kameng.errors import KamengError

# -- catalog -------------------------------------------------------------------------------------


def _add_sku(
    session: Any, *, product: Any, sku: str, name: str, price: str, cost: str,
    denomination: str, allow_below_cost: bool, actor: str | None,
) -> None:  # fmt: skip
    """One SKU plus its audit row: the same for a new product's first SKU and for later ones."""
    from kameng.audit import service as audit
    from kameng.catalog import service as catalog
    from kameng.money import parse_amount

    catalog.add_sku(
        session,
        product=product,
        code=sku,
        name=name,
        price_cents=parse_amount(price),
        cost_cents=parse_amount(cost, allow_zero=True),
        denomination=denomination,
        allow_below_cost=allow_below_cost,
    )
    audit.record(
        session,
        actor=_actor(actor),
        action="sku.create",
        target_type="sku",
        target_id=sku,
        details={"product": product.slug, "price": price},
    )


@product_app.command("create")
def product_create(
    slug: Annotated[str, typer.Argument(help="Short unique id, e.g. steam-wallet")],
    name: Annotated[str, typer.Option(help="Display name")],
    sku: Annotated[str, typer.Option(help="SKU code of the first SKU, e.g. STEAM-100")],
    price: Annotated[str, typer.Option(help="Base price in CNY, e.g. 98.50")],
    cost: Annotated[str, typer.Option(help="Unit cost in CNY")] = "0",
    category: Annotated[str, typer.Option(help="Category slug (created if new)")] = "default",
    delivery: Annotated[str, typer.Option(help="card_key | direct_topup | manual")] = "card_key",
    sku_name: Annotated[str | None, typer.Option(help="SKU display name")] = None,
    denomination: Annotated[str, typer.Option(help="面值, e.g. 100元")] = "",
    fields_json: Annotated[
        str | None, typer.Option("--fields", help="Buyer-field template as JSON list")
    ] = None,
    min_qty: Annotated[int, typer.Option(help="Minimum quantity per order")] = 1,
    max_qty: Annotated[int, typer.Option(help="Maximum quantity per order")] = 10,
    sla: Annotated[int | None, typer.Option(help="SLA in seconds (default 1800)")] = None,
    low_stock: Annotated[int, typer.Option(help="Low-stock threshold")] = 10,
    allow_below_cost: Annotated[bool, typer.Option(help="Allow price below cost")] = False,
    actor: ActorOpt = None,
) -> None:
    """Create a product with its first SKU."""
    from kameng.catalog import service as catalog
    from kameng.catalog.models import DeliveryKind

    try:
        template = json.loads(fields_json) if fields_json else []
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--fields is not JSON: {exc}") from None
    if delivery not in {k.value for k in DeliveryKind}:
        raise typer.BadParameter("--delivery must be card_key, direct_topup or manual")
    container = _container()
    with container.db.unit_of_work() as session:
        product = catalog.create_product(
            session,
            slug=slug,
            name=name,
            category=category,
            delivery_kind=DeliveryKind(delivery),
            field_template=template,
            min_quantity=min_qty,
            max_quantity=max_qty,
            sla_seconds=sla,
            low_stock_threshold=low_stock,
        )
        _add_sku(
            session, product=product, sku=sku, name=sku_name or name, price=price, cost=cost,
            denomination=denomination, allow_below_cost=allow_below_cost, actor=actor,
        )  # fmt: skip
    console.print(f"created product [bold]{slug}[/bold] with SKU [bold]{sku}[/bold]")


@product_app.command("add-sku")
def product_add_sku(
    slug: Annotated[str, typer.Argument(help="Product slug")],
    sku: Annotated[str, typer.Option(help="SKU code")],
    price: Annotated[str, typer.Option(help="Base price in CNY")],
    cost: Annotated[str, typer.Option(help="Unit cost in CNY")] = "0",
    name: Annotated[str | None, typer.Option(help="SKU display name")] = None,
    denomination: Annotated[str, typer.Option(help="面值")] = "",
    allow_below_cost: Annotated[bool, typer.Option(help="Allow price below cost")] = False,
    actor: ActorOpt = None,
) -> None:
    """Add another SKU (面值) to a product."""
    from kameng.catalog import service as catalog

    container = _container()
    with container.db.unit_of_work() as session:
        product = catalog.get_product(session, slug=slug)
        _add_sku(
            session, product=product, sku=sku, name=name or sku, price=price, cost=cost,
            denomination=denomination, allow_below_cost=allow_below_cost, actor=actor,
        )  # fmt: skip
    console.print(f"added SKU [bold]{sku}[/bold] to {slug}")


@product_app.command("enable")
def product_enable(
    sku: Annotated[str | None, typer.Option(help="SKU code")] = None,
    product: Annotated[str | None, typer.Option(help="Product slug")] = None,
    off: Annotated[bool, typer.Option("--off", help="Disable instead")] = False,
    actor: ActorOpt = None,
) -> None:
    """Put a SKU or product on sale (or take it off with --off)."""
    from kameng.audit import service as audit
    from kameng.catalog import service as catalog

    if not sku and not product:
        raise typer.BadParameter("give --sku or --product")
    container = _container()
    with container.db.unit_of_work() as session:
        catalog.set_enabled(session, sku_code=sku, product_slug=product, enabled=not off)
        audit.record(
            session,
            actor=_actor(actor),
            action="catalog.enable" if not off else "catalog.disable",
            target_type="sku" if sku else "product",
            target_id=sku or product,
        )
    console.print("off sale" if off else "on sale")


@product_app.command("risk")
def product_risk(
    product: Annotated[str, typer.Argument(help="Product slug")],
    level: Annotated[
        int | None, typer.Option(min=0, max=3, help="Risk level 0-3 (rule attribute product_risk)")
    ] = None,
    qualification: Annotated[
        str | None,
        typer.Option(
            help="Require an approved document of this kind ('any' for any kind, 'none' to stop)"
        ),
    ] = None,
    actor: ActorOpt = None,
) -> None:
    """Set what screening and checkout know about a product's risk."""
    from kameng.audit import service as audit
    from kameng.catalog import service as catalog

    if level is None and qualification is None:
        raise typer.BadParameter("give --level and/or --qualification")
    container = _container()
    with container.db.unit_of_work() as session:
        found = catalog.get_product(session, slug=product)
        details: dict[str, Any] = {}
        if level is not None:
            found.risk_level = level
            details["risk_level"] = level
        if qualification is not None:
            if qualification not in ("none", "any") and not qualification.isidentifier():
                raise typer.BadParameter("a document kind is a name like business_license")
            found.requires_qualification = qualification != "none"
            found.qualification_kind = "" if qualification in ("none", "any") else qualification
            details["qualification"] = qualification
        audit.record(
            session,
            actor=_actor(actor),
            action="catalog.risk",
            target_type="product",
            target_id=product,
            details=details,
        )
    container.invalidate_caches()
    console.print(f"{product}: {details}")


@product_app.command("list")
def product_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Products, SKUs, prices and stock."""
    from kameng.catalog import service as catalog
    from kameng.inventory import service as inventory
    from kameng.money import format_cents

    container = _container()
    with container.db.connect(write=False) as conn:
        counts = inventory.available_counts(conn)
    rows = []
    with container.db.unit_of_work(write=False) as session:
        for p in catalog.list_products(session, include_disabled=True):
            for s in p.skus:
                rows.append(
                    {
                        "product": p.slug,
                        "sku": s.code,
                        "name": s.name,
                        "kind": p.delivery_kind,
                        "price": format_cents(s.price_cents),
                        "cost": format_cents(s.cost_cents),
                        "stock": counts.get(s.id, 0),
                        "on_sale": s.enabled and p.enabled,
                    }
                )
    if as_json:
        console.print_json(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(*rows[0].keys()) if rows else Table("product")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)


# -- tiers ---------------------------------------------------------------------------------------


@tier_app.command("create")
def tier_create(
    code: Annotated[str, typer.Argument()],
    name: Annotated[str, typer.Option()],
    percent: Annotated[str, typer.Option(help="Default price as % of base, e.g. 95")] = "100",
) -> None:
    """Create a reseller tier."""
    from decimal import Decimal

    from kameng.pricing import service as pricing

    container = _container()
    with container.db.unit_of_work() as session:
        pricing.create_tier(session, code=code, name=name, default_bp=int(Decimal(percent) * 100))
    console.print(f"tier {code} created")


@tier_app.command("price")
def tier_price(
    tier: Annotated[str, typer.Argument()],
    sku: Annotated[str, typer.Argument()],
    fixed: Annotated[str | None, typer.Option(help="Fixed unit price in CNY")] = None,
    percent: Annotated[str | None, typer.Option(help="% of base price, e.g. 96.5")] = None,
    allow_below_cost: Annotated[bool, typer.Option(help="Allow a price under cost")] = False,
    actor: ActorOpt = None,
) -> None:
    """Set a tier's price for one SKU (fixed or percent)."""
    from decimal import Decimal

    from sqlalchemy import select

    from kameng.audit import service as audit
    from kameng.catalog.models import Sku
    from kameng.errors import ErrorCode
    from kameng.money import parse_amount
    from kameng.pricing import service as pricing

    container = _container()
    with container.db.unit_of_work() as session:
        sku_row = session.scalar(select(Sku).where(Sku.code == sku))
        if sku_row is None:
            raise KamengError(ErrorCode.sku_not_found, sku=sku)
        pricing.set_tier_price(
            session,
            tier=pricing.get_tier(session, code=tier),
            sku=sku_row,
            fixed_cents=parse_amount(fixed) if fixed else None,
            percent_bp=int(Decimal(percent) * 100) if percent else None,
            allow_below_cost=allow_below_cost,
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="pricing.set",
            target_type="sku",
            target_id=sku,
            details={"tier": tier, "fixed": fixed, "percent": percent},
        )
    console.print(f"price set for {tier}/{sku}")

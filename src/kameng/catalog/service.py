"""Catalog use cases: create and change categories, products and SKUs; look them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from kameng.catalog.fields import validate_template
from kameng.catalog.models import Category, DeliveryKind, Product, Sku
from kameng.errors import ErrorCode, KamengError
from kameng.money import format_cents


@dataclass(frozen=True, slots=True)
class SkuInfo:
    """What the order hot path needs about a SKU, detached from any session."""

    id: int
    code: str
    name: str
    product_id: int
    product_name: str
    delivery_kind: str
    price_cents: int
    cost_cents: int
    currency: str
    on_sale: bool
    min_quantity: int
    max_quantity: int
    field_template: tuple[dict[str, Any], ...]
    sla_seconds: int | None
    allow_below_cost: bool
    risk_level: int = 0
    requires_qualification: bool = False
    qualification_kind: str = ""


def _sku_info(sku: Sku) -> SkuInfo:
    product = sku.product
    return SkuInfo(
        id=sku.id,
        code=sku.code,
        name=sku.name,
        product_id=product.id,
        product_name=product.name,
        delivery_kind=product.delivery_kind,
        price_cents=sku.price_cents,
        cost_cents=sku.cost_cents,
        currency=sku.currency,
        on_sale=sku.enabled and product.enabled and product.category.enabled,
        min_quantity=product.min_quantity,
        max_quantity=product.max_quantity,
        field_template=tuple(product.field_template or ()),
        sla_seconds=product.sla_seconds,
        allow_below_cost=sku.allow_below_cost,
        risk_level=product.risk_level,
        requires_qualification=product.requires_qualification,
        qualification_kind=product.qualification_kind,
    )


def get_sku_info(session: Session, *, code: str) -> SkuInfo:
    sku = session.scalar(
        select(Sku)
        .where(Sku.code == code)
        .options(selectinload(Sku.product).selectinload(Product.category))
    )
    if sku is None:
        raise KamengError(ErrorCode.sku_not_found, sku=code)
    return _sku_info(sku)


def ensure_category(session: Session, *, slug: str, name: str | None = None) -> Category:
    category = session.scalar(select(Category).where(Category.slug == slug))
    if category is None:
        category = Category(slug=slug, name=name or slug, sort=0, enabled=True)
        session.add(category)
        session.flush()
    return category


def create_product(
    session: Session,
    *,
    slug: str,
    name: str,
    category: str,
    delivery_kind: DeliveryKind,
    description: str = "",
    field_template: list[dict[str, Any]] | None = None,
    min_quantity: int = 1,
    max_quantity: int = 10,
    sla_seconds: int | None = None,
    low_stock_threshold: int = 10,
) -> Product:
    if session.scalar(select(Product.id).where(Product.slug == slug)) is not None:
        raise KamengError(ErrorCode.already_exists, what=f"product {slug}")
    if not 1 <= min_quantity <= max_quantity <= 1000:
        raise KamengError(ErrorCode.quantity_out_of_range, min=1, max=1000)
    product = Product(
        slug=slug,
        name=name,
        category_id=ensure_category(session, slug=category).id,
        delivery_kind=DeliveryKind(delivery_kind).value,
        description=description,
        field_template=validate_template(field_template or []),
        min_quantity=min_quantity,
        max_quantity=max_quantity,
        sla_seconds=sla_seconds,
        low_stock_threshold=low_stock_threshold,
        enabled=True,
    )
    session.add(product)
    session.flush()
    return product


def add_sku(
    session: Session,
    *,
    product: Product,
    code: str,
    name: str,
    price_cents: int,
    cost_cents: int = 0,
    denomination: str = "",
    allow_below_cost: bool = False,
) -> Sku:
    if session.scalar(select(Sku.id).where(Sku.code == code)) is not None:
        raise KamengError(ErrorCode.already_exists, what=f"SKU {code}")
    if price_cents < cost_cents and not allow_below_cost:
        raise KamengError(
            ErrorCode.price_below_cost,
            price=format_cents(price_cents),
            cost=format_cents(cost_cents),
        )
    sku = Sku(
        product_id=product.id,
        code=code,
        name=name,
        price_cents=price_cents,
        cost_cents=cost_cents,
        denomination=denomination,
        allow_below_cost=allow_below_cost,
        currency="CNY",
        enabled=True,
    )
    session.add(sku)
    session.flush()
    return sku


def get_product(session: Session, *, slug: str) -> Product:
    product = session.scalar(select(Product).where(Product.slug == slug))
    if product is None:
        raise KamengError(ErrorCode.product_not_found, product=slug)
    return product


def set_enabled(
    session: Session, *, sku_code: str | None = None, product_slug: str | None = None, enabled: bool
) -> None:
    if sku_code:
        sku = session.scalar(select(Sku).where(Sku.code == sku_code))
        if sku is None:
            raise KamengError(ErrorCode.sku_not_found, sku=sku_code)
        sku.enabled = enabled
    if product_slug:
        get_product(session, slug=product_slug).enabled = enabled


def list_products(session: Session, *, include_disabled: bool = False) -> list[Product]:
    stmt = (
        select(Product)
        .options(selectinload(Product.skus), selectinload(Product.category))
        .order_by(Product.id)
    )
    products = list(session.scalars(stmt))
    if include_disabled:
        return products
    return [p for p in products if p.enabled and p.category.enabled]

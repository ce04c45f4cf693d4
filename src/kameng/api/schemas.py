"""Request and response shapes of Reseller API v1 — the public contract in the OpenAPI doc."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Money = Annotated[str, Field(pattern=r"^-?\d+\.\d{2}$", examples=["10.00"])]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def _refuse_nul(value: object) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nul(k)
            _refuse_nul(v)


class StrictBody(BaseModel):
    """Request bodies: unknown properties refused, and no NUL characters anywhere (PostgreSQL
    text cannot hold them, and no legitimate key, account or reference contains one)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nul(self) -> StrictBody:
        for name in type(self).model_fields:
            _refuse_nul(getattr(self, name))
        return self


class CorrectFieldsRequest(StrictBody):
    fields: dict[str, str | int] = Field(
        description="The corrected buyer information: every field of the product's template"
    )


class CreateOrderRequest(StrictBody):
    sku: Annotated[str, Field(min_length=1, max_length=64, examples=["GC-100"])]
    quantity: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1
    fields: dict[str, str | int] = Field(default_factory=dict)
    customer_ref: Annotated[
        str,
        Field(
            max_length=128,
            description="Your own reference for the end customer; part of the duplicate guard",
        ),
    ] = ""
    confirm_duplicate: bool = Field(
        default=False,
        description="Set after a duplicate_order_suspected answer to buy again on purpose",
    )
    notify_url: Annotated[
        str | None,
        Field(
            max_length=500,
            pattern=r"^https?://[^\s]+$",
            description="Where to POST signed status updates of this order (X-Kameng-Signature "
            "over the body with your API secret)",
        ),
    ] = None


class LookupRequest(StrictBody):
    order_no: Annotated[str, Field(min_length=1, max_length=40)]
    secret: Annotated[str, Field(min_length=1, max_length=40)]


class KeyOut(BaseModel):
    code: str
    secret: str | None = None


class EventOut(BaseModel):
    at: str
    from_status: str | None
    to_status: str
    stage: str
    reason: str
    reason_text: str
    actor: str


class OrderOut(BaseModel):
    order_no: str
    status: str
    status_text: str
    stage: str
    reason: str
    reason_text: str
    stage_since: str
    next_action_at: str | None
    sla_deadline: str | None
    sku: str
    quantity: int
    unit_price: Money
    amount: Money
    currency: str
    customer_ref: str
    fields: dict[str, str]
    created_at: str
    delivered_at: str | None
    keys: list[KeyOut] | None = None
    lookup_secret: str | None = Field(
        default=None, description="Returned once, at creation: give it to the end customer"
    )
    timeline: list[EventOut] | None = None


class OrderPage(BaseModel):
    orders: list[OrderOut]
    next_cursor: str | None


class SkuOut(BaseModel):
    sku: str
    name: str
    denomination: str
    price: Money
    currency: str
    available: bool
    stock: int | None = Field(description="Keys in stock (card_key products); null otherwise")


class ProductOut(BaseModel):
    id: int
    slug: str
    name: str
    category: str
    delivery_kind: str
    min_quantity: int
    max_quantity: int
    fields: list[dict[str, object]]
    skus: list[SkuOut]


class ProductList(BaseModel):
    products: list[ProductOut]


class BalanceOut(BaseModel):
    available: Money
    held: Money
    currency: str


class LookupOut(OrderOut):
    pass

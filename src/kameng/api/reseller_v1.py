"""Reseller API v1: signed, idempotent, tenant-isolated. A thin edge over the services."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.engine import Connection

from kameng.api import checks, render
from kameng.api.deps import (
    ContainerDep,
    LanguageDep,
    SignedDep,
    run_as_async,
    run_signed,
    run_signed_async,
    signed_request,
)
from kameng.api.responses import JSON
from kameng.api.schemas import (
    BalanceOut,
    CorrectFieldsRequest,
    CreateOrderRequest,
    ErrorResponse,
    LookupRequest,
    OrderOut,
    OrderPage,
    ProductList,
)
from kameng.catalog import service as catalog
from kameng.catalog.fields import validate_fields
from kameng.catalog.service import SkuInfo
from kameng.container import Container
from kameng.errors import ErrorCode, KamengError, normalize_language
from kameng.idempotency import service as idem
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.money import format_cents
from kameng.orders import cancel as order_cancel
from kameng.orders import queries as order_queries
from kameng.orders import screening
from kameng.orders import service as orders
from kameng.orders.numbers import normalize_order_no
from kameng.orders.state import Status
from kameng.pipeline import buyer_info
from kameng.pipeline.wakeup import DOORBELL
from kameng.pricing import service as pricing
from kameng.resellers.service import Caller

# (body, keys to decrypt, their SKU id, replayed): what placing an order answers.
Answer = tuple[dict[str, Any], list[Any], int, bool]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 402, 404, 409, 422, 429)
}
router = APIRouter(prefix="/api/v1", default_response_class=JSON, responses=ERRORS)
public = APIRouter(prefix="/api/v1", default_response_class=JSON, responses=ERRORS)


@router.get("/products", response_model=ProductList, tags=["catalog"])
def list_products(req: SignedDep, container: ContainerDep, language: LanguageDep) -> Any:
    caller = run_signed(container, req, lambda conn, caller: caller)
    with container.db.connect(write=False) as conn:
        counts = inventory.available_counts(conn)
    with container.db.unit_of_work(write=False) as session:
        prices = pricing.prices_for_tier(session, tier_id=caller.tier_id)
        out = []
        for product in catalog.list_products(session):
            skus = []
            for sku in product.skus:
                if not sku.enabled:
                    continue
                stock = counts.get(sku.id, 0) if product.delivery_kind == "card_key" else None
                skus.append(
                    {
                        "sku": sku.code,
                        "name": sku.name,
                        "denomination": sku.denomination,
                        "price": format_cents(prices[sku.id]),
                        "currency": sku.currency,
                        "available": stock is None or stock > 0,
                        "stock": stock,
                    }
                )
            out.append(
                {
                    "id": product.id,
                    "slug": product.slug,
                    "name": product.name,
                    "category": product.category.name,
                    "delivery_kind": product.delivery_kind,
                    "min_quantity": product.min_quantity,
                    "max_quantity": product.max_quantity,
                    "fields": [
                        {k: v for k, v in f.items() if k != "label_en" or language == "en"}
                        for f in product.field_template
                    ],
                    "skus": skus,
                }
            )
    return JSON({"products": out})


_CREATE_ORDER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CreateOrderRequest.model_json_schema()}},
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": True,
            "description": "1-255 characters, a new one per new order",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ],
}


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderOut,
    tags=["orders"],
    openapi_extra=_CREATE_ORDER_DOC,
)
async def create_order(request: Request) -> Any:
    """Pay from balance and deliver at once from stock; short of stock the order waits in
    `backordered` with the money held. Needs `Idempotency-Key`.

    Checks run in this order, each only once the one before passed: signature (key, timestamp,
    signature), nonce, idempotency (a replay answers the original response and nothing else
    runs; a key in flight answers 409, the same key with another body 422), validation, the
    supplier's pre-check (direct top-ups), placement. So a retry of a placed order is answered
    with that order whatever has changed since (the supplier now refusing the account, the
    SKU closed), and a request that is not authentic never reaches a supplier.

    The hot path: it reads and validates its own input (the same model, the same errors as
    every other endpoint) instead of going through dependency injection, which on this
    endpoint cost more CPU than the order's whole database transaction. Without a pre-check
    the order is one transaction; with one, the checks commit (spending the nonce), the
    supplier is asked outside any transaction, and a second transaction places the order."""
    container: Container = request.app.state.container
    language = normalize_language(request.headers.get("accept-language"))
    req = await signed_request(request, container)
    claim = idem.Claim(container.inflight)
    client_ip = request.client.host if request.client else ""

    def attempt(conn: Connection, caller: Caller, *, checked: bool) -> Answer | _PrecheckDue:
        key = idem.validate_key(request.headers.get("idempotency-key"))
        claim.take(caller.scope, key)
        req_hash = idem.request_hash(req.method, req.path.split("?")[0], req.body)
        idem.lock_across_processes(conn, scope=caller.scope, key=key)
        stored = idem.find(conn, scope=caller.scope, key=key, req_hash=req_hash)
        if stored is not None:
            return _replay(conn, container, caller, stored.response)
        payload = _parse_order(request.headers.get("content-type"), req.body)
        sku, fields = _validated(container, conn, payload)
        if not checked and checks.precheck_due(container, conn, sku):
            return _PrecheckDue(caller, sku, fields)
        unit_price = container.unit_price(tier_id=caller.tier_id, sku_id=sku.id, conn=conn)
        now = container.clock()
        placed = orders.place_order(
            conn,
            buyer=orders.Buyer(caller.reseller_id, caller.wallet_id, caller.actor),
            cmd=orders.PlaceOrder(
                sku=sku,
                unit_price_cents=unit_price,
                quantity=payload.quantity,
                fields=fields,
                customer_ref=payload.customer_ref,
                confirm_duplicate=payload.confirm_duplicate,
                supplier_offers=container.has_offers(sku.id, conn=conn),
                notify_url=payload.notify_url or "",
            ),
            accounts=container.accounts,
            vault=container.vault,
            policy=container.policy,
            now=now,
            engine=container.screening_engine,
            context=screening.Context(ip=client_ip),
        )
        body = render.placed_body(
            placed, sku, payload.quantity, unit_price, fields, language, payload.customer_ref
        )
        if placed.keys:
            container.decryptor.preload(conn, {k.batch_id for k in placed.keys})
        # The lookup secret is stored only hashed on the order; the replayable copy of this
        # answer keeps it sealed (AES-GCM) so that even this record never holds it in clear.
        stored_body = {k: v for k, v in body.items() if k != "lookup_secret"}
        stored_body[SEALED_LOOKUP] = base64.b64encode(
            container.vault.seal(placed.lookup_secret, _lookup_context(placed.order_no))
        ).decode()
        idem.store(
            conn,
            scope=caller.scope,
            key=key,
            req_hash=req_hash,
            status_code=201,
            response=stored_body,
            now=now,
        )
        return body, placed.keys, sku.id, False

    try:
        first = await run_signed_async(
            container, req, lambda conn, caller: attempt(conn, caller, checked=False)
        )
        answer: Answer | _PrecheckDue = first
        if isinstance(first, _PrecheckDue):
            buyer_info.refuse_if_wrong(
                await checks.precheck(request, container, first.caller, first.sku, first.fields)
            )
            answer = await run_as_async(
                container,
                req,
                first.caller,
                lambda conn, caller: attempt(conn, caller, checked=True),
            )
    finally:
        claim.release()
    assert not isinstance(answer, _PrecheckDue)  # the second attempt never asks for a check
    body, keys, sku_id, replayed = answer
    # Committed. Only now do plaintext keys exist, and only in this response.
    if body.get("stage") == "procuring" and not replayed:
        DOORBELL.ring()  # an embedded worker picks it up now rather than at its next poll
    if keys:
        body = {**body, "keys": render.decrypt_all(container, sku_id, keys)}
    return JSON(body, status_code=201, headers=checks.replayed_header(replayed))


@dataclass(frozen=True, slots=True)
class _PrecheckDue:
    """The checks passed and nothing is stored under the key: the supplier is to be asked
    about these fields before the order is placed."""

    caller: Caller
    sku: SkuInfo
    fields: dict[str, str]


def _parse_order(content_type: str | None, body: bytes) -> CreateOrderRequest:
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    if not media_type.endswith(("/json", "+json")):
        raise RequestValidationError(
            [{"type": "content_type", "loc": ("body",), "msg": "a JSON body is expected"}]
        )
    return checks.parse_json(CreateOrderRequest, body)


def _validated(
    container: Container, conn: Connection, payload: CreateOrderRequest
) -> tuple[SkuInfo, dict[str, str]]:
    sku = container.sku(payload.sku, conn=conn)
    if not sku.on_sale:
        raise KamengError(ErrorCode.sku_disabled, sku=sku.code)
    if not sku.min_quantity <= payload.quantity <= sku.max_quantity:
        raise KamengError(
            ErrorCode.quantity_out_of_range, min=sku.min_quantity, max=sku.max_quantity
        )
    return sku, validate_fields(list(sku.field_template), payload.fields)


SEALED_LOOKUP = "_sealed_lookup_secret"


def _lookup_context(order_no: str) -> str:
    return f"idempotent-lookup-secret|{order_no}"


def _replay(
    conn: Connection, container: Container, caller: Caller, stored: dict[str, Any]
) -> tuple[dict[str, Any], list[Any], int, bool]:
    """The original answer; keys were never stored, so they are re-read from the order."""
    body = dict(stored)
    sealed = body.pop(SEALED_LOOKUP, None)
    if sealed is not None:
        body["lookup_secret"] = container.vault.unseal(
            base64.b64decode(sealed), _lookup_context(body["order_no"])
        )
    if body.get("keys") is None:
        return body, [], 0, True
    order = order_queries.find_order(
        conn, order_no=body["order_no"], reseller_id=caller.reseller_id
    )
    line = order_queries.order_line(conn, order_id=order.id)
    keys = render.reveal_keys(
        conn, container, order=order, line=line, channel="idempotent_replay", actor=caller.actor
    )
    return body, keys, order.sku_id, True


def _encode_cursor(order_id: int) -> str:
    return base64.urlsafe_b64encode(f"o:{order_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        if prefix != "o" or not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise ValueError
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise KamengError(ErrorCode.invalid_request, detail="bad cursor") from None


@router.get("/orders", response_model=OrderPage, tags=["orders"])
def list_orders(
    req: SignedDep,
    container: ContainerDep,
    language: LanguageDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Status | None, Query()] = None,
    sku: Annotated[str | None, Query(max_length=64)] = None,
    customer_ref: Annotated[str | None, Query(max_length=128)] = None,
    created_from: Annotated[datetime | None, Query()] = None,
    created_to: Annotated[datetime | None, Query()] = None,
) -> Any:
    """Newest first. Keys are not included in lists: fetch one order to see its keys."""
    before = _decode_cursor(cursor) if cursor else None

    def handler(conn: Connection, caller: Caller) -> tuple[list[Any], list[dict[str, Any]]]:
        sku_id = None
        if sku:
            sku_id = container.sku(sku, conn=conn).id
        for value in (created_from, created_to):
            if value is not None and value.tzinfo is None:
                raise KamengError(ErrorCode.invalid_request, detail="dates need a timezone")
        rows = order_queries.list_orders(
            conn,
            reseller_id=caller.reseller_id,
            limit=limit + 1,
            before_id=before,
            status=status.value if status else None,
            sku_id=sku_id,
            customer_ref=customer_ref,
            created_from=created_from,
            created_to=created_to,
        )
        page = rows[:limit]
        codes = render.sku_codes(conn, {r.sku_id for r in page})
        bodies = []
        for row in page:
            line = order_queries.order_line(conn, order_id=row.id)
            bodies.append(render.order_body(row, line, codes.get(row.sku_id, ""), language))
        return rows, bodies

    rows, bodies = run_signed(container, req, handler)
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1].id) if len(rows) > limit and page else None
    return JSON({"orders": bodies, "next_cursor": next_cursor})


@router.get("/orders/{order_no}", response_model=OrderOut, tags=["orders"])
def get_order(order_no: str, req: SignedDep, container: ContainerDep, language: LanguageDep) -> Any:
    """One order with its timeline, and its keys once delivered (each reveal is recorded)."""

    def handler(conn: Connection, caller: Caller) -> tuple[Any, dict[str, Any], list[Any]]:
        order = order_queries.find_order(
            conn, order_no=normalize_order_no(order_no), reseller_id=caller.reseller_id
        )
        body, keys = render.full_order(
            conn, container, order, language, channel="api_get", actor=caller.actor
        )
        return order, body, keys

    order, body, keys = run_signed(container, req, handler)
    if keys:
        body["keys"] = render.decrypt_all(container, order.sku_id, keys)
    return JSON(body)


_OPTIONAL_KEY_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "1-255 characters. Optional here: a retry under the same key and "
            "body answers the first answer (`Idempotent-Replayed: true`), the same key with "
            "another body 422, a key still in flight 409",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ]
}


@router.post(
    "/orders/{order_no}/cancel",
    response_model=OrderOut,
    tags=["orders"],
    openapi_extra=_OPTIONAL_KEY_DOC,
)
def cancel_order(
    order_no: str,
    request: Request,
    req: SignedDep,
    container: ContainerDep,
    language: LanguageDep,
) -> Any:
    """Cancel an order that has not been delivered: stock released, money back to balance.

    Naturally idempotent: canceling a canceled order answers with the order as it is. With an
    `Idempotency-Key` the first answer is replayed, and a key sent again for another order is
    refused instead of canceling that one too."""
    claim = idem.Claim(container.inflight)
    header = request.headers.get("idempotency-key")

    def handler(conn: Connection, caller: Caller) -> tuple[dict[str, Any], bool]:
        stored = checks.stored_answer(conn, caller, claim, req, header)
        if stored is not None:
            return stored, True
        normalized = normalize_order_no(order_no)
        order_cancel.cancel_order(
            conn,
            order_no=normalized,
            reseller_id=caller.reseller_id,
            wallet_id=caller.wallet_id,
            accounts=container.accounts,
            actor=caller.actor,
            reason="canceled_by_buyer",
            now=container.clock(),
        )
        order = order_queries.find_order(conn, order_no=normalized, reseller_id=caller.reseller_id)
        body, _ = render.full_order(
            conn, container, order, language, channel="api_cancel", actor=caller.actor
        )
        checks.store_answer(conn, caller, req, header, body, container.clock())
        return body, False

    try:
        body, replayed = run_signed(container, req, handler)
    finally:
        claim.release()
    return JSON(body, headers=checks.replayed_header(replayed))


@dataclass(frozen=True, slots=True)
class _Correction:
    caller: Caller
    order_id: int
    sku: SkuInfo
    fields: dict[str, str]
    precheck_due: bool


@router.post(
    "/orders/{order_no}/fields",
    response_model=OrderOut,
    tags=["orders"],
    openapi_extra=_OPTIONAL_KEY_DOC,
)
async def correct_fields(
    order_no: str, request: Request, req: SignedDep, container: ContainerDep, language: LanguageDep
) -> Any:
    """Correct the buyer information of an order in `needs_buyer_action` (the supplier refused
    it): send every field again. The order goes back to the supplier at once. Where the
    supplier offers a pre-check, the new fields are checked first and a definite refusal
    answers `invalid_fields` naming the field. To give up instead, cancel the order (refund).

    Checks run in the order of `POST /orders`: signature, nonce, idempotency (with an
    `Idempotency-Key`, a retry of an applied correction answers that correction rather than
    `order_not_fixable`), validation, pre-check, correction."""
    normalized = normalize_order_no(order_no)
    claim = idem.Claim(container.inflight)
    header = request.headers.get("idempotency-key")

    def check(conn: Connection, caller: Caller) -> dict[str, Any] | _Correction:
        stored = checks.stored_answer(conn, caller, claim, req, header)
        if stored is not None:
            return stored
        payload = checks.parse_json(CorrectFieldsRequest, req.body)
        order = order_queries.find_order(conn, order_no=normalized, reseller_id=caller.reseller_id)
        if order.status != Status.needs_buyer_action.value:
            raise KamengError(ErrorCode.order_not_fixable, status=order.status)
        sku = container.sku_by_id(order.sku_id, conn=conn)
        fields = validate_fields(list(sku.field_template), payload.fields)
        return _Correction(caller, order.id, sku, fields, checks.precheck_due(container, conn, sku))

    def correct(conn: Connection, caller: Caller, todo: _Correction) -> tuple[dict[str, Any], bool]:
        stored = checks.stored_answer(conn, caller, claim, req, header)
        if stored is not None:
            return stored, True
        now = container.clock()
        fresh = buyer_info.correct_fields(
            conn,
            order_id=todo.order_id,
            sku=todo.sku,
            fields=todo.fields,
            actor=caller.actor,
            fulfil_sla_s=todo.sku.sla_seconds or container.settings.default_sla_s,
            now=now,
            engine=container.screening_engine,
            accounts=container.accounts,
            review_sla_s=container.settings.review_sla_s,
        )
        body, _ = render.full_order(
            conn, container, fresh, language, channel="api_fields", actor=caller.actor
        )
        checks.store_answer(conn, caller, req, header, body, now)
        return body, False

    try:
        first = await run_signed_async(container, req, check)
        if isinstance(first, dict):
            return JSON(first, headers=checks.replayed_header(True))
        todo = first
        if todo.precheck_due:
            buyer_info.refuse_if_wrong(
                await checks.precheck(request, container, todo.caller, todo.sku, todo.fields)
            )
        body, replayed = await run_as_async(
            container, req, todo.caller, lambda conn, caller: correct(conn, caller, todo)
        )
    finally:
        claim.release()
    if not replayed:
        DOORBELL.ring()
    return JSON(body, headers=checks.replayed_header(replayed))


@router.get("/balance", response_model=BalanceOut, tags=["account"])
def get_balance(req: SignedDep, container: ContainerDep) -> Any:
    available, held = run_signed(
        container, req, lambda conn, caller: ledger.balances(conn, wallet_id=caller.wallet_id)
    )
    return JSON(
        {"available": format_cents(available), "held": format_cents(held), "currency": "CNY"}
    )


@public.post("/lookup", response_model=OrderOut, tags=["lookup"])
def lookup_order(
    payload: LookupRequest, request: Request, container: ContainerDep, language: LanguageDep
) -> Any:
    """Buyer lookup (查单) by order number and the secret given at purchase. Unsigned and
    rate-limited per IP; a wrong secret and an unknown order give the same answer."""
    client = request.client.host if request.client else "unknown"
    request.app.state.lookup_limiter.check(client)
    with container.db.connect() as conn:
        order = order_queries.lookup(
            conn,
            order_no=normalize_order_no(payload.order_no),
            secret=payload.secret,
            vault=container.vault,
        )
        if order is None:
            raise KamengError(ErrorCode.order_not_found)
        body, keys = render.full_order(
            conn,
            container,
            order,
            language,
            channel="lookup",
            audience="buyer",
            actor=f"lookup:{client}",
        )
    if keys:
        body["keys"] = render.decrypt_all(container, order.sku_id, keys)
    return JSON(body)

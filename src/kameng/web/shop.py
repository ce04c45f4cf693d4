"""Storefront pages: catalog -> order form -> pay (balance or gateway) -> live order page.

Thin edge: every page reads or writes through services in one transaction, and every POST is
CSRF-checked first. The order page polls a fragment (htmx) while the order is still moving,
so the buyer watches stage, reason and timeline change without reloading; once delivered it
shows the keys (each showing is audited, like every reveal).
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from kameng.api import render as api_render
from kameng.catalog import service as catalog
from kameng.catalog.fields import validate_fields
from kameng.container import Container
from kameng.documents import service as documents
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.ledger import service as ledger
from kameng.orders import cancel as order_cancel
from kameng.orders import checkout, screening
from kameng.orders import queries as order_queries
from kameng.orders import service as orders
from kameng.orders.explain import status_text
from kameng.orders.numbers import normalize_order_no
from kameng.orders.state import TERMINAL, Status
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.pipeline import buyer_info
from kameng.pipeline.wakeup import DOORBELL
from kameng.web.browser import Browser, browser, client_ip, form_data
from kameng.web.i18n import TEXT
from kameng.web.templating import render

router = APIRouter(include_in_schema=False)

# Statuses in which the page keeps polling: the order is still on its way.
_MOVING = frozenset(s.value for s in Status if s not in TERMINAL) - {
    Status.delivered.value,
    Status.completed.value,
    Status.disputed.value,
}


def _container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def _error_page(ctx: Browser, exc: KamengError, *, back: str = "/") -> Response:
    response = render(
        ctx,
        "error.html",
        status_code=exc.http_status,
        code=exc.code.value,
        message=exc.message(ctx.language),
        back=back,
    )
    if exc.code is ErrorCode.rate_limited:
        response.headers["Retry-After"] = str(exc.params.get("retry_after", 60))
    return response


def pay_options(conn: Connection, ctx: Browser, *, balance: bool = True) -> list[dict[str, str]]:
    """The ways this buyer can pay: balance (members), then each gateway's pay types."""
    options = []
    if balance and ctx.member is not None:
        options.append({"value": "balance", "label": "pay_balance"})
    for gw in payments.list_gateways(conn, enabled_only=True):
        for pay_type in gw.pay_types.split(","):
            options.append({"value": f"{gw.code}:{pay_type}", "label": f"pay_gateway_{pay_type}"})
    return options


# -- catalog -------------------------------------------------------------------------------------


@router.get("/")
def home(request: Request) -> Response:
    container = _container(request)
    ctx = browser(request, container)
    with container.db.connect(write=False) as conn:
        counts = inventory.available_counts(conn)
    with container.db.unit_of_work(write=False) as session:
        products = [
            {
                "name": p.name,
                "kind": p.delivery_kind,
                "skus": [
                    {
                        "code": s.code,
                        "name": s.name,
                        "price": s.price_cents,
                        "stock": counts.get(s.id, 0) if p.delivery_kind == "card_key" else None,
                    }
                    for s in p.skus
                    if s.enabled
                ],
            }
            for p in catalog.list_products(session)
        ]
    return render(ctx, "home.html", products=products)


@router.post("/lookup")
async def lookup(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    try:
        ctx.check_csrf(form.get("csrf_token"))
        request.app.state.lookup_limiter.check(request.client.host if request.client else "")
    except KamengError as exc:
        return _error_page(ctx, exc)
    order_no = normalize_order_no(form.get("order_no", ""))[:40]
    secret = order_queries.normalize_secret(form.get("secret", "")[:40])

    def find() -> Any:
        with container.db.connect(write=False) as conn:
            return order_queries.lookup(
                conn, order_no=order_no, secret=secret, vault=container.vault
            )

    if await run_in_threadpool(find) is None:
        return _unknown_order(ctx)
    ctx.remember_guest_order(order_no, secret)
    return ctx.apply(RedirectResponse(f"/orders/{order_no}", status_code=303))


def _unknown_order(ctx: Browser) -> Response:
    """Unknown order and wrong secret look the same (no hint which orders exist)."""
    return render(
        ctx,
        "error.html",
        status_code=404,
        code=ErrorCode.order_not_found.value,
        message=TEXT[ctx.language]["unknown_order"],
    )


# -- the order form ------------------------------------------------------------------------------


def _form_page(
    ctx: Browser,
    container: Container,
    code: str,
    *,
    values: dict[str, str] | None = None,
    problems: list[dict[str, Any]] | None = None,
    error: str = "",
    error_code: str = "",
    duplicate: bool = False,
    status_code: int = 200,
) -> Response:
    try:
        sku = container.sku(code)
    except KamengError as exc:
        return _error_page(ctx, exc)
    with container.db.connect(write=False) as conn:
        options = pay_options(conn, ctx)
        balance = ledger.balances(conn, wallet_id=ctx.member.wallet_id)[0] if ctx.member else None
        stock = inventory.available_counts(conn).get(sku.id, 0)
    field_errors = {
        p.get("field"): p.get("message_en" if ctx.language == "en" else "message_zh")
        or p.get("message")
        for p in (problems or [])
    }
    return render(
        ctx,
        "buy.html",
        status_code=status_code,
        sku=sku,
        fields=list(sku.field_template),
        values=values or {},
        field_errors=field_errors,
        error=error,
        code=error_code,
        duplicate=duplicate,
        options=options,
        balance=balance,
        stock=stock if sku.delivery_kind == "card_key" else None,
    )


@router.get("/buy/{code}")
def buy_form(request: Request, code: str) -> Response:
    container = _container(request)
    return _form_page(browser(request, container), container, code[:64])


@router.post("/buy/{code}")
async def buy(request: Request, code: str) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    code = code[:64]
    try:
        ctx.check_csrf(form.get("csrf_token"))
        request.app.state.checkout_limiter.check(client_ip(request))
        sku = await run_in_threadpool(container.sku, code)
        if not sku.on_sale:
            raise KamengError(ErrorCode.sku_disabled, sku=sku.code)
    except KamengError as exc:
        return _error_page(ctx, exc, back=f"/buy/{code}")
    values = {k.removeprefix("f_"): v for k, v in form.items() if k.startswith("f_")}
    again = form.get("confirm_duplicate") == "1"

    def retry(**kw: Any) -> Response:
        return _form_page(ctx, container, code, values=values, **kw)

    try:
        quantity = int(form.get("quantity", "1"))
    except ValueError:
        quantity = 0
    try:
        if not sku.min_quantity <= quantity <= sku.max_quantity:
            raise KamengError(
                ErrorCode.quantity_out_of_range, min=sku.min_quantity, max=sku.max_quantity
            )
        fields = validate_fields(list(sku.field_template), values)
        # Before any money moves: the supplier's own check of the account, where it has one.
        buyer_info.refuse_if_wrong(
            await buyer_info.precheck(
                run_read=functools.partial(_read, container),
                adapters=request.app.state.adapters,
                sku=sku,
                fields=fields,
                now=container.clock(),
            )
        )
    except KamengError as exc:
        problems = exc.extra.get("fields") if isinstance(exc.extra.get("fields"), list) else None
        return await run_in_threadpool(
            functools.partial(
                retry,
                problems=problems,
                error=exc.message(ctx.language),
                error_code=exc.code.value,
                status_code=exc.http_status,
            )
        )

    pay = form.get("pay", "")
    member = ctx.member
    cmd = orders.PlaceOrder(
        sku=sku,
        unit_price_cents=sku.price_cents,
        quantity=quantity,
        fields=fields,
        confirm_duplicate=again,
        channel="storefront",
        supplier_offers=await run_in_threadpool(container.has_offers, sku.id),
    )
    actor = f"member:{member.member_id}" if member else "guest"
    context = screening.Context(
        ip=client_ip(request),
        device=ctx.anon_id,
        email=member.email if member else "",
        buyer_since=member.since if member else None,
    )

    def place(conn: Connection) -> tuple[str, str, bool]:
        now = container.clock()
        documents.require(
            conn,
            member_id=member.member_id if member else None,
            requires=sku.requires_qualification,
            kind=sku.qualification_kind,
            now=now,
        )
        if pay == "balance":
            if member is None:
                raise KamengError(ErrorCode.login_required)
            placed = orders.place_order(
                conn,
                buyer=orders.Buyer(None, member.wallet_id, actor, member_id=member.member_id),
                cmd=cmd,
                accounts=container.accounts,
                vault=container.vault,
                policy=container.policy,
                now=now,
                engine=container.screening_engine,
                context=context,
            )
            return placed.order_no, placed.lookup_secret, False
        gateway_code, _, pay_type = pay.partition(":")
        gateway = payments.get_gateway(conn, code=gateway_code[:64])
        if not gateway.enabled:
            raise KamengError(ErrorCode.gateway_unavailable)
        placed = checkout.place_pending(
            conn,
            buyer=orders.Buyer(
                None,
                0,
                actor,
                member_id=member.member_id if member else None,
                guest_key=ctx.anon_id,
            ),
            cmd=cmd,
            vault=container.vault,
            policy=container.policy,
            now=now,
            pay_window_s=container.settings.payment_window_s,
            context=context,
        )
        payments.open_payment(
            conn,
            gateway=gateway,
            purpose=PaymentPurpose.order,
            pay_type=pay_type,
            amount_cents=placed.amount_cents,
            currency=sku.currency,
            expires_at=placed.sla_deadline or now,
            now=now,
            checks=container.payment_checks,
            order_id=placed.order_id,
            order_no=placed.order_no,
            member_id=member.member_id if member else None,
        )
        return placed.order_no, placed.lookup_secret, True

    try:
        order_no, secret, to_gateway = await container.writer.run_async(place)
    except KamengError as exc:
        duplicate = exc.code is ErrorCode.duplicate_order_suspected
        return await run_in_threadpool(
            functools.partial(
                retry,
                error=exc.message(ctx.language),
                error_code=exc.code.value,
                duplicate=duplicate,
                status_code=exc.http_status,
            )
        )
    if member is None:
        ctx.remember_guest_order(order_no, secret)
    target = f"/pay/{order_no}" if to_gateway else f"/orders/{order_no}"
    return ctx.apply(RedirectResponse(target, status_code=303))


async def _read(container: Container, job: Any) -> Any:
    def run() -> Any:
        with container.db.connect(write=False) as conn:
            return job(conn)

    return await run_in_threadpool(run)


# -- paying at the gateway -----------------------------------------------------------------------


def _owns(conn: Connection, ctx: Browser, container: Container, order_no: str) -> Any | None:
    """The order if this browser may see it (its member, or a guest holding its secret)."""
    try:
        order = order_queries.find_order(conn, order_no=order_no, reseller_id=None)
    except KamengError:
        return None
    if ctx.member is not None and order.member_id == ctx.member.member_id:
        return order
    secret = ctx.guest_orders.get(order_no)
    if secret and order_queries.lookup(
        conn, order_no=order_no, secret=secret, vault=container.vault
    ):
        return order
    return None


@router.get("/pay/{payment_no}")
def pay_page(request: Request, payment_no: str) -> Response:
    """A page whose button posts the signed form to the gateway (no script needed)."""
    container = _container(request)
    ctx = browser(request, container)
    payment_no = payment_no[:64]
    # Not found and not yours get the same answer: no way to learn which numbers exist.
    hidden = KamengError(
        ErrorCode.payment_not_found if payment_no.startswith("T") else ErrorCode.order_not_found
    )
    with container.db.connect(write=False) as conn:
        pay = payments.payment_or_none(conn, payment_no=payment_no)
        if pay is None:
            return _error_page(ctx, hidden)
        if pay.purpose == PaymentPurpose.order.value:
            order = _owns(conn, ctx, container, payment_no)
            if order is None:
                return _error_page(ctx, hidden)
            subject = api_render.sku_codes(conn, {order.sku_id}).get(order.sku_id, "")
            back = f"/orders/{payment_no}"
        else:
            if ctx.member is None or pay.member_id != ctx.member.member_id:
                return _error_page(ctx, hidden)
            order, subject, back = None, "balance top-up", "/account"
        gateway = payments.get_gateway(conn, gateway_id=pay.gateway_id)
    closed = order is not None and order.status != Status.pending_payment.value
    if pay.state != "pending" or closed:
        # Paid, flagged, given up, or the order closed: nothing to pay here any more.
        return ctx.apply(RedirectResponse(back, status_code=303))
    base = container.settings.callback_base_url
    checkout_form = request.app.state.gateways.get(gateway).checkout(
        payment_no=pay.payment_no,
        amount_cents=pay.amount_cents,
        subject=f"{subject} {pay.payment_no}",
        pay_type=pay.pay_type,
        notify_url=f"{base}/pay/notify/{gateway.code}",
        return_url=f"{base}/pay/return/{gateway.code}",
        currency=pay.currency,
    )
    return render(ctx, "pay.html", payment=pay, order=order, checkout=checkout_form, back=back)


# -- the order page ------------------------------------------------------------------------------


def _order_view(request: Request, order_no: str, *, template: str) -> Response:
    container = _container(request)
    ctx = browser(request, container)
    order_no = normalize_order_no(order_no)[:40]
    with container.db.connect(write=False) as conn:
        order = _owns(conn, ctx, container, order_no)
    if order is None:
        return _unknown_order(ctx)
    # A write transaction only when keys are shown: each showing is audited.
    write = order.status in api_render.DELIVERED_STATES
    with container.db.connect(write=write) as conn:
        fresh = order_queries.find_order(conn, order_no=order_no, reseller_id=None)
        if write or fresh.status not in api_render.DELIVERED_STATES:
            order = fresh  # (delivered just now: shown with its keys on the next refresh)
        actor = f"member:{ctx.member.member_id}" if ctx.member else "guest"
        body, keys = api_render.full_order(
            conn,
            container,
            order,
            ctx.language,
            channel="storefront",
            actor=actor,
            audience="buyer",
        )
        plain = api_render.decrypt_all(container, order.sku_id, keys) if keys else []
        for event in body.get("timeline") or []:
            event["status_text"] = status_text(event["to_status"], ctx.language)
        pay = payments.payment_of_order(conn, order_id=order.id)
        fix_fields = None
        if order.status == Status.needs_buyer_action.value:
            sku = container.sku_by_id(order.sku_id, conn=conn)
            current = body.get("fields") or {}
            fix_fields = [
                {**spec, "value": current.get(spec["name"], "")} for spec in sku.field_template
            ]
    return render(
        ctx,
        template,
        order=body,
        fix_fields=fix_fields,
        keys=plain,
        moving=body["status"] in _MOVING,
        payment=pay,
        secret=ctx.guest_orders.get(order_no) if ctx.member is None else None,
    )


@router.get("/orders/{order_no}")
def order_page(request: Request, order_no: str) -> Response:
    return _order_view(request, order_no, template="order.html")


@router.get("/orders/{order_no}/panel")
def order_panel(request: Request, order_no: str) -> Response:
    return _order_view(request, order_no, template="order_panel.html")


@router.post("/orders/{order_no}/cancel")
async def cancel(request: Request, order_no: str) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    order_no = normalize_order_no(order_no)[:40]

    def job(conn: Connection) -> None:
        order = _owns(conn, ctx, container, order_no)
        if order is None:
            raise KamengError(ErrorCode.order_not_found)
        order_cancel.cancel_order(
            conn,
            order_no=order_no,
            reseller_id=None,
            wallet_id=0,
            accounts=container.accounts,
            actor=f"member:{ctx.member.member_id}" if ctx.member else "guest",
            reason=(
                "canceled_by_buyer"
                if order.status == Status.needs_buyer_action.value
                else "canceled_before_payment"
            ),
            now=container.clock(),
            only_from=frozenset({Status.pending_payment, Status.needs_buyer_action}),
        )

    try:
        ctx.check_csrf(form.get("csrf_token"))
        await container.writer.run_async(job)
    except KamengError as exc:
        return _error_page(ctx, exc, back=f"/orders/{order_no}")
    return ctx.apply(RedirectResponse(f"/orders/{order_no}", status_code=303))


@router.post("/orders/{order_no}/fields")
async def correct_fields(request: Request, order_no: str) -> Response:
    """The buyer corrects information the supplier refused; the order resumes at once."""
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    order_no = normalize_order_no(order_no)[:40]
    back = f"/orders/{order_no}"
    values = {k.removeprefix("f_"): v for k, v in form.items() if k.startswith("f_")}

    def check(conn: Connection) -> tuple[Any, Any]:
        order = _owns(conn, ctx, container, order_no)
        if order is None:
            raise KamengError(ErrorCode.order_not_found)
        if order.status != Status.needs_buyer_action.value:
            raise KamengError(ErrorCode.order_not_fixable, status=order.status)
        return order, container.sku_by_id(order.sku_id, conn=conn)

    actor = f"member:{ctx.member.member_id}" if ctx.member else "guest"
    try:
        ctx.check_csrf(form.get("csrf_token"))
        order, sku = await _read(container, check)
        fields = validate_fields(list(sku.field_template), values)
        buyer_info.refuse_if_wrong(
            await buyer_info.precheck(
                run_read=functools.partial(_read, container),
                adapters=request.app.state.adapters,
                sku=sku,
                fields=fields,
                now=container.clock(),
            )
        )
        await container.writer.run_async(
            lambda conn: buyer_info.correct_fields(
                conn,
                order_id=order.id,
                sku=sku,
                fields=fields,
                actor=actor,
                fulfil_sla_s=sku.sla_seconds or container.settings.default_sla_s,
                now=container.clock(),
                engine=container.screening_engine,
                accounts=container.accounts,
                review_sla_s=container.settings.review_sla_s,
            )
        )
    except KamengError as exc:
        return _error_page(ctx, exc, back=back)
    DOORBELL.ring()
    return ctx.apply(RedirectResponse(back, status_code=303))

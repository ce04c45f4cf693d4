"""Member pages: register, log in, log out, and the account page (balance, top-up by gateway,
order history, payments).

Failed logins are limited per email and per IP (`login_failures_per_window` in
`login_window_s`), registrations per IP: past the limit the answer is 429 with Retry-After.
A login always issues a new session id and drops the old one. Pages only ever read the
logged-in member's own rows: every query is keyed by the session's member id.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from kameng.api.render import sku_codes
from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.money import parse_amount
from kameng.orders import queries as order_queries
from kameng.orders.explain import status_text
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.web.browser import Browser, browser, client_ip, form_data
from kameng.web.shop import pay_options
from kameng.web.templating import render

router = APIRouter(include_in_schema=False)

TOPUP_MIN_CENTS = 100
WALLET_CURRENCY = "CNY"
TOPUP_MAX_CENTS = 5_000_000


def _container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a login link must not bounce the buyer to another site."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target[:200]
    return "/account"


def _new_session(
    conn: Connection, ctx: Browser, request: Request, *, member_id: int, now: datetime
) -> tuple[str, members.SessionInfo]:
    """A new session id for the member (the browser's previous one is dropped: rotation)."""
    token = members.start_session(
        conn,
        member_id=member_id,
        previous_token=ctx.session_token or None,
        ip=client_ip(request),
        now=now,
    )
    info = members.resolve_session(conn, token=token, now=now)
    assert info is not None
    return token, info


@router.get("/register")
def register_page(request: Request) -> Response:
    return render(browser(request, _container(request)), "register.html", error="", email="")


@router.post("/register")
async def register(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    email = form.get("email", "")[:254]
    try:
        ctx.check_csrf(form.get("csrf_token"))
        request.app.state.register_limiter.check(client_ip(request))
    except KamengError as exc:
        return _refuse(ctx, "register.html", exc, email=email)

    try:
        members.normalize_email(email)
        password_hash = await run_in_threadpool(members.hash_password, form.get("password", ""))
    except KamengError as exc:
        return _refuse(ctx, "register.html", exc, email=email)

    def job(conn: Connection) -> tuple[str, members.SessionInfo]:
        now = container.clock()
        member_id = members.register(
            conn, email=email, password_hash=password_hash, language=ctx.language, now=now
        )
        return _new_session(conn, ctx, request, member_id=member_id, now=now)

    try:
        token, info = await container.writer.run_async(job)
    except KamengError as exc:
        return _refuse(ctx, "register.html", exc, email=email)
    ctx.log_in(token, info)
    return ctx.apply(RedirectResponse("/account", status_code=303))


@router.get("/login")
def login_page(request: Request) -> Response:
    ctx = browser(request, _container(request))
    return render(ctx, "login.html", error="", email="", next=request.query_params.get("next"))


@router.post("/login")
async def login(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    email = form.get("email", "")[:254]
    target = _safe_next(form.get("next"))
    limiter = request.app.state.login_limiter
    keys = (f"ip:{client_ip(request)}", f"email:{email.strip().lower()}")
    claimed: list[str] = []
    try:
        ctx.check_csrf(form.get("csrf_token"))
        # Claim an attempt on each limit before checking the password (atomic under the
        # limiter's lock, so a concurrent burst cannot all slip past), and give the claims
        # back if the password turns out right: only failures count.
        for key in keys:
            limiter.check(key)
            claimed.append(key)
    except KamengError as exc:
        for key in claimed:
            limiter.release(key)
        return _refuse(ctx, "login.html", exc, email=email, next=target)
    password = form.get("password", "")

    def verify() -> tuple[int, str | None]:
        # The slow part (argon2) on a read connection, outside the single writer.
        with container.db.connect(write=False) as conn:
            member_id = members.authenticate(conn, email=email, password=password)
            return member_id, members.new_hash_if_outdated(
                conn, member_id=member_id, password=password
            )

    try:
        member_id, rehashed = await run_in_threadpool(verify)
    except KamengError as exc:
        return _refuse(ctx, "login.html", exc, email=email, next=target)
    for key in claimed:
        limiter.release(key)

    def job(conn: Connection) -> tuple[str, members.SessionInfo]:
        now = container.clock()
        if rehashed is not None:
            members.set_password_hash(conn, member_id=member_id, password_hash=rehashed)
        return _new_session(conn, ctx, request, member_id=member_id, now=now)

    token, info = await container.writer.run_async(job)
    ctx.log_in(token, info)
    return ctx.apply(RedirectResponse(target, status_code=303))


@router.post("/logout")
async def logout(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    try:
        ctx.check_csrf(form.get("csrf_token"))
    except KamengError as exc:
        return _refuse(ctx, "error.html", exc)
    token = ctx.session_token
    if token:
        await container.writer.run_async(lambda conn: members.end_session(conn, token=token))
    ctx.log_out()
    return ctx.apply(RedirectResponse("/", status_code=303))


def _refuse(ctx: Browser, template: str, exc: KamengError, **values: Any) -> Response:
    headers = None
    if exc.code is ErrorCode.rate_limited:
        headers = {"Retry-After": str(exc.params.get("retry_after", 60))}
    response = render(
        ctx,
        template,
        status_code=exc.http_status,
        error=exc.message(ctx.language),
        code=exc.code.value,
        message=exc.message(ctx.language),
        back="/",
        **values,
    )
    if headers:
        response.headers.update(headers)
    return response


# -- the account page ----------------------------------------------------------------------------


@router.get("/account")
def account(request: Request) -> Response:
    container = _container(request)
    ctx = browser(request, container)
    if ctx.member is None:
        return ctx.apply(RedirectResponse("/login?next=/account", status_code=303))
    return _account_page(ctx, container)


def _account_page(
    ctx: Browser,
    container: Container,
    *,
    error: str = "",
    code: str = "",
    status_code: int = 200,
) -> Response:
    assert ctx.member is not None
    member_id = ctx.member.member_id
    with container.db.connect(write=False) as conn:
        available, held = ledger.balances(conn, wallet_id=ctx.member.wallet_id)
        rows = order_queries.list_member_orders(conn, member_id=member_id, limit=50)
        codes = sku_codes(conn, {r.sku_id for r in rows})
        history = [
            {
                "order_no": r.order_no,
                "sku": codes.get(r.sku_id, ""),
                "amount": r.amount_cents,
                "status": status_text(r.status, ctx.language),
                "created_at": r.created_at,
            }
            for r in rows
        ]
        pays = payments.list_payments(conn, member_id=member_id, limit=20)
        options = pay_options(conn, ctx, balance=False)
    return render(
        ctx,
        "account.html",
        status_code=status_code,
        available=available,
        held=held,
        orders=history,
        payments=pays,
        options=options,
        error=error,
        code=code,
    )


@router.post("/account/topup")
async def topup(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    form = await form_data(request)
    member = ctx.member
    try:
        ctx.check_csrf(form.get("csrf_token"))
        if member is None:
            raise KamengError(ErrorCode.login_required)
        request.app.state.checkout_limiter.check(client_ip(request))
        amount = parse_amount(form.get("amount", ""))
        if not TOPUP_MIN_CENTS <= amount <= TOPUP_MAX_CENTS:
            raise KamengError(ErrorCode.invalid_amount, detail="1.00 - 50000.00")
    except KamengError as exc:
        if member is None:
            return _refuse(ctx, "error.html", exc)
        return await run_in_threadpool(
            functools.partial(
                _account_page,
                ctx,
                container,
                error=exc.message(ctx.language),
                code=exc.code.value,
                status_code=exc.http_status,
            )
        )
    gateway_code, _, pay_type = form.get("pay", "").partition(":")

    def job(conn: Connection) -> str:
        now = container.clock()
        gateway = payments.get_gateway(conn, code=gateway_code[:64])
        if not gateway.enabled or gateway.currency != WALLET_CURRENCY:
            # Balances are kept in one currency: a gateway in another cannot top them up.
            raise KamengError(ErrorCode.gateway_unavailable)
        return payments.open_payment(
            conn,
            gateway=gateway,
            purpose=PaymentPurpose.topup,
            pay_type=pay_type,
            amount_cents=amount,
            currency=gateway.currency,
            expires_at=now + _window(container),
            now=now,
            checks=container.payment_checks,
            member_id=member.member_id,
            wallet_id=member.wallet_id,
        )

    try:
        payment_no = await container.writer.run_async(job)
    except KamengError as exc:
        return await run_in_threadpool(
            functools.partial(
                _account_page,
                ctx,
                container,
                error=exc.message(ctx.language),
                code=exc.code.value,
                status_code=exc.http_status,
            )
        )
    return ctx.apply(RedirectResponse(f"/pay/{payment_no}", status_code=303))


def _window(container: Container) -> timedelta:
    return timedelta(seconds=container.settings.payment_window_s)

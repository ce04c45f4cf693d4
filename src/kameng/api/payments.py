"""Where gateways reach us: the asynchronous notify and the buyer's return.

The notify is answered `success` only once what it says is durably recorded (or was already):
anything else is answered `fail`, so the gateway keeps retrying while the active query works
in parallel. Every notify, whatever its outcome, leaves a `payment_notifies` row: the proof of
what the gateway told us and when.

The return (the buyer's browser, redirected by the gateway) carries the same signed fields;
a valid one is applied exactly like a notify — it often arrives first — and the buyer lands on
their order page. An invalid one moves nothing and still lands them there, where the page
shows what the platform really knows.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.errors import KamengError
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.payments.port import NotifyCheck
from kameng.pipeline.metrics import PAYMENT_STATEMENTS

router = APIRouter(include_in_schema=False)
log = logging.getLogger("kameng.payments")

MAX_PARAMS = 40
MAX_VALUE = 1024


async def _params(request: Request) -> dict[str, str]:
    params = dict(request.query_params.items())
    if request.method == "POST":
        form = await request.form()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return {k[:64]: v[:MAX_VALUE] for k, v in list(params.items())[:MAX_PARAMS]}


async def receive(
    request: Request, gateway_code: str, *, channel: str
) -> tuple[str, NotifyCheck | None, Any]:
    """Check and apply one statement from a gateway; returns (outcome, check, payment row)."""
    container: Container = request.app.state.container
    params = await _params(request)
    ip = request.client.host if request.client else ""

    def load(conn: Connection) -> Any:
        return payments.get_gateway(conn, code=gateway_code[:64])

    try:
        gateway = await container.writer.run_async(load)
    except KamengError:
        return "unknown_gateway", None, None
    check = request.app.state.gateways.get(gateway).check_notify(params)

    def apply(conn: Connection) -> tuple[str, Any]:
        now = container.clock()
        if check.confirmation is None:
            outcome = check.problem.value if check.problem else "malformed"
        else:
            outcome = payments.apply_confirmation(
                conn,
                gateway=gateway,
                confirmation=check.confirmation,
                channel=channel,
                deps=container.payment_deps,
                now=now,
            ).value
        payments.record_statement(
            conn,
            gateway_id=gateway.id,
            channel=channel,
            outcome=outcome,
            payment_no=check.payment_no,
            gateway_trade_no=check.gateway_trade_no,
            money=check.money,
            remote_ip=ip,
            now=now,
        )
        row = None
        if check.payment_no:
            try:
                row = payments.find_payment(conn, payment_no=check.payment_no)
            except KamengError:
                row = None
        return outcome, row

    try:
        outcome, row = await container.writer.run_async(apply)
    except KamengError as exc:
        # Nothing was applied (the transaction rolled back); the gateway retries, and the
        # active query covers the payment meanwhile.
        log.warning("gateway %s %s not applied: %s", gateway_code[:64], channel, exc.code)
        return f"error:{exc.code.value}", check, None
    PAYMENT_STATEMENTS.labels(channel, outcome).inc()
    if outcome not in payments.ACKNOWLEDGED:
        log.warning(
            "gateway %s %s refused: %s (%s)", gateway_code[:64], channel, outcome, check.payment_no
        )
    return outcome, check, row


@router.api_route("/pay/notify/{gateway_code}", methods=["GET", "POST"])
async def notify(request: Request, gateway_code: str) -> Response:
    outcome, _, _ = await receive(request, gateway_code, channel="notify")
    body = "success" if outcome in payments.ACKNOWLEDGED else "fail"
    return PlainTextResponse(body)


@router.get("/pay/return/{gateway_code}")
async def back_from_gateway(request: Request, gateway_code: str) -> Response:
    _, _, row = await receive(request, gateway_code, channel="return")
    if row is not None and row.purpose == PaymentPurpose.order.value:
        return RedirectResponse(f"/orders/{row.payment_no}", status_code=303)
    if row is not None:
        return RedirectResponse("/account", status_code=303)
    return RedirectResponse("/", status_code=303)

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
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.errors import KamengError
from kameng.payments import service as payments
from kameng.payments.models import PaymentPurpose
from kameng.payments.port import NotifyCheck, NotifyProblem
from kameng.pipeline.metrics import PAYMENT_STATEMENTS

router = APIRouter(include_in_schema=False)
log = logging.getLogger("kameng.payments")

MAX_PARAMS = 40
GATEWAY_CACHE_S = 5.0
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
    """Check and apply one statement from a gateway; returns (outcome, check, payment row).
    The payment row is returned only for a correctly signed statement, so an unsigned request
    cannot learn which order numbers exist."""
    container: Container = request.app.state.container
    params = await _params(request)
    ip = request.client.host if request.client else ""
    gateway = _gateway(request, container, gateway_code[:64])
    if gateway is None:
        PAYMENT_STATEMENTS.labels(channel, "unknown_gateway").inc()
        return "unknown_gateway", None, None
    check = request.app.state.gateways.get(gateway).check_notify(params)
    if check.problem is NotifyProblem.bad_signature:
        # Not from the gateway: counted and logged, but it costs no write (anyone can send it).
        PAYMENT_STATEMENTS.labels(channel, "bad_signature").inc()
        log.warning("gateway %s %s with a bad signature from %s", gateway.code, channel, ip)
        return "bad_signature", check, None

    def record(conn: Connection, outcome: str) -> None:
        payments.record_statement(
            conn,
            gateway_id=gateway.id,
            channel=channel,
            outcome=outcome,
            payment_no=check.payment_no,
            gateway_trade_no=check.gateway_trade_no,
            money=check.money,
            remote_ip=ip,
            now=container.clock(),
        )

    def apply(conn: Connection) -> tuple[str, Any]:
        if check.confirmation is None:
            outcome = check.problem.value if check.problem else "malformed"
        else:
            outcome = payments.apply_confirmation(
                conn,
                gateway=gateway,
                confirmation=check.confirmation,
                channel=channel,
                deps=container.payment_deps,
                now=container.clock(),
            ).value
        record(conn, outcome)
        row = None
        if check.payment_no and channel == "return":
            row = payments.payment_or_none(conn, payment_no=check.payment_no)
        return outcome, row

    try:
        outcome, row = await container.writer.run_async(apply)
    except Exception as exc:
        # Nothing was applied (rolled back); the gateway retries and the active query covers
        # the payment meanwhile. What happened is still recorded, in its own transaction.
        outcome, row = f"error:{getattr(exc, 'code', type(exc).__name__)}"[:32], None
        log.error("gateway %s %s not applied: %s", gateway.code, channel, outcome)
        await container.writer.run_async(lambda conn: record(conn, outcome))
    PAYMENT_STATEMENTS.labels(channel, outcome).inc()
    if outcome not in payments.ACKNOWLEDGED:
        log.warning("gateway %s %s: %s (%s)", gateway.code, channel, outcome, check.payment_no)
    return outcome, check, row


def _gateway(request: Request, container: Container, code: str) -> Any | None:
    """The gateway row, cached for a few seconds (every notify needs it; it rarely changes)."""
    cache: dict[str, tuple[float, Any]] = request.app.state.__dict__.setdefault("gateway_rows", {})
    hit = cache.get(code)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    with container.db.connect(write=False) as conn:
        try:
            row = payments.get_gateway(conn, code=code)
        except KamengError:
            row = None
    cache[code] = (time.monotonic() + GATEWAY_CACHE_S, row)
    return row


@router.api_route("/pay/notify/{gateway_code}", methods=["GET", "POST"])
async def notify(request: Request, gateway_code: str) -> Response:
    outcome, _, _ = await receive(request, gateway_code, channel="notify")
    body = "success" if outcome in payments.ACKNOWLEDGED else "fail"
    return PlainTextResponse(body)


@router.get("/pay/return/{gateway_code}")
async def back_from_gateway(request: Request, gateway_code: str) -> Response:
    """Always lands the buyer somewhere useful, whatever the gateway sent."""
    try:
        _, _, row = await receive(request, gateway_code, channel="return")
    except Exception as exc:
        log.error("return from gateway failed: %s", type(exc).__name__)
        row = None
    if row is not None and row.purpose == PaymentPurpose.order.value:
        return RedirectResponse(f"/orders/{row.payment_no}", status_code=303)
    if row is not None:
        return RedirectResponse("/account", status_code=303)
    return RedirectResponse("/", status_code=303)

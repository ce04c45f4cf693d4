"""`kameng payments …`: payment gateways, payments, and reconciliation against the ledger."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from kameng.cli.base import ActorOpt, _actor, _container, app, console, err_console
from kameng.errors import ErrorCode, KamengError

payments_app = typer.Typer(
    help="Payment gateways, payments and reconciliation", no_args_is_help=True
)
app.add_typer(payments_app, name="payments")


@payments_app.command("gateway-add")
def gateway_add(
    code: Annotated[str, typer.Argument(help="Short name, used in notify URLs")],
    url: Annotated[str, typer.Option(help="The gateway's base URL (where submit.php lives)")],
    pid: Annotated[str, typer.Option(help="Our merchant id (EPay pid)")],
    key: Annotated[
        str | None, typer.Option(help="Our merchant key (default: $KAMENG_GATEWAY_KEY)")
    ] = None,
    name: Annotated[str | None, typer.Option()] = None,
    currency: Annotated[str, typer.Option(help="The merchant account's currency")] = "CNY",
    pay_types: Annotated[str, typer.Option(help="Comma list: alipay,wxpay,qqpay")] = "alipay,wxpay",
    actor: ActorOpt = None,
) -> None:
    """Connect an EPay (易支付) gateway. The key is stored sealed (AES-GCM), never in clear."""
    from kameng.audit import service as audit
    from kameng.payments import service as payments

    key = key or os.environ.get("KAMENG_GATEWAY_KEY")
    if not key:
        raise KamengError(ErrorCode.invalid_request, detail="--key or KAMENG_GATEWAY_KEY")
    container = _container()
    with container.db.unit_of_work() as session:
        gateway_id = payments.add_gateway(
            session.connection(),
            vault=container.vault,
            code=code,
            name=name or code,
            base_url=url,
            merchant_id=pid,
            key=key,
            currency=currency,
            pay_types=pay_types,
            now=container.clock(),
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="gateway.add",
            target_type="payment_gateway",
            target_id=str(gateway_id),
            details={"code": code, "url": url, "pid": pid},
        )
    base = container.settings.callback_base_url
    console.print(f"gateway {code} added; notify URL: {base}/pay/notify/{code}")


@payments_app.command("gateways")
def gateways() -> None:
    """List the payment gateways."""
    from kameng.payments import service as payments

    container = _container()
    with container.db.connect(write=False) as conn:
        rows = payments.list_gateways(conn)
    table = Table("code", "kind", "url", "pid", "currency", "types", "enabled")
    for g in rows:
        table.add_row(
            g.code, g.kind, g.base_url, g.merchant_id, g.currency, g.pay_types, str(g.enabled)
        )
    console.print(table)


@payments_app.command("list")
def list_payments(
    state: Annotated[str | None, typer.Option(help="pending | paid | flagged | closed")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Recent payments (flagged ones need a person: amount or currency differed)."""
    from kameng.money import format_cents
    from kameng.payments import service as payments

    container = _container()
    with container.db.connect(write=False) as conn:
        rows = payments.list_payments(conn, state=state, limit=limit)
    items = [
        {
            "payment_no": r.payment_no,
            "purpose": r.purpose,
            "amount": format_cents(r.amount_cents),
            "state": r.state,
            "reason": r.reason,
            "reported": format_cents(r.reported_cents) if r.reported_cents is not None else None,
            "checks": r.checks,
            "created_at": r.created_at.isoformat(),
        }
        for r in rows
    ]
    if as_json:
        console.print_json(json.dumps(items))
        return
    table = Table(*items[0].keys()) if items else Table("payment_no")
    for item in items:
        table.add_row(*(str(v) if v is not None else "" for v in item.values()))
    console.print(table)


@payments_app.command("reconcile")
def reconcile(
    days: Annotated[int, typer.Option(help="Payments opened in the last N days")] = 7,
    gateway: Annotated[str | None, typer.Option(help="Only this gateway")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare each gateway's records (its query API) with the ledger; list every mismatch.
    Exit status 1 when there is any."""
    from kameng.money import format_cents
    from kameng.payments import service as payments
    from kameng.payments.reconcile import Mismatch, reconcile_gateway
    from kameng.payments.registry import build_gateway

    container = _container()
    until = container.clock()
    since = until - timedelta(days=days)

    def read(fn: Any) -> Any:
        with container.db.connect(write=False) as conn:
            return fn(conn)

    rows = read(payments.list_gateways)
    if gateway:
        rows = [r for r in rows if r.code == gateway]
        if not rows:
            raise KamengError(ErrorCode.gateway_not_found, gateway=gateway)

    async def run() -> tuple[int, list[Mismatch]]:
        checked, found = 0, []
        for row in rows:
            adapter = build_gateway(row, container.vault)
            try:
                report = await reconcile_gateway(
                    gateway=row,
                    adapter=adapter,
                    read=read,
                    clearing=container.accounts.clearing_accounts,
                    since=since,
                    until=until,
                )
            finally:
                await adapter.aclose()
            checked += report.checked
            found.extend(report.mismatches)
        return checked, found

    checked, found = asyncio.run(run())
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "checked": checked,
                    "mismatches": [
                        {
                            "kind": m.kind.value,
                            "payment_no": m.payment_no,
                            "gateway": m.gateway,
                            "ours_state": m.ours_state,
                            "recorded": format_cents(m.recorded_cents),
                            "gateway_paid": format_cents(m.gateway_cents)
                            if m.gateway_cents is not None
                            else None,
                            "detail": m.detail,
                        }
                        for m in found
                    ],
                }
            )
        )
    else:
        console.print(
            f"checked {checked} trade(s) on {len(rows)} gateway(s); {len(found)} mismatch(es)"
        )
        if found:
            table = Table(
                "kind", "payment_no", "gateway", "ours", "recorded", "gateway paid", "detail"
            )
            for m in found:
                table.add_row(
                    m.kind.value,
                    m.payment_no,
                    m.gateway,
                    m.ours_state,
                    format_cents(m.recorded_cents),
                    format_cents(m.gateway_cents) if m.gateway_cents is not None else "-",
                    m.detail,
                )
            console.print(table)
    if found:
        err_console.print("reconciliation found mismatches")
        raise typer.Exit(1)


@payments_app.command("owed")
def owed(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Money kept for guests (refunded orders, payments that came too late). The worker pays
    it back through the gateway by itself; rows marked refused or unknown need a person."""
    from kameng.money import format_cents
    from kameng.payments import payouts

    container = _container()
    with container.db.connect(write=False) as conn:
        rows = payouts.owed_to_guests(conn)
    if as_json:
        items = [
            {
                "order_no": r.order_no,
                "payment_no": r.payment_no,
                "owed": format_cents(r.owed_cents),
                "payout_state": r.payout_state,
                "payout_message": r.payout_message,
            }
            for r in rows
        ]
        console.print_json(json.dumps(items, ensure_ascii=False))
        return
    table = Table("order_no", "payment_no", "owed", "last payout", "message")
    for r in rows:
        table.add_row(
            r.order_no,
            r.payment_no,
            format_cents(r.owed_cents),
            r.payout_state or "-",
            r.payout_message or "",
        )
    console.print(table)
    console.print(f"{len(rows)} guest order(s) owed money")


@payments_app.command("payout")
def payout(
    order_no: Annotated[str, typer.Argument(help="The guest order whose money to pay back")],
    manual: Annotated[
        bool, typer.Option(help="Staff paid it back some other way: only record it")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Even after an unknown or refused attempt (check the gateway first)"),
    ] = False,
    actor: ActorOpt = None,
) -> None:
    """Pay back what a guest is owed now: a refund through the gateway the guest paid with,
    then recorded in the ledger (or, with --manual, only recorded). Audited."""
    from kameng.audit import service as audit
    from kameng.money import format_cents
    from kameng.payments import payouts
    from kameng.payments import service as payments
    from kameng.payments.registry import build_gateway

    container = _container()
    accounts = container.accounts  # resolved before a write transaction opens
    who = _actor(actor)
    with container.db.connect() as conn:
        try:
            payout_id, row = payouts.start_payout(
                conn,
                order_no=order_no,
                via="manual" if manual else "gateway",
                actor=who,
                now=container.clock(),
                force=force,
            )
        except KamengError as exc:
            if exc.code is ErrorCode.invalid_amount:
                err_console.print(f"nothing is owed for {order_no}")
                raise typer.Exit(2) from exc
            raise
        gateway = payments.get_gateway(conn, gateway_id=row.gateway_id)
    done, message = True, "recorded by staff"
    if not manual:
        adapter = build_gateway(gateway, container.vault)

        async def send() -> tuple[bool, str]:
            try:
                return await adapter.refund(row.payment_no, row.owed_cents)
            finally:
                await adapter.aclose()

        done, message = asyncio.run(send())
    with container.db.unit_of_work() as session:
        payouts.finish_payout(
            session.connection(),
            payout_id=payout_id,
            done=done,
            message=message,
            accounts=accounts,
            now=container.clock(),
        )
        audit.record(
            session,
            actor=who,
            action="payment.payout",
            target_type="order",
            target_id=order_no,
            details={"amount": format_cents(row.owed_cents), "done": done, "message": message},
        )
    if not done:
        err_console.print(f"the gateway refused the refund: {message}")
        raise typer.Exit(1)
    via = "by staff" if manual else f"via gateway {gateway.code}"
    console.print(f"paid back {format_cents(row.owed_cents)} for {order_no} {via}")


@payments_app.command("resolve")
def resolve(
    payment_no: Annotated[str, typer.Argument(help="A flagged payment (see `payments list`)")],
    accept: Annotated[
        bool, typer.Option("--accept", help="Credit the money that arrived to the payer")
    ] = False,
    refund: Annotated[
        bool, typer.Option("--refund", help="Send it back through the gateway's refund API")
    ] = False,
    manual_refund: Annotated[
        bool, typer.Option("--manual-refund", help="Staff sent it back some other way")
    ] = False,
    amount: Annotated[
        str | None, typer.Option(help="With --accept: the amount that arrived, if unreadable")
    ] = None,
    actor: ActorOpt = None,
) -> None:
    """Decide about a flagged payment (a different amount or currency arrived). Audited; the
    order's timeline says what was decided."""
    from kameng.audit import service as audit
    from kameng.money import parse_amount
    from kameng.payments import service as payments
    from kameng.payments import staff
    from kameng.payments.registry import build_gateway

    if sum((accept, refund, manual_refund)) != 1:
        raise KamengError(
            ErrorCode.invalid_request, detail="choose one of --accept, --refund, --manual-refund"
        )
    container = _container()
    deps = container.payment_deps  # resolved before the write transaction opens
    who = _actor(actor)
    with container.db.connect(write=False) as conn:
        pay = payments.find_payment(conn, payment_no=payment_no)
        gateway = payments.get_gateway(conn, gateway_id=pay.gateway_id)
    if pay.state != "flagged":
        raise KamengError(ErrorCode.invalid_transition, from_status=pay.state, to_status="resolved")
    if refund:
        if pay.reported_cents is None:
            raise KamengError(
                ErrorCode.invalid_amount, detail="unknown amount: use --manual-refund"
            )
        adapter = build_gateway(gateway, container.vault)

        async def send() -> tuple[bool, str]:
            try:
                return await adapter.refund(payment_no, pay.reported_cents)
            finally:
                await adapter.aclose()

        done, message = asyncio.run(send())
        if not done:
            err_console.print(f"the gateway refused the refund: {message}")
            raise typer.Exit(1)
    with container.db.unit_of_work() as session:
        conn = session.connection()
        now = container.clock()
        if accept:
            outcome = staff.accept_flagged(
                conn,
                payment_no=payment_no,
                amount_cents=parse_amount(amount) if amount else None,
                deps=deps,
                actor=who,
                now=now,
            )
        else:
            via = "gateway" if refund else "manual"
            staff.mark_returned(conn, payment_no=payment_no, via=via, actor=who, now=now)
            outcome = f"returned_{via}"
        audit.record(
            session,
            actor=who,
            action="payment.resolve",
            target_type="payment",
            target_id=payment_no,
            details={"outcome": outcome, "was": pay.reason},
        )
    console.print(f"{payment_no}: {outcome}")

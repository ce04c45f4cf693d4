"""`kameng supplier …`: connect upstream suppliers, map our SKUs to theirs, watch their health."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from kameng.cli.base import ActorOpt, _actor, _container, console, err_console, supplier_app
from kameng.errors import ErrorCode, KamengError
from kameng.suppliers.port import CatalogItem


@supplier_app.command("add")
def supplier_add(
    code: Annotated[str, typer.Argument(help="Short name, used in callback URLs")],
    url: Annotated[str, typer.Option(help="Their base URL")],
    api_key: Annotated[str, typer.Option(help="Our key at the supplier")],
    secret: Annotated[
        str | None,
        typer.Option(help="Our secret at the supplier (default: $KAMENG_SUPPLIER_SECRET)"),
    ] = None,
    adapter: Annotated[str, typer.Option(help="simulator | kameng")] = "simulator",
    name: Annotated[str | None, typer.Option()] = None,
    timeout_ms: Annotated[int, typer.Option(help="Per-request timeout")] = 10_000,
    low_balance: Annotated[str, typer.Option(help="Warn below this balance")] = "100.00",
    request_ttl: Annotated[
        int | None,
        typer.Option(
            help="Seconds after which they refuse a signed request (default: the protocol's, "
            "300); see docs/suppliers.md",
            min=1,
        ),
    ] = None,
    dedup_window: Annotated[
        str | None,
        typer.Option(
            help="How long they deduplicate on our out-trade-no: seconds, or 'forever' "
            "(default: the protocol's)"
        ),
    ] = None,
    actor: ActorOpt = None,
) -> None:
    """Connect a supplier. The secret is stored sealed (AES-GCM), never in clear."""
    from kameng.audit import service as audit
    from kameng.money import parse_amount
    from kameng.suppliers import service as suppliers

    secret = secret or os.environ.get("KAMENG_SUPPLIER_SECRET")
    if not secret:
        raise KamengError(ErrorCode.invalid_request, detail="--secret or KAMENG_SUPPLIER_SECRET")
    window: int | Literal["default"] | None = "default"
    if dedup_window is not None:
        if dedup_window == "forever":
            window = None
        elif dedup_window.isdigit():
            window = int(dedup_window)
        else:
            raise KamengError(
                ErrorCode.invalid_request, detail="--dedup-window: seconds, or 'forever'"
            )
    container = _container()
    with container.db.unit_of_work() as session:
        supplier_id = suppliers.create_supplier(
            session.connection(),
            container.vault,
            code=code,
            name=name or code,
            adapter=adapter,
            base_url=url,
            api_key=api_key,
            secret=secret,
            timeout_ms=timeout_ms,
            low_balance_cents=parse_amount(low_balance, allow_zero=True),
            request_ttl_s=request_ttl,
            dedup_window_s=window,
            now=container.clock(),
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="supplier.add",
            target_type="supplier",
            target_id=code,
            details={"adapter": adapter, "url": url},
        )
    console.print(f"supplier [bold]{code}[/bold] added (id {supplier_id})")
    console.print(
        f"callbacks: {container.settings.callback_base_url}/api/v1/callbacks/suppliers/{code}"
    )


@supplier_app.command("offer")
def supplier_offer(
    sku: Annotated[str, typer.Argument(help="Our SKU code")],
    supplier: Annotated[str, typer.Argument(help="Supplier code")],
    their_sku: Annotated[str, typer.Argument(help="The supplier's SKU code")],
    cost: Annotated[str, typer.Option(help="What one unit costs us there")],
    priority: Annotated[
        int | None, typer.Option(help="Lower is tried first (default 100; kept on update)")
    ] = None,
    actor: ActorOpt = None,
) -> None:
    """Let the pipeline procure one of our SKUs from a supplier (add or update the offer)."""
    from kameng.audit import service as audit
    from kameng.money import parse_amount
    from kameng.suppliers import service as suppliers

    container = _container()
    sku_info = container.sku(sku)
    with container.db.unit_of_work() as session:
        conn = session.connection()
        row = suppliers.supplier_by_code(conn, supplier)
        offer_id = suppliers.add_offer(
            conn,
            sku_id=sku_info.id,
            supplier_id=row.id,
            supplier_sku=their_sku,
            cost_cents=parse_amount(cost, allow_zero=True),
            priority=priority,
            now=container.clock(),
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="supplier.offer",
            target_type="sku",
            target_id=sku,
            details={"supplier": supplier, "their_sku": their_sku, "cost": cost},
        )
    console.print(f"offer {offer_id}: {sku} <- {supplier}:{their_sku} at {cost}")


@supplier_app.command("sync")
def supplier_sync(
    code: Annotated[str, typer.Argument(help="Supplier code")],
    mapping: Annotated[
        list[str] | None,
        typer.Option("--map", help="THEIRS=OURS; default: SKUs with the same code"),
    ] = None,
    priority: Annotated[
        int | None, typer.Option(help="For new offers (default 100); existing ones keep theirs")
    ] = None,
) -> None:
    """Read the supplier's catalog and create or update offers at their current prices."""
    from kameng.pipeline.registry import build_adapter
    from kameng.suppliers import service as suppliers

    container = _container()
    with container.db.connect(write=False) as conn:
        row = suppliers.supplier_by_code(conn, code)
    adapter = build_adapter(row, container.vault)

    async def fetch() -> list[CatalogItem]:
        try:
            return await adapter.catalog()
        finally:
            await adapter.aclose()

    items = asyncio.run(fetch())
    if not items:
        # The port never raises for upstream trouble: an empty catalog is how an unreachable
        # supplier or refused credentials look from here, so say so and fail.
        err_console.print(
            f"[red]error[/red] supplier {code} returned no catalog "
            "(unreachable, credentials refused, or nothing on sale)"
        )
        raise typer.Exit(1)
    wanted = dict(m.split("=", 1) for m in (mapping or []) if "=" in m)
    table = Table("their sku", "name", "price", "available", "our sku", "result")
    for item in items:
        ours = wanted.get(item.sku, item.sku if not wanted else None)
        result = "-"
        if ours:
            try:
                sku_info = container.sku(ours)
            except KamengError:
                result = "no such SKU here"
            else:
                with container.db.connect() as conn:
                    suppliers.add_offer(
                        conn,
                        sku_id=sku_info.id,
                        supplier_id=row.id,
                        supplier_sku=item.sku,
                        cost_cents=item.price_cents,
                        priority=priority,
                        now=container.clock(),
                    )
                result = "offer saved"
        table.add_row(
            item.sku,
            item.name,
            f"{item.price_cents / 100:.2f}",
            "∞" if item.available is None else str(item.available),
            ours or "",
            result,
        )
    console.print(table)


@supplier_app.command("list")
def supplier_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Suppliers with their circuit, success rate, latency and balance (last 15 minutes)."""
    from kameng.suppliers import service as suppliers

    container = _container()
    with container.db.connect(write=False) as conn:
        health = suppliers.health(conn, now=container.clock())
    if as_json:
        print(json.dumps([{f: getattr(h, f) for f in h.__slots__} for h in health], default=str))
        return
    table = Table("supplier", "circuit", "purchases", "success", "p50 ms", "p95 ms", "balance")
    for h in health:
        table.add_row(
            h.code,
            h.circuit_state,
            str(h.purchases),
            "-" if h.success_rate is None else f"{h.success_rate:.1%}",
            str(h.latency_p50_ms or "-"),
            str(h.latency_p95_ms or "-"),
            "-"
            if h.balance_cents is None
            else f"{h.balance_cents / 100:.2f}" + (" LOW" if h.low_balance else ""),
        )
    console.print(table)


@supplier_app.command("reconcile")
def supplier_reconcile(
    supplier: Annotated[
        str | None, typer.Argument(help="Supplier code (default: all enabled)")
    ] = None,
    days: Annotated[int, typer.Option(help="Purchases made in the last N days", min=1)] = 7,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare each supplier's own record of our purchases with our procurements; list every
    mismatch (charged_not_recorded, bought_twice, recorded_not_charged, amount_differs,
    unchecked). Exit status 1 when there is any."""
    from kameng.money import format_cents
    from kameng.pipeline.registry import Adapters
    from kameng.pipeline.supplier_checks import reconcile_suppliers

    container = _container()
    until = container.clock()
    since = until - timedelta(days=days)
    adapters = Adapters(container.vault)

    async def run() -> list[Any]:
        try:
            return await reconcile_suppliers(
                container, adapters.get, since=since, until=until, code=supplier
            )
        finally:
            await adapters.aclose()

    reports = asyncio.run(run())
    found = [m for r in reports for m in r.mismatches]
    if as_json:
        print(
            json.dumps(
                {
                    "checked": sum(r.checked for r in reports),
                    "ok": all(r.ok for r in reports),
                    "suppliers": [r.as_dict() for r in reports],
                },
                ensure_ascii=False,
            )
        )
    else:
        for r in reports:
            counts = {k: v for k, v in r.counts().items() if v}
            console.print(
                f"{r.supplier}: checked {r.checked} purchase(s)"
                + (f"; {sum(counts.values())} mismatch(es) {counts}" if counts else "; clean"),
                markup=False,
            )
        if found:
            table = Table(
                "supplier",
                "kind",
                "out_trade_no",
                "ours",
                "theirs",
                "we have",
                "they have",
                "detail",
            )
            for r in reports:
                for m in r.mismatches:
                    table.add_row(
                        r.supplier,
                        m.kind.value,
                        m.out_trade_no,
                        m.ours_state,
                        m.supplier_status,
                        "-" if m.our_cents is None else format_cents(m.our_cents),
                        "-" if m.supplier_cents is None else format_cents(m.supplier_cents),
                        m.detail,
                    )
            console.print(table)
    if found:
        err_console.print("supplier reconciliation found mismatches")
        raise typer.Exit(1)


@supplier_app.command("claims")
def supplier_claims(
    state: Annotated[
        str | None, typer.Option(help="open | stocked | resolved (default: all)")
    ] = None,
    supplier: Annotated[str | None, typer.Option(help="Only this supplier")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Purchases that succeeded after their order line was served another way or refunded:
    late keys went to stock (`stocked`); a late top-up is money to recover (`open`)."""
    from kameng.money import format_cents
    from kameng.orders import queries as order_queries
    from kameng.suppliers import claims
    from kameng.suppliers import service as suppliers
    from kameng.suppliers.models import ClaimState

    if state is not None and state not in {s.value for s in ClaimState}:
        raise KamengError(ErrorCode.invalid_request, detail=f"unknown claim state {state!r}")
    container = _container()
    with container.db.connect(write=False) as conn:
        supplier_id = suppliers.supplier_by_code(conn, supplier).id if supplier else None
        found = claims.list_claims(conn, supplier_id=supplier_id, state=state)
        order_nos = order_queries.order_numbers(conn, ids={c.order_id for c in found})
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": c.id,
                        "supplier": c.supplier,
                        "out_trade_no": c.out_trade_no,
                        "order_no": order_nos.get(c.order_id, ""),
                        "kind": c.kind,
                        "state": c.state,
                        "amount": format_cents(c.amount_cents),
                        "keys": c.keys_count,
                        "created_at": c.created_at.isoformat(),
                        "resolved_at": c.resolved_at.isoformat() if c.resolved_at else None,
                        "resolved_by": c.resolved_by,
                        "note": c.note,
                    }
                    for c in found
                ],
                ensure_ascii=False,
            )
        )
        return
    table = Table(
        "id", "supplier", "out_trade_no", "order", "kind", "state", "amount", "keys", "note"
    )
    for c in found:
        table.add_row(
            str(c.id),
            c.supplier,
            c.out_trade_no,
            order_nos.get(c.order_id, ""),
            c.kind,
            c.state,
            format_cents(c.amount_cents),
            str(c.keys_count),
            c.note,
        )
    console.print(table)


@supplier_app.command("claim-resolve")
def supplier_claim_resolve(
    claim_id: Annotated[int, typer.Argument(help="The claim's id (kameng supplier claims)")],
    note: Annotated[str, typer.Option(help="How it was settled with the supplier")],
    actor: ActorOpt = None,
) -> None:
    """Mark an overcharge settled (the supplier refunded or credited it, or it was written
    off); audited."""
    from kameng.audit import service as audit
    from kameng.suppliers import claims

    container = _container()
    with container.db.unit_of_work() as session:
        claims.resolve_claim(
            session.connection(),
            claim_id=claim_id,
            actor=_actor(actor),
            note=note,
            now=container.clock(),
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="supplier.claim_resolve",
            target_type="supplier_claim",
            target_id=str(claim_id),
            details={"note": note},
        )
    console.print(f"claim {claim_id} resolved")

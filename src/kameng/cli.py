"""The `kameng` command: serve, migrate, demo, and staff tools for catalog, stock and money."""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from kameng.errors import KamengError

app = typer.Typer(help="kameng — card-key trading platform", no_args_is_help=True)
stock_app = typer.Typer(help="Card-key stock", no_args_is_help=True)
product_app = typer.Typer(help="Catalog", no_args_is_help=True)
reseller_app = typer.Typer(help="Resellers and their API keys", no_args_is_help=True)
tier_app = typer.Typer(help="Reseller tiers and prices", no_args_is_help=True)
ledger_app = typer.Typer(help="The money ledger", no_args_is_help=True)
app.add_typer(stock_app, name="stock")
app.add_typer(product_app, name="product")
app.add_typer(reseller_app, name="reseller")
app.add_typer(tier_app, name="tier")
app.add_typer(ledger_app, name="ledger")

console = Console()
err_console = Console(stderr=True)

ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="Staff name for the audit log (default: $USER)")
]


def _actor(actor: str | None) -> str:
    return f"staff:{actor or os.environ.get('KAMENG_ACTOR') or getpass.getuser()}"


def _container() -> Any:
    from kameng.container import Container

    return Container.build()


def _fail(exc: KamengError) -> None:
    err_console.print(f"[red]error[/red] {exc.code}: {exc.message('en')}")
    for problem in exc.extra.get("fields", []):
        err_console.print(f"  - {problem.get('field')}: {problem.get('message_en', problem)}")
    raise typer.Exit(2)


def main() -> None:
    try:
        app()
    except KamengError as exc:
        _fail(exc)


# -- platform ------------------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (safe to run repeatedly)."""
    from kameng.config import get_settings
    from kameng.migrate import upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    container = _container()
    container.bootstrap()
    console.print(f"database ready: [bold]{_safe_url(settings.resolved_database_url)}[/bold]")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
    workers: Annotated[int, typer.Option(help="Web processes")] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request")] = False,
) -> None:
    """Run the platform (web + API). Processes share SQLite safely through a file lock."""
    import uvicorn

    from kameng.config import get_settings

    settings = get_settings()
    uvicorn.run(
        "kameng.asgi:app",
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        access_log=access_log,
        log_level="warning",
        loop="auto",
        http="auto",
    )


@app.command()
def web(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
    workers: Annotated[int, typer.Option(help="Web processes")] = 1,
) -> None:
    """Run only the web/API processes (the pipeline worker runs separately)."""
    serve(host=host, port=port, workers=workers, access_log=False)


@app.command()
def verify() -> None:
    """Check every money and stock invariant; exits non-zero on any violation."""
    _verify(include_stock=True)


@ledger_app.command("verify")
def ledger_verify() -> None:
    """Check every ledger invariant (DESIGN §5.1); exits non-zero on any violation."""
    _verify(include_stock=False)


def _verify(*, include_stock: bool) -> None:
    from kameng.ledger.verify import verify as run_verify

    container = _container()
    with container.db.connect(write=False) as conn:
        report = run_verify(conn, include_stock=include_stock)
    table = Table("check", "result")
    for name, rows in report.violations.items():
        table.add_row(name, "[green]ok[/green]" if not rows else f"[red]{len(rows)}+ bad[/red]")
    console.print(table)
    console.print(" ".join(f"{k}={v}" for k, v in report.figures.items()))
    for name, rows in report.violations.items():
        for row in rows:
            err_console.print(f"[red]{name}[/red]: {row}")
    if not report.ok:
        raise typer.Exit(1)


# -- catalog -------------------------------------------------------------------------------------


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
    from kameng.audit import service as audit
    from kameng.catalog import service as catalog
    from kameng.catalog.models import DeliveryKind
    from kameng.money import parse_amount

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
        catalog.add_sku(
            session,
            product=product,
            code=sku,
            name=sku_name or name,
            price_cents=parse_amount(price),
            cost_cents=parse_amount(cost, allow_zero=True),
            denomination=denomination,
            allow_below_cost=allow_below_cost,
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="product.create",
            target_type="product",
            target_id=slug,
            details={"sku": sku, "price": price},
        )
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
    from kameng.audit import service as audit
    from kameng.catalog import service as catalog
    from kameng.money import parse_amount

    container = _container()
    with container.db.unit_of_work() as session:
        product = catalog.get_product(session, slug=slug)
        catalog.add_sku(
            session,
            product=product,
            code=sku,
            name=name or sku,
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
            details={"product": slug, "price": price},
        )
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


# -- stock ---------------------------------------------------------------------------------------


@stock_app.command("import")
def stock_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    sku: Annotated[str, typer.Option(help="SKU code")],
    source: Annotated[str | None, typer.Option(help="Where the keys came from")] = None,
    unit_cost: Annotated[str | None, typer.Option(help="Unit cost in CNY for this batch")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    actor: ActorOpt = None,
) -> None:
    """Import card keys: one per line, or CSV `key,secret`. Duplicates are refused."""
    from kameng.inventory.flows import import_file
    from kameng.money import parse_amount

    container = _container()
    cost = parse_amount(unit_cost, allow_zero=True) if unit_cost else None
    size = file.stat().st_size
    with Progress(
        TextColumn("[bold]importing[/bold]"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=as_json or not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("import", total=size)
        result = import_file(
            container,
            sku_code=sku,
            path=file,
            source=source,
            unit_cost_cents=cost,
            actor=_actor(actor),
            progress=lambda n: progress.advance(task, n),
        )
    summary = {
        "batch_id": result.batch_id,
        "sku": sku,
        "imported": result.imported,
        "duplicate": result.duplicates,
        "invalid": result.invalid,
        "invalid_lines": result.invalid_lines,
    }
    if as_json:
        print(json.dumps(summary))
        return
    console.print(
        f"batch {result.batch_id}: imported [green]{result.imported}[/green], "
        f"duplicate [yellow]{result.duplicates}[/yellow], invalid [red]{result.invalid}[/red]"
    )
    if result.invalid_lines:
        console.print(
            f"invalid lines (first {len(result.invalid_lines)}): "
            + ", ".join(map(str, result.invalid_lines))
        )


@stock_app.command("count")
def stock_count(
    sku: Annotated[str | None, typer.Option(help="Only this SKU")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Keys per SKU by state, with the low-stock flag."""
    from sqlalchemy import select

    from kameng.catalog.models import Product, Sku
    from kameng.inventory import service as inventory

    container = _container()
    with container.db.connect(write=False) as conn:
        stmt = (
            select(Sku.id, Sku.code, Product.low_stock_threshold)
            .join(Product, Product.id == Sku.product_id)
            .where(Product.delivery_kind == "card_key")
        )
        if sku:
            stmt = stmt.where(Sku.code == sku)
        skus = list(conn.execute(stmt))
        counts = inventory.counts(conn, sku_ids=[s.id for s in skus])
    rows = []
    for s in skus:
        c = counts.get(s.id, {"available": 0, "sold": 0, "burned": 0})
        rows.append({"sku": s.code, **c, "low": c.get("available", 0) < s.low_stock_threshold})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("sku", "available", "sold", "burned", "low stock")
    for r in rows:
        table.add_row(
            r["sku"],
            str(r.get("available", 0)),
            str(r.get("sold", 0)),
            str(r.get("burned", 0)),
            "[red]yes[/red]" if r["low"] else "no",
        )
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


# -- resellers -----------------------------------------------------------------------------------


@reseller_app.command("create")
def reseller_create(
    name: Annotated[str, typer.Argument()],
    tier: Annotated[str, typer.Option(help="normal | silver | gold | your own")] = "normal",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    actor: ActorOpt = None,
) -> None:
    """Create a reseller; prints its API key and secret ONCE."""
    from kameng.resellers import service as resellers

    container = _container()
    with container.db.unit_of_work() as session:
        issued = resellers.create_reseller(
            session, container.vault, name=name, tier_code=tier, actor=_actor(actor)
        )
    _print_credentials(issued, as_json)


def _print_credentials(issued: Any, as_json: bool) -> None:
    data = {"reseller": issued.name, "api_key": issued.api_key, "api_secret": issued.api_secret}
    if as_json:
        print(json.dumps(data))
        return
    console.print(f"reseller [bold]{issued.name}[/bold]")
    console.print(f"  api_key    {issued.api_key}")
    console.print(f"  api_secret {issued.api_secret}")
    console.print("[yellow]The secret is shown only now; store it safely.[/yellow]")


@reseller_app.command("rotate-key")
def reseller_rotate(
    name: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    actor: ActorOpt = None,
) -> None:
    """Revoke the reseller's keys and issue a new one."""
    from kameng.resellers import service as resellers

    container = _container()
    with container.db.unit_of_work() as session:
        issued = resellers.rotate_credentials(
            session, container.vault, name=name, actor=_actor(actor)
        )
    _print_credentials(issued, as_json)


@reseller_app.command("revoke-key")
def reseller_revoke(
    name: Annotated[str, typer.Argument()],
    api_key: Annotated[str | None, typer.Option(help="Only this key (default: all)")] = None,
    actor: ActorOpt = None,
) -> None:
    """Revoke API keys at once (requests signed with them are refused)."""
    from kameng.resellers import service as resellers

    container = _container()
    with container.db.unit_of_work() as session:
        revoked = resellers.revoke_credentials(
            session, name=name, actor=_actor(actor), api_key=api_key
        )
    console.print(f"revoked: {', '.join(revoked) or 'nothing'}")


@reseller_app.command("topup")
def reseller_topup(
    name: Annotated[str, typer.Argument()],
    amount: Annotated[str, typer.Argument(help="CNY, e.g. 500 or 99.90")],
    note: Annotated[str, typer.Option(help="Memo, e.g. bank transfer reference")] = "",
    actor: ActorOpt = None,
) -> None:
    """Credit a reseller's balance (money received outside the platform). Audited."""
    from kameng.audit import service as audit
    from kameng.ledger import service as ledger
    from kameng.money import format_cents, parse_amount
    from kameng.resellers import service as resellers

    cents = parse_amount(amount)
    container = _container()
    accounts = container.accounts
    with container.db.unit_of_work() as session:
        reseller = resellers.get_reseller(session, name=name)
        conn = session.connection()
        wallet = resellers.reseller_wallet(conn, reseller_id=reseller.id)
        txn = ledger.topup(
            conn,
            wallet_id=wallet,
            accounts=accounts,
            amount=cents,
            now=container.clock(),
            actor=_actor(actor),
            memo=note,
        )
        audit.record(
            session,
            actor=_actor(actor),
            action="wallet.topup",
            target_type="reseller",
            target_id=reseller.id,
            details={"amount": amount, "txn": txn, "note": note},
        )
        available, held = ledger.balances(conn, wallet_id=wallet)
    console.print(
        f"{name}: +{format_cents(cents)} -> available {format_cents(available)}, "
        f"held {format_cents(held)}"
    )


@reseller_app.command("list")
def reseller_list() -> None:
    """Resellers with tier and balance."""
    from kameng.ledger import service as ledger
    from kameng.money import format_cents
    from kameng.resellers import service as resellers

    container = _container()
    table = Table("name", "tier", "status", "available", "held")
    with container.db.unit_of_work() as session:
        for reseller, tier in resellers.list_resellers(session):
            wallet = resellers.reseller_wallet(session.connection(), reseller_id=reseller.id)
            available, held = ledger.balances(session.connection(), wallet_id=wallet)
            table.add_row(
                reseller.name, tier, reseller.status, format_cents(available), format_cents(held)
            )
    console.print(table)


@app.command()
def demo(
    keys_per_sku: Annotated[int, typer.Option(help="Demo keys to import per card-key SKU")] = 200,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seed a demo catalog with stock and a demo reseller, and print its credentials."""
    from kameng.demo import seed

    container = _container()
    issued = seed(container, keys_per_sku=keys_per_sku)
    path = container.settings.data_dir / "demo-credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"reseller": issued.name, "api_key": issued.api_key, "api_secret": issued.api_secret},
            fh,
        )
    _print_credentials(issued, as_json)
    if not as_json:
        console.print(f"(also saved to {path}, mode 0600)")

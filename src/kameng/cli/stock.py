"""`kameng stock …`: card-key import and counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from kameng.cli.base import ActorOpt, _actor, _container, console, err_console, stock_app

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

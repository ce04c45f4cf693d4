"""Shared parts of the `kameng` command: the Typer apps, consoles and small helpers."""

from __future__ import annotations

import getpass
import os
from typing import Annotated, Any

import typer
from rich.console import Console

from kameng.errors import KamengError

app = typer.Typer(help="kameng — card-key trading platform", no_args_is_help=True)
stock_app = typer.Typer(help="Card-key stock", no_args_is_help=True)
product_app = typer.Typer(help="Catalog", no_args_is_help=True)
reseller_app = typer.Typer(help="Resellers and their API keys", no_args_is_help=True)
tier_app = typer.Typer(help="Reseller tiers and prices", no_args_is_help=True)
ledger_app = typer.Typer(help="The money ledger", no_args_is_help=True)
supplier_app = typer.Typer(help="Upstream suppliers and offers", no_args_is_help=True)
app.add_typer(stock_app, name="stock")
app.add_typer(product_app, name="product")
app.add_typer(reseller_app, name="reseller")
app.add_typer(tier_app, name="tier")
app.add_typer(ledger_app, name="ledger")
app.add_typer(supplier_app, name="supplier")

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


def _report(exc: KamengError) -> None:
    err_console.print(f"[red]error[/red] {exc.code}: {exc.message('en')}")
    for problem in exc.extra.get("fields", []):
        err_console.print(f"  - {problem.get('field')}: {problem.get('message_en', problem)}")

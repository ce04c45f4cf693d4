"""The `kameng` command: serve, migrate, demo, and staff tools for catalog, stock and money."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from kameng.cli import (  # noqa: F401  (register their commands)
    catalog,
    documents,
    gateway_sim,
    payments,
    resellers,
    risk,
    stock,
    supplier_sim,
    suppliers,
)
from kameng.cli.base import _container, _report, app, console, err_console, ledger_app
from kameng.cli.resellers import _print_credentials
from kameng.errors import KamengError


def main() -> None:
    """Entry point: a refusal prints its stable code and message and exits 2 (no traceback)."""
    try:
        app()
    except KamengError as exc:
        _report(exc)
        sys.exit(2)


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
    worker: Annotated[
        bool, typer.Option(help="Run the pipeline worker in the same process (embedded)")
    ] = True,
    demo_supplier: Annotated[
        bool, typer.Option(help="Also run the demo supplier simulator (set up by `kameng demo`)")
    ] = False,
    demo_gateway: Annotated[
        bool, typer.Option(help="Also run the demo EPay gateway simulator (see `kameng demo`)")
    ] = False,
) -> None:
    """Run the platform: web + API and (by default) one pipeline worker in the same process.
    Processes share SQLite safely through a file lock; one of them claims due orders."""
    import uvicorn

    from kameng.config import get_settings

    os.environ["KAMENG_EMBEDDED_WORKER"] = "1" if worker else "0"
    settings = get_settings()
    if demo_supplier:
        _start_demo_supplier(settings)
    if demo_gateway:
        _start_demo_gateway()
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


def _start_demo_supplier(settings: Any) -> None:
    from kameng.demo import DEMO_MERCHANT, DEMO_SUPPLIER_PORT
    from kameng.suppliers.simulator.app import create_app as create_sim
    from kameng.suppliers.simulator.config import load_config
    from kameng.suppliers.simulator.runner import ServerThread

    path = settings.data_dir / "demo-supplier.json"
    if not path.exists():
        err_console.print("no demo supplier configured: run `kameng demo` first")
        raise typer.Exit(2)
    sim = create_sim(
        load_config(path), merchant_key=DEMO_MERCHANT[0], merchant_secret=DEMO_MERCHANT[1]
    )
    server = ServerThread(sim, port=DEMO_SUPPLIER_PORT).start()
    console.print(f"demo supplier simulator on {server.url} (control API: {server.url}/_sim/state)")


def _start_demo_gateway() -> None:
    from kameng.demo import DEMO_GATEWAY_MERCHANT, DEMO_GATEWAY_PORT
    from kameng.payments.gateway_sim.runner import start_gateway_sim

    sim = start_gateway_sim(
        merchants={DEMO_GATEWAY_MERCHANT[0]: DEMO_GATEWAY_MERCHANT[1]}, port=DEMO_GATEWAY_PORT
    )
    console.print(f"demo payment gateway (EPay simulator) on {sim.url} (control API: /_sim/state)")


@app.command()
def web(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
    workers: Annotated[int, typer.Option(help="Web processes")] = 1,
) -> None:
    """Run only the web/API processes (run `kameng worker` separately)."""
    serve(
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        worker=False,
        demo_supplier=False,
        demo_gateway=False,
    )


@app.command()
def worker(
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve this worker's own /metrics on this port")
    ] = None,
) -> None:
    """Run one pipeline worker: claims due orders, talks to suppliers, sends notifications.
    Start several on PostgreSQL to share the work; stops gracefully on SIGTERM / Ctrl-C."""
    import asyncio
    import logging
    import signal

    from kameng.pipeline.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    container = _container()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Worker(container).run(stop)

    asyncio.run(main())


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


@app.command()
def demo(
    keys_per_sku: Annotated[int, typer.Option(help="Demo keys to import per card-key SKU")] = 200,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seed a demo catalog with stock and a demo reseller, and print its credentials."""
    from kameng.demo import DEMO_STAFF, seed, seed_staff

    container = _container()
    issued = seed(container, keys_per_sku=keys_per_sku)
    staff_token = seed_staff(container)
    path = container.settings.data_dir / "demo-credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {
                "reseller": issued.name,
                "api_key": issued.api_key,
                "api_secret": issued.api_secret,
                "staff": DEMO_STAFF,
                "staff_token": staff_token,
            },
            fh,
        )
    _print_credentials(issued, as_json)
    if not as_json:
        from kameng.demo import DEMO_MEMBER

        console.print(f"(also saved to {path}, mode 0600)")
        console.print(
            f"demo buyer account: {DEMO_MEMBER[0]} / {DEMO_MEMBER[1]} (¥100 balance); "
            "guests can buy without an account"
        )
        console.print(
            f"staff API (review queue, risk rules): Authorization: Bearer {staff_token} "
            f"({DEMO_STAFF}, admin) — see docs/risk.md"
        )

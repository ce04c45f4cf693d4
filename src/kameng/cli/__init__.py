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
    from kameng.startup_checks import check_or_exit, public_url

    os.environ["KAMENG_EMBEDDED_WORKER"] = "1" if worker else "0"
    settings = get_settings()
    container = _container()
    started = [
        *(["the supplier simulator of --demo-supplier"] if demo_supplier else []),
        *(["the EPay gateway simulator of --demo-gateway"] if demo_gateway else []),
    ]
    check_or_exit(container, public_url=public_url(settings, host=host, port=port), started=started)
    if demo_supplier:
        _start_demo_supplier(container)
    if demo_gateway:
        _start_demo_gateway(container)
    container.close()
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


def _start_demo_supplier(container: Any) -> None:
    """The supplier simulator, taking the secret `kameng demo` generated for this database."""
    from kameng.demo import DEMO_SUPPLIER_PORT, demo_supplier_config_path, demo_supplier_credentials
    from kameng.suppliers.simulator.app import create_app as create_sim
    from kameng.suppliers.simulator.config import load_config
    from kameng.suppliers.simulator.runner import ServerThread

    path = demo_supplier_config_path(container)
    if not path.exists():
        err_console.print("no demo supplier configured: run `kameng demo` first")
        raise typer.Exit(2)
    try:
        api_key, secret = demo_supplier_credentials(container)
    except KamengError as exc:
        err_console.print(f"no demo supplier configured ({exc.code}): run `kameng demo` first")
        raise typer.Exit(2) from exc
    sim = create_sim(load_config(path), merchant_key=api_key, merchant_secret=secret)
    server = ServerThread(sim, port=DEMO_SUPPLIER_PORT).start()
    console.print(f"demo supplier simulator on {server.url} (control API: {server.url}/_sim/state)")


def _start_demo_gateway(container: Any) -> None:
    """The EPay gateway simulator, taking the merchant key `kameng demo` generated."""
    from kameng.demo import DEMO_GATEWAY_PORT, demo_gateway_merchant
    from kameng.payments.gateway_sim.runner import start_gateway_sim

    try:
        pid, key = demo_gateway_merchant(container)
    except KamengError as exc:
        err_console.print(f"no demo gateway configured ({exc.code}): run `kameng demo` first")
        raise typer.Exit(2) from exc
    sim = start_gateway_sim(merchants={pid: key}, port=DEMO_GATEWAY_PORT)
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

    from kameng.config import get_settings
    from kameng.pipeline.worker import Worker
    from kameng.startup_checks import check_or_exit, public_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    container = _container()
    check_or_exit(container, public_url=public_url(get_settings()))
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
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Seed even a database holding data the demo did not create (unsafe)"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seed a demo catalog with stock, a simulator gateway and supplier, a buyer, a reseller and
    an admin, and print their generated credentials. Only into an empty database or its own."""
    from kameng.demo import DEMO_MEMBER_EMAIL, DEMO_STAFF, credentials_path, seed

    def warn(found: str) -> None:
        err_console.print(
            f"[bold red]warning[/bold red] --force: seeding the demo into a database that holds "
            f"data it did not create ({found}). It adds an enabled simulator gateway and "
            'supplier anyone can "pay" through, a funded buyer and an admin; kameng will '
            "refuse to start with them behind a public (non-loopback) KAMENG_PUBLIC_URL.",
            highlight=False,
        )

    container = _container()
    creds = seed(container, keys_per_sku=keys_per_sku, force=force, on_forced=warn)
    if as_json:
        print(json.dumps(creds.as_dict()))
        return
    _print_credentials(creds.reseller, as_json)
    console.print(
        f"(all demo credentials are saved to {credentials_path(container)}, mode 0600)",
        soft_wrap=True,
    )
    console.print(
        f"demo buyer account: {DEMO_MEMBER_EMAIL} / {creds.member_password} (¥100 balance); "
        "guests can buy without an account",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"staff API (review queue, risk rules): Authorization: Bearer {creds.staff_token} "
        f"({DEMO_STAFF}, admin) — see docs/risk.md",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"demo EPay gateway: pid {creds.gateway_pid}, key {creds.gateway_key}; demo supplier: "
        f"api key {creds.supplier_api_key}, secret {creds.supplier_secret} "
        "(`kameng serve --demo-gateway --demo-supplier` starts the simulators with them)",
        highlight=False,
        soft_wrap=True,
    )

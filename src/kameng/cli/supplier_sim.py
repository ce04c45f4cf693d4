"""`kameng supplier-sim`: run the bundled upstream supplier simulator (docs/supplier-sim.md).

A separate process on its own port, so the platform talks to it exactly as to a real supplier.
Imports are deferred into the command so `kameng --help` stays fast.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from kameng.cli.base import app, console, err_console


@app.command("supplier-sim")
def supplier_sim(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8701,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="JSON config file (default: the built-in demo catalog)"),
    ] = None,
    merchant_key: Annotated[
        str, typer.Option("--merchant-key", help="The API key we accept")
    ] = "demo-merchant",
    merchant_secret: Annotated[
        str, typer.Option("--merchant-secret", help="Signs requests and callbacks")
    ] = "demo-merchant-secret",  # noqa: S107 (published demo credential)
    seed: Annotated[
        int | None, typer.Option(help="Seed for latency, faults and keys (default: random)")
    ] = None,
) -> None:
    """Run a simulated upstream supplier (signed HTTP API + /_sim control API)."""
    import uvicorn

    from kameng.suppliers.simulator.app import create_app
    from kameng.suppliers.simulator.config import ConfigError, default_config, load_config

    try:
        sim_config = load_config(config) if config is not None else default_config()
    except ConfigError as exc:
        err_console.print(f"[red]error[/red] invalid supplier-sim config: {exc}")
        raise typer.Exit(2) from exc
    chosen_seed = seed if seed is not None else secrets.randbits(32)
    application = create_app(
        sim_config, merchant_key=merchant_key, merchant_secret=merchant_secret, seed=chosen_seed
    )
    shown_host = f"[{host}]" if ":" in host else host
    console.print(
        f"supplier simulator: [bold]http://{shown_host}:{port}[/bold]  "
        f"(merchant key {merchant_key}, {len(sim_config.skus)} SKUs, seed {chosen_seed})",
        highlight=False,
    )
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )

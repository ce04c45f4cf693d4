"""`kameng gateway-sim`: run the bundled 易支付 (EPay) gateway simulator (docs/gateway-sim.md).

A separate process on its own port, so the platform pays through it exactly as through a real
gateway. Imports are deferred into the command so `kameng --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kameng.cli.base import app, console, err_console


def _merchants(values: list[str] | None) -> dict[str, str]:
    """`PID:KEY` options as pid -> key (BadParameter on a malformed or repeated pid)."""
    merchants: dict[str, str] = {}
    for value in values or ["1001:demo-epay-key"]:
        pid, sep, key = value.partition(":")
        pid = pid.strip()
        if not sep or not pid or not key:
            raise typer.BadParameter("expected PID:KEY, e.g. 1001:demo-epay-key")
        if pid in merchants:
            raise typer.BadParameter(f"merchant {pid} given twice")
        merchants[pid] = key
    return merchants


def _retry(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        delays = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"not a comma list of seconds: {text!r}") from exc
    if not delays or any(d < 0 for d in delays):
        raise typer.BadParameter("give one or more non-negative delays, e.g. 0,15,60")
    return delays


def _masked(key: str) -> str:
    return f"{key[:3]}…({len(key)} chars)" if len(key) >= 12 else "…"


@app.command("gateway-sim")
def gateway_sim(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8702,
    merchant: Annotated[
        list[str] | None,
        typer.Option(
            "--merchant", help="PID:KEY of a merchant (repeatable; default 1001:demo-epay-key)"
        ),
    ] = None,
    currency: Annotated[str, typer.Option(help="Every merchant's currency")] = "CNY",
    notify_retry: Annotated[
        str | None,
        typer.Option(
            "--notify-retry",
            help="Notify attempts: seconds to wait before each, comma-separated "
            "(default 0,15,60,300,900,1800,3600)",
        ),
    ] = None,
) -> None:
    """Run a simulated EPay payment gateway (submit.php, api.php + /_sim control API)."""
    import uvicorn

    from kameng.payments.gateway_sim.app import create_app

    merchants = _merchants(merchant)
    try:
        application = create_app(merchants, currency=currency, notify_retry_s=_retry(notify_retry))
    except ValueError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from exc
    shown_host = f"[{host}]" if ":" in host else host
    listed = ", ".join(f"pid {pid} (key {_masked(key)})" for pid, key in merchants.items())
    console.print(
        f"EPay gateway simulator: [bold]http://{shown_host}:{port}[/bold]  "
        f"(merchants: {listed}; currency {currency})",
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

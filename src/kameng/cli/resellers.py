"""`kameng reseller …`: resellers, their API keys and balances."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from kameng.cli.base import ActorOpt, _actor, _container, console, reseller_app

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


@reseller_app.command("set-tier")
def reseller_set_tier(
    name: Annotated[str, typer.Argument()],
    tier: Annotated[str, typer.Argument(help="normal | silver | gold | your own")],
    actor: ActorOpt = None,
) -> None:
    """Move a reseller to another price tier (takes effect within seconds). Audited."""
    from kameng.resellers import service as resellers

    container = _container()
    with container.db.unit_of_work() as session:
        resellers.set_tier(session, name=name, tier_code=tier, actor=_actor(actor))
    console.print(f"{name} is now on tier {tier}")

"""`kameng staff|risk|review …`: staff tokens, risk rules and lists, the review queue.

The same services as the staff JSON API; the CLI acts as the staff member named by `--actor`
(reviews need the decider's name, since a claim and a two-reviewer approval are personal).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kameng.cli.base import ActorOpt, _actor, _container, app, console

staff_app = typer.Typer(help="Staff members and their API tokens", no_args_is_help=True)
risk_app = typer.Typer(help="Risk rules, lists, backtests", no_args_is_help=True)
review_app = typer.Typer(help="The manual review queue", no_args_is_help=True)
app.add_typer(staff_app, name="staff")
app.add_typer(risk_app, name="risk")
app.add_typer(review_app, name="review")


def _mode(value: str) -> Any:
    """live or shadow; anything else is passed on as draft, which activate() refuses clearly."""
    from kameng.risk.models import RuleSetStatus

    return RuleSetStatus(value) if value in ("live", "shadow") else RuleSetStatus.draft


def _json(value: Any) -> None:
    console.print_json(json.dumps(value, ensure_ascii=False, default=str))


# -- staff ------------------------------------------------------------------------------------


@staff_app.command("add")
def staff_add(
    name: str,
    role: Annotated[str, typer.Option(help="admin | reviewer | support | finance")] = "reviewer",
    actor: ActorOpt = None,
) -> None:
    """Add a staff member and print their API token (shown this once only)."""
    from kameng.staff import service as staff

    container = _container()
    with container.db.connect() as conn:
        token = staff.create(conn, name=name, role=role, actor=_actor(actor), now=container.clock())
    console.print(f"staff [bold]{name}[/bold] ({role}) token: {token}")


@staff_app.command("rotate")
def staff_rotate(name: str, actor: ActorOpt = None) -> None:
    """Give a staff member a new token (the old one stops working at once). A disabled member
    is enabled again: rotating is how access comes back."""
    from kameng.staff import service as staff

    container = _container()
    with container.db.connect() as conn:
        rotated = staff.rotate(conn, name=name, actor=_actor(actor), now=container.clock())
    console.print(f"new token for [bold]{name}[/bold]: {rotated.token}")
    if rotated.re_enabled:
        console.print(f"{name} was disabled and is enabled again with this token")


@staff_app.command("disable")
def staff_disable(name: str, actor: ActorOpt = None) -> None:
    from kameng.staff import service as staff

    container = _container()
    with container.db.connect() as conn:
        staff.disable(conn, name=name, actor=_actor(actor), now=container.clock())
    console.print(f"disabled {name}")


@staff_app.command("list")
def staff_list() -> None:
    from kameng.staff import service as staff

    container = _container()
    with container.db.connect(write=False) as conn:
        rows = staff.list_staff(conn)
    table = Table("name", "role", "disabled", "created")
    for r in rows:
        table.add_row(
            escape(str(r["name"])), str(r["role"]), str(r["disabled"]), str(r["created_at"])
        )
    console.print(table)


# -- risk rules -------------------------------------------------------------------------------


@risk_app.command("rules")
def rules_list() -> None:
    """Every rule-set version: which is live, which runs in shadow, who changed what when."""
    from kameng.risk import service as risk

    container = _container()
    with container.db.connect(write=False) as conn:
        sets = risk.list_rule_sets(conn)
    table = Table("version", "status", "rules", "created by", "created", "activated", "note")
    for s in sets:
        table.add_row(
            str(s.version),
            s.status,
            str(len(s.rules)),
            escape(s.created_by),
            s.created_at.isoformat(timespec="seconds"),
            s.activated_at.isoformat(timespec="seconds") if s.activated_at else "",
            escape(s.note[:40]),
        )
    console.print(table)


@risk_app.command("show")
def rules_show(version: int) -> None:
    """Print a rule set as JSON (edit it and `kameng risk save` it as a new version)."""
    from kameng.risk import service as risk

    container = _container()
    with container.db.connect(write=False) as conn:
        found = risk.get_rule_set(conn, version=version)
    print(json.dumps(found.rules, ensure_ascii=False, indent=2))


@risk_app.command("bundled")
def rules_bundled() -> None:
    """Print the rule set this release ships, as JSON.

    An installation keeps the rules it runs: a newer release's defaults reach it only when staff
    save them (`kameng risk bundled > rules.json`, `kameng risk save rules.json --activate
    shadow`, then `shadow-report` before making them live), so an upgrade never changes live
    decisions by itself."""
    from kameng.risk.defaults import DEFAULT_RULES

    print(json.dumps(DEFAULT_RULES, ensure_ascii=False, indent=2))


@risk_app.command("save")
def rules_save(
    path: Annotated[Path, typer.Argument(help="A JSON file: a list of rules")],
    note: Annotated[str, typer.Option(help="Why this change")] = "",
    activate: Annotated[
        str, typer.Option(help="Also activate it: live | shadow | (empty: save as draft)")
    ] = "",
    actor: ActorOpt = None,
) -> None:
    """Save a rule set as a new version (checked first; a bad rule saves nothing)."""
    from kameng.errors import ErrorCode, KamengError
    from kameng.risk import service as risk
    from kameng.risk.models import RuleSetStatus

    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KamengError(ErrorCode.invalid_request, detail=f"{path}: {exc}") from None
    container = _container()
    with container.db.connect() as conn:
        now = container.clock()
        saved = risk.save_rule_set(conn, rules=rules, note=note, actor=_actor(actor), now=now)
        if activate:
            risk.activate(
                conn,
                version=saved.version,
                mode=RuleSetStatus(activate)
                if activate in ("live", "shadow")
                else RuleSetStatus.draft,
                actor=_actor(actor),
                now=now,
            )
    console.print(f"saved version {saved.version}" + (f" as {activate}" if activate else ""))


@risk_app.command("activate")
def rules_activate(
    version: int,
    mode: Annotated[str, typer.Option(help="live | shadow")] = "live",
    actor: ActorOpt = None,
) -> None:
    from kameng.risk import service as risk
    from kameng.risk.models import RuleSetStatus

    container = _container()
    status = RuleSetStatus(mode) if mode in ("live", "shadow") else RuleSetStatus.draft
    with container.db.connect() as conn:
        risk.activate(
            conn, version=version, mode=status, actor=_actor(actor), now=container.clock()
        )
    console.print(f"version {version} is now {mode} (running servers pick it up within seconds)")


@risk_app.command("shadow-stop")
def shadow_stop(actor: ActorOpt = None) -> None:
    from kameng.risk import service as risk

    container = _container()
    with container.db.connect() as conn:
        stopped = risk.stop_shadow(conn, actor=_actor(actor), now=container.clock())
    console.print("shadow stopped" if stopped else "no shadow rule set was running")


@risk_app.command("shadow-report")
def shadow_report(version: Annotated[int | None, typer.Option()] = None) -> None:
    """What the shadow rule set would have decided, next to the live decisions."""
    from kameng.risk import backtest

    container = _container()
    with container.db.connect(write=False) as conn:
        _json(backtest.shadow_report(conn, version=version))


@risk_app.command("backtest")
def run_backtest(
    version: int,
    since: Annotated[str | None, typer.Option(help="ISO date/time (UTC)")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date/time (UTC)")] = None,
    limit: int = 5000,
) -> None:
    """Replay a rule set over stored orders: flagged and blocked counts, and the false-positive
    rate where reviewers decided (flagged then approved ÷ flagged and reviewed). Times without
    a zone are UTC."""
    from kameng.errors import ErrorCode, KamengError
    from kameng.risk import backtest

    def when(value: str | None) -> datetime | None:
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise KamengError(
                ErrorCode.invalid_request, detail=f"not an ISO date/time: {value!r}"
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    container = _container()
    with container.db.connect(write=False) as conn:
        result = backtest.backtest(
            conn, version=version, since=when(since), until=when(until), limit=limit
        )
    _json(result.as_json())


@risk_app.command("lists")
def lists(which: Annotated[str | None, typer.Option("--list")] = None) -> None:
    from kameng.risk import lists as risk_lists

    container = _container()
    with container.db.connect(write=False) as conn:
        entries = risk_lists.list_entries(conn, which=which)
    table = Table("list", "kind", "value", "note", "by", "at")
    for e in entries:
        table.add_row(
            *(escape(str(e[k])) for k in ("list", "kind", "value", "note", "created_by")),
            e["created_at"],
        )
    console.print(table)


@risk_app.command("list-add")
def list_add(
    which: Annotated[str, typer.Argument(help="allow | block | proxy")],
    kind: Annotated[str, typer.Argument(help="buyer | ip | account | device | email")],
    value: str,
    note: str = "",
    actor: ActorOpt = None,
) -> None:
    """Add to a list. Buyers are written r<reseller id>, m<member id> or g<browser id>; the
    proxy list takes IPs and networks (CIDR)."""
    from kameng.risk import lists as risk_lists

    container = _container()
    with container.db.connect() as conn:
        stored = risk_lists.add_list_entry(
            conn,
            which=which,
            kind=kind,
            value=value,
            note=note,
            actor=_actor(actor),
            now=container.clock(),
        )
    console.print(escape(f"{which} {kind} {stored}"))


@risk_app.command("list-remove")
def list_remove(which: str, kind: str, value: str, actor: ActorOpt = None) -> None:
    from kameng.risk import lists as risk_lists

    container = _container()
    with container.db.connect() as conn:
        gone = risk_lists.remove_list_entry(
            conn, which=which, kind=kind, value=value, actor=_actor(actor), now=container.clock()
        )
    console.print("removed" if gone else "not on that list")


@risk_app.command("screenings")
def screenings(order_no: str) -> None:
    """What screening saw and decided for one order (live and shadow)."""
    from kameng.orders import queries
    from kameng.risk import service as risk

    container = _container()
    with container.db.connect(write=False) as conn:
        order = queries.find_order(conn, order_no=order_no, reseller_id=None)
        _json(risk.screenings_of(conn, order_id=order.id))


# -- review -----------------------------------------------------------------------------------


@review_app.command("list")
def review_list(status: Annotated[str, typer.Option(help="open | approved | …")] = "open") -> None:
    from kameng.review import service as review

    container = _container()
    now = container.clock()
    with container.db.connect(write=False) as conn:
        items = review.list_items(conn, status=status)
        figures = review.queue_figures(conn, now=now)
    table = Table("id", "order", "status", "category", "rule", "amount", "age", "due", "claimed by")
    for i in items:
        table.add_row(
            str(i.id),
            str(i.order_id),
            i.status,
            i.category,
            i.rule_code,
            f"{i.amount_cents / 100:.2f} {i.currency}",
            f"{int((now - i.opened_at).total_seconds()) // 60} min",
            i.sla_deadline.isoformat(timespec="seconds"),
            escape(i.holder(now)),
        )
    console.print(table)
    console.print(
        f"depth {figures['depth']} · oldest {figures['oldest_age_s']} s · "
        f"decided last hour {figures['decisions_last_hour']} · SLA breaches "
        f"{figures['sla_breaches_total']}"
    )


@review_app.command("show")
def review_show(item_id: int) -> None:
    from kameng.review import service as review
    from kameng.risk import records as risk_records

    container = _container()
    now = container.clock()
    with container.db.connect(write=False) as conn:
        item = review.get_item(conn, item_id=item_id)
        _json(
            {
                "item": item.as_json(now),
                "decisions": review.decisions_of(conn, item_id=item_id),
                "buyer_history": risk_records.buyer_history(conn, order_id=item.order_id),
            }
        )


@review_app.command("claim")
def review_claim(item_id: int, actor: ActorOpt = None) -> None:
    from kameng.review import service as review

    container = _container()
    with container.db.connect() as conn:
        item = review.claim(
            conn,
            item_id=item_id,
            reviewer=_actor(actor),
            policy=container.review_policy,
            now=container.clock(),
        )
    console.print(f"claimed {item.id} until {item.claim_expires_at}")


@review_app.command("approve")
def review_approve(item_id: int, note: str = "", actor: ActorOpt = None) -> None:
    from kameng.pipeline import review_actions

    container = _container()
    accounts = container.accounts  # may write on first use: before the decision's transaction
    with container.db.connect() as conn:
        result = review_actions.approve(
            conn,
            item_id=item_id,
            reviewer=_actor(actor),
            note=note,
            policy=container.review_policy,
            accounts=accounts,
            fulfil_sla_s=container.settings.default_sla_s,
            now=container.clock(),
        )
    _json(result)


@review_app.command("reject")
def review_reject(
    item_id: int,
    note: Annotated[str, typer.Option(help="Why (required)")],
    actor: ActorOpt = None,
) -> None:
    from kameng.pipeline import review_actions

    container = _container()
    accounts = container.accounts  # may write on first use: before the decision's transaction
    with container.db.connect() as conn:
        result = review_actions.reject(
            conn,
            item_id=item_id,
            reviewer=_actor(actor),
            note=note,
            accounts=accounts,
            now=container.clock(),
        )
    _json(result)

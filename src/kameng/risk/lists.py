"""Allow, block and proxy lists: staff edit them (audited), screening reads them as sets.

Values are stored canonical (IPs and networks parsed, emails lower-cased) so that screening
compares like with like; the engine reloads them with the rules (`service.Engine`).
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.risk import attributes
from kameng.risk.attributes import Lists
from kameng.risk.models import ListKind, RiskListEntry

_lists = table(RiskListEntry)

LIST_KEYS = attributes.KEYS


def _bad(detail: str) -> KamengError:
    return KamengError(ErrorCode.invalid_request, detail=detail)


def _normalise_entry(which: ListKind, kind: str, value: str) -> str:
    value = value.strip()
    if which is ListKind.proxy:
        if kind != "ip":
            raise _bad("the proxy list holds IP addresses and networks only (kind ip)")
        try:
            if "/" in value:
                return str(ipaddress.ip_network(value, strict=False))
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise _bad(f"not an IP address or network: {value[:60]}") from None
    if kind not in LIST_KEYS:
        raise _bad(f"list entries are one of {', '.join(LIST_KEYS)}")
    if not value or len(value) > 200:
        raise _bad("a list value is 1-200 characters")
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise _bad(f"not an IP address: {value[:60]}") from None
    return value.lower() if kind == "email" else value


def add_list_entry(
    conn: Connection, *, which: str, kind: str, value: str, note: str, actor: str, now: datetime
) -> str:
    try:
        list_kind = ListKind(which)
    except ValueError:
        raise _bad("the lists are allow, block and proxy") from None
    value = _normalise_entry(list_kind, kind, value)
    exists = conn.execute(
        select(_lists.c.id).where(
            _lists.c.list == list_kind.value, _lists.c.kind == kind, _lists.c.value == value
        )
    ).first()
    if exists is None:
        conn.execute(
            insert(_lists).values(
                list=list_kind.value,
                kind=kind,
                value=value,
                note=note[:500],
                created_by=actor,
                created_at=now,
            )
        )
        audit.record_on(
            conn,
            actor=actor,
            action="risk_list_added",
            target_type="risk_list",
            target_id=f"{list_kind.value}:{kind}",
            now=now,
            details={"value": value, "note": note[:200]},
        )
    return value


def remove_list_entry(
    conn: Connection, *, which: str, kind: str, value: str, actor: str, now: datetime
) -> bool:
    try:
        list_kind = ListKind(which)
    except ValueError:
        raise _bad("the lists are allow, block and proxy") from None
    value = _normalise_entry(list_kind, kind, value)
    gone = conn.execute(
        delete(_lists).where(
            _lists.c.list == list_kind.value, _lists.c.kind == kind, _lists.c.value == value
        )
    ).rowcount
    if gone:
        audit.record_on(
            conn,
            actor=actor,
            action="risk_list_removed",
            target_type="risk_list",
            target_id=f"{list_kind.value}:{kind}",
            now=now,
            details={"value": value},
        )
    return bool(gone)


def list_entries(conn: Connection, *, which: str | None = None) -> list[dict[str, Any]]:
    stmt = select(_lists).order_by(_lists.c.list, _lists.c.kind, _lists.c.value)
    if which:
        try:
            stmt = stmt.where(_lists.c.list == ListKind(which).value)
        except ValueError:
            raise _bad("the lists are allow, block and proxy") from None
    return [
        {
            "list": r.list,
            "kind": r.kind,
            "value": r.value,
            "note": r.note,
            "created_by": r.created_by,
            "created_at": r.created_at.isoformat(),
        }
        for r in conn.execute(stmt)
    ]


def load_lists(conn: Connection) -> Lists:
    allow: set[tuple[str, str]] = set()
    block: set[tuple[str, str]] = set()
    proxy_ips: set[str] = set()
    nets = []
    for r in conn.execute(select(_lists.c.list, _lists.c.kind, _lists.c.value)):
        if r.list == ListKind.allow.value:
            allow.add((r.kind, r.value))
        elif r.list == ListKind.block.value:
            block.add((r.kind, r.value))
        elif "/" in r.value:
            nets.append(ipaddress.ip_network(r.value, strict=False))
        else:
            proxy_ips.add(r.value)
    return Lists(frozenset(allow), frozenset(block), frozenset(proxy_ips), tuple(nets))

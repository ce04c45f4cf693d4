"""`kameng documents …`: review buyers' qualification documents (list, open, approve, reject).

Each decision is audited (by the service, in the decision's own transaction) under the name
given with `--by`; two staff deciding the same document at once get one winner and one
`document_already_decided`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kameng.cli.base import _container, app, console
from kameng.errors import ErrorCode, KamengError

documents_app = typer.Typer(help="Buyers' qualification documents", no_args_is_help=True)
app.add_typer(documents_app, name="documents")

ByOpt = Annotated[str, typer.Option("--by", help="Your staff name (recorded and audited)")]


def expiry_of(day: str) -> datetime:
    """`--expires YYYY-MM-DD`: the document stays valid through that whole day (UTC), so it
    expires at 00:00 UTC the day after."""
    try:
        parsed = date.fromisoformat(day)
    except ValueError as exc:
        raise KamengError(ErrorCode.invalid_request, detail="--expires must be YYYY-MM-DD") from exc
    return datetime.combine(parsed + timedelta(days=1), time(0), tzinfo=UTC)


def _staff(by: str) -> str:
    """The audit actor for `--by` (no fallback to $USER: a decision needs a named person)."""
    name = by.strip()
    if not name:
        raise KamengError(ErrorCode.invalid_request, detail="--by needs your staff name")
    return f"staff:{name}"


def _as_dict(doc: Any) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": doc.id,
        "member_id": doc.member_id,
        "kind": doc.kind,
        "filename": doc.filename,
        "content_type": doc.content_type,
        "size_bytes": doc.size_bytes,
        "sha256": doc.sha256,
        "status": doc.status,
        "reason": doc.reason,
        "reviewed_by": doc.reviewed_by,
        "reviewed_at": when(doc.reviewed_at),
        "expires_at": when(doc.expires_at),
        "created_at": when(doc.created_at),
    }


@documents_app.command("list")
def list_documents(
    pending: Annotated[bool, typer.Option("--pending", help="Only those awaiting review")] = False,
    member: Annotated[int | None, typer.Option(help="Only this member's documents")] = None,
    limit: Annotated[int, typer.Option()] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Documents, newest first; with --pending the review queue, oldest first."""
    from kameng.documents import service as documents

    container = _container()
    with container.db.connect(write=False) as conn:
        if member is not None:
            rows = documents.list_for_member(conn, member_id=member)
            if pending:
                rows = [d for d in rows if d.status == "pending"]
            rows = rows[:limit]
        elif pending:
            rows = documents.list_pending(conn, limit=limit)
        else:
            rows = documents.list_recent(conn, limit=limit)
    items = [_as_dict(d) for d in rows]
    if as_json:
        print(json.dumps(items))
        return
    table = Table("id", "member", "kind", "file", "size", "status", "expires", "uploaded")
    for d in items:
        table.add_row(
            str(d["id"]),
            str(d["member_id"]),
            d["kind"],
            d["filename"],
            str(d["size_bytes"]),
            d["status"],
            (d["expires_at"] or "")[:10],
            (d["created_at"] or "")[:16],
        )
    console.print(table)


@documents_app.command("show")
def show(
    document_id: Annotated[int, typer.Argument(metavar="ID")],
    save: Annotated[
        Path | None, typer.Option(help="Write the file here (must not exist yet; mode 0600)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A document's details; --save writes the file itself for viewing."""
    from kameng.documents import service as documents

    container = _container()
    with container.db.connect(write=False) as conn:
        doc = documents.get(conn, document_id=document_id, with_content=save is not None)
    if save is not None:
        assert doc.content is not None
        # Identity papers: never overwrite a file, never readable by other users.
        try:
            fd = os.open(save, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KamengError(
                ErrorCode.invalid_request, detail=f"{save} already exists; choose another path"
            ) from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(doc.content)
    data = _as_dict(doc)
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        console.print(f"{key:<13}{'' if value is None else value}", highlight=False)
    if save is not None:
        console.print(f"saved to {save}")


@documents_app.command("approve")
def approve(
    document_id: Annotated[int, typer.Argument(metavar="ID")],
    by: ByOpt,
    expires: Annotated[
        str | None,
        typer.Option(help="YYYY-MM-DD: valid through that day (UTC); default no expiry"),
    ] = None,
) -> None:
    """Approve a pending document."""
    from kameng.documents import service as documents

    container = _container()
    expires_at = expiry_of(expires) if expires else None
    with container.db.connect() as conn:
        documents.approve(
            conn,
            document_id=document_id,
            staff=_staff(by),
            expires_at=expires_at,
            now=container.clock(),
        )
    until = f" until {expires_at.isoformat()}" if expires_at else " (no expiry)"
    console.print(f"document {document_id} approved{until}")


@documents_app.command("reject")
def reject(
    document_id: Annotated[int, typer.Argument(metavar="ID")],
    by: ByOpt,
    reason: Annotated[str, typer.Option(help="Shown to the buyer: say what to upload instead")],
) -> None:
    """Reject a pending document with a reason the buyer sees."""
    from kameng.documents import service as documents

    container = _container()
    with container.db.connect() as conn:
        documents.reject(
            conn, document_id=document_id, staff=_staff(by), reason=reason, now=container.clock()
        )
    console.print(f"document {document_id} rejected")

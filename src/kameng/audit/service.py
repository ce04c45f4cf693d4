"""Writing audit rows; callers pass their session so the row commits with the action."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from kameng.audit.models import AuditEntry
from kameng.db import table

_audit = table(AuditEntry)


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: object,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEntry(
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=str(target_id),
            details=details or {},
        )
    )


def record_on(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: object,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    """The same row, for services that work on a Connection rather than a Session."""
    conn.execute(
        insert(_audit).values(
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=str(target_id),
            details=details or {},
            at=now,
        )
    )

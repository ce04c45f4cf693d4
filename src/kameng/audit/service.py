"""Writing audit rows; callers pass their session so the row commits with the action."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from kameng.audit.models import AuditEntry


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

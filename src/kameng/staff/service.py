"""Staff tokens: created by the CLI (shown once), checked on every staff API request.

Only SHA-256 of a token is stored, so a copy of the database lets nobody act as staff. Each
token carries one role; `require` says which roles an action accepts, and admin is accepted
everywhere.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.staff.models import Role, StaffMember

_staff = table(StaffMember)
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{1,63}$")
TOKEN_PREFIX = "kst_"  # noqa: S105 (a prefix, not a secret)


@dataclass(frozen=True, slots=True)
class Staff:
    id: int
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"staff:{self.name}"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(conn: Connection, *, name: str, role: str, actor: str, now: datetime) -> str:
    """Add a staff member; returns their token (the only time it is ever shown)."""
    if not _NAME.match(name):
        raise KamengError(
            ErrorCode.invalid_request, detail="a staff name is 2-64 of a-z 0-9 _ . - (a-z first)"
        )
    try:
        role_ = Role(role)
    except ValueError:
        raise KamengError(
            ErrorCode.invalid_request, detail=f"role must be one of {[r.value for r in Role]}"
        ) from None
    if conn.execute(select(_staff.c.id).where(_staff.c.name == name)).first() is not None:
        raise KamengError(ErrorCode.already_exists, what=f"staff {name}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        insert(_staff).values(
            name=name, role=role_.value, token_hash=_hash(token), disabled=False, created_at=now
        )
    )
    audit.record_on(
        conn,
        actor=actor,
        action="staff_created",
        target_type="staff",
        target_id=name,
        now=now,
        details={"role": role_.value},
    )
    return token


@dataclass(frozen=True, slots=True)
class Rotated:
    token: str
    re_enabled: bool  # the member was disabled: this token gives their access back


def rotate(conn: Connection, *, name: str, actor: str, now: datetime) -> Rotated:
    """A new token; the old one stops working at once. Rotating is also how a disabled member
    gets access back, so the audit row says whether it enabled them again."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    was = conn.execute(select(_staff.c.disabled).where(_staff.c.name == name)).first()
    if was is None:
        raise KamengError(ErrorCode.not_found)
    conn.execute(
        update(_staff).where(_staff.c.name == name).values(token_hash=_hash(token), disabled=False)
    )
    audit.record_on(
        conn,
        actor=actor,
        action="staff_token_rotated",
        target_type="staff",
        target_id=name,
        now=now,
        details={"re_enabled": bool(was.disabled)},
    )
    return Rotated(token, bool(was.disabled))


def disable(conn: Connection, *, name: str, actor: str, now: datetime) -> None:
    changed = conn.execute(
        update(_staff).where(_staff.c.name == name).values(disabled=True)
    ).rowcount
    if not changed:
        raise KamengError(ErrorCode.not_found)
    audit.record_on(
        conn, actor=actor, action="staff_disabled", target_type="staff", target_id=name, now=now
    )


def list_staff(conn: Connection) -> list[dict[str, object]]:
    return [
        {"name": r.name, "role": r.role, "disabled": r.disabled, "created_at": r.created_at}
        for r in conn.execute(select(_staff).order_by(_staff.c.name))
    ]


def authenticate(conn: Connection, *, token: str) -> Staff:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        raise KamengError(ErrorCode.staff_auth_required)
    row = conn.execute(
        select(_staff.c.id, _staff.c.name, _staff.c.role, _staff.c.disabled).where(
            _staff.c.token_hash == _hash(token)
        )
    ).first()
    if row is None or row.disabled:
        raise KamengError(ErrorCode.staff_auth_required)
    return Staff(int(row.id), str(row.name), Role(row.role))


def require(staff: Staff, *roles: Role) -> None:
    if staff.role is Role.admin or staff.role in roles:
        return
    raise KamengError(ErrorCode.staff_forbidden, role=staff.role.value)

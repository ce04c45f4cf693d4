"""Member use cases: register, log in (rotating the session), resolve a session, log out.

Passwords are hashed with argon2id (argon2-cffi's defaults: RFC 9106 low-memory profile). A
login that fails for an unknown email still spends one hash verification, so response time
does not reveal which emails are registered. Session tokens are 256-bit random strings; only
their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.members.models import Member, MemberSession

_member = table(Member)
_session = table(MemberSession)

PASSWORD_MIN = 8
PASSWORD_MAX = 128
SESSION_TTL = timedelta(days=14)
# Refresh `last_seen_at` at most this often: a page view should not always be a write.
_SEEN_GRANULARITY = timedelta(minutes=5)
_EMAIL = re.compile(
    r"^[^@\s<>\"']{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)

_hasher = PasswordHasher()
# Verified against when the email is unknown, so both paths cost one argon2 verification.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class SessionInfo:
    member_id: int
    email: str
    language: str
    wallet_id: int
    stale: bool = False  # last seen long enough ago that its expiry should slide forward
    since: datetime | None = None  # when the account was created (risk: account age)


def normalize_email(email: str) -> str:
    cleaned = email.strip().lower()
    if len(cleaned) > 254 or not _EMAIL.match(cleaned):
        raise KamengError(ErrorCode.email_invalid)
    return cleaned


def check_password(password: str) -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX or len(set(password)) == 1:
        raise KamengError(ErrorCode.password_too_weak, min=PASSWORD_MIN, max=PASSWORD_MAX)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def hash_password(password: str) -> str:
    """Check the rules and hash (argon2id). Slow on purpose: callers run it outside any write
    transaction, so a burst of registrations never holds up orders."""
    check_password(password)
    return _hasher.hash(password)


def register(
    conn: Connection,
    *,
    email: str,
    password: str | None = None,
    password_hash: str | None = None,
    language: str,
    now: datetime,
) -> int:
    """Create a member and their wallet; the caller logs them in in the same transaction.
    Give `password_hash` (from `hash_password`) to keep the hashing out of the transaction."""
    address = normalize_email(email)
    if password_hash is None:
        password_hash = hash_password(password or "")
    try:
        with conn.begin_nested():
            member_id = int(
                conn.execute(
                    insert(_member)
                    .values(
                        email=address,
                        password_hash=password_hash,
                        language="en" if language == "en" else "zh-CN",
                        disabled=False,
                        created_at=now,
                    )
                    .returning(_member.c.id)
                ).scalar_one()
            )
    except IntegrityError as exc:
        raise KamengError(ErrorCode.email_taken) from exc
    ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
    return member_id


def authenticate(conn: Connection, *, email: str, password: str) -> int:
    """The member id for a correct email and password; `login_failed` otherwise (the same
    refusal for an unknown email, a wrong password and a disabled account). Reads only (a
    rehash with newer parameters is left to `rehash_if_needed`), so it can run on a read
    connection outside the writer."""
    try:
        address = normalize_email(email)
    except KamengError:
        address = ""
    row = (
        conn.execute(
            select(_member.c.id, _member.c.password_hash, _member.c.disabled).where(
                _member.c.email == address
            )
        ).first()
        if address
        else None
    )
    try:
        _hasher.verify(row.password_hash if row is not None else _DUMMY_HASH, password[:256])
        verified = row is not None
    except (VerificationError, InvalidHashError):
        verified = False
    if not verified or row is None or row.disabled:
        raise KamengError(ErrorCode.login_failed)
    return int(row.id)


def new_hash_if_outdated(conn: Connection, *, member_id: int, password: str) -> str | None:
    """A fresh hash when the stored one used weaker parameters than today's (after login)."""
    stored = conn.execute(
        select(_member.c.password_hash).where(_member.c.id == member_id)
    ).scalar_one()
    return _hasher.hash(password) if _hasher.check_needs_rehash(stored) else None


def set_password_hash(conn: Connection, *, member_id: int, password_hash: str) -> None:
    conn.execute(
        update(_member).where(_member.c.id == member_id).values(password_hash=password_hash)
    )


def start_session(
    conn: Connection,
    *,
    member_id: int,
    previous_token: str | None,
    ip: str,
    now: datetime,
) -> str:
    """A fresh session token for the member. The browser's previous session (if any) is
    deleted: the id always changes at login."""
    if previous_token:
        conn.execute(delete(_session).where(_session.c.token_hash == token_hash(previous_token)))
    token = secrets.token_urlsafe(32)
    conn.execute(
        insert(_session).values(
            token_hash=token_hash(token),
            member_id=member_id,
            created_at=now,
            expires_at=now + SESSION_TTL,
            last_seen_at=now,
            ip=ip[:45],
        )
    )
    conn.execute(update(_member).where(_member.c.id == member_id).values(last_login_at=now))
    return token


def resolve_session(conn: Connection, *, token: str, now: datetime) -> SessionInfo | None:
    """The member behind a session cookie, or None if it is unknown, expired or disabled."""
    if not token or len(token) > 100:
        return None
    row = conn.execute(
        select(
            _session.c.id,
            _session.c.expires_at,
            _session.c.last_seen_at,
            _member.c.id.label("member_id"),
            _member.c.email,
            _member.c.language,
            _member.c.disabled,
            _member.c.created_at,
        )
        .join(_member, _member.c.id == _session.c.member_id)
        .where(_session.c.token_hash == token_hash(token))
    ).first()
    if row is None or row.expires_at <= now or row.disabled:
        return None
    wallet_id = ledger.wallet_account(conn, owner_type="member", owner_id=row.member_id)
    return SessionInfo(
        member_id=int(row.member_id),
        email=row.email,
        language=row.language,
        wallet_id=wallet_id,
        stale=row.last_seen_at < now - _SEEN_GRANULARITY,
        since=row.created_at,
    )


def touch_session(conn: Connection, *, token: str, now: datetime) -> None:
    """Slide the session's expiry forward (at most once per few minutes)."""
    conn.execute(
        update(_session)
        .where(
            _session.c.token_hash == token_hash(token),
            _session.c.last_seen_at < now - _SEEN_GRANULARITY,
        )
        .values(last_seen_at=now, expires_at=now + SESSION_TTL)
    )


def end_session(conn: Connection, *, token: str) -> None:
    conn.execute(delete(_session).where(_session.c.token_hash == token_hash(token)))


def prune_sessions(conn: Connection, *, now: datetime) -> int:
    return int(conn.execute(delete(_session).where(_session.c.expires_at <= now)).rowcount or 0)


def find_member(conn: Connection, *, email: str) -> int | None:
    value = conn.execute(
        select(_member.c.id).where(_member.c.email == email.strip().lower())
    ).scalar()
    return int(value) if value is not None else None

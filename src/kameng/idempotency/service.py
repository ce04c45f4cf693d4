"""Idempotency-Key handling (DESIGN §5.5): replay, conflict, in-flight.

The record is written in the same transaction as the effect it guards, so a crash can never
leave an effect without its record or a record without its effect. "In flight" is detected
without an extra commit: an in-process registry for requests in this process, and a
transaction-scoped advisory lock on PostgreSQL for requests in other processes (SQLite's
single writer already serialises them, so the second simply sees the first's record).
Only successful outcomes are stored: a refused request changed nothing, so retrying it under
the same key is safe and lets a client fix (say) its balance and try again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, text
from sqlalchemy.engine import Connection

from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.idempotency.models import IdempotencyRecord

_rec = table(IdempotencyRecord)
_FIND = select(_rec.c.request_hash, _rec.c.status_code, _rec.c.response).where(
    _rec.c.scope == bindparam("scope"), _rec.c.key == bindparam("key")
)
_INSERT = insert(_rec)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Stored:
    status_code: int
    response: dict[str, Any]


def validate_key(key: str | None) -> str:
    if key is None:
        raise KamengError(ErrorCode.idempotency_key_required)
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable() or key.strip() != key:
        raise KamengError(ErrorCode.idempotency_key_invalid)
    return key


def request_hash(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(method.encode() + b"\n" + path.encode() + b"\n" + body).digest()


class InFlight:
    """Keys whose first request is still running in this process."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, scope: str, key: str) -> Iterator[None]:
        with self._lock:
            if (scope, key) in self._keys:
                raise KamengError(ErrorCode.idempotency_in_flight)
            self._keys.add((scope, key))
        try:
            yield
        finally:
            with self._lock:
                self._keys.discard((scope, key))


def lock_across_processes(conn: Connection, *, scope: str, key: str) -> None:
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"idem|{scope}|{key}".encode()).digest()
    got = conn.execute(
        text("SELECT pg_try_advisory_xact_lock(:k)"),
        {"k": int.from_bytes(digest[:8], "big", signed=True)},
    ).scalar()
    if not got:
        raise KamengError(ErrorCode.idempotency_in_flight)


def find(conn: Connection, *, scope: str, key: str, req_hash: bytes) -> Stored | None:
    row = conn.execute(_FIND, {"scope": scope, "key": key}).first()
    if row is None:
        return None
    if bytes(row.request_hash) != req_hash:
        raise KamengError(ErrorCode.idempotency_key_reused)
    return Stored(int(row.status_code), row.response)


def store(
    conn: Connection,
    *,
    scope: str,
    key: str,
    req_hash: bytes,
    status_code: int,
    response: dict[str, Any],
    now: datetime,
) -> None:
    conn.execute(
        _INSERT,
        {
            "scope": scope,
            "key": key,
            "request_hash": req_hash,
            "status_code": status_code,
            "response": response,
            "created_at": now,
        },
    )


def prune(conn: Connection, *, older_than: datetime) -> int:
    return conn.execute(delete(_rec).where(_rec.c.created_at < older_than)).rowcount

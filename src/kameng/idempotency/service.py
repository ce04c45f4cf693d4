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
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.engine import Connection

from kameng.db import RawSQL, db_time, table
from kameng.errors import ErrorCode, KamengError
from kameng.idempotency.models import IdempotencyRecord

_rec = table(IdempotencyRecord)
_FIND = RawSQL(
    "SELECT request_hash, status_code, response FROM idempotency_keys "
    "WHERE scope = :scope AND key = :key"
)
_INSERT = RawSQL(
    "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, response, created_at) "
    "VALUES (:scope, :key, :request_hash, :status_code, :response, :created_at)"
)
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
    row = _FIND.one(conn, {"scope": scope, "key": key})
    if row is None:
        return None
    stored_hash, status_code, response = row
    if bytes(stored_hash) != req_hash:
        raise KamengError(ErrorCode.idempotency_key_reused)
    if isinstance(response, str | bytes):
        response = json.loads(response)
    return Stored(int(status_code), response)


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
    _INSERT.run(
        conn,
        {
            "scope": scope,
            "key": key,
            "request_hash": req_hash,
            "status_code": status_code,
            "response": json.dumps(response, ensure_ascii=False),
            "created_at": db_time(conn, now),
        },
    ).close()


def prune(conn: Connection, *, older_than: datetime) -> int:
    return conn.execute(delete(_rec).where(_rec.c.created_at < older_than)).rowcount

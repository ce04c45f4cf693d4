"""Idempotency-Key handling (DESIGN §5.5): replay, conflict, in-flight.

The record is written in the same transaction as the effect it guards, so a crash can never
leave an effect without its record or a record without its effect. "In flight" is detected
without an extra commit: an in-process registry for requests in this process, and a
transaction-scoped advisory lock on PostgreSQL for requests in other processes (SQLite's
single writer already serialises them, so the second simply sees the first's record).
Only successful outcomes are stored: a refused request changed nothing, so retrying it under
the same key is safe and lets a client fix (say) its balance and try again.

A request that asks a supplier before its effect (a direct top-up's pre-check) runs in two
transactions with the network call between them, because no transaction is held open across
outbound HTTP. The in-process `Claim` spans both; the advisory lock covers each, and the key
is looked up again in the second, so a same-key request from another process in the gap is
answered with the first one's record (or 409), never with a second effect.
"""

from __future__ import annotations

import hashlib
import json
import threading
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


def optional_key(key: str | None) -> str | None:
    """For POSTs where the key is accepted but not (yet) required: checked only when sent."""
    return None if key is None else validate_key(key)


def request_hash(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(method.encode() + b"\n" + path.encode() + b"\n" + body).digest()


class InFlight:
    """Keys whose first request is still running in this process."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def claim(self, scope: str, key: str) -> None:
        """Mark the key as in flight, refusing (409) if another request already holds it."""
        with self._lock:
            if (scope, key) in self._keys:
                raise KamengError(ErrorCode.idempotency_in_flight)
            self._keys.add((scope, key))

    def release(self, scope: str, key: str) -> None:
        with self._lock:
            self._keys.discard((scope, key))


class Claim:
    """One request's hold on its key, taken once the caller is authenticated and kept across
    the request's steps (the lookup, a supplier's pre-check outside any transaction, the
    effect's own transaction) until the answer is ready.

    The scope is only known after authentication, and authentication runs inside the first
    transaction, so the hold cannot be a `with` block around it: the transaction `take`s it and
    the endpoint `release`s it in a `finally`, whichever step ended the request. Taking it
    after authentication means a request that fails it never learns whether a key is in use.
    """

    def __init__(self, inflight: InFlight) -> None:
        self._inflight = inflight
        self._held: tuple[str, str] | None = None

    def take(self, scope: str, key: str) -> None:
        if self._held == (scope, key):
            return
        self._inflight.claim(scope, key)
        self._held = (scope, key)

    def release(self) -> None:
        if self._held is not None:
            self._inflight.release(*self._held)
            self._held = None


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

"""Card-key stock: import (encrypt + fingerprint), atomic claim, release, burn, counts, reveal.

Claims are rows, not counters: a claim flips `available -> sold` on specific rows. On
PostgreSQL the candidate rows are locked with `FOR UPDATE SKIP LOCKED` so concurrent buyers
take different keys without waiting; on SQLite the single writer plus the `state` re-check is
a compare-and-set. Both keep the literal `'available'` and an inline LIMIT in the SQL so the
partial index is used (a bound parameter makes SQLite ignore it).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.engine import Connection

from kameng.db import RawSQL, db_time, table
from kameng.inventory.models import CardKey, KeyReveal, KeyState, StockBatch
from kameng.security.crypto import Vault, decode_card_key, encode_card_key

_key = table(CardKey)
_batch = table(StockBatch)
_reveal = table(KeyReveal)

MAX_KEY_LENGTH = 512
_WHITESPACE = re.compile(r"\s")
INSERT_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class ClaimedKey:
    id: int
    batch_id: int
    fingerprint: bytes
    ciphertext: bytes


@dataclass
class ImportResult:
    batch_id: int
    imported: int = 0
    duplicates: int = 0
    invalid: int = 0
    invalid_lines: list[int] | None = None


def parse_line(line: str) -> tuple[str, str | None] | None:
    """One key per line, or CSV `key,secret`. Returns None for a line that is not a key.

    Blank lines and lines starting with '#' are skipped by the caller and never counted.
    """
    raw = line.strip().lstrip("\ufeff")
    if "," in raw:
        code, _, secret = raw.partition(",")
        code, secret = code.strip(), secret.strip()
        if not secret or "," in secret:
            return None
    else:
        code, secret = raw, ""
    if not code or len(code) > MAX_KEY_LENGTH or len(secret) > MAX_KEY_LENGTH:
        return None
    text = code + secret
    if not text.isprintable() or _WHITESPACE.search(text):
        return None
    return code, (secret or None)


def is_blank_or_comment(line: str) -> bool:
    stripped = line.strip().lstrip("\ufeff").strip()
    return not stripped or stripped.startswith("#")


def new_batch(
    conn: Connection,
    vault: Vault,
    *,
    sku_id: int,
    source: str,
    unit_cost_cents: int | None,
    imported_by: str,
    now: datetime,
) -> tuple[int, AESGCM]:
    uid = secrets.token_hex(16)
    aead, wrapped = vault.new_data_key(uid)
    batch_id = conn.execute(
        insert(_batch)
        .values(
            uid=uid,
            sku_id=sku_id,
            source=source,
            unit_cost_cents=unit_cost_cents,
            imported_by=imported_by,
            wrapped_key=wrapped,
            imported=0,
            duplicates=0,
            invalid=0,
            created_at=now,
        )
        .returning(_batch.c.id)
    ).scalar_one()
    return int(batch_id), aead


_INSERT_KEY_SQL = (
    "INSERT INTO card_keys (sku_id, batch_id, state, fingerprint, ciphertext, created_at) "
    "VALUES ({p}, {p}, 'available', {p}, {p}, {p}) "
    "ON CONFLICT (sku_id, fingerprint) DO NOTHING"
)
# Keys bought from a supplier for one line go straight to that line (never on sale).
_INSERT_LINE_KEY_SQL = (
    "INSERT INTO card_keys (sku_id, batch_id, state, fingerprint, ciphertext, created_at, "
    "order_line_id, sold_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) "
    "ON CONFLICT (sku_id, fingerprint) DO NOTHING"
)


def insert_keys(
    conn: Connection,
    vault: Vault,
    aead: AESGCM,
    *,
    sku_id: int,
    batch_id: int,
    keys: list[tuple[str, str | None]],
    now: datetime,
    for_line: tuple[KeyState, int] | None = None,
) -> int:
    """Encrypt and insert keys, skipping any whose fingerprint the SKU already has.

    `for_line` (state, line id) stores keys a supplier delivered for one order line as `held`
    (more to come) or `sold` (delivered now) instead of putting them on sale.

    Returns how many were inserted; the rest were duplicates (of stock, or within the file).
    Goes straight to the DB-API cursor: at a million keys, per-row ORM or Core overhead would
    cost more than the encryption itself.
    """
    if not keys:
        return 0
    created = db_time(conn, now)
    rows: list[tuple[Any, ...]] = []
    for code, secret in keys:
        fp = vault.fingerprint(sku_id, code)
        ciphertext = vault.encrypt_key(aead, sku_id, fp, encode_card_key(code, secret))
        if for_line is None:
            rows.append((sku_id, batch_id, fp, ciphertext, created))
        else:
            state, line_id = for_line
            rows.append((sku_id, batch_id, state.value, fp, ciphertext, created, line_id, created))
    # Fingerprints are random: inserting them in sorted order walks the unique index's B-tree
    # once per chunk instead of jumping to a random page for every key.
    fp_at = 2 if for_line is None else 3
    rows.sort(key=lambda row: row[fp_at])
    sql = _INSERT_KEY_SQL if for_line is None else _INSERT_LINE_KEY_SQL
    raw = conn.connection.driver_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        placeholder = "%s" if conn.dialect.name == "postgresql" else "?"
        cursor.executemany(sql.format(p=placeholder), rows)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def finish_batch(conn: Connection, result: ImportResult) -> None:
    conn.execute(
        update(_batch)
        .where(_batch.c.id == result.batch_id)
        .values(imported=result.imported, duplicates=result.duplicates, invalid=result.invalid)
    )


def chunked(lines: Iterable[str], size: int = INSERT_CHUNK) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- claim / release / burn -------------------------------------------------------------------


def _claim_sql(dialect: str, quantity: int, state: str = "sold") -> str:
    n = int(quantity)
    assert state in ("sold", "held")
    if dialect == "postgresql":
        return (
            f"UPDATE card_keys SET state = '{state}', order_line_id = :line_id, sold_at = :now "
            "WHERE id IN (SELECT id FROM card_keys WHERE sku_id = :sku_id AND state = 'available' "
            f"ORDER BY sku_id, id LIMIT {n} FOR UPDATE SKIP LOCKED) "
            "RETURNING id, batch_id, fingerprint, ciphertext"
        )
    return (
        f"UPDATE card_keys SET state = '{state}', order_line_id = :line_id, sold_at = :now "
        "WHERE id IN (SELECT id FROM card_keys WHERE sku_id = :sku_id AND state = 'available' "
        f"ORDER BY sku_id, id LIMIT {n}) AND state = 'available' "
        "RETURNING id, batch_id, fingerprint, ciphertext"
    )


_CLAIMS: dict[tuple[str, int, str], RawSQL] = {}


_ENOUGH: dict[int, RawSQL] = {}


def _enough_available(quantity: int) -> RawSQL:
    stmt = _ENOUGH.get(quantity)
    if stmt is None:
        stmt = _ENOUGH.setdefault(
            quantity,
            RawSQL(
                "SELECT count(*) FROM (SELECT 1 FROM card_keys WHERE sku_id = :sku_id "
                f"AND state = 'available' ORDER BY sku_id, id LIMIT {int(quantity)}) AS enough"
            ),
        )
    return stmt


def claim(
    conn: Connection,
    *,
    sku_id: int,
    quantity: int,
    line_id: int,
    now: datetime,
    hold: bool = False,
) -> list[ClaimedKey] | None:
    """Claim exactly `quantity` keys for an order line, or none at all (returns None). With
    `hold`, the keys are set aside for the line without being sold (an order under review):
    delivery sells them, a rejection puts them back on sale."""
    state = "held" if hold else "sold"
    key = (conn.dialect.name, quantity, state)
    stmt = _CLAIMS.get(key)
    if stmt is None:
        stmt = _CLAIMS.setdefault(key, RawSQL(_claim_sql(conn.dialect.name, quantity, state)))
    # PostgreSQL: a claim that comes back short must not sit on the rows it did lock, or buyers
    # running at the same time would skip those keys (SKIP LOCKED) and be backordered while
    # stock is there. So first count, without locking, whether there are enough at all: the
    # usual short case (stock ran out) then locks nothing.
    if (
        conn.dialect.name == "postgresql"
        and _enough_available(quantity).one(conn, {"sku_id": sku_id})[0] < quantity
    ):
        return None
    params = {"line_id": line_id, "sku_id": sku_id, "now": db_time(conn, now)}
    claimed = _claimed(stmt.all(conn, params))
    if len(claimed) == quantity:
        return claimed
    # Short: hand back what was taken. On SQLite nobody else can be looking at these rows; on
    # PostgreSQL this is a lost race for the last keys, and the row locks go when this
    # transaction commits, a few milliseconds later.
    if claimed:
        if hold:
            held_to_stock(conn, line_id=line_id)
        else:
            release(conn, line_id=line_id)
    return None


def release(conn: Connection, *, line_id: int) -> int:
    """Return a line's keys to stock (order canceled before the keys were ever shown)."""
    return conn.execute(
        update(_key)
        .where(_key.c.order_line_id == line_id, _key.c.state == KeyState.sold.value)
        .values(state=KeyState.available.value, order_line_id=None, sold_at=None)
    ).rowcount


def held_count(conn: Connection, *, line_id: int) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(_key)
            .where(_key.c.order_line_id == line_id, _key.c.state == KeyState.held.value)
        ).scalar_one()
    )


def sell_held(conn: Connection, *, line_id: int, now: datetime) -> int:
    """A supplier-filled line is delivered: its held keys become the line's sold keys."""
    return conn.execute(
        update(_key)
        .where(_key.c.order_line_id == line_id, _key.c.state == KeyState.held.value)
        .values(state=KeyState.sold.value, sold_at=now)
    ).rowcount


def held_to_stock(conn: Connection, *, line_id: int) -> int:
    """The order was refunded while a supplier had delivered part of it: those keys are ours
    (we paid for them) and go on sale like any imported key."""
    return conn.execute(
        update(_key)
        .where(_key.c.order_line_id == line_id, _key.c.state == KeyState.held.value)
        .values(state=KeyState.available.value, order_line_id=None, sold_at=None)
    ).rowcount


def burn(conn: Connection, *, key_ids: list[int]) -> int:
    return conn.execute(
        update(_key).where(_key.c.id.in_(key_ids)).values(state=KeyState.burned.value)
    ).rowcount


def counts(conn: Connection, *, sku_ids: list[int] | None = None) -> dict[int, dict[str, int]]:
    stmt = select(_key.c.sku_id, _key.c.state, func.count()).group_by(_key.c.sku_id, _key.c.state)
    if sku_ids is not None:
        stmt = stmt.where(_key.c.sku_id.in_(sku_ids))
    out: dict[int, dict[str, int]] = {}
    for sku_id, state, n in conn.execute(stmt):
        out.setdefault(sku_id, {s.value: 0 for s in KeyState})[state] = int(n)
    return out


def available_counts(conn: Connection) -> dict[int, int]:
    rows = conn.execute(
        text("SELECT sku_id, COUNT(*) FROM card_keys WHERE state = 'available' GROUP BY sku_id")
    )
    return {int(sku_id): int(n) for sku_id, n in rows}


# -- reveal --------------------------------------------------------------------------------------


class KeyDecryptor:
    """Decrypts claimed keys; caches unwrapped batch data keys for the life of the process."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._batches: dict[int, tuple[str, bytes]] = {}

    def preload(self, conn: Connection, batch_ids: Iterable[int]) -> None:
        missing = {b for b in batch_ids if b not in self._batches}
        if missing:
            rows = conn.execute(
                select(_batch.c.id, _batch.c.uid, _batch.c.wrapped_key).where(
                    _batch.c.id.in_(missing)
                )
            )
            for batch_id, uid, wrapped in rows:
                self._batches[int(batch_id)] = (uid, bytes(wrapped))

    def decrypt(self, *, sku_id: int, key: ClaimedKey) -> dict[str, str | None]:
        uid, wrapped = self._batches[key.batch_id]
        aead = self.vault.data_key(uid, wrapped)
        code, secret = decode_card_key(
            self.vault.decrypt_key(aead, sku_id, key.fingerprint, key.ciphertext)
        )
        return {"code": code, "secret": secret}


def keys_of_line(conn: Connection, *, line_id: int) -> list[ClaimedKey]:
    rows = conn.execute(
        select(_key.c.id, _key.c.batch_id, _key.c.fingerprint, _key.c.ciphertext)
        .where(_key.c.order_line_id == line_id, _key.c.state == KeyState.sold.value)
        .order_by(_key.c.id)
    )
    return _claimed(rows)


def _claimed(rows: Iterable[Any]) -> list[ClaimedKey]:
    return [ClaimedKey(r[0], r[1], bytes(r[2]), bytes(r[3])) for r in rows]


_INSERT_REVEAL = RawSQL(
    "INSERT INTO key_reveals (order_id, channel, actor, key_count, at) "
    "VALUES (:order_id, :channel, :actor, :key_count, :at)"
)


def record_reveal(
    conn: Connection, *, order_id: int, channel: str, actor: str, key_count: int, now: datetime
) -> None:
    _INSERT_REVEAL.run(
        conn,
        {
            "order_id": order_id,
            "channel": channel,
            "actor": actor,
            "key_count": key_count,
            "at": db_time(conn, now),
        },
    ).close()

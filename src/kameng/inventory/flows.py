"""Stock import as a flow: many short transactions, so a million-key import never blocks sales.

Each chunk commits on its own. An interrupted import can simply be run again: keys already
imported are recognised by fingerprint and counted as duplicates, never stored twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from kameng.audit import service as audit
from kameng.container import Container
from kameng.inventory import service as inventory
from kameng.inventory.service import ImportResult
from kameng.orders import fulfil

MAX_REPORTED_INVALID = 50


def import_lines(
    container: Container,
    *,
    sku_code: str,
    lines: Iterable[str],
    source: str,
    unit_cost_cents: int | None,
    actor: str,
    chunk_size: int = 20_000,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import keys from lines (one key, or `key,secret`, per line). `progress(n_lines)`."""
    sku = container.sku(sku_code)
    now = container.clock()
    with container.db.connect() as conn:
        batch_id, aead = inventory.new_batch(
            conn,
            container.vault,
            sku_id=sku.id,
            source=source,
            unit_cost_cents=unit_cost_cents,
            imported_by=actor,
            now=now,
        )
    result = ImportResult(batch_id=batch_id, invalid_lines=[])
    line_no = 0
    for chunk in inventory.chunked(lines, chunk_size):
        keys: list[tuple[str, str | None]] = []
        for line in chunk:
            line_no += 1
            if inventory.is_blank_or_comment(line):
                continue
            parsed = inventory.parse_line(line)
            if parsed is None:
                result.invalid += 1
                if (
                    result.invalid_lines is not None
                    and len(result.invalid_lines) < MAX_REPORTED_INVALID
                ):
                    result.invalid_lines.append(line_no)
                continue
            keys.append(parsed)
        with container.db.connect() as conn:
            inserted = inventory.insert_keys(
                conn,
                container.vault,
                aead,
                sku_id=sku.id,
                batch_id=batch_id,
                keys=keys,
                now=now,
            )
        result.imported += inserted
        result.duplicates += len(keys) - inserted
        if progress:
            progress(len(chunk))
    with container.db.unit_of_work() as session:
        inventory.finish_batch(session.connection(), result)
        if result.imported:
            # Orders waiting for this SKU are served first, oldest first, by the worker.
            fulfil.nudge_backorders(session.connection(), sku_ids=[sku.id], now=now)
        audit.record(
            session,
            actor=actor,
            action="stock.import",
            target_type="sku",
            target_id=sku.code,
            details={
                "batch_id": batch_id,
                "source": source,
                "imported": result.imported,
                "duplicates": result.duplicates,
                "invalid": result.invalid,
            },
        )
    return result


def import_file(
    container: Container,
    *,
    sku_code: str,
    path: Path,
    source: str | None,
    unit_cost_cents: int | None,
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """`progress(n_bytes)` as the file is read."""

    def lines() -> Iterable[str]:
        pending = 0
        with path.open("rb") as fh:
            for raw in fh:
                pending += len(raw)
                if progress and pending >= 1 << 20:  # per MiB: a per-line callback costs more
                    progress(pending)  # than encrypting the key
                    pending = 0
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield "\x00"  # not valid UTF-8: counted as an invalid line
        if progress and pending:
            progress(pending)

    return import_lines(
        container,
        sku_code=sku_code,
        lines=lines(),
        source=source or path.name,
        unit_cost_cents=unit_cost_cents,
        actor=actor,
    )

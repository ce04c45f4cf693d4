"""Card-key stock (DESIGN §5.2, §6a; reliability.md §3) on both backends.

Import refuses duplicates (inside a file, against stock) and reports invalid lines by number;
claims hand out each key at most once, also under concurrency on PostgreSQL; released keys come
back, burned keys never do; the claim uses the partial index; the CLI import works end to end.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from tests.integration._helpers import run_cli
from tests.support import factories

from kameng.container import Container
from kameng.inventory import service as inventory
from kameng.inventory.flows import import_lines
from kameng.orders import service as orders
from kameng.resellers import service as resellers


def _tok() -> str:
    return secrets.token_hex(5).upper()


def _import(container: Container, sku: str, lines: list[str]) -> inventory.ImportResult:
    return import_lines(
        container, sku_code=sku, lines=lines, source="test", unit_cost_cents=None, actor="staff:t"
    )


def _stored_keys(container: Container, sku_code: str) -> dict[str, tuple[str | None, str]]:
    """Decrypt every stored key of a SKU: code -> (secret, state)."""
    sku_id = container.sku(sku_code).id
    out: dict[str, tuple[str | None, str]] = {}
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            text(
                "SELECT id, batch_id, fingerprint, ciphertext, state FROM card_keys "
                "WHERE sku_id = :s ORDER BY id"
            ),
            {"s": sku_id},
        ).all()
        container.decryptor.preload(conn, {r.batch_id for r in rows})
    for r in rows:
        key = inventory.ClaimedKey(r.id, r.batch_id, bytes(r.fingerprint), bytes(r.ciphertext))
        plain = container.decryptor.decrypt(sku_id=sku_id, key=key)
        code = plain["code"]
        assert code is not None
        assert code not in out, f"{code} stored twice"
        out[code] = (plain["secret"], r.state)
    return out


def _states(container: Container, sku_code: str) -> Counter[str]:
    sku_id = container.sku(sku_code).id
    with container.db.connect(write=False) as conn:
        return Counter(
            dict(
                conn.execute(
                    text("SELECT state, COUNT(*) FROM card_keys WHERE sku_id = :s GROUP BY state"),
                    {"s": sku_id},
                ).all()
            )
        )


# -- import ------------------------------------------------------------------------------------


def test_import_refuses_duplicates_and_counts_invalid_lines(container: Container) -> None:
    sku = factories.add_product(container, stock=0)
    other_sku = factories.add_product(container, stock=0)
    t = _tok()
    existing = f"EXISTING-{t}"
    assert _import(container, sku, [existing]).imported == 1
    lines = [
        f"ALPHA-{t}",  # 1 imported
        f"BETA-{t},SECRET-B-{t}",  # 2 imported, CSV key,secret
        "",  # 3 blank: skipped, not counted
        "# a comment",  # 4 skipped, not counted
        f"ALPHA-{t}",  # 5 duplicate inside the file
        f"has space {t}",  # 6 invalid: whitespace inside a key
        f"GAMMA-{t},",  # 7 invalid: CSV with an empty secret
        "A,B,C",  # 8 invalid: too many columns
        "X" * 513,  # 9 invalid: too long
        f"  DELTA-{t}  \r\n",  # 10 imported: surrounding whitespace and CRLF are trimmed
        f"BETA-{t},ANOTHER-SECRET",  # 11 duplicate: same code, whatever the secret
        ",SECRET-ONLY",  # 12 invalid: no code
        existing,  # 13 duplicate of stock imported earlier
        "\t",  # 14 blank
        f"CTRL-{t}\x07",  # 15 invalid: control character
    ]
    result = _import(container, sku, lines)
    assert (result.imported, result.duplicates, result.invalid) == (3, 3, 6)
    assert result.invalid_lines == [6, 7, 8, 9, 12, 15]

    stored = _stored_keys(container, sku)
    assert stored == {
        existing: (None, "available"),
        f"ALPHA-{t}": (None, "available"),
        f"BETA-{t}": (f"SECRET-B-{t}", "available"),
        f"DELTA-{t}": (None, "available"),
    }
    with container.db.connect(write=False) as conn:
        batch = conn.execute(
            text("SELECT imported, duplicates, invalid, source FROM stock_batches WHERE id = :b"),
            {"b": result.batch_id},
        ).one()
    assert tuple(batch) == (3, 3, 6, "test")

    # The same key under another SKU is a different key.
    assert _import(container, other_sku, [f"ALPHA-{t}"]).imported == 1

    # Running the same import again imports nothing new.
    again = _import(container, sku, lines)
    assert (again.imported, again.duplicates, again.invalid) == (0, 6, 6)
    assert _states(container, sku) == Counter({"available": 4})
    factories.assert_books_clean(container)


def test_plaintext_keys_never_reach_the_sqlite_files(sqlite_container: Container) -> None:
    sku = factories.add_product(sqlite_container, stock=0)
    codes = [f"PLAINTEXT-{secrets.token_hex(8)}" for _ in range(20)]
    secrets_ = [f"PASSWORD-{secrets.token_hex(8)}" for _ in codes]
    lines = [f"{c},{s}" for c, s in zip(codes, secrets_, strict=True)]
    assert _import(sqlite_container, sku, lines).imported == 20
    creds = factories.add_reseller(sqlite_container, balance_cents=100_000)
    with factories.live_server(sqlite_container) as url:
        resp = factories.client_for(url, creds).create_order(sku, 3)
    assert resp.status_code == 201, resp.text
    delivered = {k["code"] for k in resp.json()["keys"]}
    assert delivered <= set(codes) and len(delivered) == 3
    db = Path(sqlite_container.db.engine.url.database or "")
    blobs = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())
    assert len(blobs) > 10_000
    leaked = [v for v in codes + secrets_ if v.encode() in blobs]
    assert not leaked, f"plaintext in the database files: {leaked[:3]}"


# -- claim / release / burn ----------------------------------------------------------------------


def _spare_lines(container: Container, sku_code: str, n: int) -> list[int]:
    """Order lines to claim keys for: one backordered order, plus extra lines raw-inserted.

    Only the claim primitive is under test here, so the lines need to exist (foreign key),
    not to make business sense; every test releases its keys before checking the books.
    """
    sku = container.sku(sku_code)
    creds = factories.add_reseller(container, balance_cents=1_000_000)
    with container.db.connect() as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=creds.reseller_id)
        placed = orders.place_order(
            conn,
            buyer=orders.Buyer(creds.reseller_id, wallet, "reseller:test"),
            cmd=orders.PlaceOrder(sku=sku, unit_price_cents=sku.price_cents, quantity=1, fields={}),
            accounts=container.accounts,
            vault=container.vault,
            policy=container.policy,
            now=container.clock(),
        )
        assert placed.status.value == "backordered"
        lines = [placed.line_id]
        for _ in range(n - 1):
            lines.append(
                int(
                    conn.execute(
                        text(
                            "INSERT INTO order_lines (order_id, sku_id, quantity, "
                            "unit_price_cents, fields) VALUES (:o, :s, 1, :p, '{}') RETURNING id"
                        ),
                        {"o": placed.order_id, "s": sku.id, "p": sku.price_cents},
                    ).scalar_one()
                )
            )
    return lines


def _stocked_with_lines(container: Container, keys: int, lines: int) -> tuple[str, list[int]]:
    """A SKU with `keys` keys in stock and `lines` order lines to claim them for."""
    sku = factories.add_product(container, stock=0)
    spare = _spare_lines(container, sku, lines)
    factories.add_stock(container, sku, [f"{sku}-{i:05d}-{_tok()}" for i in range(keys)])
    return sku, spare


def _claim(container: Container, sku_code: str, qty: int, line: int) -> list[int] | None:
    with container.db.connect() as conn:
        got = inventory.claim(
            conn,
            sku_id=container.sku(sku_code).id,
            quantity=qty,
            line_id=line,
            now=container.clock(),
        )
    return None if got is None else [k.id for k in got]


def _release(container: Container, line: int) -> int:
    with container.db.connect() as conn:
        return inventory.release(conn, line_id=line)


def _keys_by_line(container: Container, sku_code: str) -> dict[int, list[int]]:
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            text(
                "SELECT order_line_id, id FROM card_keys WHERE sku_id = :s AND state = 'sold' "
                "ORDER BY id"
            ),
            {"s": container.sku(sku_code).id},
        ).all()
    out: dict[int, list[int]] = {}
    for line, key in rows:
        out.setdefault(line, []).append(key)
    return out


def test_claim_release_and_burn(container: Container) -> None:
    sku, (line_a, line_b, line_c) = _stocked_with_lines(container, 5, 3)
    with container.db.connect(write=False) as conn:
        ids = list(
            conn.execute(
                text("SELECT id FROM card_keys WHERE sku_id = :s ORDER BY id"),
                {"s": container.sku(sku).id},
            ).scalars()
        )
    burned = [ids[0], ids[3]]
    with container.db.connect() as conn:
        assert inventory.burn(conn, key_ids=burned) == 2

    got = _claim(container, sku, 3, line_a)
    assert got is not None and sorted(got) == sorted(set(ids) - set(burned))
    assert _claim(container, sku, 1, line_b) is None  # only burned keys are left
    assert _keys_by_line(container, sku) == {line_a: sorted(got)}

    assert _release(container, line_a) == 3
    assert _states(container, sku) == Counter({"available": 3, "burned": 2})
    assert _claim(container, sku, 4, line_b) is None  # all or nothing: 3 < 4
    assert _states(container, sku) == Counter({"available": 3, "burned": 2})
    again = _claim(container, sku, 3, line_c)
    assert again is not None and sorted(again) == sorted(got)
    assert _keys_by_line(container, sku) == {line_c: sorted(got)}
    assert _release(container, line_c) == 3
    assert _release(container, line_c) == 0
    factories.assert_books_clean(container)


@pytest.mark.pg
def test_concurrent_claims_never_hand_out_a_key_twice(pg_container: Container) -> None:
    sku, lines = _stocked_with_lines(pg_container, 100, 300)
    sizes = {line: 1 + i % 3 for i, line in enumerate(lines)}
    barrier = threading.Barrier(16, timeout=30)

    def claim(job: tuple[int, int]) -> tuple[int, list[int] | None]:
        i, line = job
        if i < 16:
            barrier.wait()
        return line, _claim(pg_container, sku, sizes[line], line)

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(claim, enumerate(lines)))
    handed_out = [k for got in results.values() if got for k in got]
    assert len(handed_out) == len(set(handed_out)), "a key was claimed twice"
    assert len(handed_out) <= 100
    won = {line: sorted(got) for line, got in results.items() if got is not None}
    for line, got in won.items():
        assert len(got) == sizes[line]
    assert _keys_by_line(pg_container, sku) == won  # losers hold nothing
    states = _states(pg_container, sku)
    assert states["sold"] == len(handed_out)
    assert states["sold"] + states["available"] == 100
    print(f"claims: {len(won)} of {len(lines)} won, {len(handed_out)} keys")

    for line in won:
        _release(pg_container, line)
    assert _states(pg_container, sku) == Counter({"available": 100})
    factories.assert_books_clean(pg_container)


@pytest.mark.pg
def test_a_short_claim_does_not_hide_keys_from_others(pg_container: Container) -> None:
    sku, (big, small) = _stocked_with_lines(pg_container, 2, 2)
    with pg_container.db.connect() as first:
        short = inventory.claim(
            first,
            sku_id=pg_container.sku(sku).id,
            quantity=3,
            line_id=big,
            now=pg_container.clock(),
        )
        assert short is None  # 2 < 3: nothing claimed
        other = _claim(pg_container, sku, 1, small)  # meanwhile, someone wants one key
    assert other is not None, "a buyer of one key was turned away while two were in stock"
    assert _states(pg_container, sku) == Counter({"available": 1, "sold": 1})


# -- the claim uses the partial index ------------------------------------------------------------


def test_sqlite_claim_uses_the_partial_index(sqlite_container: Container) -> None:
    sku, (line,) = _stocked_with_lines(sqlite_container, 50, 1)
    statements: list[str] = []
    with sqlite_container.db.engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        raw.set_trace_callback(statements.append)
        try:
            conn.begin()
            got = inventory.claim(
                conn,
                sku_id=sqlite_container.sku(sku).id,
                quantity=2,
                line_id=line,
                now=sqlite_container.clock(),
            )
            assert got is not None and len(got) == 2
            claims = [s for s in statements if "card_keys" in s and "'sold'" in s]
            assert len(claims) == 1, statements
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {claims[0]}").all()
            conn.rollback()
        finally:
            raw.set_trace_callback(None)
    details = [str(row[-1]) for row in plan]
    print("sqlite claim plan:", details)
    assert any("ix_card_keys_available" in d for d in details), details
    assert not any(d.startswith("SCAN card_keys") for d in details), details
    assert not any("TEMP B-TREE" in d for d in details), details


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", []):
        out.extend(_plan_nodes(child))
    return out


@pytest.mark.pg
def test_postgresql_claim_reads_few_buffers_when_most_keys_are_sold(
    pg_container: Container,
) -> None:
    sku = factories.add_product(pg_container, stock=0)
    t = _tok()
    assert _import(pg_container, sku, [f"K{i:05d}-{t}" for i in range(20_000)]).imported == 20_000
    sku_id = pg_container.sku(sku).id
    with pg_container.db.connect() as conn:
        sold = conn.execute(
            text(
                "UPDATE card_keys SET state = 'sold' WHERE id IN (SELECT id FROM card_keys "
                "WHERE sku_id = :s ORDER BY id LIMIT 19000)"
            ),
            {"s": sku_id},
        ).rowcount
    assert sold == 19_000
    with pg_container.db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM ANALYZE card_keys"
        )
    claim_sql = inventory._claim_sql("postgresql", 1)
    plans = []
    with pg_container.db.engine.connect() as conn:
        for _ in range(2):  # the second run shows the steady state, with a warm cache
            conn.begin()
            plans.append(_explain(conn, claim_sql, sku_id, pg_container))
            conn.rollback()
    for plan in plans:
        nodes = _plan_nodes(plan["Plan"])
        assert any(n.get("Index Name") == "ix_card_keys_available" for n in nodes), nodes
        assert plan["Plan"]["Actual Rows"] == 1
    warm = plans[-1]["Plan"]
    buffers = warm["Shared Hit Blocks"] + warm["Shared Read Blocks"]
    print(f"claim with 19,000 of 20,000 keys sold: {buffers} buffers")
    assert buffers < 100


def _explain(conn: Connection, sql: str, sku_id: int, container: Container) -> dict[str, Any]:
    row = conn.execute(
        text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"),
        {"sku_id": sku_id, "line_id": None, "now": container.clock()},
    ).scalar_one()
    doc = json.loads(row) if isinstance(row, str) else row
    return dict(doc[0])


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_stock_import_json_summary(sqlite_container: Container, tmp_path: Path) -> None:
    sku = factories.add_product(sqlite_container, stock=0)
    t = _tok()
    assert _import(sqlite_container, sku, [f"OLD-{t}"]).imported == 1
    path = tmp_path / "keys.csv"
    path.write_bytes(
        "\n".join(
            [
                f"NEW-1-{t},PW-1",
                f"NEW-2-{t}",
                f"NEW-1-{t},PW-1",  # duplicate in the file
                f"OLD-{t}",  # duplicate of stock
                "bad key",  # invalid, line 5
                "# comment",
                "",
                "also,bad,line",  # invalid, line 8
                f"NEW-3-{t}",
            ]
        ).encode()
        + b"\n\xff\xfe broken utf-8\n"  # invalid, line 10
    )
    done = run_cli(sqlite_container, "stock", "import", "--sku", sku, str(path), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["sku"] == sku
    assert (summary["imported"], summary["duplicate"], summary["invalid"]) == (3, 2, 3)
    assert summary["invalid_lines"] == [5, 8, 10]
    assert isinstance(summary["batch_id"], int)
    assert t not in done.stdout + done.stderr  # no key echoed back
    stored = _stored_keys(sqlite_container, sku)
    assert set(stored) == {f"OLD-{t}", f"NEW-1-{t}", f"NEW-2-{t}", f"NEW-3-{t}"}
    assert stored[f"NEW-1-{t}"] == ("PW-1", "available")

    again = run_cli(sqlite_container, "stock", "import", "--sku", sku, str(path), "--json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["imported"], json.loads(again.stdout)["duplicate"]) == (0, 5)
    missing = run_cli(sqlite_container, "stock", "import", "--sku", "NO-SUCH-SKU", str(path))
    assert missing.returncode != 0
    assert _states(sqlite_container, sku) == Counter({"available": 4})

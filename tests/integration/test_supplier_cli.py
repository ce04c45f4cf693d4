"""`kameng supplier add|offer|sync|list` end to end: the real command in a subprocess, pointed
at a test database, talking to a real simulator on loopback.

Independent invocations run concurrently (each CLI start costs about a second); the secret we
hold at the supplier must never be readable in the database nor printed by any command.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from tests.integration._helpers import cli_env
from tests.support import factories

from kameng.container import Container
from kameng.db import table
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import Supplier, SupplierOffer
from kameng.suppliers.simulator.runner import RunningSimulator, start_simulator

pytestmark = pytest.mark.timeout(120)

MERCHANT_KEY = "cli-merchant"
SUP_SECRET = f"sup-secret-{secrets.token_hex(12)}"
SIM_CONFIG = {
    "skus": [
        {"sku": "CLI-GAME-100", "price_cents": 9_500},
        {"sku": "CLI-STEAM-50", "price_cents": 4_800, "stock": 7},
        {"sku": "THEIR-ODD", "price_cents": 1_234},
        {"sku": "CLI-NOT-OURS", "price_cents": 1},
    ]
}

_supplier = table(Supplier)
_offer = table(SupplierOffer)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with start_simulator(SIM_CONFIG, merchant_key=MERCHANT_KEY, merchant_secret=SUP_SECRET) as s:
        yield s


# -- running the CLI ------------------------------------------------------------------------------


def _env(container: Container, extra: dict[str, str] | None) -> dict[str, str]:
    # Wide enough that rich never wraps a cell (the tests read the tables).
    return {**cli_env(container), "COLUMNS": "200", **(extra or {})}


def cli_many(
    container: Container, *commands: tuple[str, ...], env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run several `kameng` invocations at once; results in the order given."""
    exe = str(Path(sys.executable).with_name("kameng"))
    procs = [
        (
            args,
            subprocess.Popen(
                [exe, *args],
                env=_env(container, env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    results = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess([exe, *args], proc.returncode, out, err))
    return results


def cli(
    container: Container, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cli_many(container, args, env=env)[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], code: str) -> str:
    assert result.returncode == 2, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert f"error {code}:" in result.stderr, result.stderr
    return result.stderr


def assert_secret_not_in(results: list[subprocess.CompletedProcess[str]]) -> None:
    for r in results:
        assert SUP_SECRET not in r.stdout and SUP_SECRET not in r.stderr, r.args


def add_supplier_row(container: Container, code: str, sim: RunningSimulator) -> int:
    with container.db.connect() as conn:
        return suppliers.create_supplier(
            conn,
            container.vault,
            code=code,
            name=code,
            adapter="simulator",
            base_url=sim.url,
            api_key=MERCHANT_KEY,
            secret=SUP_SECRET,
            now=container.clock(),
        )


def offers_of(container: Container, supplier_code: str) -> dict[str, Any]:
    """Offers of one supplier, by their SKU."""
    from kameng.catalog.models import Sku

    sku = table(Sku)
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            select(_offer, sku.c.code.label("our_sku"))
            .join(_supplier, _supplier.c.id == _offer.c.supplier_id)
            .join(sku, sku.c.id == _offer.c.sku_id)
            .where(_supplier.c.code == supplier_code)
        ).all()
    return {r.supplier_sku: r for r in rows}


# -- supplier add ---------------------------------------------------------------------------------


def test_supplier_add_seals_the_secret_and_refuses_bad_input(
    sqlite_container: Container, sim: RunningSimulator
) -> None:
    c = sqlite_container
    added = cli(
        c, "supplier", "add", "sim1", "--url", f"{sim.url}/", "--api-key", MERCHANT_KEY,
        "--name", "模拟供货商", "--timeout-ms", "3000", "--low-balance", "50.00",
        env={"KAMENG_SUPPLIER_SECRET": SUP_SECRET},
    )  # fmt: skip
    out = ok(added)
    assert "supplier sim1 added" in out
    assert "/api/v1/callbacks/suppliers/sim1" in out

    url = ("--url", sim.url, "--api-key", "k")
    dup, bad_adapter, no_secret = cli_many(
        c,
        ("supplier", "add", "sim1", *url, "--secret", "another-secret"),
        ("supplier", "add", "x1", *url, "--secret", "s", "--adapter", "soap"),
        ("supplier", "add", "x2", *url),  # no --secret and no $KAMENG_SUPPLIER_SECRET
    )
    refused(dup, "already_exists")
    assert "sim1" in dup.stderr
    assert "soap" in refused(bad_adapter, "invalid_request")
    assert "KAMENG_SUPPLIER_SECRET" in refused(no_secret, "invalid_request")
    assert_secret_not_in([added, dup, bad_adapter, no_secret])

    with c.db.connect(write=False) as conn:
        rows = conn.execute(select(_supplier)).all()
    assert [r.code for r in rows] == ["sim1"]
    row = rows[0]
    assert (row.name, row.adapter, row.base_url, row.api_key) == (
        "模拟供货商",
        "simulator",
        sim.url,  # the trailing slash is dropped
        MERCHANT_KEY,
    )
    assert (row.timeout_ms, row.low_balance_cents, row.circuit_state) == (3000, 5000, "closed")
    # Sealed, not stored: no column holds the secret in any form …
    secret_bytes = SUP_SECRET.encode()
    for column, value in row._mapping.items():
        raw = value if isinstance(value, bytes | memoryview) else str(value).encode()
        assert secret_bytes not in bytes(raw), column
    # … but the platform can still open it (bound to this supplier's code).
    assert c.vault.unseal(bytes(row.sealed_secret), suppliers.secret_context("sim1")) == SUP_SECRET
    # … and it appears nowhere in the database files (audit log, WAL, free pages included).
    db_file = Path(make_url(c.settings.resolved_database_url).database or "")
    files = [p for p in db_file.parent.glob(db_file.name + "*") if p.is_file()]
    assert db_file in files
    for path in files:
        assert secret_bytes not in path.read_bytes(), path


# -- supplier offer and sync ----------------------------------------------------------------------


def test_supplier_offer_add_update_and_sync_from_the_catalog(
    sqlite_container: Container, sim: RunningSimulator
) -> None:
    c = sqlite_container
    for code in ("CLI-GAME-100", "CLI-STEAM-50", "OURS-ODD"):
        factories.add_product(c, sku=code, price_cents=20_000, cost_cents=1)
    add_supplier_row(c, "simx", sim)
    sim.configure_sku("CLI-GAME-100", price_cents=9_500)

    added, no_supplier = cli_many(
        c,
        ("supplier", "offer", "OURS-ODD", "simx", "MANUAL-1", "--cost", "9.00", "--priority", "7"),
        ("supplier", "offer", "OURS-ODD", "nobody", "MANUAL-1", "--cost", "9.00"),
    )
    assert "OURS-ODD <- simx:MANUAL-1 at 9.00" in ok(added)
    refused(no_supplier, "not_found")
    first = offers_of(c, "simx")["MANUAL-1"]
    assert (first.our_sku, first.cost_cents, first.priority, first.enabled) == (
        "OURS-ODD",
        900,
        7,
        True,
    )

    updated, synced = cli_many(
        c,
        ("supplier", "offer", "OURS-ODD", "simx", "MANUAL-1", "--cost", "8.50", "--priority", "3"),
        ("supplier", "sync", "simx", "--priority", "40"),
    )
    assert f"offer {first.id}:" in ok(updated)  # the same offer, updated in place
    table_out = ok(synced)
    for their in ("CLI-GAME-100", "CLI-STEAM-50", "THEIR-ODD", "CLI-NOT-OURS"):
        assert their in table_out
    assert table_out.count("offer saved") == 2
    assert table_out.count("no such SKU here") == 2
    assert "95.00" in table_out and "48.00" in table_out and "∞" in table_out

    offers = offers_of(c, "simx")
    assert set(offers) == {"MANUAL-1", "CLI-GAME-100", "CLI-STEAM-50"}
    manual = offers["MANUAL-1"]
    assert (manual.id, manual.cost_cents, manual.priority) == (first.id, 850, 3)
    game, steam = offers["CLI-GAME-100"], offers["CLI-STEAM-50"]
    assert (game.our_sku, game.cost_cents, game.priority) == ("CLI-GAME-100", 9_500, 40)
    assert (steam.our_sku, steam.cost_cents, steam.priority) == ("CLI-STEAM-50", 4_800, 40)

    # --map picks what to take and under which of our SKUs; a price change is picked up.
    sim.configure_sku("CLI-GAME-100", price_cents=9_900)
    mapped = cli(
        c, "supplier", "sync", "simx",
        "--map", "THEIR-ODD=OURS-ODD", "--map", "CLI-GAME-100=CLI-GAME-100",
        "--map", "CLI-NOT-OURS=NOPE",
    )  # fmt: skip
    mapped_out = ok(mapped)
    assert mapped_out.count("offer saved") == 2
    assert mapped_out.count("no such SKU here") == 1
    assert_secret_not_in([added, no_supplier, updated, synced, mapped])

    offers = offers_of(c, "simx")
    assert set(offers) == {"MANUAL-1", "CLI-GAME-100", "CLI-STEAM-50", "THEIR-ODD"}
    odd = offers["THEIR-ODD"]
    assert (odd.our_sku, odd.cost_cents, odd.priority) == ("OURS-ODD", 1_234, 100)
    assert offers["CLI-GAME-100"].id == game.id  # updated, not duplicated
    assert offers["CLI-GAME-100"].cost_cents == 9_900
    assert offers["CLI-STEAM-50"].cost_cents == 4_800  # not in the map: left alone
    with c.db.connect(write=False) as conn:
        routed = suppliers.route(
            suppliers.offers_for(conn, sku_id=c.sku("OURS-ODD").id), now=c.clock(), exclude=set()
        )
    assert [(o.supplier_sku, o.cost_cents) for o in routed] == [
        ("MANUAL-1", 850),
        ("THEIR-ODD", 1234),
    ]


# -- supplier list --------------------------------------------------------------------------------


def test_supplier_list_shows_circuit_balance_and_health(
    sqlite_container: Container, sim: RunningSimulator
) -> None:
    """On SQLite, the default backend (health itself is checked on both in the unit tests)."""
    c = sqlite_container
    sid = add_supplier_row(c, "listed", sim)
    add_supplier_row(c, "calm", sim)
    now = c.clock()
    with c.db.connect() as conn:
        suppliers.record_balance(conn, supplier_id=sid, balance=1_234, now=now)
        for _ in range(suppliers.FAILURES_TO_OPEN):
            suppliers.record_call(conn, supplier_id=sid, ok=False, now=now)

    as_json, as_table = cli_many(c, ("supplier", "list", "--json"), ("supplier", "list"))
    report = {h["code"]: h for h in json.loads(ok(as_json))}
    assert set(report) == {"listed", "calm"}
    listed = report["listed"]
    assert listed["circuit_state"] == "open" and listed["circuit_open_until"]
    assert (listed["balance_cents"], listed["low_balance"]) == (1_234, True)
    assert (listed["purchases"], listed["success_rate"]) == (0, None)
    assert (listed["latency_p50_ms"], listed["latency_p95_ms"]) == (None, None)
    calm = report["calm"]
    assert (calm["circuit_state"], calm["balance_cents"], calm["low_balance"]) == (
        "closed",
        None,
        False,
    )
    table_out = ok(as_table)
    assert "listed" in table_out and "calm" in table_out
    assert "open" in table_out and "12.34 LOW" in table_out
    assert_secret_not_in([as_json, as_table])

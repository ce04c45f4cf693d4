"""Stock import speed: keys/s for importing 1,000,000 keys through `kameng stock import`.

The baseline, measured in the same run on the same disk, is the raw speed of inserting the same
number of rows of the same shape (same table, same indexes) with plain sqlite3 executemany and
no encryption: the ratio says how much of the database's own speed the import keeps.

Prints one `key=value` line at the end:
  keys=… import_s=… keys_per_s=… baseline_rows_per_s=… ratio=… duplicates=… invalid=…
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, env_for, machine

sys.path.insert(0, str(ROOT / "src"))

from tests.support.factories import add_product

from kameng.config import Settings
from kameng.container import Container
from kameng.migrate import upgrade


def write_keys(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(f"GC-{i:09d}-{secrets.token_hex(8)},{secrets.token_hex(4)}\n")


def baseline(data_dir: Path, n: int) -> float:
    """Plain inserts of n same-shaped rows into a fresh migrated database, no crypto."""
    url = f"sqlite:///{data_dir / 'baseline.db'}"
    upgrade(url)
    con = sqlite3.connect(data_dir / "baseline.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute("INSERT INTO categories (slug, name, sort, enabled) VALUES ('c', 'c', 0, 1)")
    blob, fp = os.urandom(60), os.urandom(32)
    rows_per_chunk = 10_000
    started = time.perf_counter()
    for start in range(0, n, rows_per_chunk):
        rows = [
            (1, 1, i.to_bytes(4, "big") + fp[4:], blob, "2026-01-01 00:00:00.000000")
            for i in range(start, min(n, start + rows_per_chunk))
        ]
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO card_keys (sku_id, batch_id, state, fingerprint, ciphertext, created_at) "
            "VALUES (?, ?, 'available', ?, ?, ?) ON CONFLICT (sku_id, fingerprint) DO NOTHING",
            rows,
        )
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kameng-import-"))
    try:
        keys_file = tmp / "keys.csv"
        write_keys(keys_file, args.keys)
        # a few bad and duplicate lines, as real files have
        with keys_file.open("a") as fh:
            fh.write("has space inside,x\n\nGC-000000000-dup\nGC-000000000-dup\n")
        data_dir = tmp / "data"
        env = env_for(data_dir, None)
        settings = Settings(data_dir=data_dir, master_key=env["KAMENG_MASTER_KEY"])
        upgrade(settings.resolved_database_url)
        container = Container.build(settings)
        container.bootstrap()
        add_product(container, sku="GC-100", price_cents=10000, cost_cents=9500)
        container.close()
        kameng = Path(sys.executable).with_name("kameng")
        started = time.perf_counter()
        out = subprocess.run(
            [str(kameng), "stock", "import", "--sku", "GC-100", str(keys_file), "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        elapsed = time.perf_counter() - started
        summary = json.loads(out.strip().splitlines()[-1])
        base = baseline(tmp, args.keys)
        rate = summary["imported"] / elapsed
        print(f"machine: {machine()}", file=sys.stderr)
        print(
            f"keys={summary['imported']} import_s={elapsed:.1f} keys_per_s={rate:.0f} "
            f"baseline_rows_per_s={base:.0f} ratio={rate / base:.3f} "
            f"duplicates={summary['duplicate']} invalid={summary['invalid']}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

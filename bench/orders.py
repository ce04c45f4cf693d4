"""Order throughput: signed POST /api/v1/orders with 64 requests in flight.

Starts the platform as real server processes, seeds a card-key SKU with plenty of stock and a
few funded resellers, pre-signs every request (so the load client spends its CPU on HTTP only),
replays them with wrk, and measures in the same run a baseline:
  * SQLite: the same server's GET /healthz requests/s (HTTP stack + one DB read);
  * PostgreSQL: pgbench TPC-B tps on the same cluster.

Prints one `key=value` line at the end, e.g.
  db=sqlite workers=2 orders_per_s=… baseline_rps=… ratio=… p50_ms=… p99_ms=… client_cpu=…
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, env_for, machine, run_wrk, start_server

sys.path.insert(0, str(ROOT / "src"))

from tests.support.factories import add_product

from kameng.config import Settings
from kameng.container import Container
from kameng.inventory.flows import import_lines
from kameng.ledger import service as ledger
from kameng.migrate import upgrade
from kameng.resellers import service as resellers
from kameng.security.signing import sign_request

SKU = "BENCH-KEY"
PRICE_CENTS = 1000
RESELLERS = 16


def seed(data_dir: Path, database_url: str | None, keys: int) -> list[tuple[str, str]]:
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        master_key=env_for(data_dir, None)["KAMENG_MASTER_KEY"],
        app_secret="bench-app-secret",
    )
    upgrade(settings.resolved_database_url)
    container = Container.build(settings)
    container.bootstrap()
    add_product(container, sku=SKU, price_cents=PRICE_CENTS, cost_cents=900, max_quantity=10)
    t0 = time.perf_counter()
    batch = 50_000
    for start in range(0, keys, batch):
        import_lines(
            container,
            sku_code=SKU,
            lines=(
                f"BK-{i:08d}-{secrets.token_hex(6)}" for i in range(start, min(keys, start + batch))
            ),
            source="bench",
            unit_cost_cents=900,
            actor="staff:bench",
        )
    print(f"seeded {keys} keys in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    creds = []
    for n in range(RESELLERS):
        with container.db.unit_of_work() as session:
            issued = resellers.create_reseller(
                session, container.vault, name=f"bench-{n}", tier_code="normal", actor="staff:bench"
            )
        with container.db.connect() as conn:
            wallet = resellers.reseller_wallet(conn, reseller_id=issued.reseller_id)
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=container.accounts,
                amount=10**11,
                now=container.clock(),
                actor="staff:bench",
            )
        creds.append((issued.api_key, issued.api_secret))
    container.close()
    return creds


def presign(creds: list[tuple[str, str]], count: int, path: Path, tag: str = "c") -> None:
    ts = str(int(time.time()))
    with path.open("w") as fh:
        for i in range(count):
            key, secret = creds[i % len(creds)]
            body = json.dumps(
                {"sku": SKU, "quantity": 1, "customer_ref": f"{tag}{i}"}, separators=(",", ":")
            )
            nonce = secrets.token_hex(8)
            sig = sign_request(secret, "POST", "/api/v1/orders", ts, nonce, body.encode())
            fh.write(f"/api/v1/orders\t{key}\t{ts}\t{nonce}\t{sig}\t{uuid.uuid4()}\t{body}\n")


def count_orders(data_dir: Path, database_url: str | None) -> dict[str, int]:
    from kameng.orders.queries import count_by_status

    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        master_key=env_for(data_dir, None)["KAMENG_MASTER_KEY"],
    )
    container = Container.build(settings)
    with container.db.connect(write=False) as conn:
        counts = count_by_status(conn)
        from kameng.ledger.verify import verify

        report = verify(conn)
    container.close()
    counts["_books_clean"] = int(report.ok)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=None, help="web processes")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--keys", type=int, default=150_000)
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    workers = args.workers or 2

    tmp = Path(tempfile.mkdtemp(prefix="kameng-bench-"))
    cluster = None
    database_url = None
    try:
        if args.db == "postgresql":
            from tests.support.pgcluster import PgCluster, find_pg_bindir

            bindir = find_pg_bindir()
            if bindir is None:
                sys.exit("no PostgreSQL binaries")
            cluster = PgCluster(bindir).start()
            cluster.create_database("kameng")
            database_url = cluster.dsn("kameng")
        creds = seed(tmp, database_url, args.keys)
        requests_file = tmp / "requests.tsv"
        warmup_file = tmp / "warmup.tsv"
        presign(creds, count=args.keys, path=requests_file)
        presign(creds, count=5000, path=warmup_file, tag="warm")
        env = env_for(tmp, database_url)
        env["KAMENG_DB_POOL_SIZE"] = "4"
        server = start_server(env, args.port, workers)
        try:
            # warm-up (fills caches, first compilations), then the measured run
            run_wrk(server.url + "/healthz", connections=8, seconds=2)
            run_wrk(
                server.url,
                connections=args.connections,
                seconds=2,
                script=ROOT / "bench" / "signed_orders.lua",
                script_args=[str(warmup_file), "2"],
            )
            orders = run_wrk(
                server.url,
                connections=args.connections,
                seconds=args.seconds,
                script=ROOT / "bench" / "signed_orders.lua",
                script_args=[str(requests_file), "2"],
            )
            if args.db == "sqlite":
                base = run_wrk(
                    server.url + "/healthz",
                    connections=args.connections,
                    seconds=min(10, args.seconds),
                )
                baseline = base.rps
        finally:
            server.stop()
        if args.db == "postgresql":
            assert cluster is not None
            cluster.create_database("pgbench")
            cluster.run_pgbench("pgbench", "-i", "-q", "-s", "10")
            out = cluster.run_pgbench(
                "pgbench", "-c", "8", "-j", "2", "-T", str(min(20, args.seconds))
            )
            from tests.support.pgcluster import pgbench_tps

            baseline = pgbench_tps(out)
        counts = count_orders(tmp, database_url)
        delivered = counts.get("delivered", 0)  # includes the warm-up's orders
        ok = orders.status.get("201", 0)
        orders_per_s = ok / orders.seconds
        print(f"machine: {machine()}", file=sys.stderr)
        print(f"statuses: {orders.status}  orders by status: {counts}", file=sys.stderr)
        for line in orders.raw.splitlines():
            if line.startswith("sample non-201"):
                print(line, file=sys.stderr)
        baseline_name = "healthz_rps" if args.db == "sqlite" else "pgbench_tps"
        print(
            f"db={args.db} workers={workers} orders_per_s={orders_per_s:.0f} "
            f"delivered={delivered} baseline={baseline_name} "
            f"baseline_rps={baseline:.0f} ratio={orders_per_s / baseline:.3f} "
            f"p50_ms={orders.p50_ms:.1f} p99_ms={orders.p99_ms:.1f} "
            f"client_cpu={orders.client_cpu * 100:.1f}% books_clean={counts['_books_clean']}"
        )
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

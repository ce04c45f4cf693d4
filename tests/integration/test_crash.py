"""Crash test: SIGKILL the worker at random points while 500 orders flow, restart it each time,
and check that nothing was lost, bought twice or delivered twice (DESIGN §5.3, §5.4).

The app (which receives supplier callbacks) and the supplier simulator run in this process;
the worker is the real `kameng worker` command in a subprocess, so a kill is a real SIGKILL of
a process holding database connections and open supplier requests. Its lease is 2 s: whatever
it had claimed is due again 2 s after it died.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.pipeline import FAST, Rig, pipeline_rig

from kameng.apiclient import ResellerClient
from kameng.catalog.models import DeliveryKind
from kameng.inventory import service as inventory

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.timeout(120)]

SEED = 20_240_611
N_ORDERS = 500
N_KILLS = 12  # the issue asks for at least 10
PLACERS = 4
PLACE_SPAN_S = 10.0  # orders arrive spread over this long, so kills land while they flow
SETTLE_TIMEOUT_S = 25.0
LEASE_S = 2
SUPPLIER_TIMEOUT_MS = 1000
OWN_STOCK = 15

_FAULTS = {
    "latency_ms": {"dist": "uniform", "min": 20, "max": 80},
    # Bought, then a 500 / no answer within our timeout: the outcome is unknown to us.
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
TERMINAL_OR_DONE = {
    "delivered",
    "completed",
    "refunded",
    "canceled",
    "rejected",
    "expired",
    "replaced",
}

KAMENG = str(Path(sys.executable).parent / "kameng")


class WorkerProcess:
    """`kameng worker` in a subprocess; each start logs to its own file in `log_dir`."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logs: list[Path] = []

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> None:
        self.starts += 1
        path = self.log_dir / f"worker-{self.starts:02d}.stderr"
        self.logs.append(path)
        with (
            path.open("wb") as err,
            (self.log_dir / f"worker-{self.starts:02d}.stdout").open("wb") as out,
        ):
            self.proc = subprocess.Popen(
                [KAMENG, "worker"], env=self.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def wait_started(self, timeout: float = 15.0) -> None:
        """Until the worker logged that its loop runs (so a kill lands in real work)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while b" started" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start\n{tail(self.log)}")
            time.sleep(0.01)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def stop(self, timeout: float = 40.0) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"worker ignored SIGTERM\n{tail(self.log)}") from None
        return int(self.proc.returncode)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text_ = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text_.splitlines()[-lines:])


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


class ErrorLog(logging.Handler):
    """Error records logged in this process (the app answering callbacks, the simulator)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {self.format(record)}")


def place_all(rig: Rig, plan: list[tuple[str, int]], placed: list[dict[str, Any] | None]) -> None:
    """Place every planned order through the signed API from a few threads, paced so they
    arrive spread over PLACE_SPAN_S."""
    t0 = time.monotonic()
    errors: list[str] = []

    def run(offset: int) -> None:
        client = ResellerClient(rig.url, rig.creds.api_key, rig.creds.api_secret)
        try:
            for i in range(offset, len(plan), PLACERS):
                delay = t0 + i * PLACE_SPAN_S / len(plan) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sku, quantity = plan[i]
                resp = client.request(
                    "POST",
                    "/api/v1/orders",
                    body={
                        "sku": sku,
                        "quantity": quantity,
                        "fields": {},
                        "customer_ref": f"crash-{i}",
                    },
                    idempotency_key=f"crash-{SEED}-{i}",
                )
                if resp.status_code != 201:
                    errors.append(f"order {i}: {resp.status_code} {resp.text}")
                    continue
                placed[i] = resp.json()
        finally:
            client.http.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(PLACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def order_rows(rig: Rig) -> list[Any]:
    with rig.container.db.connect(write=False) as conn:
        return list(
            conn.execute(
                text(
                    "SELECT o.id, o.order_no, o.status, o.stage, o.reason, o.next_action_at, "
                    "o.sku_id, l.id AS line_id, l.quantity "
                    "FROM orders o JOIN order_lines l ON l.order_id = o.id ORDER BY o.id"
                )
            )
        )


def unsettled(rig: Rig) -> list[Any]:
    return [r for r in order_rows(rig) if r.status not in TERMINAL_OR_DONE]


@pytest.mark.pg
@pytest.mark.slow
def test_worker_survives_sigkill_while_orders_flow(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    with pipeline_rig(
        backend_container, "postgresql", tmp_path, SIM_CONFIG, worker=False, worker_lease_s=LEASE_S
    ) as rig:
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

        errors = ErrorLog()
        logging.getLogger().addHandler(errors)
        worker = WorkerProcess(worker_env(rig), tmp_path)
        placed: list[dict[str, Any] | None] = [None] * N_ORDERS
        placer = threading.Thread(target=place_all, args=(rig, plan, placed))
        kill_times: list[float] = []
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
            while unsettled(rig) and time.monotonic() < deadline:
                time.sleep(0.25)
            settled_at = time.monotonic() - started
        finally:
            code = worker.stop()
            logging.getLogger().removeHandler(errors)
        logs = "\n".join(tail(p, 15) for p in worker.logs[-3:])
        assert code == 0, f"worker exit code {code} after SIGTERM\n{logs}"
        assert all(p is not None for p in placed)

        rows = order_rows(rig)
        by_no = {r.order_no: r for r in rows}
        assert len(rows) == N_ORDERS
        status = Counter(r.status for r in rows)

        # 1. Nothing paid is forgotten: terminal, delivered, or due again some time.
        forgotten = [
            (r.order_no, r.status, r.stage, r.reason)
            for r in rows
            if r.status not in TERMINAL_OR_DONE and r.next_action_at is None
        ]
        assert not forgotten, f"paid orders nobody will act on: {forgotten[:10]}\n{logs}"
        stuck = [
            (r.order_no, r.status, r.stage, r.reason, r.next_action_at)
            for r in rows
            if r.status not in TERMINAL_OR_DONE
        ]

        with rig.container.db.connect(write=False) as conn:
            # 2. At most one delivery per line; no card key on two lines.
            twice = conn.execute(
                text(
                    "SELECT order_line_id, COUNT(*) FROM deliveries "
                    "GROUP BY order_line_id HAVING COUNT(*) > 1"
                )
            ).all()
            sources = dict(conn.execute(text("SELECT order_line_id, source FROM deliveries")).all())
            key_rows = conn.execute(
                text(
                    "SELECT id, batch_id, fingerprint, ciphertext, order_line_id, sku_id, state "
                    "FROM card_keys WHERE order_line_id IS NOT NULL"
                )
            ).all()
            rig.container.decryptor.preload(conn, {k.batch_id for k in key_rows})
            procs = conn.execute(
                text(
                    "SELECT p.order_line_id, p.out_trade_no, p.state, p.reason, p.attempts "
                    "FROM procurements p ORDER BY p.id"
                )
            ).all()
        assert not twice, f"lines delivered more than once: {twice}"
        line_of_code: dict[str, int] = {}
        reused: list[str] = []
        keys_per_line: Counter[int] = Counter()
        for k in key_rows:
            code_ = rig.container.decryptor.decrypt(
                sku_id=k.sku_id,
                key=inventory.ClaimedKey(
                    k.id, k.batch_id, bytes(k.fingerprint), bytes(k.ciphertext)
                ),
            )["code"]
            assert code_ is not None
            if line_of_code.setdefault(code_, k.order_line_id) != k.order_line_id:
                reused.append(code_)
            if k.state == "sold":
                keys_per_line[k.order_line_id] += 1
        assert not reused, f"card keys on two lines: {reused[:10]}"
        short = [
            (r.order_no, r.quantity, keys_per_line[r.line_id])
            for r in rows
            if kind_of[r.sku_id] == "card_key"
            and r.status == "delivered"
            and keys_per_line[r.line_id] != r.quantity
        ]
        assert not short, f"card-key orders delivered with the wrong number of keys: {short[:10]}"

        # 3. At most one purchase upstream per line, and exactly one behind every order a
        #    supplier delivered.
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
        assert not strangers, f"the supplier has orders we never made: {strangers[:10]}"
        max_bought = max(bought.values(), default=0)
        over = {no: n for no, n in bought.items() if n > 1}
        assert not over, f"lines bought more than once upstream: {list(over.items())[:10]}"
        proc_states: dict[int, list[str]] = defaultdict(list)
        for p in procs:
            proc_states[p.order_line_id].append(p.state)
        unpaid_upstream = []
        from_stock_but_bought = []
        for r in rows:
            if r.status != "delivered":
                continue
            source = str(sources.get(r.line_id, ""))
            if source.startswith("supplier:") and bought[r.order_no] != 1:
                unpaid_upstream.append((r.order_no, source, bought[r.order_no]))
            if source == "own_stock" and bought[r.order_no] != 0:
                from_stock_but_bought.append((r.order_no, bought[r.order_no]))
        assert not unpaid_upstream, (
            f"delivered from a supplier without exactly one purchase: {unpaid_upstream[:10]}"
        )
        assert not from_stock_but_bought, (
            f"bought although served from stock: {from_stock_but_bought}"
        )

        # 4. Money, stock and pipeline invariants (what `kameng verify` checks).
        report = factories.assert_books_clean(rig.container)

        # 5. No step failed in any worker run, and nothing went wrong in the app.
        failures = []
        for path in worker.logs:
            body = path.read_text(errors="replace")
            if "Traceback" in body or " ERROR" in body:
                failures.append(tail(path, 60))
        assert not failures, "worker logged errors:\n" + "\n".join(failures[:3])
        assert not errors.records, f"errors logged in the app: {errors.records[:5]}"

        proc_summary = Counter(p.state for p in procs)
        delivered_states = Counter(
            s for r in rows if r.status == "delivered" for s in proc_states.get(r.line_id, [])
        )
        elapsed = time.monotonic() - started
        print(
            f"\ncrash test: orders={len(rows)} kills={len(kill_times)} "
            f"worker_starts={worker.starts} delivered={status['delivered']} "
            f"refunded={status['refunded']} not_settled={len(stuck)} "
            f"statuses={dict(status)}\n"
            f"  kills at (s): {[round(t, 1) for t in kill_times]}; "
            f"placing done at {placing_done:.1f}s, settled at {settled_at:.1f}s\n"
            f"  max purchases per line={max_bought} "
            f"max purchase requests per line={max(requests.values(), default=0)} "
            f"sim stats={sim['stats']}\n"
            f"  procurements={dict(proc_summary)} (of delivered orders: {dict(delivered_states)})"
            f"\n  figures={report.figures} elapsed={elapsed:.1f}s"
        )
        if stuck:
            print(f"  not settled: {stuck[:20]}")

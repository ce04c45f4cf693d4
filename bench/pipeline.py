"""Upstream-procured orders on PostgreSQL: the platform's own overhead and the workers' throughput.

Everything runs as real processes on this machine: a throwaway PostgreSQL cluster, the web
(`kameng serve --no-worker`), separate `kameng worker` processes, and the bundled supplier
simulator (`kameng supplier-sim`) with a fixed 200 ms latency, sync mode, a direct top-up SKU
with unlimited stock. Every order is placed through the signed Reseller API by a small raw
asyncio HTTP/1.1 client (pre-signed requests; httpx is too slow at this concurrency, see
encode/httpx#3215).

Phase A — overhead at a steady pace: with 2 worker processes, orders are placed open-loop at a
constant rate (default 200/s, then 250/s) for `--seconds`, then the run waits for every order to
be delivered. Per order, from the database:
    total    = orders.delivered_at - orders.created_at
    supplier = procurements.latency_ms   (measured by the worker around its HTTP call)
    overhead = total - supplier
`created_at` is taken at the start of the placing transaction (web process); `delivered_at` at
the start of the worker's settling transaction, so the settle commit itself is not included.
`latency_ms` also holds whatever the worker's own HTTP client adds (waiting for a pooled
connection, a busy event loop), so `total - 200 ms` (the simulator's fixed latency) is printed
next to it: when the two differ, the difference is time spent inside the worker.

Phase B — worker throughput with 1, 2, 4 worker processes: for each N a backlog (default 3,000
orders, a fresh SKU per N) is placed with no worker running and then held (next_action_at moved
an hour ahead) while the N workers start, so process start-up is not timed; then the backlog is
released (next_action_at = now, NOTIFY) and timed until every order is delivered.
orders_per_s_wN = delivered / (last delivered_at - release).

Baseline, same run: the simulator alone — closed-loop purchases from the raw client with 200
connections at the same 200 ms latency (the ceiling is 200 / 0.2 s = 1,000/s).

Each phase prints the CPU used by the web, the workers, the simulator, PostgreSQL and this
script (cores, and CPU ms per order), plus `other`: CPU used on the machine by anything else. A
busy machine skews every figure, so each measured phase first waits (up to `--quiet-wait` s)
for the machine to be nearly idle. `--py-spy PATH` samples the workers (GIL holders) into
`pyspy-*.txt` in the temp dir (kept with `--keep`).

Prints one `key=value` line at the end:
  overhead_p50_ms=… overhead_p99_ms=… total_p50_ms=… total_p99_ms=… placed_per_s=…
  orders_per_s_w1=… orders_per_s_w2=… orders_per_s_w4=… baseline_sim_per_s=…
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, Server, env_for, machine, start_server

sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from tests.support.factories import add_product

from kameng.catalog.models import DeliveryKind
from kameng.config import Settings
from kameng.container import Container
from kameng.db import notify_due
from kameng.ledger import service as ledger
from kameng.migrate import upgrade
from kameng.resellers import service as resellers
from kameng.security.signing import sign_request, signed_headers
from kameng.suppliers import service as suppliers
from kameng.suppliers.adapters import signed_http

KAMENG = str(Path(sys.executable).with_name("kameng"))
SIM_SKU = "SIM-TOPUP"
SIM_KEY = "bench-merchant"
SIM_SECRET = "bench-merchant-secret"  # throwaway simulator credential
SIM_LATENCY_MS = 200
PRICE_CENTS = 1000
COST_CENTS = 900
RESELLERS = 16
CONNECTIONS = 64  # load client → web
BASELINE_CONNECTIONS = 200  # load client → simulator (the worker's httpx pool allows 200)


# -- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(content[-lines:])


# -- CPU accounting from /proc -------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime ticks) for every process."""
    rows: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = data[data.rfind(")") + 2 :].split()
        # rest[k] is field k+3 of proc(5): ppid=4, utime=14, stime=15, cutime=16, cstime=17
        rows[int(entry)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    return rows


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


class CpuMeter:
    """CPU used by process trees (a root pid and its descendants) over a window; labels in
    `own_only` count just their own process (the bench is every other process's parent)."""

    def __init__(self, roots: dict[str, list[int]], own_only: frozenset[str] = frozenset()) -> None:
        self.roots = roots
        self.own_only = own_only
        self._start: dict[str, int] = {}
        self._mstart = (0, 0)
        self._t0 = 0.0

    def _sample(self) -> dict[str, int]:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out: dict[str, int] = {}
        for label, pids in self.roots.items():
            total, stack, seen = 0, list(pids), set()
            while stack:
                pid = stack.pop()
                if pid in seen or pid not in table:
                    continue
                seen.add(pid)
                total += table[pid][1]
                if label not in self.own_only:
                    stack.extend(children.get(pid, []))
            out[label] = total
        return out

    def start(self) -> CpuMeter:
        self._start = self._sample()
        self._mstart = _machine_ticks()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        """Cores used per label (1.0 = one core busy all the time), plus `machine_busy` (0..1)."""
        end = self._sample()
        mend = _machine_ticks()
        wall = max(time.monotonic() - self._t0, 1e-6)
        used = {k: (end[k] - self._start.get(k, 0)) / CLK_TCK / wall for k in end}
        busy, total = mend[0] - self._mstart[0], mend[1] - self._mstart[1]
        cores = os.cpu_count() or 1
        ours = sum(used.values())
        used["other"] = max(0.0, (busy / total if total else 0.0) * cores - ours)
        used["machine_busy"] = busy / total if total else float("nan")
        used["_wall"] = wall
        return used


def machine_busy(seconds: float) -> float:
    """Fraction of the machine's CPU busy over the next `seconds`."""
    b0, t0 = _machine_ticks()
    time.sleep(seconds)
    b1, t1 = _machine_ticks()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Other work on this machine (a test run, say) skews every figure: wait, within reason,
    until the machine is nearly idle before a measured phase."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy(1.0)
    if busy <= threshold:
        return
    log(f"  machine {busy * 100:.0f}% busy before the phase; waiting up to {max_wait:.0f} s")
    while time.monotonic() < deadline:
        busy = machine_busy(1.0)
        if busy <= threshold:
            log(f"  quiet now ({busy * 100:.0f}% busy)")
            return
    log(f"  still {busy * 100:.0f}% busy: measuring anyway (see `other` in the CPU figures)")


def fmt_cpu(used: dict[str, float], orders: int) -> str:
    """Cores used per process group, and CPU milliseconds per order."""
    labels = [k for k in used if k not in ("machine_busy", "_wall")]
    cores = " ".join(f"{k}={used[k]:.2f}" for k in labels)
    per = " ".join(
        f"{k}={used[k] * used['_wall'] * 1000 / max(orders, 1):.1f}" for k in labels if k != "other"
    )
    return (
        f"cores used: {cores} (`other` = not ours), machine busy "
        f"{used['machine_busy'] * 100:.0f}%\n  CPU ms per order: {per}"
    )


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {self.pid} ignored SIGTERM; killing\n{tail(self.log_path)}")
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_simulator(tmp: Path, port: int) -> Proc:
    config = {
        "balance_cents": 10**15,
        "skus": [
            {
                "sku": SIM_SKU,
                "name": "bench top-up",
                "kind": "direct_topup",
                "price_cents": COST_CENTS,
                "stock": None,
                "mode": "sync",
                "latency_ms": {"dist": "fixed", "ms": SIM_LATENCY_MS},
            }
        ],
    }
    cfg = tmp / "sim.json"
    cfg.write_text(json.dumps(config))
    log_path = tmp / "sim.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                KAMENG,
                "supplier-sim",
                "--port",
                str(port),
                "--config",
                str(cfg),
                "--merchant-key",
                SIM_KEY,
                "--merchant-secret",
                SIM_SECRET,
                "--seed",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    sim = Proc(proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"supplier-sim exited\n{tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return sim
        time.sleep(0.1)
    sim.stop()
    raise RuntimeError(f"supplier-sim did not start\n{tail(log_path)}")


def start_workers(n: int, env: dict[str, str], log_dir: Path, tag: str) -> list[Proc]:
    workers = []
    for i in range(n):
        log_path = log_dir / f"worker-{tag}-{i}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [KAMENG, "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        workers.append(Proc(proc, log_path))
    return workers


def wait_workers_started(workers: list[Proc], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for w in workers:
        while b" started" not in w.log_path.read_bytes():
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {w.proc.returncode}\n{tail(w.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start\n{tail(w.log_path)}")
            time.sleep(0.02)


def stop_all(procs: list[Proc]) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop()


def worker_log_problems(workers: list[Proc], limit: int = 8) -> list[str]:
    """WARNING/ERROR lines and tracebacks from the workers' logs (first few)."""
    found: list[str] = []
    for w in workers:
        try:
            lines = w.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if any(word in line for word in ("ERROR", "WARNING", "Traceback", "failed")):
                found.append(f"{w.log_path.name}: {line[:300]}")
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


# -- seeding -----------------------------------------------------------------------------------


def settings_for(data_dir: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        master_key=env_for(data_dir, None)["KAMENG_MASTER_KEY"],
        app_secret="bench-app-secret",
    )


def seed(data_dir: Path, database_url: str, sim_url: str, skus: list[str]) -> list[tuple[str, str]]:
    upgrade(database_url)
    container = Container.build(settings_for(data_dir, database_url))
    container.bootstrap()
    with container.db.connect() as conn:
        supplier_id = suppliers.create_supplier(
            conn,
            container.vault,
            code="sim",
            name="bench simulator",
            adapter="simulator",
            base_url=sim_url,
            api_key=SIM_KEY,
            secret=SIM_SECRET,
            timeout_ms=5000,
            low_balance_cents=0,
            now=container.clock(),
        )
    for code in skus:
        add_product(
            container,
            sku=code,
            price_cents=PRICE_CENTS,
            cost_cents=COST_CENTS,
            kind=DeliveryKind.direct_topup,
            max_quantity=10,
        )
        with container.db.connect() as conn:
            suppliers.add_offer(
                conn,
                sku_id=container.sku(code).id,
                supplier_id=supplier_id,
                supplier_sku=SIM_SKU,
                cost_cents=COST_CENTS,
                now=container.clock(),
            )
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
                amount=10**12,
                now=container.clock(),
                actor="staff:bench",
            )
        creds.append((issued.api_key, issued.api_secret))
    container.close()
    return creds


def books_clean(data_dir: Path, database_url: str) -> bool:
    from kameng.ledger.verify import verify

    container = Container.build(settings_for(data_dir, database_url))
    with container.db.connect(write=False) as conn:
        report = verify(conn)
    container.close()
    if not report.ok:
        log(f"ledger violations: { {k: v for k, v in report.violations.items() if v} }")
    return bool(report.ok)


# -- pre-signed raw HTTP requests -----------------------------------------------------------------


def presign_orders(creds: list[tuple[str, str]], sku: str, count: int, tag: str) -> list[bytes]:
    ts = str(int(time.time()))
    out = []
    for i in range(count):
        key, secret = creds[i % len(creds)]
        body = json.dumps(
            {"sku": sku, "quantity": 1, "customer_ref": f"{tag}-{i}"}, separators=(",", ":")
        ).encode()
        nonce = secrets.token_hex(8)
        sig = sign_request(secret, "POST", "/api/v1/orders", ts, nonce, body)
        head = (
            "POST /api/v1/orders HTTP/1.1\r\nHost: bench\r\n"
            "Content-Type: application/json\r\n"
            f"X-Api-Key: {key}\r\nX-Timestamp: {ts}\r\nX-Nonce: {nonce}\r\n"
            f"X-Signature: {sig}\r\nIdempotency-Key: {uuid.uuid4()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


def presign_sim_purchases(count: int, tag: str) -> list[bytes]:
    ts = int(time.time())
    out = []
    for i in range(count):
        body = json.dumps(
            {
                "out_trade_no": f"{tag}-{i}",
                "sku": SIM_SKU,
                "quantity": 1,
                "fields": {},
                "callback_url": None,
            },
            separators=(",", ":"),
        ).encode()
        headers = signed_headers(
            api_key=SIM_KEY,
            secret=SIM_SECRET,
            method="POST",
            path_with_query="/v1/orders",
            body=body,
            timestamp=ts,
            nonce=secrets.token_hex(12),
        )
        head = "POST /v1/orders HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        out.append(head.encode() + body)
    return out


# -- the load client (raw asyncio, keep-alive HTTP/1.1) ----------------------------------------


@dataclass
class LoadResult:
    sent: int
    statuses: dict[int, int]
    latencies_ms: list[float]  # from the scheduled send time to the full answer
    first_due: float
    last_done: float
    samples: list[str] = field(default_factory=list)

    def ok(self, code: int) -> int:
        return self.statuses.get(code, 0)

    @property
    def seconds(self) -> float:
        return max(self.last_done - self.first_due, 1e-9)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return status, body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _load(
    port: int, requests: list[bytes], *, rate: float | None, connections: int, ok: int
) -> LoadResult:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    samples: list[str] = []
    last_done = 0.0

    async def conn_loop() -> None:
        nonlocal last_done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (item := await queue.get()) is not None:
                due, payload = item
                try:
                    writer.write(payload)
                    status, body = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    status, body = 0, repr(exc).encode()
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                done = loop.time()
                last_done = max(last_done, done)
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append((done - due) * 1000)
                if status != ok and len(samples) < 3:
                    samples.append(f"{status}: {body[:300].decode(errors='replace')}")
        finally:
            writer.close()

    tasks = [asyncio.create_task(conn_loop()) for _ in range(connections)]
    await asyncio.sleep(0.05)  # connections open before the clock starts
    t0 = loop.time()
    for i, payload in enumerate(requests):
        due = t0 + (i / rate if rate else 0.0)
        if rate:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        queue.put_nowait((due, payload))
    for _ in tasks:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    return LoadResult(len(requests), statuses, latencies, t0, last_done, samples)


def run_load(
    port: int, requests: list[bytes], *, rate: float | None, connections: int, ok: int = 201
) -> LoadResult:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_load(port, requests, rate=rate, connections=connections, ok=ok))  # type: ignore[no-any-return]


# -- reading outcomes from the database --------------------------------------------------------


@dataclass
class OrderTimes:
    status: str
    created: float  # unix seconds
    delivered: float | None
    proc_created: float | None
    latency_ms: int | None


def order_times(engine: Engine, sku: str) -> list[OrderTimes]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT o.id, o.status, EXTRACT(EPOCH FROM o.created_at), "
                "EXTRACT(EPOCH FROM o.delivered_at), EXTRACT(EPOCH FROM p.created_at), "
                "p.latency_ms FROM orders o JOIN skus s ON s.id = o.sku_id "
                "LEFT JOIN procurements p ON p.order_id = o.id "
                "WHERE s.code = :sku ORDER BY o.id, p.id"
            ),
            {"sku": sku},
        ).all()
    by_id: dict[int, OrderTimes] = {}
    for oid, status, created, delivered, pcreated, lat in rows:
        by_id[oid] = OrderTimes(
            status,
            float(created),
            None if delivered is None else float(delivered),
            None if pcreated is None else float(pcreated),
            lat,
        )
    return list(by_id.values())


def status_counts(engine: Engine, sku: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT o.status, count(*) FROM orders o JOIN skus s ON s.id = o.sku_id "
                "WHERE s.code = :sku GROUP BY o.status"
            ),
            {"sku": sku},
        ).all()
    return {str(s): int(n) for s, n in rows}


def wait_delivered(engine: Engine, sku: str, expected: int | None, timeout: float) -> float:
    """Poll until `expected` (None: all) orders of the SKU are delivered; returns the monotonic
    time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        counts = status_counts(engine, sku)
        want = sum(counts.values()) if expected is None else expected
        if counts.get("delivered", 0) >= want:
            return time.monotonic()
        if time.monotonic() > deadline:
            log(f"  timed out waiting for {sku}: {counts}")
            return time.monotonic()
        time.sleep(0.1)


@dataclass
class Overhead:
    placed: int
    delivered: int
    overhead_ms: list[float]
    total_ms: list[float]
    supplier_ms: list[float]
    before_ms: list[float]  # order created -> procurement row written (claim + plan)
    after_ms: list[float]  # rest: total - before - supplier (sign, send, settle)
    delivery_rate: float


def overhead_of(rows: list[OrderTimes]) -> Overhead:
    done = [r for r in rows if r.status == "delivered" and r.delivered and r.latency_ms is not None]
    total = [(r.delivered - r.created) * 1000 for r in done]  # type: ignore[operator]
    supplier = [float(r.latency_ms) for r in done]  # type: ignore[arg-type]
    before = [((r.proc_created or r.created) - r.created) * 1000 for r in done]
    overhead = [t - s for t, s in zip(total, supplier, strict=True)]
    after = [o - b for o, b in zip(overhead, before, strict=True)]
    span = (
        max(r.delivered for r in done) - min(r.created for r in done)  # type: ignore[type-var]
        if done
        else 0.0
    )
    return Overhead(
        len(rows),
        len(done),
        overhead,
        total,
        supplier,
        before,
        after,
        len(done) / span if span else 0.0,
    )


def dist(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50):7.1f}  p90 {pct(values, 90):7.1f}  p99 {pct(values, 99):7.1f}  "
        f"max {max(values) if values else float('nan'):7.1f} ms"
    )


# -- the phases --------------------------------------------------------------------------------


@dataclass
class Rig:
    tmp: Path
    env: dict[str, str]
    engine: Engine
    server: Server
    web_port: int
    sim: Proc
    pg_pid: int | None
    creds: list[tuple[str, str]]
    quiet_wait: float = 0.0
    py_spy: str | None = None  # path of a py-spy binary: sample the workers while measured
    live: list[Proc] = field(default_factory=list)  # workers to clean up on failure
    spies: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spy(self, workers: list[Proc], tag: str) -> None:
        """Sample what every worker runs while holding the GIL (py-spy) until `unspy()`."""
        if not self.py_spy:
            return
        for i, w in enumerate(workers):
            out = self.tmp / f"pyspy-{tag}-{i}.txt"
            self.spies.append(
                subprocess.Popen(
                    [
                        *(self.py_spy, "record", "--pid", str(w.pid), "--rate", "100"),
                        *("--gil", "--nonblocking", "--threads", "--format", "raw"),
                        *("--output", str(out)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def unspy(self) -> None:
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
        self.spies.clear()

    def meter(self, workers: list[Proc]) -> CpuMeter:
        roots = {
            "web": [self.server.proc.pid],
            "workers": [w.pid for w in workers],
            "sim": [self.sim.pid],
            "postgres": [self.pg_pid] if self.pg_pid else [],
            "bench": [os.getpid()],
        }
        return CpuMeter(roots, own_only=frozenset({"bench"})).start()


def phase_a(rig: Rig, *, sku: str, rate: float, seconds: float, n_workers: int) -> dict[str, Any]:
    log(f"\n== phase A: {rate:.0f} orders/s for {seconds:.0f} s, {n_workers} worker processes ==")
    workers = start_workers(n_workers, rig.env, rig.tmp, f"a{rate:.0f}")
    rig.live.extend(workers)
    try:
        wait_workers_started(workers)
        warm = presign_orders(rig.creds, "BENCH-WARM", min(int(rate), 100), f"warm{rate:.0f}")
        run_load(rig.web_port, warm, rate=rate, connections=CONNECTIONS)
        wait_delivered(rig.engine, "BENCH-WARM", None, 120)
        count = int(rate * seconds)
        reqs = presign_orders(rig.creds, sku, count, f"a{rate:.0f}")
        wait_quiet(rig.quiet_wait)
        rig.spy(workers, f"a{rate:.0f}")
        meter = rig.meter(workers)
        load = run_load(rig.web_port, reqs, rate=rate, connections=CONNECTIONS)
        placed = load.ok(201)
        wait_delivered(rig.engine, sku, placed, timeout=max(120.0, placed / 10))
        cpu = meter.stop()
        rig.unspy()
        problems = worker_log_problems(workers)
    finally:
        rig.unspy()
        stop_all(workers)
        for w in workers:
            rig.live.remove(w)
    stats = overhead_of(order_times(rig.engine, sku))
    placed_per_s = placed / load.seconds
    log(
        f"placement: {placed}/{load.sent} answered 201 in {load.seconds:.1f} s = "
        f"{placed_per_s:.1f}/s (target {rate:.0f}/s); statuses {load.statuses}"
    )
    log(f"  client latency (from scheduled send) {dist(load.latencies_ms)}")
    for sample in load.samples:
        log(f"  sample non-201 answer: {sample}")
    log(
        f"delivered {stats.delivered}/{stats.placed} (not delivered: "
        f"{stats.placed - stats.delivered}) at {stats.delivery_rate:.1f}/s"
    )
    log(f"  total     {dist(stats.total_ms)}")
    log(f"  supplier  {dist(stats.supplier_ms)}")
    log(f"  overhead  {dist(stats.overhead_ms)}")
    fixed = [t - SIM_LATENCY_MS for t in stats.total_ms]
    log(f"  total - the simulator's fixed {SIM_LATENCY_MS} ms {dist(fixed)}")
    log(f"    created -> procurement written (notify, claim, plan) {dist(stats.before_ms)}")
    log(f"    the rest (request build, settle, delivery)           {dist(stats.after_ms)}")
    log(f"  {fmt_cpu(cpu, stats.delivered)}")
    for line in problems:
        log(f"  worker log: {line}")
    return {
        "rate": rate,
        "placed_per_s": placed_per_s,
        "stats": stats,
        "load": load,
        "cpu": cpu,
        "not_delivered": stats.placed - stats.delivered,
    }


def phase_b(rig: Rig, *, sku: str, backlog: int, n_workers: int) -> dict[str, Any]:
    log(f"\n== phase B: backlog of {backlog} orders, {n_workers} worker process(es) ==")
    reqs = presign_orders(rig.creds, sku, backlog, f"b{n_workers}")
    load = run_load(rig.web_port, reqs, rate=None, connections=CONNECTIONS)
    placed = load.ok(201)
    log(
        f"placed {placed}/{backlog} with no worker running in {load.seconds:.1f} s "
        f"({placed / load.seconds:.0f} orders/s, client p50 {pct(load.latencies_ms, 50):.0f} ms "
        f"— these include queueing in the client); statuses {load.statuses}"
    )
    for sample in load.samples:
        log(f"  sample non-201 answer: {sample}")
    hold = text(
        "UPDATE orders SET next_action_at = now() + interval '1 hour' "
        "WHERE sku_id = (SELECT id FROM skus WHERE code = :sku) AND next_action_at IS NOT NULL"
    )
    with rig.engine.begin() as conn:
        held = conn.execute(hold, {"sku": sku}).rowcount
    log(f"  status {status_counts(rig.engine, sku)}; {held} held while the workers start")
    started = time.monotonic()
    workers = start_workers(n_workers, rig.env, rig.tmp, f"b{n_workers}")
    rig.live.extend(workers)
    try:
        wait_workers_started(workers)
        startup_s = time.monotonic() - started
        time.sleep(1.0)  # first heartbeat, balance check and outbox pass out of the way
        wait_quiet(rig.quiet_wait)
        rig.spy(workers, f"b{n_workers}")
        meter = rig.meter(workers)
        released_wall = time.time()
        released = time.monotonic()
        with rig.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE orders SET next_action_at = now() WHERE sku_id = "
                    "(SELECT id FROM skus WHERE code = :sku) AND next_action_at IS NOT NULL"
                ),
                {"sku": sku},
            )
            notify_due(conn)
        seen = wait_delivered(rig.engine, sku, placed, timeout=max(120.0, placed / 10))
        cpu = meter.stop()
        rig.unspy()
        problems = worker_log_problems(workers)
    finally:
        rig.unspy()
        stop_all(workers)
        for w in workers:
            rig.live.remove(w)
    rows = order_times(rig.engine, sku)
    stats = overhead_of(rows)
    last = max((r.delivered for r in rows if r.delivered), default=released_wall)
    elapsed_db = max(last - released_wall, 1e-6)
    rate = stats.delivered / elapsed_db
    log(
        f"workers up in {startup_s:.1f} s; after release {stats.delivered}/{placed} delivered in "
        f"{elapsed_db:.2f} s (poll saw it at {seen - released:.2f} s) = {rate:.0f} orders/s"
    )
    log(f"  supplier latency {dist(stats.supplier_ms)}")
    log(f"  {fmt_cpu(cpu, stats.delivered)}")
    for line in problems:
        log(f"  worker log: {line}")
    return {"rate": rate, "delivered": stats.delivered, "placed": placed, "cpu": cpu}


def baseline_sim(sim_port: int, count: int) -> float:
    log(
        f"\n== baseline: {count} purchases straight at the simulator, "
        f"{BASELINE_CONNECTIONS} connections =="
    )
    reqs = presign_sim_purchases(count, f"base-{secrets.token_hex(3)}")
    load = run_load(sim_port, reqs, rate=None, connections=BASELINE_CONNECTIONS, ok=200)
    rate = load.ok(200) / load.seconds
    log(
        f"simulator alone: {load.ok(200)}/{count} in {load.seconds:.2f} s = {rate:.0f}/s "
        f"(ceiling {BASELINE_CONNECTIONS / (SIM_LATENCY_MS / 1000):.0f}/s); statuses "
        f"{load.statuses}"
    )
    for sample in load.samples:
        log(f"  sample non-200 answer: {sample}")
    return rate


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="200,250", help="phase A paces (orders/s); first = key")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--workers", default="1,2,4", help="phase B worker process counts")
    parser.add_argument("--phase-a-workers", type=int, default=2)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--baseline-count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=None, help="KAMENG_WORKER_CONCURRENCY")
    parser.add_argument("--batch", type=int, default=None, help="KAMENG_WORKER_BATCH")
    parser.add_argument("--pool", type=int, default=None, help="KAMENG_DB_POOL_SIZE (workers)")
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it works")
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="wait up to this for an idle machine"
    )
    parser.add_argument("--py-spy", default=None, help="py-spy binary: profile the workers")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.seconds, args.backlog, args.baseline_count = "100", 3, 300, 500
    rates = [float(r) for r in args.rate.split(",") if r]
    ns = [int(n) for n in args.workers.split(",") if n]

    from tests.support.pgcluster import PgCluster, find_pg_bindir

    bindir = find_pg_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL binaries")

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="kameng-pipeline-"))
    cluster = None
    sim: Proc | None = None
    server: Server | None = None
    rig: Rig | None = None
    engine: Engine | None = None
    failed = True
    try:
        cluster = PgCluster(bindir).start()
        cluster.create_database("kameng")
        database_url = cluster.dsn("kameng")
        sim_port, web_port = free_port(), free_port()
        sim = start_simulator(tmp, sim_port)
        sim_url = f"http://127.0.0.1:{sim_port}"
        a_skus = ["BENCH-TOPUP" if i == 0 else f"BENCH-TOPUP-R{r:.0f}" for i, r in enumerate(rates)]
        b_skus = {n: f"BENCH-TOPUP-W{n}" for n in ns}
        t0 = time.perf_counter()
        creds = seed(tmp, database_url, sim_url, ["BENCH-WARM", *a_skus, *b_skus.values()])
        log(f"seeded in {time.perf_counter() - t0:.1f}s; simulator at {sim_url}")

        wait_quiet(args.quiet_wait)
        baseline = baseline_sim(sim_port, args.baseline_count)

        env = env_for(tmp, database_url)
        env["KAMENG_PUBLIC_URL"] = f"http://127.0.0.1:{web_port}"
        env["KAMENG_DB_POOL_SIZE"] = "4"
        env["KAMENG_LOG_LEVEL"] = "WARNING"
        server = start_server(env, web_port, args.web_workers, pipeline_worker=False)
        worker_env = dict(env)
        for name, value in (
            ("KAMENG_WORKER_CONCURRENCY", args.concurrency),
            ("KAMENG_WORKER_BATCH", args.batch),
            ("KAMENG_DB_POOL_SIZE", args.pool),
        ):
            if value is not None:
                worker_env[name] = str(value)
        effective = Settings(
            **{
                k[len("KAMENG_") :].lower(): v
                for k, v in worker_env.items()
                if k.startswith("KAMENG_WORKER_") or k == "KAMENG_DB_POOL_SIZE"
            }
        )
        engine = create_engine(database_url, pool_size=2)
        rig = Rig(
            tmp,
            worker_env,
            engine,
            server,
            web_port,
            sim,
            cluster._postmaster_pid(),
            creds,
            quiet_wait=args.quiet_wait,
            py_spy=args.py_spy,
        )
        log(
            f"web: {args.web_workers} processes; workers: concurrency "
            f"{effective.worker_concurrency}, batch {effective.worker_batch}, poll "
            f"{effective.worker_poll_s} s, db pool {effective.db_pool_size} (tx threads), "
            "supplier client: aiohttp, at most "
            f"{signed_http.MAX_CONNECTIONS} connections per supplier (SignedHttp)"
        )

        a_results = [
            phase_a(rig, sku=sku, rate=rate, seconds=args.seconds, n_workers=args.phase_a_workers)
            for sku, rate in zip(a_skus, rates, strict=True)
        ]
        b_results = {n: phase_b(rig, sku=b_skus[n], backlog=args.backlog, n_workers=n) for n in ns}
        clean = books_clean(tmp, database_url)

        head = a_results[0]
        stats: Overhead = head["stats"]
        log(f"\nmachine: {machine()}")
        log("summary:")
        for res in a_results:
            s: Overhead = res["stats"]
            log(
                f"  A @ {res['rate']:.0f}/s target: placed {res['placed_per_s']:.1f}/s, delivered "
                f"{s.delivery_rate:.1f}/s, not delivered {res['not_delivered']}; overhead p50 "
                f"{pct(s.overhead_ms, 50):.1f} p99 {pct(s.overhead_ms, 99):.1f} ms (total - "
                f"{SIM_LATENCY_MS} ms: p50 {pct(s.total_ms, 50) - SIM_LATENCY_MS:.1f} p99 "
                f"{pct(s.total_ms, 99) - SIM_LATENCY_MS:.1f}); total p50 "
                f"{pct(s.total_ms, 50):.1f} p99 {pct(s.total_ms, 99):.1f} ms; machine busy "
                f"{res['cpu']['machine_busy'] * 100:.0f}%"
            )
        for n, res in b_results.items():
            log(
                f"  B with {n} worker(s): {res['rate']:.0f} orders/s "
                f"({res['rate'] / baseline:.2f} of the simulator alone, {baseline:.0f}/s); "
                f"machine busy {res['cpu']['machine_busy'] * 100:.0f}%"
            )
        log(f"  books clean: {clean}")
        w = {n: res["rate"] for n, res in b_results.items()}
        print(
            f"overhead_p50_ms={pct(stats.overhead_ms, 50):.1f} "
            f"overhead_p99_ms={pct(stats.overhead_ms, 99):.1f} "
            f"total_p50_ms={pct(stats.total_ms, 50):.1f} "
            f"total_p99_ms={pct(stats.total_ms, 99):.1f} "
            f"placed_per_s={head['placed_per_s']:.1f} "
            f"orders_per_s_w1={w.get(1, float('nan')):.0f} "
            f"orders_per_s_w2={w.get(2, float('nan')):.0f} "
            f"orders_per_s_w4={w.get(4, float('nan')):.0f} "
            f"baseline_sim_per_s={baseline:.0f}",
            flush=True,
        )
        failed = False
    finally:
        if rig is not None:
            stop_all(rig.live)
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop(timeout=10)
        if engine is not None:
            engine.dispose()
        if cluster is not None:
            cluster.stop()
        if args.keep or failed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

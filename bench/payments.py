"""The payment link: gateway notifies, dropped-notify recovery, and storefront checkout.

Everything runs as real processes on this machine: `kameng serve --workers 2 --worker` (web +
the embedded pipeline worker, as installed), the bundled EPay gateway simulator
(`kameng gateway-sim`), optionally a throwaway PostgreSQL cluster, and the load client in this
process: a small raw asyncio HTTP/1.1 client with keep-alive connections (httpx spends more CPU
than the servers at this concurrency), the same client for every figure and its baseline.

1. Notifies — N pending gateway orders for a card-key SKU are created through the services
   (`checkout.place_pending` + `payments.open_payment`, 200 per transaction) before the server
   starts; then their notifies, signed with `epay.signed` and the gateway row's pid and key,
   are fired at `GET /pay/notify/{gateway}` by C connections, closed loop. Each one answered
   `success` is a payment credited + a key claimed + the order delivered in one transaction.
   Reported: notifies applied per second, p50/p99 of the notify request (send -> full answer).
   Afterwards every order must be `delivered`, every payment `paid`, and the books clean
   (`kameng.ledger.verify.verify`). Baselines with the same client and C: `GET /healthz`
   (HTTP stack + one DB read), and signed Reseller API orders (`POST /api/v1/orders`, paid from
   a balance, 1 key from stock: the same ledger + claim + delivery work without a gateway).
2. Recovery — a second server with `KAMENG_PAYMENT_FIRST_CHECK_S=1`; M orders arrive open loop
   at `--recovery-rate` per second, each one as a buyer would: created, submitted to the
   simulator (`submit.php`, the pay page's signed form), paid (`POST /_sim/trades/{no}/pay`).
   Measured per order: the order's `delivered_at` (server clock, from the database) minus the
   moment the pay request was sent. With the simulator in `drop` mode only the worker's active
   query can deliver (each payment's `reason` is checked: `confirmed_by_query`); the baseline
   is the same run in `normal` mode (the notify delivers). Orders are paid right after they are
   created, so the first query (1 s after creation) finds them paid: this is the best case of
   the query path. The worker looks for due payments once a second, at most 20 per round.
3. Storefront checkout — C guest browsers, each with its own cookie jar: one `GET /buy/{sku}`
   each for the cookie and CSRF token (not timed), then `POST /buy/{sku}` (pay at the gateway)
   closed loop, cookies updated from every answer like a browser; each `303 /pay/{no}` is one
   pending order + payment. The form carries `confirm_duplicate=1` (a guest buying the same
   SKU again within 10 minutes is otherwise asked to confirm). Baseline: `GET /`, same client.

Every measured run first waits (up to `--quiet-wait` s) for an idle machine and prints the CPU
used per process group (web, gateway, postgres, this script, `other`); `--py-spy PATH` also
samples the web processes (threads holding the GIL) and prints where they spent it. The run
fails (exit 1, temp dir kept) unless every paid order was delivered and the books are clean.

Prints one `key=value` line at the end (the skipped phases' keys left out):
  db=… workers=… c=… n=… notifies_per_s=… notify_p50_ms=… notify_p99_ms=… healthz_rps=…
  ratio_notify_healthz=… api_orders_per_s=… ratio_notify_api=… client_cpu=… m=…
  recovery_p50_ms=… recovery_p99_ms=… notify_path_p50_ms=… notify_path_p99_ms=… ratio_recovery=…
  checkouts_per_s=… checkout_p50_ms=… checkout_p99_ms=… home_rps=… ratio_checkout_home=…
  delivered_ok=… books_clean=…
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from _common import MASTER_KEY_B64, ROOT, machine

sys.path.insert(0, str(ROOT / "src"))

from pipeline import CpuMeter, free_port, wait_quiet  # the sibling bench's helpers
from sqlalchemy import func, select
from tests.support.factories import add_product

from kameng.config import Settings
from kameng.container import Container
from kameng.db import table
from kameng.ledger import service as ledger
from kameng.ledger.verify import verify
from kameng.migrate import upgrade
from kameng.orders import checkout
from kameng.orders import service as orders
from kameng.orders.models import Order
from kameng.payments import service as payments
from kameng.payments.models import Payment, PaymentNotify, PaymentPurpose
from kameng.payments.registry import build_gateway
from kameng.resellers import service as resellers
from kameng.security import epay
from kameng.security.signing import sign_request

KAMENG = str(Path(sys.executable).with_name("kameng"))
GATEWAY = "bench-epay"
PID, KEY = "1001", "bench-epay-key"  # throwaway simulator merchant
PAY = f"{GATEWAY}:alipay"
PRICE_CENTS = 1000
COST_CENTS = 900
RESELLERS = 4
SKU_NOTIFY, SKU_WARM, SKU_API = "PAY-NOTIFY", "PAY-WARM", "PAY-API"
SKU_DROP, SKU_NORMAL, SKU_SHOP = "PAY-RECOVER-DROP", "PAY-RECOVER-NORMAL", "PAY-SHOP"
ANSWER_TIMEOUT_S = 30.0

_order = table(Order)
_pay = table(Payment)
_notify = table(PaymentNotify)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def dist(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50):.1f}  p90 {pct(values, 90):.1f}  p99 {pct(values, 99):.1f}  "
        f"max {max(values) if values else float('nan'):.1f} ms"
    )


# -- settings, seeding, pending orders ---------------------------------------------------------


def settings_for(data_dir: Path, database_url: str | None, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        master_key=MASTER_KEY_B64,
        app_secret="bench-app-secret",
        **overrides,
    )


def server_env(data_dir: Path, database_url: str | None, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in [k for k in env if k.startswith("KAMENG_")]:
        env.pop(name)  # only what this run sets
    env.update(
        KAMENG_DATA_DIR=str(data_dir),
        KAMENG_MASTER_KEY=MASTER_KEY_B64,
        KAMENG_APP_SECRET="bench-app-secret",
        KAMENG_PUBLIC_URL=f"http://127.0.0.1:{port}",
        KAMENG_DB_POOL_SIZE="4",
        KAMENG_LOG_LEVEL="WARNING",
        # Every simulated buyer comes from 127.0.0.1: lift the per-IP checkout limit.
        KAMENG_CHECKOUTS_PER_MINUTE="10000000",
        **extra,
    )
    if database_url:
        env["KAMENG_DATABASE_URL"] = database_url
    return env


def seed(
    data_dir: Path, database_url: str | None, sim_url: str, stock: dict[str, int]
) -> list[tuple[str, str]]:
    settings = settings_for(data_dir, database_url)
    upgrade(settings.resolved_database_url)
    container = Container.build(settings)
    container.bootstrap()
    for code, keys in stock.items():
        add_product(container, sku=code, price_cents=PRICE_CENTS, cost_cents=COST_CENTS, stock=keys)
    with container.db.connect() as conn:
        payments.add_gateway(
            conn,
            vault=container.vault,
            code=GATEWAY,
            name="bench gateway (simulator)",
            base_url=sim_url,
            merchant_id=PID,
            key=KEY,
            pay_types="alipay,wxpay",
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
                amount=10**11,
                now=container.clock(),
                actor="staff:bench",
            )
        creds.append((issued.api_key, issued.api_secret))
    container.close()
    return creds


@dataclass(frozen=True)
class Pending:
    order_no: str
    amount_cents: int


def create_pending(
    container: Container, sku_code: str, count: int, batch: int = 200
) -> list[Pending]:
    """Guest orders waiting for a gateway payment, as `POST /buy` writes them (order + payment
    in one transaction), `batch` per transaction."""
    sku = container.sku(sku_code)
    cmd = orders.PlaceOrder(
        sku=sku,
        unit_price_cents=sku.price_cents,
        quantity=1,
        fields={},
        confirm_duplicate=True,
        channel="storefront",
    )
    out: list[Pending] = []
    for start in range(0, count, batch):
        with container.db.connect() as conn:
            gateway = payments.get_gateway(conn, code=GATEWAY)
            for _ in range(min(batch, count - start)):
                now = container.clock()
                placed = checkout.place_pending(
                    conn,
                    buyer=orders.Buyer(None, 0, "guest", guest_key=secrets.token_urlsafe(18)),
                    cmd=cmd,
                    vault=container.vault,
                    policy=container.policy,
                    now=now,
                    pay_window_s=container.settings.payment_window_s,
                )
                payments.open_payment(
                    conn,
                    gateway=gateway,
                    purpose=PaymentPurpose.order,
                    pay_type="alipay",
                    amount_cents=placed.amount_cents,
                    currency=sku.currency,
                    expires_at=placed.sla_deadline or now,
                    now=now,
                    checks=container.payment_checks,
                    order_id=placed.order_id,
                    order_no=placed.order_no,
                )
                out.append(Pending(placed.order_no, placed.amount_cents))
    return out


def gateway_key(container: Container) -> tuple[str, str]:
    """The pid and key of the gateway row, as the gateway itself holds them."""
    with container.db.connect(write=False) as conn:
        row = payments.get_gateway(conn, code=GATEWAY)
    key = container.vault.unseal(bytes(row.sealed_key), payments.key_context(GATEWAY))
    return row.merchant_id, key


# -- raw requests ----------------------------------------------------------------------------


def notify_requests(pending: list[Pending], pid: str, key: str) -> list[bytes]:
    """The gateway's notify for each order: GET with the signed parameters in the query."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    out = []
    for i, p in enumerate(pending):
        params = epay.signed(
            {
                "pid": pid,
                "trade_no": f"{stamp}{i:06d}",
                "out_trade_no": p.order_no,
                "type": "alipay",
                "name": f"{SKU_NOTIFY} {p.order_no}",
                "money": epay.format_money(p.amount_cents),
                "trade_status": "TRADE_SUCCESS",
            },
            key,
        )
        out.append(
            f"GET /pay/notify/{GATEWAY}?{urlencode(params)} HTTP/1.1\r\nHost: bench\r\n"
            "User-Agent: bench-gateway\r\nAccept: */*\r\n\r\n".encode()
        )
    return out


def get_request(path: str, cookies: dict[str, str] | None = None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/html\r\n"
    if cookies:
        head += "Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()) + "\r\n"
    return (head + "\r\n").encode()


def api_order_requests(creds: list[tuple[str, str]], count: int) -> list[bytes]:
    ts = str(int(time.time()))
    out = []
    for i in range(count):
        api_key, secret = creds[i % len(creds)]
        body = json.dumps(
            {"sku": SKU_API, "quantity": 1, "customer_ref": f"api-{i}"}, separators=(",", ":")
        ).encode()
        nonce = secrets.token_hex(8)
        sig = sign_request(secret, "POST", "/api/v1/orders", ts, nonce, body)
        head = (
            "POST /api/v1/orders HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"X-Api-Key: {api_key}\r\nX-Timestamp: {ts}\r\nX-Nonce: {nonce}\r\n"
            f"X-Signature: {sig}\r\nIdempotency-Key: {uuid.uuid4()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


# -- the load client (raw asyncio, keep-alive HTTP/1.1, closed loop) --------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Feed:
    """What one connection sends: `next()` is the next request (None: done); `seen()` gets
    the answer (a browser updates its cookies there)."""

    def next(self) -> bytes | None:
        raise NotImplementedError

    def seen(self, answer: Answer) -> None:
        pass


class Shared(Feed):
    """Connections take turns on one list of prebuilt requests."""

    def __init__(self, requests: list[bytes]) -> None:
        self._items = requests
        self._i = 0
        self._lock = threading.Lock()

    def next(self) -> bytes | None:
        with self._lock:
            if self._i >= len(self._items):
                return None
            self._i += 1
            return self._items[self._i - 1]


class Budget:
    """A shared count of requests left."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass
class Guest(Feed):
    """A guest browser: its own cookie jar and CSRF token."""

    budget: Budget
    make: Callable[[Guest], bytes]
    cookies: dict[str, str] = field(default_factory=dict)
    csrf: str = ""

    def next(self) -> bytes | None:
        return self.make(self) if self.budget.take() else None

    def seen(self, answer: Answer) -> None:
        for name, value in answer.headers:
            if name == "set-cookie":
                pair = value.split(";", 1)[0]
                k, _, v = pair.partition("=")
                if "max-age=0" in value.lower() or not v.strip('"'):
                    self.cookies.pop(k.strip(), None)
                else:
                    self.cookies[k.strip()] = v
        if not self.csrf:
            m = re.search(rb'name="csrf_token" value="([^"]+)"', answer.body)
            if m:
                self.csrf = m.group(1).decode()


@dataclass
class LoadResult:
    statuses: Counter[int]
    bodies: Counter[bytes]  # the first 16 bytes of each answer's body
    latencies_ms: list[float]
    seconds: float
    client_cpu: float  # fraction of the machine's CPU used by this process meanwhile
    samples: list[str]

    def count(self, status: int, body_prefix: bytes | None = None) -> int:
        if body_prefix is None:
            return self.statuses.get(status, 0)
        return sum(n for b, n in self.bodies.items() if b.startswith(body_prefix))

    def rate(self, ok: int) -> float:
        return ok / self.seconds

    def line(self, what: str, ok: int) -> str:
        return (
            f"{what}: {ok} ok in {self.seconds:.2f} s = {self.rate(ok):.0f}/s; latency "
            f"{dist(self.latencies_ms)}; statuses {dict(self.statuses)}; client CPU "
            f"{self.client_cpu * 100:.0f}% of the machine"
        )


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    length, chunked = 0, False
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers.append((name, value))
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return Answer(status, headers, await reader.readexactly(length))
    body = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return Answer(status, headers, body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _drive(port: int, feeds: list[Feed], ok: Callable[[Answer], bool]) -> LoadResult:
    statuses: Counter[int] = Counter()
    bodies: Counter[bytes] = Counter()
    latencies: list[float] = []
    samples: list[str] = []
    last_done = 0.0

    async def conn_loop(feed: Feed) -> None:
        nonlocal last_done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (payload := feed.next()) is not None:
                sent = time.perf_counter()
                try:
                    writer.write(payload)
                    answer = await asyncio.wait_for(_read_answer(reader), ANSWER_TIMEOUT_S)
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                    answer = Answer(0, [], repr(exc).encode())
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                done = time.perf_counter()
                last_done = max(last_done, done)
                latencies.append((done - sent) * 1000)
                statuses[answer.status] += 1
                bodies[answer.body[:16]] += 1
                feed.seen(answer)
                if not ok(answer) and len(samples) < 3:
                    samples.append(f"{answer.status}: {answer.body[:300].decode(errors='replace')}")
        finally:
            writer.close()

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(conn_loop(f) for f in feeds))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = max(last_done - t0, 1e-9)
    cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall / (os.cpu_count() or 1)
    return LoadResult(statuses, bodies, latencies, wall, cpu, samples)


def run_load(port: int, feeds: list[Feed], ok: Callable[[Answer], bool]) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(_drive(port, feeds, ok))
    except ImportError:
        return asyncio.run(_drive(port, feeds, ok))


def shared(requests: list[bytes], connections: int) -> list[Feed]:
    feed = Shared(requests)
    return [feed] * connections


def status_is(code: int) -> Callable[[Answer], bool]:
    return lambda a: a.status == code


def body_is(text: bytes) -> Callable[[Answer], bool]:
    return lambda a: a.status == 200 and a.body.strip() == text


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def children(self) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rfind(")") + 2 :].split()[1]) == self.pid:
                    out.append(int(entry))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def problems(self, limit: int = 8) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        found = [
            line[:300]
            for line in lines
            if any(w in line for w in ("ERROR", "WARNING", "Traceback", "rror:"))
        ]
        return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


def _start(cmd: list[str], env: dict[str, str], log_path: Path, url: str, probe: str) -> Proc:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    p = Proc(proc, log_path, url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[1]} exited:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + probe, timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    p.stop()
    raise RuntimeError(f"{cmd[1]} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


def start_gateway(tmp: Path, port: int) -> Proc:
    return _start(
        [
            KAMENG,
            "gateway-sim",
            "--port",
            str(port),
            "--merchant",
            f"{PID}:{KEY}",
            "--notify-retry",
            "0,1,2,5",
        ],
        dict(os.environ),
        tmp / "gateway.log",
        f"http://127.0.0.1:{port}",
        "/_sim/state",
    )


def start_server(env: dict[str, str], port: int, workers: int, tmp: Path, tag: str) -> Proc:
    """`kameng serve` (web + embedded worker), its log in a file (a pipe nobody reads would
    stall it once full)."""
    cmd = [KAMENG, "serve", "--port", str(port), "--workers", str(workers), "--worker"]
    server = _start(cmd, env, tmp / f"server-{tag}.log", f"http://127.0.0.1:{port}", "/healthz")
    deadline = time.monotonic() + 30
    while len(server.children()) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5 * workers)  # let every process finish starting
    return server


# -- reading outcomes ------------------------------------------------------------------------


def order_rows(container: Container, sku_code: str) -> list[Any]:
    sku_id = container.sku(sku_code).id
    with container.db.connect(write=False) as conn:
        return list(
            conn.execute(
                select(
                    _order.c.order_no,
                    _order.c.status,
                    _order.c.delivered_at,
                    _pay.c.state,
                    _pay.c.reason,
                )
                .select_from(_order.outerjoin(_pay, _pay.c.order_id == _order.c.id))
                .where(_order.c.sku_id == sku_id)
            )
        )


def statuses_of(container: Container, sku_code: str) -> dict[str, int]:
    return dict(Counter(r.status for r in order_rows(container, sku_code)))


def wait_delivered(container: Container, sku_code: str, expected: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if statuses_of(container, sku_code).get("delivered", 0) >= expected:
            return True
        time.sleep(0.1)
    log(f"  timed out waiting for {sku_code}: {statuses_of(container, sku_code)}")
    return False


def notify_outcomes(container: Container, order_nos: set[str]) -> Counter[str]:
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            select(_notify.c.payment_no, _notify.c.channel, _notify.c.outcome)
        ).all()
    return Counter(f"{ch}:{oc}" for no, ch, oc in rows if no in order_nos)


def epoch(value: datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# -- py-spy -----------------------------------------------------------------------------------


# Leaves that are waiting, not working (py-spy's own idle detection misses some of them).
IDLE_LEAVES = ("select ", "epoll_wait", "Runner.run ", "Condition.wait ", "WorkerThread.run ")


class Spy:
    """Samples processes with py-spy (raw collapsed stacks, threads holding the GIL) until
    `stop()`, then prints where they spent it."""

    def __init__(self, binary: str | None, tmp: Path) -> None:
        self.binary, self.tmp = binary, tmp
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, pids: list[int], tag: str) -> None:
        if not self.binary:
            return
        for pid in pids:
            out = self.tmp / f"pyspy-{tag}-{pid}.txt"
            proc = subprocess.Popen(
                [
                    self.binary,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--gil",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append((proc, out))

    def stop(self, top: int = 20) -> None:
        if not self.procs:
            return
        for proc, _ in self.procs:
            proc.send_signal(signal.SIGINT)
        inclusive: Counter[str] = Counter()
        leaf: Counter[str] = Counter()
        total = 0
        for proc, out in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if not out.exists():
                continue
            for line in out.read_text(errors="replace").splitlines():
                stack, _, n = line.rpartition(" ")
                if not n.isdigit():
                    continue
                frames = [_short(f) for f in stack.split(";")]
                if frames[-1].startswith(IDLE_LEAVES):
                    continue
                count = int(n)
                total += count
                for name in set(frames):
                    inclusive[name] += count
                leaf[frames[-1]] += count
        self.procs.clear()
        if not total:
            return
        log(f"  py-spy: {total} busy samples (web processes); top inclusive frames of ours:")
        ours = [(k, v) for k, v in inclusive.items() if "(kameng/" in k]
        for name, hits in sorted(ours, key=lambda kv: -kv[1])[:top]:
            log(f"    {hits / total * 100:5.1f}%  {name}")
        log("  top self frames:")
        for name, hits in leaf.most_common(12):
            log(f"    {hits / total * 100:5.1f}%  {name}")


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    name, path = m.groups()
    if path.startswith("kameng/") or "/kameng/" in path:
        return f"{name} (kameng/{path.split('kameng/', 1)[1]})"
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


# -- the phases ------------------------------------------------------------------------------


@dataclass
class Rig:
    tmp: Path
    database_url: str | None
    container: Container  # this process's own view of the database
    gateway: Proc
    connections: int
    quiet_wait: float
    pg_pid: int | None = None
    spy: Spy | None = None

    def meter(self, server: Proc) -> CpuMeter:
        roots = {
            "web": [server.pid],
            "gateway": [self.gateway.pid],
            "postgres": [self.pg_pid] if self.pg_pid else [],
            "bench": [os.getpid()],
        }
        return CpuMeter(roots, own_only=frozenset({"bench"})).start()

    def measure(
        self, server: Proc, tag: str, feeds: list[Feed], ok: Callable[[Answer], bool]
    ) -> tuple[LoadResult, dict[str, float]]:
        """One measured load: after waiting for a quiet machine, with CPU metered per process
        group and (with --py-spy) the web processes sampled."""
        wait_quiet(self.quiet_wait)
        meter = self.meter(server)
        if self.spy:
            self.spy.start(server.children(), tag)
        result = run_load(server.port, feeds, ok)
        cpu = meter.stop()  # before py-spy exits: its CPU would count as this process's
        if self.spy:
            self.spy.stop()
        return result, cpu


def fmt_cpu(used: dict[str, float], n: int) -> str:
    labels = [k for k in used if k not in ("machine_busy", "_wall")]
    cores = " ".join(f"{k}={used[k]:.2f}" for k in labels)
    per = " ".join(
        f"{k}={used[k] * used['_wall'] * 1000 / max(n, 1):.2f}" for k in labels if k != "other"
    )
    return (
        f"cores used: {cores} (machine busy {used['machine_busy'] * 100:.0f}%); "
        f"CPU ms per request: {per}"
    )


def sim_post(rig: Rig, path: str, body: dict[str, Any]) -> httpx.Response:
    reply = httpx.post(rig.gateway.url + path, json=body, timeout=10)
    reply.raise_for_status()
    return reply


def phase_recovery(
    rig: Rig, server: Proc, *, mode: str, sku: str, m: int, rate: float
) -> dict[str, Any]:
    """M orders created, submitted and paid one after another at `rate`/s; the time from the
    pay request to `delivered_at`."""
    log(f"\n== recovery, simulator notify mode `{mode}`: {m} orders at {rate:.0f}/s ==")
    sim_post(rig, "/_sim/config", {"notify": mode})
    container = Container.build(settings_for(rig.tmp, rig.database_url, payment_first_check_s=1))
    with container.db.connect(write=False) as conn:
        adapter = build_gateway(payments.get_gateway(conn, code=GATEWAY), container.vault)
    notify_url = f"{server.url}/pay/notify/{GATEWAY}"
    local = threading.local()
    paid_at: dict[str, float] = {}
    errors: list[str] = []

    def client() -> httpx.Client:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=10)
        return local.http  # type: ignore[no-any-return]

    def buyer(i: int) -> None:
        try:
            (p,) = create_pending(container, sku, 1)
            form = adapter.checkout(
                payment_no=p.order_no,
                amount_cents=p.amount_cents,
                subject=f"{sku} {p.order_no}",
                pay_type="alipay",
                notify_url=notify_url,
                return_url=f"{server.url}/pay/return/{GATEWAY}",
                currency="CNY",
            )
            cashier = client().post(form.url, data=form.fields)
            if cashier.status_code != 200:
                raise RuntimeError(f"submit {cashier.status_code}: {cashier.text[:200]}")
            t = time.time()
            reply = client().post(f"{rig.gateway.url}/_sim/trades/{quote(p.order_no)}/pay", json={})
            if reply.status_code != 200:
                raise RuntimeError(f"pay {reply.status_code}: {reply.text[:200]}")
            paid_at[p.order_no] = t
        except Exception as exc:  # reported below; the run goes on
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    wait_quiet(rig.quiet_wait)
    meter = rig.meter(server)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(m):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(buyer, i)
    wait_delivered(rig.container, sku, len(paid_at), timeout=60 + m / 5)
    cpu = meter.stop()
    container.close()
    rows = {r.order_no: r for r in order_rows(rig.container, sku)}
    lat = [
        (epoch(rows[no].delivered_at) - t) * 1000
        for no, t in paid_at.items()
        if rows[no].delivered_at is not None
    ]
    reasons = Counter(rows[no].reason for no in paid_at)
    log(
        f"paid {len(paid_at)}/{m}; delivered {len(lat)}; confirmed by {dict(reasons)}; "
        f"pay -> delivered {dist(lat)}"
    )
    log(f"  {fmt_cpu(cpu, m)}")
    for e in errors[:3]:
        log(f"  buyer error: {e}")
    return {"lat": lat, "reasons": reasons, "paid": len(paid_at), "errors": len(errors)}


def phase_notifies(
    rig: Rig,
    server: Proc,
    *,
    warm: list[Pending],
    timed: list[Pending],
    creds: list[tuple[str, str]],
    api_count: int,
    healthz_count: int,
) -> dict[str, Any]:
    c = rig.connections
    pid, key = gateway_key(rig.container)
    log(f"\n== notifies: {len(timed)} signed notifies, {c} connections ==")
    warm_reqs, reqs = notify_requests(warm, pid, key), notify_requests(timed, pid, key)
    run_load(server.port, shared(warm_reqs, c), body_is(b"success"))
    run_load(server.port, shared([get_request("/healthz")] * 500, c), status_is(200))
    notify, cpu = rig.measure(server, "notify", shared(reqs, c), body_is(b"success"))
    applied = notify.count(200, b"success")
    log(notify.line("notifies answered `success`", applied))
    log(f"  {fmt_cpu(cpu, len(reqs))}")
    for s in notify.samples:
        log(f"  sample non-success answer: {s}")

    log(f"\n== baseline: GET /healthz, {healthz_count} requests, {c} connections ==")
    health, health_cpu = rig.measure(
        server, "healthz", shared([get_request("/healthz")] * healthz_count, c), status_is(200)
    )
    log(health.line("GET /healthz", health.count(200)))
    log(f"  {fmt_cpu(health_cpu, healthz_count)}")

    log(f"\n== baseline: {api_count} signed POST /api/v1/orders (balance), {c} connections ==")
    api_reqs = api_order_requests(creds, api_count)
    api, api_cpu = rig.measure(server, "api", shared(api_reqs, c), status_is(201))
    log(api.line("reseller orders (201)", api.count(201)))
    log(f"  {fmt_cpu(api_cpu, api_count)}")
    for s in api.samples:
        log(f"  sample non-201 answer: {s}")
    return {"notify": notify, "applied": applied, "health": health, "api": api, "cpu": cpu}


def phase_checkout(rig: Rig, server: Proc, *, count: int) -> dict[str, Any]:
    c = rig.connections
    log(f"\n== storefront checkout: {count} guest POST /buy/{SKU_SHOP}, {c} browsers ==")
    port = server.port

    def form(g: Guest) -> bytes:
        return get_request(f"/buy/{SKU_SHOP}", g.cookies)

    def buy(g: Guest) -> bytes:
        body = urlencode(
            {"csrf_token": g.csrf, "quantity": "1", "pay": PAY, "confirm_duplicate": "1"}
        ).encode()
        head = (
            f"POST /buy/{SKU_SHOP} HTTP/1.1\r\nHost: bench\r\nAccept: text/html\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Cookie: {'; '.join(f'{k}={v}' for k, v in g.cookies.items())}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def home(g: Guest) -> bytes:
        return get_request("/", g.cookies)

    guests = [Guest(Budget(1), form) for _ in range(c)]
    opened = run_load(port, list(guests), status_is(200))  # one form page each, not timed
    missing = sum(1 for g in guests if not g.csrf)
    if missing:
        raise RuntimeError(f"{missing} browsers got no CSRF token: {opened.samples}")
    # warm-up: a few orders each, then the measured run with the same browsers
    warm = Budget(min(200, count))
    for g in guests:
        g.budget, g.make = warm, buy
    run_load(port, list(guests), status_is(303))
    budget = Budget(count)
    for g in guests:
        g.budget = budget
    placed, cpu = rig.measure(server, "checkout", list(guests), status_is(303))
    ok = placed.count(303)
    log(placed.line("checkouts (303 to /pay/…)", ok))
    log(f"  {fmt_cpu(cpu, count)}")
    for s in placed.samples:
        log(f"  sample non-303 answer: {s}")

    log(f"\n== baseline: GET / ({count} requests, the same {c} browsers) ==")
    budget = Budget(count)
    for g in guests:
        g.budget, g.make = budget, home
    front, front_cpu = rig.measure(server, "home", list(guests), status_is(200))
    log(front.line("GET /", front.count(200)))
    log(f"  {fmt_cpu(front_cpu, count)}")
    return {"placed": placed, "ok": ok, "front": front, "cpu": cpu}


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=2, help="web processes")
    parser.add_argument("--notifies", "-n", type=int, default=2000, help="N: notifies timed")
    parser.add_argument("--connections", "-c", type=int, default=16, help="C: clients")
    parser.add_argument("--recovery", "-m", type=int, default=100, help="M: orders per mode")
    parser.add_argument("--recovery-rate", type=float, default=10.0, help="orders/s paid")
    parser.add_argument("--checkouts", type=int, default=2000)
    parser.add_argument("--api-orders", type=int, default=2000)
    parser.add_argument("--healthz", type=int, default=5000)
    parser.add_argument("--skip", default="", help="phases to skip: notify,recovery,checkout")
    parser.add_argument("--quiet-wait", type=float, default=20, help="wait for an idle machine")
    parser.add_argument(
        "--py-spy",
        default=None,
        help="py-spy binary: profile the web processes in every measured run",
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    n, m, c = args.notifies, args.recovery, args.connections
    warm_n = min(200, n)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="kameng-payments-"))
    cluster = None
    database_url = None
    gateway = server = None
    container = None
    failed = True
    results: dict[str, Any] = {}
    try:
        if args.db == "postgresql":
            from tests.support.pgcluster import PgCluster, find_pg_bindir

            bindir = find_pg_bindir()
            if bindir is None:
                sys.exit("no PostgreSQL binaries")
            cluster = PgCluster(bindir).start()
            cluster.create_database("kameng")
            database_url = cluster.dsn("kameng")
        gateway = start_gateway(tmp, free_port())
        t0 = time.perf_counter()
        creds = seed(
            tmp,
            database_url,
            gateway.url,
            {
                SKU_NOTIFY: n,
                SKU_WARM: warm_n,
                SKU_API: args.api_orders + 50,
                SKU_DROP: m,
                SKU_NORMAL: m,
                SKU_SHOP: 10,
            },
        )
        log(f"seeded in {time.perf_counter() - t0:.1f} s; gateway simulator at {gateway.url}")
        container = Container.build(settings_for(tmp, database_url))
        rig = Rig(
            tmp,
            database_url,
            container,
            gateway,
            c,
            args.quiet_wait,
            pg_pid=cluster._postmaster_pid() if cluster else None,
            spy=Spy(args.py_spy, tmp) if args.py_spy else None,
        )

        if "recovery" not in skip:
            port = args.port or free_port()
            env = server_env(tmp, database_url, port, KAMENG_PAYMENT_FIRST_CHECK_S="1")
            server = start_server(env, port, args.workers, tmp, "recovery")
            base = phase_recovery(
                rig, server, mode="normal", sku=SKU_NORMAL, m=m, rate=args.recovery_rate
            )
            drop = phase_recovery(
                rig, server, mode="drop", sku=SKU_DROP, m=m, rate=args.recovery_rate
            )
            sim_post(rig, "/_sim/config", {"notify": "normal"})
            for line in server.problems():
                log(f"  server log: {line}")
            server.stop()
            server = None
            results.update(base=base, drop=drop)

        if not {"notify", "checkout"} <= skip:
            warm = timed = []
            if "notify" not in skip:
                t0 = time.perf_counter()
                warm = create_pending(container, SKU_WARM, warm_n)
                timed = create_pending(container, SKU_NOTIFY, n)
                log(
                    f"\n{n + warm_n} pending gateway orders created through the services in "
                    f"{time.perf_counter() - t0:.1f} s"
                )
            port = args.port or free_port()
            server = start_server(server_env(tmp, database_url, port), port, args.workers, tmp, "a")
            if "notify" not in skip:
                results["notify"] = phase_notifies(
                    rig,
                    server,
                    warm=warm,
                    timed=timed,
                    creds=creds,
                    api_count=args.api_orders,
                    healthz_count=args.healthz,
                )
                results["timed"] = timed
            if "checkout" not in skip:
                results["checkout"] = phase_checkout(rig, server, count=args.checkouts)
            for line in server.problems():
                log(f"  server log: {line}")
            server.stop()
            server = None

        # -- checks: every paid order delivered, the books clean ------------------------------
        log("\n== checks ==")
        delivered_ok = True
        if "timed" in results:
            nos = {p.order_no for p in results["timed"]}
            rows = [r for r in order_rows(container, SKU_NOTIFY) if r.order_no in nos]
            by_status = Counter(r.status for r in rows)
            by_state = Counter(r.state for r in rows)
            outcomes = notify_outcomes(container, nos)
            log(
                f"notified orders: {dict(by_status)}; payments {dict(by_state)}; "
                f"statements {dict(outcomes)}"
            )
            delivered_ok &= by_status["delivered"] == n and by_state["paid"] == n
        for key, sku in (("base", SKU_NORMAL), ("drop", SKU_DROP)):
            if key in results:
                st = statuses_of(container, sku)
                log(f"recovery {key}: {st}")
                delivered_ok &= st.get("delivered", 0) == m
        if "drop" in results:
            delivered_ok &= results["drop"]["reasons"].get("confirmed_by_query", 0) == m
        with container.db.connect(write=False) as conn:
            report = verify(conn)
            unpaid = conn.execute(
                select(func.count()).select_from(_pay).where(_pay.c.state == "pending")
            ).scalar_one()
        if not report.ok:
            log(f"ledger violations: { {k: v for k, v in report.violations.items() if v} }")
        log(f"books clean: {report.ok}; pending payments left (checkout phase): {unpaid}")
        log(f"machine: {machine()}")

        # -- the summary line -----------------------------------------------------------------
        out = [f"db={args.db}", f"workers={args.workers}", f"c={c}"]
        nan = float("nan")
        if "notify" in results:
            r = results["notify"]
            rate = r["notify"].rate(r["applied"])
            hz = r["health"].rate(r["health"].count(200))
            api = r["api"].rate(r["api"].count(201))
            out += [
                f"n={n}",
                f"notifies_per_s={rate:.0f}",
                f"notify_p50_ms={pct(r['notify'].latencies_ms, 50):.1f}",
                f"notify_p99_ms={pct(r['notify'].latencies_ms, 99):.1f}",
                f"healthz_rps={hz:.0f}",
                f"ratio_notify_healthz={rate / hz if hz else nan:.3f}",
                f"api_orders_per_s={api:.0f}",
                f"ratio_notify_api={rate / api if api else nan:.2f}",
                f"client_cpu={r['notify'].client_cpu * 100:.0f}%",
            ]
        if "drop" in results:
            d, b = results["drop"]["lat"], results["base"]["lat"]
            out += [
                f"m={m}",
                f"recovery_p50_ms={pct(d, 50):.0f}",
                f"recovery_p99_ms={pct(d, 99):.0f}",
                f"notify_path_p50_ms={pct(b, 50):.1f}",
                f"notify_path_p99_ms={pct(b, 99):.1f}",
                f"ratio_recovery={pct(d, 50) / pct(b, 50):.0f}",
            ]
        if "checkout" in results:
            r = results["checkout"]
            rate = r["placed"].rate(r["ok"])
            home = r["front"].rate(r["front"].count(200))
            out += [
                f"checkouts_per_s={rate:.0f}",
                f"checkout_p50_ms={pct(r['placed'].latencies_ms, 50):.1f}",
                f"checkout_p99_ms={pct(r['placed'].latencies_ms, 99):.1f}",
                f"home_rps={home:.0f}",
                f"ratio_checkout_home={rate / home if home else nan:.3f}",
            ]
        out += [f"delivered_ok={int(delivered_ok)}", f"books_clean={int(report.ok)}"]
        print(" ".join(out), flush=True)
        failed = not (delivered_ok and report.ok)
    finally:
        if server is not None:
            server.stop()
        if gateway is not None:
            gateway.stop()
        if container is not None:
            container.close()
        if cluster is not None:
            cluster.stop()
        if args.keep or failed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

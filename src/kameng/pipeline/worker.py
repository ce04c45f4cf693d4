"""The worker: claims due orders, runs one step each, and keeps itself visible.

Claiming pushes the order's `next_action_at` forward by a lease in the claiming transaction,
so a worker that dies mid-step (SIGKILL, power cut) simply leaves the order due again when the
lease runs out — no separate recovery pass is needed (DESIGN §5.4). Many workers share work on
PostgreSQL (`FOR UPDATE SKIP LOCKED`); on SQLite one process holds the claimer lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.db import RawSQL, db_time, table
from kameng.payments.registry import Gateways
from kameng.pipeline import outbox, payment_checks, supplier_checks, wakeup
from kameng.pipeline.apply import Timing
from kameng.pipeline.metrics import STEP_SECONDS, STEPS
from kameng.pipeline.models import WorkerHeartbeat
from kameng.pipeline.registry import Adapters
from kameng.pipeline.steps import StepContext, run_step
from kameng.suppliers import reconcile
from kameng.suppliers import service as suppliers

log = logging.getLogger("kameng.worker")
_beat = table(WorkerHeartbeat)

# Payments due for an active query are looked for at most this often (a cheap indexed read).
PAYMENT_CHECK_EVERY_S = 1.0
# Money owed to guests is paid back within about this long (rare; no hurry to the second).
PAYOUT_EVERY_S = 10.0
# Purchases given up on while they might still succeed are looked for this often.
LATE_CHECK_EVERY_S = 2.0

_CLAIM_PG = RawSQL(
    "UPDATE orders SET next_action_at = :lease WHERE id IN ("
    "SELECT id FROM orders WHERE next_action_at <= :now ORDER BY next_action_at "
    "LIMIT :n FOR UPDATE SKIP LOCKED) RETURNING id"
)
_CLAIM_SQLITE = RawSQL(
    "UPDATE orders SET next_action_at = :lease WHERE id IN ("
    "SELECT id FROM orders WHERE next_action_at IS NOT NULL AND next_action_at <= :now "
    "ORDER BY next_action_at LIMIT :n) RETURNING id"
)


def claim_due(conn: Connection, *, now: datetime, lease_s: int, limit: int) -> list[int]:
    stmt = _CLAIM_PG if conn.dialect.name == "postgresql" else _CLAIM_SQLITE
    rows = stmt.all(
        conn,
        {
            "now": db_time(conn, now),
            "lease": db_time(conn, now + timedelta(seconds=lease_s)),
            "n": limit,
        },
    )
    return sorted(int(r[0]) for r in rows)


@dataclass
class Worker:
    container: Container
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    steps_done: int = 0
    _inflight: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    _lock_file: IO[bytes] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        s = self.container.settings
        self.adapters = Adapters(self.container.vault)
        self.gateways = Gateways(self.container.vault)
        self.ctx = StepContext(
            run=self.container.writer.run_async,
            vault=self.container.vault,
            accounts=self.container.accounts,
            adapters=self.adapters,
            clock=self.container.clock,
            callback_base_url=s.callback_base_url,
            timing=Timing(
                poll_s=s.supplier_poll_s,
                retry_cap_s=s.supplier_retry_cap_s,
                backorder_retry_s=s.backorder_retry_s,
                buyer_action_s=s.buyer_action_sla_s,
            ),
            lease_s=s.worker_lease_s,
            review_policy=self.container.review_policy,
            default_sla_s=s.default_sla_s,
            escalation_url=s.review_escalation_url,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def _acquire_claimer(self) -> bool:
        """SQLite has one claimer: the first worker process to lock the file is it."""
        if not self.container.db.is_sqlite:
            return True
        if self._lock_file is not None:
            return True
        path = Path(self.container.settings.data_dir) / "worker.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._lock_file = fh
        return True

    def _beat(self, state: str) -> None:
        now = self.container.clock()
        with self.container.db.connect() as conn:
            changed = conn.execute(
                update(_beat)
                .where(_beat.c.worker_id == self.worker_id)
                .values(seen_at=now, state=state, steps=self.steps_done)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(_beat).values(
                        worker_id=self.worker_id,
                        host=socket.gethostname()[:200],
                        pid=os.getpid(),
                        state=state,
                        started_at=now,
                        seen_at=now,
                        steps=self.steps_done,
                    )
                )
            # Forget workers gone for a day; recent ones stay visible as "not seen".
            conn.execute(delete(_beat).where(_beat.c.seen_at < now - timedelta(days=1)))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.container.settings
        http = httpx.AsyncClient(timeout=10.0)
        last_beat = last_balance = last_payments = last_payout = 0.0
        # The first reconciliation waits a round: a starting worker has orders to move first.
        last_reconcile = time.monotonic()
        reconcile_task: asyncio.Task[Any] | None = None
        last_late_check = 0.0
        late_check_task: asyncio.Task[Any] | None = None
        sem_free = s.worker_concurrency
        outbox_task: asyncio.Task[Any] | None = None
        balance_task: asyncio.Task[Any] | None = None
        payments_task: asyncio.Task[Any] | None = None
        payout_task: asyncio.Task[Any] | None = None
        log.info("worker %s started", self.worker_id)
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def ring() -> None:
            loop.call_soon_threadsafe(wake.set)

        wakeup.DOORBELL.subscribe(ring)
        self._wake = wake
        listener: asyncio.Task[Any] | None = None
        if not self.container.db.is_sqlite:
            listener = asyncio.create_task(
                wakeup.listen(
                    wakeup.libpq_dsn(self.container.settings.resolved_database_url), wake, stop
                )
            )
        try:
            while not stop.is_set():
                mono = time.monotonic()
                if mono - last_beat >= s.worker_heartbeat_s:
                    await asyncio.to_thread(self._beat, "running")
                    last_beat = mono
                if not self._acquire_claimer():
                    await _sleep(stop, 1.0)
                    continue
                if mono - last_balance >= s.supplier_balance_check_s:
                    last_balance = mono
                    if balance_task is None or balance_task.done():
                        balance_task = asyncio.create_task(self.check_balances())
                if (
                    s.supplier_reconcile_s > 0
                    and mono - last_reconcile >= s.supplier_reconcile_s
                    and (reconcile_task is None or reconcile_task.done())
                ):
                    last_reconcile = mono
                    reconcile_task = asyncio.create_task(self.reconcile_suppliers())
                if (late_check_task is None or late_check_task.done()) and (
                    mono - last_late_check >= LATE_CHECK_EVERY_S
                ):
                    last_late_check = mono
                    late_check_task = asyncio.create_task(self.check_given_up())
                if outbox_task is None or outbox_task.done():
                    outbox_task = asyncio.create_task(outbox.send_due(self.container, http))
                if (payments_task is None or payments_task.done()) and (
                    mono - last_payments >= PAYMENT_CHECK_EVERY_S
                ):
                    last_payments = mono
                    payments_task = asyncio.create_task(
                        payment_checks.check_due(self.container, self.gateways)
                    )
                if (
                    s.guest_auto_payout
                    and (payout_task is None or payout_task.done())
                    and mono - last_payout >= PAYOUT_EVERY_S
                ):
                    last_payout = mono
                    payout_task = asyncio.create_task(
                        payment_checks.pay_back_guests(self.container, self.gateways)
                    )
                free = sem_free - len(self._inflight)
                claimed: list[int] = []
                if free > 0:
                    now = self.container.clock()
                    claimed = await self.container.writer.run_async(
                        functools.partial(
                            claim_due,
                            now=now,
                            lease_s=s.worker_lease_s,
                            limit=min(free, s.worker_batch),
                        )
                    )
                for order_id in claimed:
                    if order_id not in self._inflight:
                        task = asyncio.create_task(self._step(order_id))
                        self._inflight[order_id] = task
                if not claimed or free <= 0:
                    await _wait(stop, wake, s.worker_poll_s)
        finally:
            wakeup.DOORBELL.unsubscribe(ring)
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(BaseException):
                    await listener
            await self._drain()
            for side_task in (
                outbox_task,
                balance_task,
                payments_task,
                payout_task,
                reconcile_task,
                late_check_task,
            ):
                if side_task is not None:
                    side_task.cancel()
                    with contextlib.suppress(BaseException):
                        await side_task
            await http.aclose()
            await self.adapters.aclose()
            await self.gateways.aclose()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._beat, "stopped")
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            log.info("worker %s stopped after %d steps", self.worker_id, self.steps_done)

    async def _drain(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: let steps in flight finish (their leases cover the rest)."""
        if self._inflight:
            log.info("waiting for %d step(s) in flight", len(self._inflight))
            await asyncio.wait(list(self._inflight.values()), timeout=timeout_s)

    async def _step(self, order_id: int) -> None:
        started = time.monotonic()
        label = "error"
        try:
            label = await run_step(self.ctx, order_id)
        except Exception:
            # The order keeps its lease and comes back; a bug must not stop the worker.
            log.exception("step failed for order id %s", order_id)
        finally:
            full = len(self._inflight) >= self.container.settings.worker_concurrency
            self._inflight.pop(order_id, None)
            # Claim again at once only when it can matter: the step made an order due now
            # (next offer, queue changed hands) or it frees a slot of a full worker.
            if full or label in _DUE_AGAIN:
                self._wake.set()
            self.steps_done += 1
            STEPS.labels(label).inc()
            STEP_SECONDS.observe(time.monotonic() - started)

    async def reconcile_suppliers(self) -> None:
        """Every supplier_reconcile_s, unless another worker just did: the supplier's record
        of purchases against ours (mismatches go to the log, /metrics and /healthz)."""
        s = self.container.settings
        now = self.container.clock()
        try:
            last = await asyncio.to_thread(self._read, reconcile.last_run_at)
            if last is not None and (now - last).total_seconds() < s.supplier_reconcile_s * 0.9:
                return
            await supplier_checks.reconcile_suppliers(
                self.container,
                self.adapters.get,
                since=now - timedelta(days=s.supplier_reconcile_days),
                until=now,
            )
        except Exception as exc:
            log.warning("supplier reconciliation failed: %s", type(exc).__name__)

    async def check_given_up(self) -> None:
        try:
            await supplier_checks.check_given_up(
                self.container, self.adapters.get, timing=self.ctx.timing
            )
        except Exception as exc:
            log.warning("late checks failed: %s", type(exc).__name__)

    async def check_balances(self) -> None:
        def rows(conn: Connection) -> list[Any]:
            return suppliers.all_suppliers(conn)

        try:
            for row in await asyncio.to_thread(self._read, rows):
                if not row.enabled:
                    continue
                balance = await self.adapters.get(row).balance()
                if balance is not None:
                    await self.container.writer.run_async(
                        functools.partial(
                            suppliers.record_balance,
                            supplier_id=row.id,
                            balance=balance,
                            now=self.container.clock(),
                        )
                    )
        except Exception as exc:
            log.warning("balance check failed: %s", type(exc).__name__)

    def _read(self, fn: Any) -> Any:
        with self.container.db.connect(write=False) as conn:
            return fn(conn)


_DUE_AGAIN = frozenset({"rejected", "retry", "error"})
# After a ring, wait this long for more: under load orders arrive a few milliseconds apart,
# and one claim for several of them costs one transaction instead of several.
GATHER_S = 0.005


async def _wait(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Until stopped, rung, or `seconds` pass; then ready for the next ring."""
    if not wake.is_set():
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    if wake.is_set() and not stop.is_set():
        await asyncio.sleep(GATHER_S)
    wake.clear()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

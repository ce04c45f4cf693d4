"""Runs write transactions: grouped on SQLite (group commit), one by one on PostgreSQL.

SQLite has one writer. Giving every request its own transaction means one BEGIN, COMMIT and
fsync per order, plus a hand-off of the write lock (and of the GIL) between request threads
after every statement. Instead, one writer thread takes whatever jobs are waiting and runs
them in a single transaction, each inside its own SAVEPOINT, so one job's failure never sinks
the others; every caller is answered only after that transaction has committed. Every
guarantee of a per-request transaction holds: a job sees its effects committed or not at all.

On PostgreSQL, jobs run in the calling thread, one transaction each: row locks let many run
at once, and grouping jobs from different callers into one transaction would only widen the
window in which two batches can deadlock on the same wallet rows.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from kameng.db import Database, savepoint

T = TypeVar("T")
Job = Callable[[Connection], Any]
log = logging.getLogger("kameng.writer")

MAX_BATCH = 64


class TransactionRunner:
    def __init__(self, db: Database, *, group_commit: bool | None = None, threads: int = 4) -> None:
        self.db = db
        self.group_commit = db.is_sqlite if group_commit is None else group_commit
        # Without group commit (PostgreSQL), async callers run their transactions on a few
        # dedicated threads, one per pooled connection: dozens of threads waiting on the
        # database would spend more CPU handing the GIL around than running the orders.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kameng-tx")
        self._queue: queue.SimpleQueue[tuple[Job, Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0
        self.jobs = 0

    def run(self, job: Callable[[Connection], T]) -> T:
        """Run `job(conn)` in a committed write transaction and return its result."""
        if not self.group_commit:
            with self.db.connect() as conn:
                return job(conn)
        return self.submit(job).result()

    def submit(self, job: Callable[[Connection], T]) -> Future[T]:
        """Queue a job for the writer thread (group commit only); the future resolves after
        the batch holding it has committed."""
        assert self.group_commit, "submit() needs group commit; use run()"
        self._ensure_thread()
        future: Future[T] = Future()
        self._queue.put((job, future))
        return future

    async def run_async(self, job: Callable[[Connection], T]) -> T:
        """`run` for the event loop: no thread hand-off when the writer thread does the work."""
        if self.group_commit:
            return await asyncio.wrap_future(self.submit(job))
        return await asyncio.wrap_future(self._executor.submit(self.run, job))

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="kameng-writer", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # A caller that gave up (its task was cancelled) cancelled its future: skip its
            # job. Once marked running, a future can no longer be cancelled under us.
            batch = [(job, f) for job, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception:  # the writer thread must outlive any one batch
                log.exception("writer batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RuntimeError("write batch failed"))

    def _run_batch(self, batch: list[tuple[Job, Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            with self.db.connect() as conn:
                for job, future in batch:
                    try:
                        with savepoint(conn):
                            result = job(conn)
                    except Exception as exc:
                        outcomes.append((future, None, exc))
                    else:
                        outcomes.append((future, result, None))
        except Exception as exc:
            # The commit itself failed: nothing in the batch happened, so every job fails.
            log.error("group commit failed (%s); %d jobs refused", type(exc).__name__, len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for future, result, error in outcomes:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

"""A doorbell for the worker: ring it when an order becomes due now.

In one process (the embedded worker of `kameng serve`) the web side rings it directly after
its commit. Across processes on PostgreSQL the same commit carries a `NOTIFY` that the worker
LISTENs for. Either way a missed ring costs only latency: the worker also polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from sqlalchemy.engine import make_url

from kameng.db import DUE_CHANNEL

log = logging.getLogger("kameng.worker")


class Doorbell:
    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def ring(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            with contextlib.suppress(RuntimeError):  # a loop that has just closed
                listener()


DOORBELL = Doorbell()


def libpq_dsn(sqlalchemy_url: str) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def listen(dsn: str, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set `wake` on every NOTIFY on the due channel; reconnect with backoff on failure."""
    import psycopg

    delay = 0.5
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {DUE_CHANNEL}")
                delay = 0.5
                wake.set()  # anything that became due while we were not listening
                async for _ in conn.notifies():
                    wake.set()
                    if stop.is_set():
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("LISTEN connection lost (%s); polling until it is back", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

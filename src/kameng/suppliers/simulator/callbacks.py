"""Callback delivery and the order flows that happen after the HTTP response.

Callbacks are where real suppliers are least reliable, so every delivery quirk is explicit
here: late, duplicated (same event id), reordered (stale event with a lower sequence after the
final one), sent before the purchase response, or never sent. The order's state changes when
the outcome is *decided*, independently of whether and when the callback arrives, so a client
that queries can always recover.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any

import httpx

from kameng.security.signing import webhook_header
from kameng.suppliers.simulator.config import SkuConfig
from kameng.suppliers.simulator.protocol import Event
from kameng.suppliers.simulator.state import Order, SimState

CALLBACK_TIMEOUT_S = 5.0


def encode_event(event: Event) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class CallbackSender:
    """Signs and POSTs events, with retries; every attempt is recorded in the state."""

    def __init__(self, state: SimState, merchant_secret: str) -> None:
        self.state = state
        self.merchant_secret = merchant_secret
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily on the server's loop; `trust_env=False` keeps proxy settings from
        # rerouting loopback callbacks.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=CALLBACK_TIMEOUT_S,
                trust_env=False,
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver(self, order: Order, event: Event, cfg: SkuConfig) -> bool:
        """True once the receiver answers 2xx; gives up after `1 + callback_retries` attempts."""
        url = order.callback_url
        if url is None:
            return False
        body = encode_event(event)
        attempts = 1 + cfg.callback_retries
        for attempt in range(1, attempts + 1):
            headers = {
                "Content-Type": "application/json",
                "X-Kameng-Signature": webhook_header(self.merchant_secret, int(time.time()), body),
                "X-Supplier-Event": event["event_id"],
            }
            http_status: int | None = None
            error: str | None = None
            try:
                response = await self.client.post(url, content=body, headers=headers)
                http_status = response.status_code
            except Exception as exc:  # any transport failure counts as a failed attempt
                error = f"{type(exc).__name__}: {exc}"[:200]
            ok = http_status is not None and 200 <= http_status < 300
            self.state.record_attempt(
                order, event, attempt=attempt, ok=ok, http_status=http_status, error=error
            )
            if ok:
                return True
            if attempt < attempts:
                await asyncio.sleep(cfg.callback_backoff_ms / 1000)
        self.state.stats.callbacks_gave_up += 1
        return False


class Dispatcher:
    """Runs post-response work as tracked tasks, so reset and shutdown can cancel all of it."""

    def __init__(self, state: SimState, sender: CallbackSender) -> None:
        self.state = state
        self.sender = sender
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def callback_flow(self, order: Order, cfg: SkuConfig, *, immediate: bool) -> None:
        """Callback mode: decide the outcome after `callback_delay_ms` and announce it.

        `immediate` is the `callback_before_response` path: decide and deliver now (no delay,
        no lateness) while the purchase request waits; the rest of a partial order still comes
        later, in the background.
        """
        if not immediate:
            await asyncio.sleep(cfg.callback_delay_ms / 1000)
        event, stale = self.state.decide(order, cfg)
        await self.emit(order, cfg, event, stale, immediate=immediate)
        if order.status == "partial":
            if immediate:
                self.schedule_rest(order, cfg)
            elif cfg.partial_rest_ms is not None:
                await self.rest_flow(order, cfg)

    def schedule_rest(self, order: Order, cfg: SkuConfig) -> None:
        if cfg.partial_rest_ms is not None:
            self.spawn(self.rest_flow(order, cfg))

    async def rest_flow(self, order: Order, cfg: SkuConfig) -> None:
        """Partial mode: the held-back keys arrive `partial_rest_ms` later, by callback."""
        await asyncio.sleep((cfg.partial_rest_ms or 0) / 1000)
        event, stale = self.state.deliver_rest(order, cfg)
        await self.emit(order, cfg, event, stale, immediate=False)

    async def emit(
        self,
        order: Order,
        cfg: SkuConfig,
        event: Event,
        stale: Event | None,
        *,
        immediate: bool,
    ) -> None:
        if not immediate and cfg.late_callback_ms:
            await asyncio.sleep(cfg.late_callback_ms / 1000)
        if cfg.drop_callbacks or order.callback_url is None:
            return
        await self.sender.deliver(order, event, cfg)
        for _ in range(cfg.duplicate_callbacks):
            await self.sender.deliver(order, event, cfg)
        if stale is not None:
            await self.sender.deliver(order, stale, cfg)

"""Sending the asynchronous payment notify, with retries and the injected notify faults.

The notify is where a real gateway is least reliable and where the merchant's handling matters
most, so every quirk is explicit: sent late, never sent (`drop`), sent with a sign that does not
verify (`bad_sign`), sent again after it was acknowledged (`duplicate`), replayed on demand.
The trade is paid when it is paid, whatever becomes of its notify, so a merchant that queries
(`act=order`) can always recover. Every request is logged on the trade for tests to assert on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from kameng.payments.gateway_sim.protocol import (
    corrupt_sign,
    notify_params,
    with_query,
    without_query,
)
from kameng.payments.gateway_sim.state import GatewayState, NotifyAttempt, NotifyConfig, Trade

NOTIFY_TIMEOUT_S = 5.0
MAX_BODY_READ = 1024  # enough to tell "success" from anything else
BODY_SNIPPET = 100


def acknowledged(status: int | None, body: str) -> bool:
    """EPay's acknowledgement: a 2xx whose body is `success` (any case, surrounding blanks)."""
    return status is not None and 200 <= status < 300 and body.strip().lower() == "success"


class Notifier:
    """Runs one notify task per paid trade on the server's loop; reset and shutdown cancel
    them all, so no request leaves the gateway for a trade it has forgotten."""

    def __init__(self, state: GatewayState, *, timeout_s: float = NOTIFY_TIMEOUT_S) -> None:
        self.state = state
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._runs: dict[tuple[str, str], asyncio.Task[Any]] = {}

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily on the server's loop; `trust_env=False` keeps proxy settings from
        # rerouting loopback notifies, and redirects are not followed (gateways do not).
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s, trust_env=False, follow_redirects=False
            )
        return self._client

    async def close(self) -> None:
        await self.cancel_all()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def cancel_all(self) -> None:
        runs = [t for t in self._runs.values() if t is not asyncio.current_task()]
        self._runs.clear()
        for task in runs:
            task.cancel()
        if runs:
            await asyncio.gather(*runs, return_exceptions=True)

    @property
    def pending(self) -> int:
        return sum(1 for t in self._runs.values() if not t.done())

    def start(self, trade: Trade) -> None:
        """Schedule the trade's notify run (replacing one still retrying for it: the trade was
        marked unpaid and paid again). A trade without a notify_url gets none."""
        if trade.notify_url is None:
            return
        previous = self._runs.pop(trade.key, None)
        if previous is not None:
            previous.cancel()
        config = self.state.config.copy()
        mode = trade.notify_mode or config.mode
        if mode == "drop":
            self.state.set_notify_state(trade, "dropped")
            return
        self.state.set_notify_state(trade, "pending")
        task = asyncio.get_running_loop().create_task(self._run(trade, mode, config))
        self._runs[trade.key] = task

        def forget(done: asyncio.Task[Any]) -> None:
            if self._runs.get(trade.key) is done:
                del self._runs[trade.key]

        task.add_done_callback(forget)

    async def _run(self, trade: Trade, mode: str, config: NotifyConfig) -> None:
        """Attempt `len(retry_s)` times, waiting `retry_s[i]` before attempt i (plus the
        configured delay before the first); stop at the first acknowledgement."""
        for index, wait in enumerate(config.retry_s):
            await asyncio.sleep(wait + (config.delay_s if index == 0 else 0.0))
            if not self.state.is_current(trade) or trade.status != 1:
                return  # forgotten by a reset, or marked unpaid since: nothing to announce
            attempt = await self.send(
                trade, kind="notify", attempt=index + 1, bad_sign=mode == "bad_sign"
            )
            if attempt.ok:
                if mode == "duplicate":
                    for copy in range(config.duplicate_count):
                        await self.send(trade, kind="duplicate", attempt=copy + 1, bad_sign=False)
                return
        if trade.notify_state != "acked":
            self.state.set_notify_state(trade, "gave_up")

    async def replay(self, trade: Trade) -> NotifyAttempt:
        """Send the notify once more now (a replay), whatever the fault mode; it carries a bad
        sign only when the trade's own fault is `bad_sign`."""
        bad_sign = (trade.notify_mode or self.state.config.mode) == "bad_sign"
        number = sum(1 for a in trade.attempts if a.kind == "replay") + 1
        return await self.send(trade, kind="replay", attempt=number, bad_sign=bad_sign)

    async def send(self, trade: Trade, *, kind: str, attempt: int, bad_sign: bool) -> NotifyAttempt:
        """One GET to the notify_url, recorded on the trade whatever happens."""
        merchant = self.state.merchant(trade.pid)
        if trade.notify_url is None or merchant is None:
            raise ValueError("trade has no notify_url")
        params = notify_params(trade, merchant.key)
        if bad_sign:
            params = corrupt_sign(params, merchant.key)
        status: int | None = None
        body = ""
        error: str | None = None
        try:
            async with self.client.stream("GET", with_query(trade.notify_url, params)) as response:
                status = response.status_code
                raw = b""
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) >= MAX_BODY_READ:
                        break
                body = raw[:MAX_BODY_READ].decode("utf-8", errors="replace")
        except Exception as exc:  # any transport failure is a failed attempt, to be retried
            error = f"{type(exc).__name__}: {exc}"[:200]
        record = NotifyAttempt(
            kind=kind,
            attempt=attempt,
            at=self.state.clock(),
            url=without_query(trade.notify_url),
            bad_sign=bad_sign,
            http_status=status,
            body=body[:BODY_SNIPPET],
            ok=error is None and acknowledged(status, body),
            error=error,
        )
        self.state.record_attempt(trade, record)
        return record

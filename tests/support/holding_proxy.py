"""A loopback hop that holds chosen requests in the "network" and delivers them late.

What a congested link does to a purchase: our request leaves, our timeout passes, and the
request reaches the supplier seconds later all the same — and is charged. The proxy forwards
everything at once except the requests `hold(method, path, body)` picks, which it forwards
after the number of seconds that function returns, whether or not the client is still
waiting (a client that gave up, or a worker that was SIGKILLed, does not recall a packet).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx

# (method, path with query, body) -> seconds to hold (0: forward at once)
HoldPolicy = Callable[[str, str, bytes], float]


class HoldingProxy:
    def __init__(self, target: str, hold: HoldPolicy) -> None:
        self.target = target.rstrip("/")
        self.hold = hold
        self.held: list[tuple[str, float]] = []  # (path, seconds) of every request held
        self.delivered_late = 0
        self.late_answers: list[int] = []  # the status the target gave each late request
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Held requests not yet delivered."""
        with self._lock:
            return self._pending

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["raw_path"].decode()
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode()
        headers = [
            (k.decode(), v.decode())
            for k, v in scope["headers"]
            if k.lower() not in (b"host", b"content-length", b"connection")
        ]
        seconds = self.hold(scope["method"], path, body)
        if seconds > 0:
            with self._lock:
                self.held.append((path, seconds))
                self._pending += 1
            # Delivered late in a task of its own: the client's disconnect (a timeout, a
            # SIGKILL) must not cancel it, as it would not recall a packet on the wire.
            task = asyncio.ensure_future(self._late(scope["method"], path, body, headers, seconds))
            resp = await asyncio.shield(task)
        else:
            resp = await self._forward(scope["method"], path, body, headers)
        await send(
            {
                "type": "http.response.start",
                "status": resp.status_code,
                "headers": [
                    (b"content-type", resp.headers.get("content-type", "").encode()),
                    (b"content-length", str(len(resp.content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": resp.content})

    async def _forward(
        self, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.target, timeout=30, trust_env=False) as c:
            return await c.request(method, path, content=body, headers=headers)

    async def _late(
        self, method: str, path: str, body: bytes, headers: list[tuple[str, str]], seconds: float
    ) -> httpx.Response:
        try:
            await asyncio.sleep(seconds)
            resp = await self._forward(method, path, body, headers)
            self.late_answers.append(resp.status_code)
            return resp
        finally:
            with self._lock:
                self._pending -= 1
                self.delivered_late += 1

"""The simulated supplier as an ASGI (Starlette) app: the signed `/v1` API and the `/_sim`
control API.

It is a real HTTP server rather than an in-process fake so the adapter is exercised through the
same failure modes it meets in production: timeouts, dropped connections, 5xx after the
purchase committed, and bodies that are not JSON. Handlers only `await` for simulated time
(latency, hangs, callbacks); everything else is synchronous state work, so one process serves
hundreds of purchases per second even with 200 ms of simulated latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kameng.suppliers.simulator.auth import RequestVerifier
from kameng.suppliers.simulator.callbacks import CallbackSender, Dispatcher
from kameng.suppliers.simulator.config import ConfigError, SimConfig, SkuConfig, default_config
from kameng.suppliers.simulator.protocol import parse_order_request, parse_precheck_request
from kameng.suppliers.simulator.state import SimState

DEFAULT_MERCHANT_KEY = "demo-merchant"
DEFAULT_MERCHANT_SECRET = "demo-merchant-secret"  # noqa: S105 (a published demo credential)

_UNAUTHORIZED = {"status": "error", "code": "bad_signature"}
_BAD_REQUEST = {"status": "rejected", "reason": "bad_request"}


def path_with_query(request: Request) -> str:
    """The path exactly as sent (still percent-encoded), as the client signed it."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    path = raw.decode("latin-1")
    return f"{path}?{query.decode('latin-1')}" if query else path


class _AbortedResponse(Response):
    """Fallback connection drop for servers whose transport we cannot reach: start a response,
    then fail, which makes the server close the socket mid-response."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1024"), (b"content-type", b"application/json")],
            }
        )
        raise ConnectionAbortedError("simulated connection reset")


async def _drop_connection(request: Request) -> Response:
    """Close the client's TCP connection without any response, with an RST where possible.

    uvicorn's `receive` is a bound method of its per-request cycle object, which holds the
    asyncio transport; SO_LINGER(on, 0) + abort() resets the socket instead of a polite FIN.
    uvicorn then sees the connection as lost and discards whatever we return.
    """
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return _AbortedResponse()
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError, TypeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    for _ in range(3):  # let connection_lost run, so uvicorn drops the response silently
        await asyncio.sleep(0)
    return Response(status_code=500)


async def _sleep_unless_disconnected(request: Request, seconds: float) -> None:
    """Hang for `seconds`, but stop as soon as the client gives up, so hung requests do not
    pile up (or hold up shutdown) after every client has timed out."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)

    watcher = asyncio.get_running_loop().create_task(disconnected())
    try:
        await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


class Simulator:
    """One simulated supplier: its state, the request verifier and the callback machinery."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        merchant_key: str = DEFAULT_MERCHANT_KEY,
        merchant_secret: str = DEFAULT_MERCHANT_SECRET,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.merchant_key = merchant_key
        self.state = SimState(config or default_config(), seed=seed, clock=clock)
        self.verifier = RequestVerifier({merchant_key: merchant_secret}, clock=clock)
        self.sender = CallbackSender(self.state, merchant_secret)
        self.dispatcher = Dispatcher(self.state, self.sender)

    def build_app(self) -> Starlette:
        routes = [
            Route("/v1/catalog", self.catalog, methods=["GET"]),
            Route("/v1/quote", self.quote, methods=["GET"]),
            Route("/v1/balance", self.balance, methods=["GET"]),
            Route("/v1/orders", self.create_order, methods=["POST"]),
            Route("/v1/orders", self.list_orders, methods=["GET"]),
            Route("/v1/orders/{out_trade_no:path}", self.get_order, methods=["GET"]),
            Route("/v1/precheck", self.precheck, methods=["POST"]),
            Route("/_sim/state", self.sim_state, methods=["GET"]),
            Route("/_sim/skus/{sku:path}", self.sim_put_sku, methods=["PUT"]),
            Route("/_sim/balance", self.sim_balance, methods=["POST"]),
            Route("/_sim/stock/{sku:path}", self.sim_stock, methods=["POST"]),
            Route("/_sim/missing-accounts", self.sim_missing_accounts, methods=["POST"]),
            Route("/_sim/callbacks/{out_trade_no:path}/resend", self.sim_resend, methods=["POST"]),
            Route("/_sim/reset", self.sim_reset, methods=["POST"]),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        app.state.simulator = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.dispatcher.cancel_all()
            await self.sender.close()

    # -- helpers ---------------------------------------------------------------------------------

    async def _authentic(self, request: Request) -> bool:
        body = await request.body()
        merchant = self.verifier.verify(
            request.headers, request.method, path_with_query(request), body
        )
        if merchant is None:
            self.state.stats.auth_failures += 1
        return merchant is not None

    async def _latency(self, cfg: SkuConfig | None) -> None:
        if cfg is not None:
            ms = cfg.latency_ms.sample_ms(self.state.rng)
            if ms > 0:
                await asyncio.sleep(ms / 1000)

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.state.rng.random() < rate

    # -- /v1 -------------------------------------------------------------------------------------

    async def catalog(self, request: Request) -> Response:
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        return JSONResponse({"items": self.state.catalog()})

    async def quote(self, request: Request) -> Response:
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        sku = request.query_params.get("sku", "")
        quantity = request.query_params.get("quantity", "1")
        if not sku or not (quantity.isascii() and quantity.isdigit() and int(quantity) >= 1):
            return JSONResponse(_BAD_REQUEST, status_code=400)
        await self._latency(self.state.sku_config(sku))
        quote = self.state.quote(sku)
        if quote is None:
            return JSONResponse({"status": "rejected", "reason": "unknown_sku"}, status_code=404)
        return JSONResponse(quote)

    async def balance(self, request: Request) -> Response:
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        return JSONResponse({"balance_cents": self.state.balance_cents, "currency": "CNY"})

    async def get_order(self, request: Request) -> Response:
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        order = self.state.orders.get(request.path_params["out_trade_no"])
        if order is None:
            return JSONResponse({"status": "not_found"}, status_code=404)
        await self._latency(self.state.sku_config(order.sku))
        return JSONResponse(order.view())

    async def list_orders(self, request: Request) -> Response:
        """The merchant's purchases created in [since, until) (Unix seconds), oldest first, a
        page at a time: what the merchant reconciles its books against."""
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        q = request.query_params
        try:
            since = float(q.get("since", "0"))
            until = float(q.get("until", "1e12"))
            limit = min(max(int(q.get("limit", "500")), 1), 1000)
            after = int(q.get("after", "0") or 0)
        except ValueError:
            self.state.stats.bad_requests += 1
            return JSONResponse(_BAD_REQUEST, status_code=400)
        page, next_after = self.state.list_orders(
            since=since, until=until, after=after, limit=limit
        )
        return JSONResponse({"orders": page, "next": str(next_after) if next_after else ""})

    async def precheck(self, request: Request) -> Response:
        """Would a purchase with these buyer fields be accepted now? Nothing is recorded.

        Its faults are its own (`precheck_*`), so a test can break the pre-check while purchases
        of the same SKU keep working, which is what the caller must survive.
        """
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        req = parse_precheck_request(await request.body())
        if req is None:
            self.state.stats.bad_requests += 1
            return JSONResponse(_BAD_REQUEST, status_code=400)
        cfg = self.state.sku_config(req.sku)
        if cfg is not None:
            latency = cfg.latency_ms if cfg.precheck_latency_ms is None else cfg.precheck_latency_ms
            ms = latency.sample_ms(self.state.rng)
            if ms > 0:
                await asyncio.sleep(ms / 1000)
            if cfg.precheck_error_rate + cfg.precheck_hang_rate > 0:
                roll = self.state.rng.random()
                if roll < cfg.precheck_error_rate:
                    self.state.stats.fault("precheck_error")
                    return JSONResponse({"status": "error"}, status_code=500)
                if roll < cfg.precheck_error_rate + cfg.precheck_hang_rate:
                    self.state.stats.fault("precheck_hang")
                    await _sleep_unless_disconnected(request, cfg.hang_ms / 1000)
        answer = self.state.precheck(req.sku, req.fields)
        if answer is None:
            return JSONResponse({"status": "rejected", "reason": "unknown_sku"}, status_code=404)
        return JSONResponse(answer)

    async def create_order(self, request: Request) -> Response:
        if not await self._authentic(request):
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        req = parse_order_request(await request.body())
        if req is None:
            self.state.stats.bad_requests += 1
            return JSONResponse(_BAD_REQUEST, status_code=400)
        await self._latency(self.state.sku_config(req.sku))
        self.state.stats.purchase_requests += 1
        cfg = self.state.sku_config(req.sku)
        if cfg is not None and self._roll(cfg.error_rate):
            self.state.stats.fault("error")
            return JSONResponse({"status": "error"}, status_code=503)
        order, created = self.state.place_order(req)
        if not created or not order.bought or cfg is None:
            return JSONResponse(order.view())
        payload: dict[str, Any] = {
            "status": order.status,
            "out_trade_no": order.out_trade_no,
            "trade_no": order.trade_no,
            "keys": [dict(k) for k in order.keys],
            "cost_cents": order.cost_cents,
        }
        if cfg.mode == "callback":
            payload = {**payload, "status": "accepted"}
            del payload["keys"]
            if cfg.callback_before_response:
                await self.dispatcher.callback_flow(order, cfg, immediate=True)
            else:
                self.dispatcher.spawn(self.dispatcher.callback_flow(order, cfg, immediate=False))
        elif order.status == "partial":
            self.dispatcher.schedule_rest(order, cfg)
        return await self._answer_after_commit(request, cfg, payload)

    async def _answer_after_commit(
        self, request: Request, cfg: SkuConfig, payload: dict[str, Any]
    ) -> Response:
        """The purchase is committed; now maybe lie about it (one fault at most per request)."""
        faults = (
            ("error_after_commit", cfg.error_after_commit_rate),
            ("reset", cfg.reset_rate),
            ("hang", cfg.hang_rate),
            ("malformed", cfg.malformed_rate),
        )
        chosen = None
        if any(rate > 0 for _, rate in faults):
            roll, edge = self.state.rng.random(), 0.0
            for name, rate in faults:
                edge += rate
                if roll < edge:
                    chosen = name
                    break
        if chosen is not None:
            self.state.stats.fault(chosen)
        if chosen == "error_after_commit":
            return JSONResponse({"status": "error"}, status_code=500)
        if chosen == "reset":
            return await _drop_connection(request)
        if chosen == "hang":
            await _sleep_unless_disconnected(request, cfg.hang_ms / 1000)
        elif chosen == "malformed":
            text = json.dumps(payload)
            return Response(text[: len(text) // 2], media_type="application/json")
        return JSONResponse(payload)

    # -- /_sim (no authentication: loopback and tests only) --------------------------------------

    async def _json_object(self, request: Request) -> dict[str, Any] | None:
        try:
            data = json.loads(await request.body())
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def sim_state(self, request: Request) -> Response:
        return JSONResponse(self.state.snapshot())

    async def sim_put_sku(self, request: Request) -> Response:
        patch = await self._json_object(request)
        if patch is None:
            return JSONResponse({"status": "error", "code": "bad_request"}, status_code=400)
        try:
            view = self.state.upsert_sku(request.path_params["sku"], patch)
        except ConfigError as exc:
            body = {"status": "error", "code": "invalid_config", "detail": str(exc)}
            return JSONResponse(body, status_code=400)
        return JSONResponse(view)

    async def sim_balance(self, request: Request) -> Response:
        data = await self._json_object(request)
        cents = (data or {}).get("balance_cents")
        if not isinstance(cents, int) or isinstance(cents, bool):
            return JSONResponse({"status": "error", "code": "bad_request"}, status_code=400)
        self.state.set_balance(cents)
        return JSONResponse({"balance_cents": self.state.balance_cents})

    async def sim_stock(self, request: Request) -> Response:
        sku = request.path_params["sku"]
        data = await self._json_object(request)
        add = (data or {}).get("add")
        if not isinstance(add, int) or isinstance(add, bool):
            return JSONResponse({"status": "error", "code": "bad_request"}, status_code=400)
        if sku not in self.state.skus:
            return JSONResponse({"status": "not_found"}, status_code=404)
        try:
            available = self.state.add_stock(sku, add)
        except ValueError:
            body = {"status": "error", "code": "unlimited_stock"}
            return JSONResponse(body, status_code=409)
        return JSONResponse({"sku": sku, "available": available})

    async def sim_missing_accounts(self, request: Request) -> Response:
        data = await self._json_object(request)
        add, remove = (data or {}).get("add", []), (data or {}).get("remove", [])
        if data is None or not _strings(add) or not _strings(remove):
            return JSONResponse({"status": "error", "code": "bad_request"}, status_code=400)
        missing = self.state.change_missing_accounts(add=add, remove=remove)
        return JSONResponse({"missing_accounts": missing})

    async def sim_resend(self, request: Request) -> Response:
        """Re-send the order's latest event (same event id), even if callbacks are dropped."""
        order = self.state.orders.get(request.path_params["out_trade_no"])
        if order is None:
            return JSONResponse({"status": "not_found"}, status_code=404)
        event = order.last_event
        if event is None or order.callback_url is None:
            code = "no_callback_url" if order.callback_url is None else "no_event_yet"
            return JSONResponse({"status": "error", "code": code}, status_code=409)
        cfg = self.state.sku_config(order.sku) or SkuConfig(sku=order.sku, price_cents=0)
        delivered = await self.sender.deliver(order, event, cfg)
        return JSONResponse({"status": "ok", "event_id": event["event_id"], "delivered": delivered})

    async def sim_reset(self, request: Request) -> Response:
        await self.dispatcher.cancel_all()
        self.state.reset()
        return JSONResponse({"status": "ok"})


def create_app(
    config: SimConfig | None = None,
    *,
    merchant_key: str = DEFAULT_MERCHANT_KEY,
    merchant_secret: str = DEFAULT_MERCHANT_SECRET,
    seed: int = 0,
) -> Starlette:
    """The ASGI app; `app.state.simulator` is the `Simulator` behind it."""
    simulator = Simulator(
        config, merchant_key=merchant_key, merchant_secret=merchant_secret, seed=seed
    )
    return simulator.build_app()

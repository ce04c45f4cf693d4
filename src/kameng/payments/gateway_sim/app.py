"""The simulated EPay gateway as an ASGI (Starlette) app: `submit.php` and the cashier, the pay
button, the merchant API `api.php`, and the `/_sim` control API (control.py).

It is a real HTTP server rather than an in-process fake so the platform's payment adapter goes
through what it meets in production: a browser redirect with signed parameters, a notify that
arrives late, twice, forged or never, and an order query that is the only source of truth.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from kameng.payments.gateway_sim.notify import Notifier
from kameng.payments.gateway_sim.pages import cashier_page, error_page, paid_page
from kameng.payments.gateway_sim.protocol import (
    SubmitError,
    notify_params,
    parse_amount,
    parse_submit,
    with_query,
)
from kameng.payments.gateway_sim.state import (
    GatewayState,
    Merchant,
    NotifyConfig,
    Trade,
    check_retry_schedule,
)

DEFAULT_PID = "1001"
DEFAULT_KEY = "demo-epay-key"
DEFAULT_CURRENCY = "CNY"
MAX_BODY = 64 * 1024
ORDERS_LIMIT_DEFAULT = 20
ORDERS_LIMIT_MAX = 50

# The exact phrases real gateways answer with; merchants' code sometimes matches on them.
MSG_FOUND = "查询订单号成功！"
MSG_NOT_FOUND = "订单号不存在"
MSG_BAD_KEY = "KEY校验失败"
MSG_REFUNDED = "退款成功"


def _fail(msg: str) -> JSONResponse:
    """EPay answers every API refusal with HTTP 200 and `code: -1`."""
    return JSONResponse({"code": -1, "msg": msg})


class GatewaySim:
    """One simulated gateway: its merchants, trades, notify sender and HTTP handlers."""

    def __init__(
        self,
        merchants: Mapping[str, str] | None = None,
        *,
        currency: str = DEFAULT_CURRENCY,
        notify_retry_s: list[float] | None = None,
    ) -> None:
        keys = dict(merchants) if merchants else {DEFAULT_PID: DEFAULT_KEY}
        for pid, key in keys.items():
            if not pid or not key:
                raise ValueError("merchant pid and key must not be empty")
        if not (len(currency) == 3 and currency.isascii() and currency.isupper()):
            raise ValueError(f"currency must be a 3-letter code like CNY, got {currency!r}")
        config = NotifyConfig()
        if notify_retry_s is not None:
            config.retry_s = check_retry_schedule(list(notify_retry_s))
        self.state = GatewayState(
            {pid: Merchant(pid, key, currency) for pid, key in keys.items()}, config
        )
        self.notifier = Notifier(self.state)

    def build_app(self) -> Starlette:
        from kameng.payments.gateway_sim.control import control_routes

        routes = [
            Route("/submit.php", self.submit, methods=["GET", "POST"]),
            Route("/pay/{trade_no}", self.pay, methods=["POST"]),
            Route("/api.php", self.api, methods=["GET", "POST"]),
            *control_routes(self),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        app.state.gateway = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.notifier.close()

    # -- helpers ----------------------------------------------------------------------------------

    async def params(self, request: Request) -> dict[str, str] | None:
        """Query and form parameters merged, the form winning (PHP's `$_REQUEST` order);
        None for a body we cannot read as a form."""
        params = dict(request.query_params)
        if request.method != "POST":
            return params
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if not body:
            return params
        if len(body) > MAX_BODY:
            return None
        if content_type == "multipart/form-data":
            try:
                form = await request.form()
            except Exception:  # python-multipart is optional; a broken body is just refused
                return None
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
            return params
        if content_type not in ("application/x-www-form-urlencoded", ""):
            return None
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return None
        params.update(pairs)
        return params

    def return_link(self, trade: Trade) -> str | None:
        """The return_url with the same signed parameters as the notify (always signed
        correctly: the notify faults concern the server-to-server channel only)."""
        merchant = self.state.merchant(trade.pid)
        if trade.return_url is None or merchant is None:
            return None
        return with_query(trade.return_url, notify_params(trade, merchant.key))

    def authenticate(self, params: Mapping[str, str]) -> Merchant | str:
        """The merchant for `pid` + `key`, or the refusal message."""
        pid, key = params.get("pid", ""), params.get("key", "")
        if not pid or not key:
            return "缺少参数 pid 或 key / pid and key are required"
        merchant = self.state.merchant(pid)
        if merchant is None or not hmac.compare_digest(key.encode(), merchant.key.encode()):
            return MSG_BAD_KEY
        return merchant

    def lookup(self, merchant: Merchant, params: Mapping[str, str]) -> Trade | str:
        """The merchant's trade named by `trade_no` (preferred) or `out_trade_no`."""
        trade_no, out_trade_no = params.get("trade_no", ""), params.get("out_trade_no", "")
        if trade_no:
            trade = self.state.by_trade_no(trade_no)
            if trade is not None and trade.pid != merchant.pid:
                trade = None
        elif out_trade_no:
            trade = self.state.find(merchant.pid, out_trade_no)
        else:
            return "缺少参数 out_trade_no 或 trade_no / out_trade_no or trade_no is required"
        return trade if trade is not None else MSG_NOT_FOUND

    # -- buyer side -------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        params = await self.params(request)
        if params is None:
            return error_page("请求格式错误", "the request body is not a form")
        try:
            wanted = parse_submit(params, self.state.merchants)
        except SubmitError as exc:
            return error_page(exc.zh, exc.en, status=exc.status)
        trade, outcome = self.state.open_trade(wanted)
        if outcome == "paid":
            return paid_page(trade, self.return_link(trade), already=True)
        if outcome == "duplicate":
            return error_page(
                "订单号重复", "duplicate out_trade_no (an order with another amount or name)"
            )
        return cashier_page(trade)

    async def pay(self, request: Request) -> Response:
        """The cashier's pay button: paid now, notify scheduled, buyer sent back to the shop.
        A second press (or a reload) pays nothing more and just redirects again."""
        trade = self.state.by_trade_no(request.path_params["trade_no"])
        if trade is None:
            return error_page("交易不存在", "unknown trade", status=404)
        if self.state.pay(trade):
            self.notifier.start(trade)
        link = self.return_link(trade)
        if link is not None:
            return RedirectResponse(link, status_code=303)
        return paid_page(trade, None, already=False)

    # -- merchant API -----------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        params = await self.params(request)
        if params is None:
            return _fail("请求格式错误 / the request body is not a form")
        act = params.get("act", "")
        handler = {"order": self._order, "orders": self._orders, "refund": self._refund}.get(act)
        if handler is None:
            return _fail("不支持的操作 / act must be order, orders or refund")
        merchant = self.authenticate(params)
        if isinstance(merchant, str):
            return _fail(merchant)
        return handler(merchant, params)

    def _order(self, merchant: Merchant, params: Mapping[str, str]) -> Response:
        trade = self.lookup(merchant, params)
        if isinstance(trade, str):
            return _fail(trade)
        return JSONResponse({"code": 1, "msg": MSG_FOUND, **trade.order_view()})

    def _orders(self, merchant: Merchant, params: Mapping[str, str]) -> Response:
        limit = _int_param(params.get("limit"), ORDERS_LIMIT_DEFAULT)
        offset = _int_param(params.get("offset"), 0)
        status_text = params.get("status", "")
        if limit is None or limit < 1:
            return _fail(f"limit 参数错误 / limit must be 1..{ORDERS_LIMIT_MAX}")
        if offset is None or offset < 0:
            return _fail("offset 参数错误 / offset must be a non-negative integer")
        if status_text not in ("", "0", "1"):
            return _fail("status 参数错误 / status must be 0 or 1")
        status = int(status_text) if status_text else None
        trades = self.state.orders(
            merchant.pid, status=status, limit=min(limit, ORDERS_LIMIT_MAX), offset=offset
        )
        data: list[dict[str, Any]] = [t.order_view() for t in trades]
        return JSONResponse({"code": 1, "msg": "查询订单记录成功！", "data": data})

    def _refund(self, merchant: Merchant, params: Mapping[str, str]) -> Response:
        trade = self.lookup(merchant, params)
        if isinstance(trade, str):
            return _fail(trade)
        cents = parse_amount(params.get("money", ""))
        if cents is None:
            return _fail("退款金额不正确 / money must be an amount like 12.34")
        refused = self.state.refund(trade, cents)
        if refused is not None:
            return _fail(refused)
        return JSONResponse({"code": 1, "msg": MSG_REFUNDED})


def _int_param(text: str | None, default: int) -> int | None:
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        return None
    return int(text)


def create_app(
    merchants: Mapping[str, str] | None = None,
    *,
    currency: str = DEFAULT_CURRENCY,
    notify_retry_s: list[float] | None = None,
) -> Starlette:
    """The ASGI app; `app.state.gateway` is the `GatewaySim` behind it."""
    return GatewaySim(merchants, currency=currency, notify_retry_s=notify_retry_s).build_app()

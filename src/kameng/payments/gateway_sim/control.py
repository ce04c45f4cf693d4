"""The `/_sim` control API: inspect the gateway, inject notify faults, and make the gateway's
record disagree with the merchant's, all without a browser.

Reconciliation is only as good as the mismatches it has been shown, so these endpoints create
exactly the situations a real gateway produces rarely and unpredictably: a buyer who paid another
amount, a payment the platform never recorded, a record changed after the fact, a notify lost,
forged, duplicated or replayed. No authentication: bind the simulator to loopback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kameng.payments.gateway_sim.protocol import MAX_OUT_TRADE_NO, is_http_url, parse_amount
from kameng.payments.gateway_sim.state import PAY_TYPES, NewTrade, Trade, check_mode

if TYPE_CHECKING:
    from kameng.payments.gateway_sim.app import GatewaySim

_NOT_FOUND = {"status": "not_found"}


class BadRequest(Exception):
    """A control request we refuse with 400 and a `detail` saying which field is wrong."""


def _error(code: str, status: int, detail: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": "error", "code": code}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadRequest("the body is not JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _fault(data: dict[str, Any]) -> str | None:
    """The optional per-trade notify fault (`notify`: a mode of `/_sim/config`)."""
    if "notify" not in data:
        return None
    try:
        return check_mode(data["notify"])
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def _money(data: dict[str, Any], name: str = "money") -> int | None:
    if name not in data:
        return None
    cents = parse_amount(data[name])
    if cents is None or cents <= 0:
        raise BadRequest(f'{name} must be a positive amount as a string, like "12.34"')
    return cents


class ControlApi:
    def __init__(self, sim: GatewaySim) -> None:
        self.sim = sim
        self.state = sim.state

    def _pid(self, request: Request, data: dict[str, Any]) -> str:
        """`pid` from the body or the query; the first merchant when absent."""
        pid = data.get("pid", request.query_params.get("pid"))
        if pid is None:
            return self.state.first_pid
        if isinstance(pid, bool) or not isinstance(pid, str | int):
            raise BadRequest("pid must be a string")
        if self.state.merchant(str(pid)) is None:
            raise BadRequest(f"unknown pid {pid}")
        return str(pid)

    async def _trade(self, request: Request) -> tuple[Trade | None, dict[str, Any]]:
        data = await _body(request)
        pid = self._pid(request, data)
        return self.state.find(pid, request.path_params["out_trade_no"]), data

    async def state_view(self, request: Request) -> Response:
        return JSONResponse(self.state.snapshot())

    async def config(self, request: Request) -> Response:
        data = await _body(request)
        try:
            config = self.state.update_config(data)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        return JSONResponse(config.view())

    async def create(self, request: Request) -> Response:
        data = await _body(request)
        pid = self._pid(request, data)
        out_trade_no = data.get("out_trade_no")
        if not isinstance(out_trade_no, str) or not 1 <= len(out_trade_no) <= MAX_OUT_TRADE_NO:
            raise BadRequest(f"out_trade_no must be a string of 1-{MAX_OUT_TRADE_NO} characters")
        cents = _money(data)
        if cents is None:
            raise BadRequest("money is required")
        pay_type = data.get("type", "alipay")
        if pay_type not in PAY_TYPES:
            raise BadRequest(f"type must be one of {', '.join(PAY_TYPES)}")
        name = data.get("name", f"simulated trade {out_trade_no}")
        urls = {k: data.get(k) for k in ("notify_url", "return_url")}
        for key, url in urls.items():
            if url is not None and not (isinstance(url, str) and is_http_url(url)):
                raise BadRequest(f"{key} must be an http(s) URL")
        currency = data.get("currency")
        merchant_currency = self.state.merchants[pid].currency
        if currency is not None and currency != merchant_currency:
            raise BadRequest(f"currency must be the merchant's currency {merchant_currency}")
        paid = data.get("paid", False)
        fault = _fault(data)
        if not isinstance(name, str) or not name.strip() or not isinstance(paid, bool):
            raise BadRequest("name must be a non-empty string and paid a boolean")
        wanted = NewTrade(
            pid=pid,
            out_trade_no=out_trade_no,
            type=str(pay_type),
            name=name,
            money_cents=cents,
            notify_url=urls["notify_url"],
            return_url=urls["return_url"],
            currency=currency,
        )
        trade, outcome = self.state.open_trade(wanted, origin="control")
        if outcome != "created":
            return _error("exists", 409, "a trade with this pid and out_trade_no exists")
        self.state.set_fault(trade, fault)
        if paid and self.state.pay(trade):
            self.sim.notifier.start(trade)
        return JSONResponse(trade.view())

    async def pay(self, request: Request) -> Response:
        trade, data = await self._trade(request)
        cents = _money(data)
        fault = _fault(data)
        if trade is None:
            return JSONResponse(_NOT_FOUND, status_code=404)
        if trade.status == 1:
            return _error("already_paid", 409, "the trade is already paid")
        if fault is not None:
            self.state.set_fault(trade, fault)
        if self.state.pay(trade, money_cents=cents):
            self.sim.notifier.start(trade)
        return JSONResponse(trade.view())

    async def mutate(self, request: Request) -> Response:
        trade, data = await self._trade(request)
        status = data.get("status")
        if status is not None and (isinstance(status, bool) or status not in (0, 1)):
            raise BadRequest("status must be 0 or 1")
        cents = _money(data)
        if trade is None:
            return JSONResponse(_NOT_FOUND, status_code=404)
        self.state.mutate(trade, status=status, money_cents=cents)
        return JSONResponse(trade.view())

    async def notify(self, request: Request) -> Response:
        trade, _ = await self._trade(request)
        if trade is None:
            return JSONResponse(_NOT_FOUND, status_code=404)
        if trade.notify_url is None:
            return _error("no_notify_url", 409, "the trade has no notify_url")
        if trade.status != 1:
            return _error("not_paid", 409, "only a paid trade is notified")
        attempt = await self.sim.notifier.replay(trade)
        return JSONResponse(attempt.view())

    async def reset(self, request: Request) -> Response:
        await self.sim.notifier.cancel_all()
        self.state.reset()
        return JSONResponse({"status": "ok"})


def control_routes(sim: GatewaySim) -> list[Route]:
    api = ControlApi(sim)

    def route(path: str, handler: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except BadRequest as exc:  # one place turns a refused body into a 400
                return _error("bad_request", 400, str(exc))

        return Route(path, endpoint, methods=[method])

    return [
        route("/_sim/state", api.state_view, "GET"),
        route("/_sim/config", api.config, "POST"),
        route("/_sim/trades", api.create, "POST"),
        route("/_sim/trades/{out_trade_no}/pay", api.pay, "POST"),
        route("/_sim/trades/{out_trade_no}/mutate", api.mutate, "POST"),
        route("/_sim/trades/{out_trade_no}/notify", api.notify, "POST"),
        route("/_sim/reset", api.reset, "POST"),
    ]

"""易支付 (EPay) adapter: signed submit, MD5-signed notify, and the `api.php` order query.

EPay has no currency field: a merchant account is in one currency (CNY in practice). If a
notify or query does carry `currency` (the bundled simulator can), it must match; otherwise
the gateway's configured currency is what was paid, and it must match the payment's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from kameng.payments.port import (
    Checkout,
    Confirmation,
    GatewayRecord,
    NotifyCheck,
    NotifyProblem,
    RecordState,
)
from kameng.security import epay

SUCCESS = "TRADE_SUCCESS"


class EpayGateway:
    def __init__(
        self,
        *,
        base_url: str,
        merchant_id: str,
        key: str,
        currency: str = "CNY",
        timeout_s: float = 8.0,
        sitename: str = "kameng",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.merchant_id = merchant_id
        self._key = key
        self.currency = currency
        self.sitename = sitename
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    # -- sending the buyer ---------------------------------------------------------------------

    def checkout(
        self,
        *,
        payment_no: str,
        amount_cents: int,
        subject: str,
        pay_type: str,
        notify_url: str,
        return_url: str,
        currency: str,
    ) -> Checkout:
        params: dict[str, Any] = {
            "pid": self.merchant_id,
            "type": pay_type,
            "out_trade_no": payment_no,
            "notify_url": notify_url,
            "return_url": return_url,
            "name": subject[:100],
            "money": epay.format_money(amount_cents),
            "sitename": self.sitename,
        }
        if currency != self.currency:
            params["currency"] = currency  # the gateway refuses it: better than a wrong sum
        return Checkout(url=f"{self.base_url}/submit.php", fields=epay.signed(params, self._key))

    # -- what the gateway tells us ---------------------------------------------------------------

    def check_notify(self, params: Mapping[str, str]) -> NotifyCheck:
        payment_no = str(params.get("out_trade_no", ""))[:64]
        trade_no = str(params.get("trade_no", ""))[:64]
        money = str(params.get("money", ""))[:24]
        seen = {"payment_no": payment_no, "gateway_trade_no": trade_no, "money": money}
        if not epay.verify(params, self._key):
            return NotifyCheck(None, NotifyProblem.bad_signature, **seen)
        if str(params.get("pid", "")) != self.merchant_id:
            return NotifyCheck(None, NotifyProblem.wrong_merchant, **seen)
        if params.get("trade_status") != SUCCESS:
            return NotifyCheck(None, NotifyProblem.not_success, **seen)
        amount = epay.parse_money(money)
        if not payment_no or amount is None:
            return NotifyCheck(None, NotifyProblem.malformed, **seen)
        confirmation = Confirmation(
            payment_no=payment_no,
            gateway_trade_no=trade_no,
            amount_cents=amount,
            currency=str(params.get("currency") or self.currency)[:3],
            pay_type=str(params.get("type", ""))[:16],
        )
        return NotifyCheck(confirmation, None, **seen)

    # -- asking the gateway ----------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout_s)
        return self._http

    async def _api(self, params: dict[str, Any]) -> dict[str, Any] | None:
        try:
            reply = await self._client().get(
                f"{self.base_url}/api.php",
                params={"pid": self.merchant_id, "key": self._key, **params},
            )
            if reply.status_code != 200:
                return None
            body = reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def _record(self, item: Mapping[str, Any]) -> GatewayRecord:
        amount = epay.parse_money(str(item.get("money", "")))
        status = str(item.get("status", ""))
        return GatewayRecord(
            state=RecordState.paid if status == "1" else RecordState.unpaid,
            payment_no=str(item.get("out_trade_no", ""))[:64],
            gateway_trade_no=str(item.get("trade_no", ""))[:64],
            amount_cents=amount,
            currency=str(item.get("currency") or self.currency)[:3],
        )

    async def query(self, payment_no: str) -> GatewayRecord:
        body = await self._api({"act": "order", "out_trade_no": payment_no})
        if body is None:
            return GatewayRecord(RecordState.unreachable, payment_no=payment_no)
        if str(body.get("code")) != "1":
            message = str(body.get("msg", ""))[:100]
            # EPay answers an unknown order and a bad key alike with code -1; only the
            # "does not exist" message means the gateway has no such trade.
            state = RecordState.not_found if "不存在" in message else RecordState.unreachable
            return GatewayRecord(state, payment_no=payment_no, detail=message)
        return self._record(body)

    async def recent(self, *, limit: int, offset: int = 0) -> list[GatewayRecord] | None:
        body = await self._api({"act": "orders", "limit": limit, "offset": offset})
        if body is None or str(body.get("code")) != "1" or not isinstance(body.get("data"), list):
            return None
        return [self._record(item) for item in body["data"] if isinstance(item, dict)]

    async def refund(self, payment_no: str, amount_cents: int) -> tuple[bool, str]:
        body = await self._api(
            {"act": "refund", "out_trade_no": payment_no, "money": epay.format_money(amount_cents)}
        )
        if body is None:
            return False, "gateway unreachable"
        return str(body.get("code")) == "1", str(body.get("msg", ""))[:200]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

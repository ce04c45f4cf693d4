"""Adapter for the bundled supplier protocol (`kameng supplier-sim`, docs/supplier-sim.md).

The mapping is deliberately pessimistic: anything but a well-formed definite answer is
`unknown`, because a 5xx or a garbled 200 may well have come *after* the purchase was made.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kameng.suppliers.adapters.signed_http import SignedHttp, TransportFailure, json_or_none
from kameng.suppliers.port import (
    PRECHECK_REFUSALS,
    CallbackEvent,
    CallbackRefused,
    CatalogItem,
    Outcome,
    Precheck,
    Quote,
    Result,
    SupplierKey,
    SupplierRecord,
)

# A buyer is waiting at the checkout, and no answer costs nothing (the order goes ahead), so
# the pre-check gives up long before a purchase would.
PRECHECK_TIMEOUT_S = 3.0

_STATUS = {
    "delivered": Outcome.delivered,
    "partial": Outcome.partial,
    "accepted": Outcome.accepted,
    "processing": Outcome.accepted,
    "rejected": Outcome.rejected,
}


def parse_keys(raw: Any) -> tuple[SupplierKey, ...] | None:
    """Keys from a body, or None when the list is malformed (then the answer is not trusted)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        return None
    keys: list[SupplierKey] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("code"), str):
            return None
        secret = item.get("secret")
        if secret is not None and not isinstance(secret, str):
            return None
        if not item["code"].strip():
            return None
        keys.append(SupplierKey(item["code"].strip(), (secret or "").strip() or None))
    return tuple(keys)


def result_from_body(data: dict[str, Any] | None, *, http_status: int) -> Result:
    if data is None:
        return Result(Outcome.unknown, detail=f"http {http_status}: body is not JSON")
    status = data.get("status")
    if http_status == 404 and status == "not_found":
        return Result(Outcome.not_found)
    outcome = _STATUS.get(status) if isinstance(status, str) else None
    if outcome is None or http_status >= 500:
        return Result(Outcome.unknown, detail=f"http {http_status}: status {status!r}")
    keys = parse_keys(data.get("keys"))
    if keys is None:
        return Result(Outcome.unknown, detail="malformed key list")
    cost = data.get("cost_cents")
    return Result(
        outcome,
        keys=keys,
        reason=str(data.get("reason") or "") if outcome is Outcome.rejected else "",
        trade_no=str(data.get("trade_no") or ""),
        cost_cents=cost if isinstance(cost, int) else None,
    )


RECORD_PAGE = 500
RECORD_PAGES_MAX = 200  # 100,000 purchases in one reconciliation window at most


def _record(item: Any) -> SupplierRecord | None:
    if not isinstance(item, dict) or not isinstance(item.get("out_trade_no"), str):
        return None
    status = str(item.get("status") or "")
    cost = item.get("cost_cents")
    return SupplierRecord(
        out_trade_no=item["out_trade_no"],
        status=status,
        # The protocol refunds a rejected order in full; anything else holds our money.
        charged=status != "rejected",
        cost_cents=cost if isinstance(cost, int) else None,
        trade_no=str(item.get("trade_no") or ""),
    )


def precheck_from_body(data: dict[str, Any] | None, *, http_status: int) -> Precheck:
    """Only a well-formed yes or a refusal we know is decisive; anything else is `unavailable`."""
    if http_status != 200 or data is None:
        return Precheck.unavailable(f"http {http_status}")
    status, reason, field = data.get("status"), data.get("reason"), data.get("field")
    if status == "ok":
        return Precheck.passed()
    if status == "refused" and isinstance(reason, str) and reason in PRECHECK_REFUSALS:
        return Precheck.refused(
            reason, field=field[:64] if isinstance(field, str) else "", detail=reason
        )
    return Precheck.unavailable(f"unexpected answer: status {status!r}, reason {reason!r}")


class SimulatorSupplier:
    def __init__(self, http: SignedHttp, *, precheck_timeout_s: float = PRECHECK_TIMEOUT_S) -> None:
        self.http = http
        self.precheck_timeout_s = precheck_timeout_s

    async def catalog(self) -> list[CatalogItem]:
        try:
            response = await self.http.call("GET", "/v1/catalog")
        except TransportFailure:
            return []
        data = json_or_none(response) or {}
        items = []
        for it in data.get("items") or []:
            try:
                items.append(
                    CatalogItem(
                        sku=str(it["sku"]),
                        name=str(it.get("name") or it["sku"]),
                        kind=str(it.get("kind") or "card_key"),
                        price_cents=int(it["price_cents"]),
                        available=it.get("available"),
                        open=bool(it.get("open", True)),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
        return items

    async def quote(self, *, sku: str, quantity: int) -> Quote | None:
        try:
            response = await self.http.call(
                "GET", "/v1/quote", params={"sku": sku, "quantity": quantity}
            )
        except TransportFailure:
            return None
        data = json_or_none(response)
        if response.status_code != 200 or data is None:
            return None
        try:
            return Quote(
                sku=sku,
                unit_price_cents=int(data["unit_price_cents"]),
                available=data.get("available"),
                open=bool(data.get("open", True)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    async def purchase(
        self,
        *,
        order_no: str,
        sku: str,
        quantity: int,
        fields: dict[str, str],
        callback_url: str | None,
    ) -> Result:
        body = {
            "out_trade_no": order_no,
            "sku": sku,
            "quantity": quantity,
            "fields": fields,
            "callback_url": callback_url,
        }
        try:
            response = await self.http.call("POST", "/v1/orders", body=body)
        except TransportFailure as exc:
            return Result(Outcome.unknown, detail=str(exc))
        # Refusals before the supplier recorded an order under our number are not binding: a
        # copy of the request still in flight is judged afresh when it arrives.
        if response.status_code in (401, 403):
            # Our credentials are wrong: nothing was bought, and no purchase will succeed until
            # an operator fixes them — a supplier-wide failure for the circuit breaker.
            return Result(Outcome.rejected, reason="supplier_auth_failed", binding=False)
        if response.status_code == 400:
            # Refused before anything was done: our request is wrong.
            data = json_or_none(response) or {}
            reason = str(data.get("reason") or data.get("code") or f"http_{response.status_code}")
            return Result(Outcome.rejected, reason=reason, binding=False)
        if response.status_code == 404:
            return Result(Outcome.rejected, reason="unknown_sku", binding=False)
        return result_from_body(json_or_none(response), http_status=response.status_code)

    async def precheck(self, *, sku: str, fields: dict[str, str]) -> Precheck:
        """`POST /v1/precheck`; never raises for a network problem (that is `unavailable`)."""
        try:
            async with asyncio.timeout(self.precheck_timeout_s):
                response = await self.http.call(
                    "POST", "/v1/precheck", body={"sku": sku, "fields": fields}
                )
        except TimeoutError:
            return Precheck.unavailable(f"no answer within {self.precheck_timeout_s:g} s")
        except TransportFailure as exc:
            return Precheck.unavailable(str(exc))
        return precheck_from_body(json_or_none(response), http_status=response.status_code)

    async def query(self, *, order_no: str) -> Result:
        try:
            response = await self.http.call("GET", f"/v1/orders/{order_no}")
        except TransportFailure as exc:
            return Result(Outcome.unknown, detail=str(exc))
        return result_from_body(json_or_none(response), http_status=response.status_code)

    async def records(self, *, since: int, until: int) -> list[SupplierRecord] | None:
        """`GET /v1/orders?since=&until=&after=`, page by page (docs/supplier-sim.md)."""
        out: list[SupplierRecord] = []
        after = ""
        for _ in range(RECORD_PAGES_MAX):
            params: dict[str, Any] = {"since": since, "until": until, "limit": RECORD_PAGE}
            if after:
                params["after"] = after
            try:
                response = await self.http.call("GET", "/v1/orders", params=params)
            except TransportFailure:
                return None
            data = json_or_none(response)
            if response.status_code != 200 or data is None:
                return None
            items = data.get("orders")
            if not isinstance(items, list):
                return None
            for item in items:
                record = _record(item)
                if record is None:
                    return None
                out.append(record)
            after = str(data.get("next") or "")
            if not after:
                return out
        return None

    async def balance(self) -> int | None:
        try:
            response = await self.http.call("GET", "/v1/balance")
        except TransportFailure:
            return None
        data = json_or_none(response)
        value = (data or {}).get("balance_cents")
        return value if isinstance(value, int) else None

    def parse_callback(self, *, headers: dict[str, str], body: bytes, now: int) -> CallbackEvent:
        payload = self.http.verify_callback(headers=headers, body=body, now=now)
        event_id, out_trade_no = payload.get("event_id"), payload.get("out_trade_no")
        if not isinstance(event_id, str) or not event_id or not isinstance(out_trade_no, str):
            raise CallbackRefused("malformed_body")
        result = result_from_body(payload, http_status=200)
        if result.outcome is Outcome.unknown:
            raise CallbackRefused("malformed_body")
        sequence = payload.get("sequence")
        return CallbackEvent(
            event_id=event_id[:128],
            out_trade_no=out_trade_no,
            result=result,
            sequence=sequence if isinstance(sequence, int) else None,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

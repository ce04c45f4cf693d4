"""Adapter for docking to another kameng site through its Reseller API v1.

Our order number travels as both the `Idempotency-Key` (so a retried purchase can never buy
twice) and the `customer_ref` (so an unknown outcome can be looked up by *our* number even when
we never learnt theirs). Their webhooks are only nudges: we verify and bind them, then ask the
API for the order, so a forged or stale payload cannot deliver anything.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kameng.errors import KamengError
from kameng.money import parse_amount
from kameng.suppliers.adapters.signed_http import SignedHttp, TransportFailure, json_or_none
from kameng.suppliers.adapters.simulator import parse_keys
from kameng.suppliers.port import (
    CallbackEvent,
    CallbackRefused,
    CatalogItem,
    Outcome,
    Precheck,
    Quote,
    Result,
    SupplierRecord,
)

RECORD_PAGES_MAX = 1000  # 100,000 purchases in one reconciliation window at most


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


_DELIVERED = frozenset({"delivered", "completed"})
_FAILED = frozenset({"canceled", "refunded", "rejected", "expired"})
# Their refusals that prove nothing was bought, mapped to our reason codes.
_REFUSALS = {
    "insufficient_balance": "insufficient_balance",
    "sku_not_found": "unknown_sku",
    "sku_disabled": "unknown_sku",
    "invalid_fields": "invalid_fields",
    "quantity_out_of_range": "bad_request",
    "invalid_request": "bad_request",
}
# Answers that say an order under this key may exist: resolve by query, never buy again.
_MAYBE_BOUGHT = frozenset({"idempotency_key_reused", "idempotency_in_flight"})


def _order_result(data: dict[str, Any]) -> Result:
    status = str(data.get("status") or "")
    trade_no = str(data.get("order_no") or "")
    if status in _DELIVERED:
        keys = parse_keys(data.get("keys") or [])
        if keys is None:
            return Result(Outcome.unknown, detail="malformed key list", trade_no=trade_no)
        return Result(Outcome.delivered, keys=keys, trade_no=trade_no)
    if status in _FAILED:
        return Result(Outcome.rejected, reason=f"order_{status}", trade_no=trade_no)
    if not status:
        return Result(Outcome.unknown, detail="no status")
    return Result(Outcome.accepted, trade_no=trade_no, reason=str(data.get("reason") or ""))


class KamengSupplier:
    def __init__(self, http: SignedHttp) -> None:
        self.http = http

    async def catalog(self) -> list[CatalogItem]:
        try:
            response = await self.http.call("GET", "/api/v1/products")
        except TransportFailure:
            return []
        items: list[CatalogItem] = []
        for product in (json_or_none(response) or {}).get("products") or []:
            for sku in product.get("skus") or []:
                try:
                    items.append(
                        CatalogItem(
                            sku=str(sku["sku"]),
                            name=f"{product.get('name', '')} {sku.get('name', '')}".strip(),
                            kind=str(product.get("delivery_kind") or "card_key"),
                            price_cents=parse_amount(str(sku["price"])),
                            available=sku.get("stock"),
                            open=bool(sku.get("available", True)),
                        )
                    )
                except (KeyError, TypeError, ValueError):
                    continue
        return items

    async def quote(self, *, sku: str, quantity: int) -> Quote | None:
        for item in await self.catalog():
            if item.sku == sku:
                return Quote(sku, item.price_cents, item.available, item.open)
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
        body: dict[str, Any] = {
            "sku": sku,
            "quantity": quantity,
            "fields": fields,
            "customer_ref": order_no,
            "confirm_duplicate": True,
        }
        if callback_url:
            body["notify_url"] = callback_url
        try:
            response = await self.http.call(
                "POST", "/api/v1/orders", body=body, headers={"Idempotency-Key": order_no}
            )
        except TransportFailure as exc:
            return Result(Outcome.unknown, detail=str(exc))
        data = json_or_none(response)
        if response.status_code in (200, 201) and data is not None:
            return _order_result(data)
        code = str(((data or {}).get("error") or {}).get("code") or "")
        if code in _MAYBE_BOUGHT:
            return Result(Outcome.unknown, detail=code)
        # A kameng site stores only successful outcomes under an Idempotency-Key, so none of
        # its refusals binds our number: a copy of the request still in flight is judged afresh
        # (say, after our balance there was topped up). The line is freed only once no copy
        # can be accepted any more (`binding=False`).
        if response.status_code in (401, 403):
            return Result(Outcome.rejected, reason="supplier_auth_failed", binding=False)
        if code in _REFUSALS:  # a definite refusal whatever its status (sku_disabled is a 409)
            return Result(Outcome.rejected, reason=_REFUSALS[code], binding=False)
        if 400 <= response.status_code < 500 and response.status_code not in (408, 409, 429):
            return Result(Outcome.rejected, reason=code or "bad_request", binding=False)
        return Result(Outcome.unknown, detail=f"http {response.status_code}")

    async def query(self, *, order_no: str) -> Result:
        try:
            listed = await self.http.call(
                "GET", "/api/v1/orders", params={"customer_ref": order_no, "limit": 1}
            )
            data = json_or_none(listed)
            if listed.status_code != 200 or data is None:
                return Result(Outcome.unknown, detail=f"http {listed.status_code}")
            found = data.get("orders") or []
            if not found:
                return Result(Outcome.not_found)
            their_no = str(found[0].get("order_no") or "")
            one = await self.http.call("GET", f"/api/v1/orders/{their_no}")
        except TransportFailure as exc:
            return Result(Outcome.unknown, detail=str(exc))
        detail = json_or_none(one)
        if one.status_code != 200 or detail is None:
            return Result(Outcome.unknown, detail=f"http {one.status_code}")
        return _order_result(detail)

    async def records(self, *, since: int, until: int) -> list[SupplierRecord] | None:
        """Our orders at their site created in [since, until), every page (their list is
        newest first, keyed by a cursor); each carries our number as `customer_ref`."""
        out: list[SupplierRecord] = []
        cursor = ""
        params: dict[str, Any] = {
            "limit": 100,
            "created_from": _iso(since),
            "created_to": _iso(until),
        }
        for _ in range(RECORD_PAGES_MAX):
            if cursor:
                params["cursor"] = cursor
            try:
                response = await self.http.call("GET", "/api/v1/orders", params=params)
            except TransportFailure:
                return None
            data = json_or_none(response)
            if response.status_code != 200 or data is None:
                return None
            for order in data.get("orders") or []:
                ref = order.get("customer_ref") if isinstance(order, dict) else None
                if not isinstance(ref, str) or not ref:
                    continue  # an order placed at their site by hand, not one of our purchases
                status = str(order.get("status") or "")
                try:
                    cost: int | None = parse_amount(str(order.get("amount")), allow_zero=True)
                except (ValueError, KamengError):
                    cost = None
                out.append(
                    SupplierRecord(
                        out_trade_no=ref,
                        status=status,
                        charged=status not in _FAILED,
                        cost_cents=cost,
                        trade_no=str(order.get("order_no") or ""),
                    )
                )
            cursor = str(data.get("next_cursor") or "")
            if not cursor:
                return out
        return None

    async def precheck(self, *, sku: str, fields: dict[str, str]) -> Precheck:
        """Always `unavailable`: the Reseller API v1 has no pre-check of buyer information yet.

        Their `POST /api/v1/orders` still validates the fields against the product's template
        and refuses with `invalid_fields`, so wrong information is caught at purchase instead.
        """
        return Precheck.unavailable("the kameng Reseller API v1 has no pre-check")

    async def balance(self) -> int | None:
        try:
            response = await self.http.call("GET", "/api/v1/balance")
        except TransportFailure:
            return None
        data = json_or_none(response)
        try:
            return parse_amount(str((data or {})["available"]))
        except (KeyError, ValueError):
            return None

    def parse_callback(self, *, headers: dict[str, str], body: bytes, now: int) -> CallbackEvent:
        payload = self.http.verify_callback(headers=headers, body=body, now=now)
        event_id, ref = payload.get("event_id"), payload.get("customer_ref")
        if not isinstance(event_id, str) or not event_id or not isinstance(ref, str) or not ref:
            raise CallbackRefused("malformed_body")
        return CallbackEvent(event_id=event_id[:128], out_trade_no=ref, result=None)

    async def aclose(self) -> None:
        await self.http.aclose()

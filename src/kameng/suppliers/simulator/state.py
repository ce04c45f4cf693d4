"""In-memory state of the simulated supplier: catalog, stock, balance, orders and statistics.

Everything runs on the server's single event loop and no method here awaits, so a purchase
(check stock and balance, debit, record) is atomic without locks. That is what makes
`out_trade_no` idempotency exact: two concurrent POSTs with the same number can never both buy.
The HTTP layer (`app.py`) decides *when* things happen (latency, faults, callbacks); this module
decides *what* happens, and keeps the figures tests assert on (`/_sim/state`).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kameng.suppliers.simulator.config import SimConfig, SkuConfig, merge_sku
from kameng.suppliers.simulator.protocol import Event, OrderRequest

# Recharge accounts ending like this do not exist, with no setup: an easy wrong number for demos
# and tests ("13800000000"). Others are added through `/_sim/missing-accounts`.
MISSING_ACCOUNT_SUFFIX = "0000"


@dataclass
class Stats:
    purchase_requests: int = 0
    duplicate_requests: int = 0
    bought: int = 0
    rejected: int = 0
    errors_injected: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    # Beyond the protocol's list; handy when a test or benchmark needs to explain a figure.
    bad_requests: int = 0
    auth_failures: int = 0
    refunded: int = 0
    callbacks_gave_up: int = 0
    prechecks: int = 0
    precheck_refusals: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    def fault(self, name: str) -> None:
        self.errors_injected += 1
        self.faults[name] = self.faults.get(name, 0) + 1


@dataclass
class SkuState:
    config: SkuConfig
    available: int | None
    restocked_at: float

    def refresh(self, now: float) -> None:
        """Apply the restocks due since the last one (lazily, on access)."""
        restock = self.config.restock
        if restock is None or self.available is None:
            self.restocked_at = now
            return
        due = int((now - self.restocked_at) // restock.every_s)
        if due > 0:
            self.available += due * restock.amount
            self.restocked_at += due * restock.every_s


@dataclass
class Order:
    out_trade_no: str
    sku: str
    quantity: int
    fields: dict[str, str]
    callback_url: str | None
    created_at: float
    status: str = "processing"
    trade_no: str | None = None
    reason: str | None = None
    cost_cents: int = 0
    keys: list[dict[str, str]] = field(default_factory=list)
    purchase_requests: int = 1
    bought: int = 0
    reserved: int = 0  # units taken from stock (returned if the order is refunded)
    first_batch: int = 0  # keys handed over at the first delivery (fewer in partial mode)
    next_sequence: int = 1
    last_event: Event | None = None
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    callback_log: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """The `GET /v1/orders/{out_trade_no}` body."""
        return {
            "status": self.status,
            "out_trade_no": self.out_trade_no,
            "trade_no": self.trade_no,
            "keys": [dict(k) for k in self.keys],
            "reason": self.reason,
            "cost_cents": self.cost_cents,
        }

    def summary(self) -> dict[str, Any]:
        """The `/_sim/state` entry."""
        return {
            "sku": self.sku,
            "quantity": self.quantity,
            "status": self.status,
            "keys_delivered": len(self.keys),
            "purchase_requests": self.purchase_requests,
            "bought": self.bought,
            "callbacks_sent": self.callbacks_sent,
            "created_at": self.created_at,
            "trade_no": self.trade_no,
            "reason": self.reason,
            "cost_cents": self.cost_cents,
            "callback_url": self.callback_url,
            "callbacks_failed": self.callbacks_failed,
            "callback_log": [dict(a) for a in self.callback_log],
        }


class SimState:
    def __init__(
        self, config: SimConfig, *, seed: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = clock
        self.configured_balance_cents = config.balance_cents
        self.balance_cents = config.balance_cents
        now = clock()
        self.skus: dict[str, SkuState] = {c.sku: SkuState(c, c.stock, now) for c in config.skus}
        self.orders: dict[str, Order] = {}
        self.missing_accounts: set[str] = set(config.missing_accounts)
        self.stats = Stats()
        # Counters survive /_sim/reset so trade numbers, event ids and keys are never reused.
        self._keys = 0
        self._trades = 0
        self._events = 0

    # -- catalog --------------------------------------------------------------------------------

    def sku_config(self, sku: str) -> SkuConfig | None:
        entry = self.skus.get(sku)
        return entry.config if entry is not None else None

    def _available(self, entry: SkuState) -> int | None:
        entry.refresh(self.clock())
        return entry.available

    def catalog(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "sku": e.config.sku,
                "name": e.config.name,
                "kind": e.config.kind,
                "price_cents": e.config.price_cents,
                "available": self._available(e),
                "open": e.config.orderable(now),
            }
            for e in self.skus.values()
        ]

    def quote(self, sku: str) -> dict[str, Any] | None:
        entry = self.skus.get(sku)
        if entry is None:
            return None
        return {
            "sku": sku,
            "unit_price_cents": entry.config.price_cents,
            "available": self._available(entry),
            "open": entry.config.orderable(self.clock()),
        }

    # -- control API ----------------------------------------------------------------------------

    def upsert_sku(self, sku: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge `patch` into the SKU (creating it); a `stock` in the patch sets availability."""
        entry = self.skus.get(sku)
        config = merge_sku(entry.config if entry else None, sku, patch)
        now = self.clock()
        if entry is None:
            entry = self.skus[sku] = SkuState(config, config.stock, now)
        else:
            entry.refresh(now)
            entry.config = config
            if "stock" in patch:
                entry.available = config.stock
                entry.restocked_at = now
        return self._sku_view(entry)

    def set_balance(self, cents: int) -> None:
        """Sets the balance and makes it the one `/_sim/reset` returns to."""
        self.balance_cents = cents
        self.configured_balance_cents = cents

    def change_missing_accounts(self, *, add: list[str], remove: list[str]) -> list[str]:
        """Accounts that do not exist (apart from the suffix rule). They are configuration, like
        SKU settings, so `/_sim/reset` keeps them."""
        self.missing_accounts.update(a.strip() for a in add)
        self.missing_accounts.difference_update(a.strip() for a in remove)
        return sorted(self.missing_accounts)

    def add_stock(self, sku: str, add: int) -> int | None:
        entry = self.skus[sku]
        entry.refresh(self.clock())
        if entry.available is None:
            raise ValueError("stock is unlimited")
        entry.available = max(entry.available + add, 0)
        return entry.available

    def reset(self) -> None:
        """Forget orders and statistics; stock and balance go back to their configured values."""
        now = self.clock()
        for entry in self.skus.values():
            entry.available = entry.config.stock
            entry.restocked_at = now
        self.balance_cents = self.configured_balance_cents
        self.orders.clear()
        self.stats = Stats()

    def _sku_view(self, entry: SkuState) -> dict[str, Any]:
        return {**entry.config.model_dump(mode="json"), "available": self._available(entry)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "balance_cents": self.balance_cents,
            "seed": self.seed,
            "skus": {sku: self._sku_view(e) for sku, e in self.skus.items()},
            "orders": {otn: o.summary() for otn, o in self.orders.items()},
            "stats": asdict(self.stats),
            "missing_accounts": sorted(self.missing_accounts),
        }

    # -- buyer information ----------------------------------------------------------------------

    def account_exists(self, account: str) -> bool:
        account = account.strip()
        return not (account.endswith(MISSING_ACCOUNT_SUFFIX) or account in self.missing_accounts)

    def field_problem(self, cfg: SkuConfig, fields: dict[str, str]) -> tuple[str, str] | None:
        """`(reason, field)` when the buyer's fields would be refused, else None.

        Shared by the purchase and the pre-check so the two can never disagree about an account:
        the purchase reports every such problem as `invalid_fields` (the protocol's buyer-info
        refusal), the pre-check tells a missing account apart.
        """
        required = list(cfg.required_fields)
        if cfg.account_field is not None and cfg.account_field not in required:
            required.append(cfg.account_field)
        for name in required:
            if not fields.get(name, "").strip():
                return "invalid_fields", name
        for name, refused in cfg.reject_field_values.items():
            if name in fields and fields[name] in refused:
                return "invalid_fields", name
        if cfg.account_field is not None and not self.account_exists(fields[cfg.account_field]):
            return "account_not_found", cfg.account_field
        return None

    def precheck(self, sku: str, fields: dict[str, str]) -> dict[str, Any] | None:
        """The `POST /v1/precheck` answer, or None for an unknown SKU.

        Answers what a purchase would be refused for, in the same order, except stock and
        balance (the merchant's business, not the buyer's). Maintenance reads as a closed
        denomination: either way it cannot be topped up now.
        """
        entry = self.skus.get(sku)
        if entry is None:
            return None
        self.stats.prechecks += 1
        cfg = entry.config
        problem: tuple[str, str] | None = None
        if not cfg.orderable(self.clock()):
            problem = ("denomination_closed", "")
        else:
            problem = self.field_problem(cfg, fields)
        if problem is None:
            return {"status": "ok", "sku": sku}
        self.stats.precheck_refusals += 1
        reason, name = problem
        return {"status": "refused", "sku": sku, "reason": reason, "field": name}

    # -- purchases ------------------------------------------------------------------------------

    def list_orders(
        self, *, since: float, until: float, after: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of orders created in [since, until), in the order they were placed; `after`
        is the position to continue from (orders are only ever appended), 0 when done."""
        everything = list(self.orders.values())
        page: list[dict[str, Any]] = []
        position = after
        while position < len(everything) and len(page) < limit:
            order = everything[position]
            position += 1
            if since <= order.created_at < until:
                page.append(
                    {**order.view(), "keys": len(order.keys), "created_at": order.created_at}
                )
        return page, position if position < len(everything) else 0

    def place_order(self, req: OrderRequest) -> tuple[Order, bool]:
        """The order for `req.out_trade_no` and whether this call created it.

        A repeat returns the existing order untouched (counted as a duplicate); a refusal is
        recorded as a rejected order; otherwise the order is bought: balance debited, stock
        taken, and (sync mode) keys generated.
        """
        existing = self.orders.get(req.out_trade_no)
        if existing is not None:
            existing.purchase_requests += 1
            self.stats.duplicate_requests += 1
            return existing, False
        now = self.clock()
        order = Order(
            out_trade_no=req.out_trade_no,
            sku=req.sku,
            quantity=req.quantity,
            fields=dict(req.fields),
            callback_url=req.callback_url,
            created_at=now,
        )
        self.orders[order.out_trade_no] = order
        entry = self.skus.get(req.sku)
        reason = self._refusal(req, entry, now)
        if reason is not None or entry is None:
            order.status, order.reason = "rejected", reason or "unknown_sku"
            self.stats.rejected += 1
            return order, True
        cfg = entry.config
        order.cost_cents = cfg.price_cents * req.quantity
        self.balance_cents -= order.cost_cents
        self._trades += 1
        order.trade_no = f"SIMT{self._trades:010d}"
        order.bought = 1
        self.stats.bought += 1
        take = req.quantity
        if cfg.partial_count:
            take = max(req.quantity - cfg.partial_count, 0)
            if entry.available is not None:
                take = min(take, entry.available)
        if entry.available is not None:
            entry.available -= take
        order.reserved = order.first_batch = take
        if cfg.mode == "sync":
            order.keys = self._new_keys(cfg, take)
            order.status = "partial" if cfg.partial_count else "delivered"
        return order, True

    def _refusal(self, req: OrderRequest, entry: SkuState | None, now: float) -> str | None:
        if entry is None:
            return "unknown_sku"
        cfg = entry.config
        if not cfg.is_open(now):
            return "maintenance"
        if cfg.denomination_closed:
            return "denomination_closed"
        if self.field_problem(cfg, req.fields) is not None:
            return "invalid_fields"
        available = self._available(entry)
        if available is not None and available < req.quantity and not cfg.partial_count:
            return "out_of_stock"
        if self.balance_cents < cfg.price_cents * req.quantity:
            return "insufficient_balance"
        return None

    def _new_keys(self, cfg: SkuConfig, count: int) -> list[dict[str, str]]:
        """Fresh keys; the instance-wide counter makes every code unique within this process."""
        if cfg.kind != "card_key" or count <= 0:
            return []
        tag = hashlib.sha256(cfg.sku.encode()).hexdigest()[:6].upper()
        keys = []
        for _ in range(count):
            self._keys += 1
            code = f"SIM{tag}-{self._keys:08d}-{self.rng.getrandbits(32):08X}"
            keys.append({"code": code, "secret": f"{self.rng.randrange(10**8):08d}"})
        return keys

    # -- outcomes decided after the response (callback mode, partial rest) -----------------------

    def decide(self, order: Order, cfg: SkuConfig) -> tuple[Event, Event | None]:
        """The callback-mode outcome (applied to the order now) and the events announcing it:
        the event to send and, with `out_of_order`, a stale one to send after it."""
        if cfg.callback_reject_rate and self.rng.random() < cfg.callback_reject_rate:
            self._refund(order, "upstream_failed")
            return self._final_events(order, cfg)
        order.keys.extend(self._new_keys(cfg, order.first_batch))
        if cfg.partial_count:
            order.status = "partial"
            return self._event(order), None
        order.status = "delivered"
        return self._final_events(order, cfg)

    def deliver_rest(self, order: Order, cfg: SkuConfig) -> tuple[Event, Event | None]:
        """Completes a partial order (the rest is a backorder: it does not touch stock)."""
        order.keys.extend(self._new_keys(cfg, order.quantity - len(order.keys)))
        order.status = "delivered"
        return self._final_events(order, cfg)

    def _refund(self, order: Order, reason: str) -> None:
        self.balance_cents += order.cost_cents
        entry = self.skus.get(order.sku)
        if entry is not None and entry.available is not None:
            entry.available += order.reserved
        order.cost_cents = 0
        order.status, order.reason = "rejected", reason
        self.stats.refunded += 1
        self.stats.rejected += 1

    def _final_events(self, order: Order, cfg: SkuConfig) -> tuple[Event, Event | None]:
        stale = None
        if cfg.out_of_order:
            # Takes the lower sequence number, so the pair looks like an earlier "partial" event
            # overtaken in flight by the final one.
            stale = self._event(order, status="partial", keys=order.keys[:-1], remember=False)
        return self._event(order), stale

    def _event(
        self,
        order: Order,
        *,
        status: str | None = None,
        keys: list[dict[str, str]] | None = None,
        remember: bool = True,
    ) -> Event:
        self._events += 1
        event: Event = {
            "event_id": f"evt-{self._events:010d}-{self.rng.getrandbits(32):08x}",
            "out_trade_no": order.out_trade_no,
            "trade_no": order.trade_no,
            "status": status or order.status,
            "keys": [dict(k) for k in (order.keys if keys is None else keys)],
            "reason": order.reason if status is None else None,
            "sequence": order.next_sequence,
        }
        order.next_sequence += 1
        if remember:
            order.last_event = event
        return event

    def record_attempt(
        self,
        order: Order,
        event: Event,
        *,
        attempt: int,
        ok: bool,
        http_status: int | None,
        error: str | None,
    ) -> None:
        self.stats.callbacks_sent += 1
        order.callbacks_sent += 1
        if not ok:
            self.stats.callbacks_failed += 1
            order.callbacks_failed += 1
        order.callback_log.append(
            {
                "event_id": event["event_id"],
                "sequence": event["sequence"],
                "status": event["status"],
                "attempt": attempt,
                "ok": ok,
                "http_status": http_status,
                "error": error,
                "at": self.clock(),
            }
        )

"""In-memory state of the simulated EPay gateway: merchants, trades, notify settings and the log
of every notify attempt.

The HTTP layer (`app.py`, `control.py`) and the notify tasks (`notify.py`) all run on the
server's single event loop, and no method here awaits, so each change (submit, pay, refund) is
atomic with respect to the loop. Tests also read this object from their own thread through
`GatewaySimHandle.state`, so every method takes one lock, never held across an await: a snapshot
then never sees a half-made trade or a dict changing size under it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from kameng.security.epay import format_money

# EPay gateways run on China Standard Time and print local times without a zone; a fixed +08:00
# makes the simulator's times the same on every machine.
CST = timezone(timedelta(hours=8), "CST")
PAY_TYPES = ("alipay", "wxpay", "qqpay")
NOTIFY_MODES = ("normal", "drop", "bad_sign", "duplicate")
DEFAULT_RETRY_S: tuple[float, ...] = (0.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
MAX_DUPLICATES = 20
MAX_RETRIES = 20
MAX_DELAY_S = 86_400.0


def epay_time(ts: float | None) -> str | None:
    """Unix seconds as EPay prints them ("YYYY-MM-DD HH:MM:SS", China time)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, CST).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Merchant:
    pid: str
    key: str
    currency: str


@dataclass
class NotifyConfig:
    """How notifies are sent; `/_sim/config` changes it, and each notify run copies it at
    its start, so a change affects later payments, not the retries already under way."""

    mode: str = "normal"
    delay_s: float = 0.0
    duplicate_count: int = 1
    retry_s: list[float] = field(default_factory=lambda: list(DEFAULT_RETRY_S))

    def view(self) -> dict[str, Any]:
        return {
            "notify": self.mode,
            "notify_delay_s": self.delay_s,
            "duplicate_count": self.duplicate_count,
            "notify_retry_s": list(self.retry_s),
        }

    def copy(self) -> NotifyConfig:
        return NotifyConfig(self.mode, self.delay_s, self.duplicate_count, list(self.retry_s))


def check_retry_schedule(value: object) -> list[float]:
    """A retry schedule: 1..20 non-negative delays in seconds (ValueError otherwise)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RETRIES:
        raise ValueError(f"notify_retry_s must be a list of 1..{MAX_RETRIES} delays")
    return [check_seconds(v, "notify_retry_s") for v in value]


def check_seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds")
    if not 0 <= value <= MAX_DELAY_S:
        raise ValueError(f"{name} must be between 0 and {MAX_DELAY_S:.0f} seconds")
    return float(value)


@dataclass
class NotifyAttempt:
    """One notify request as the gateway saw it (`url` without the query: it holds the sign)."""

    kind: str  # "notify" (scheduled), "duplicate" (extra copy) or "replay" (/_sim/.../notify)
    attempt: int
    at: float
    url: str
    bad_sign: bool
    http_status: int | None
    body: str
    ok: bool
    error: str | None

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "attempt": self.attempt,
            "at": self.at,
            "url": self.url,
            "bad_sign": self.bad_sign,
            "http_status": self.http_status,
            "body": self.body,
            "ok": self.ok,
            "error": self.error,
        }


@dataclass
class Trade:
    pid: str
    out_trade_no: str
    trade_no: str
    type: str
    name: str
    money_cents: int
    notify_url: str | None
    return_url: str | None
    sitename: str
    param: str
    currency: str | None  # only when the merchant sent one: then it is echoed in notify/query
    addtime: float
    origin: str  # "submit" or "control"
    seq: int
    submitted_money_cents: int = 0
    status: int = 0
    endtime: float | None = None
    api_trade_no: str = ""
    refunded_cents: int = 0
    notify_mode: str | None = None  # this trade's override of the global mode
    notify_state: str = "none"  # none | pending | acked | gave_up | dropped
    attempts: list[NotifyAttempt] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.pid, self.out_trade_no)

    def order_view(self) -> dict[str, Any]:
        """The order fields of `api.php?act=order` (without `code`/`msg`)."""
        out: dict[str, Any] = {
            "trade_no": self.trade_no,
            "out_trade_no": self.out_trade_no,
            "api_trade_no": self.api_trade_no,
            "type": self.type,
            "pid": self.pid,
            "addtime": epay_time(self.addtime),
            "endtime": epay_time(self.endtime),
            "name": self.name,
            "money": format_money(self.money_cents),
            "param": self.param,
            "buyer": "",
            "status": self.status,
        }
        if self.currency is not None:
            out["currency"] = self.currency
        return out

    def view(self) -> dict[str, Any]:
        """The `/_sim/state` entry: everything, including what the protocol never shows."""
        return {
            **self.order_view(),
            "currency": self.currency,
            "submitted_money": format_money(self.submitted_money_cents),
            "refunded_money": format_money(self.refunded_cents),
            "notify_url": self.notify_url,
            "return_url": self.return_url,
            "sitename": self.sitename,
            "origin": self.origin,
            "fault": self.notify_mode,
            "notify_state": self.notify_state,
            "notify_attempts": [a.view() for a in self.attempts],
        }


@dataclass(frozen=True)
class NewTrade:
    """What a submit (or `/_sim/trades`) asks for; `GatewayState.open_trade` decides."""

    pid: str
    out_trade_no: str
    type: str
    name: str
    money_cents: int
    notify_url: str | None
    return_url: str | None = None
    sitename: str = ""
    param: str = ""
    currency: str | None = None


class GatewayState:
    def __init__(
        self,
        merchants: Mapping[str, Merchant],
        config: NotifyConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not merchants:
            raise ValueError("at least one merchant is required")
        self.merchants = dict(merchants)
        self.config = config
        self.clock = clock
        self.trades: dict[tuple[str, str], Trade] = {}
        self._by_trade_no: dict[str, Trade] = {}
        # Survives reset, so a gateway trade number is never handed out twice by one process.
        self._issued: set[str] = set()
        self._seq = 0
        self._lock = threading.RLock()

    # -- lookups ----------------------------------------------------------------------------------

    @property
    def first_pid(self) -> str:
        return next(iter(self.merchants))

    def merchant(self, pid: str) -> Merchant | None:
        return self.merchants.get(pid)

    def find(self, pid: str, out_trade_no: str) -> Trade | None:
        with self._lock:
            return self.trades.get((pid, out_trade_no))

    def by_trade_no(self, trade_no: str) -> Trade | None:
        with self._lock:
            return self._by_trade_no.get(trade_no)

    def is_current(self, trade: Trade) -> bool:
        """False once a reset has forgotten the trade (its notify run must stop)."""
        with self._lock:
            return self.trades.get(trade.key) is trade

    def orders(self, pid: str, *, status: int | None, limit: int, offset: int) -> list[Trade]:
        """The merchant's trades, newest first (the `act=orders` page)."""
        with self._lock:
            mine = [
                t
                for t in self.trades.values()
                if t.pid == pid and (status is None or t.status == status)
            ]
        mine.sort(key=lambda t: t.seq, reverse=True)
        return mine[offset : offset + limit]

    # -- changes ----------------------------------------------------------------------------------

    def open_trade(self, req: NewTrade, *, origin: str = "submit") -> tuple[Trade, str]:
        """The trade for a submit and what happened: "created", "reused" (same unpaid order
        again: the merchant's latest URLs and type win), "paid" (already paid: nothing changes)
        or "duplicate" (the number is taken by an order with another amount or name)."""
        with self._lock:
            existing = self.trades.get((req.pid, req.out_trade_no))
            if existing is not None:
                if existing.status == 1:
                    return existing, "paid"
                if existing.money_cents != req.money_cents or existing.name != req.name:
                    return existing, "duplicate"
                existing.type = req.type
                existing.notify_url = req.notify_url
                existing.return_url = req.return_url
                existing.sitename = req.sitename
                existing.param = req.param
                existing.currency = req.currency
                return existing, "reused"
            self._seq += 1
            now = self.clock()
            trade = Trade(
                pid=req.pid,
                out_trade_no=req.out_trade_no,
                trade_no=self._new_trade_no(now),
                type=req.type,
                name=req.name,
                money_cents=req.money_cents,
                notify_url=req.notify_url,
                return_url=req.return_url,
                sitename=req.sitename,
                param=req.param,
                currency=req.currency,
                addtime=now,
                origin=origin,
                seq=self._seq,
                submitted_money_cents=req.money_cents,
            )
            self.trades[trade.key] = trade
            self._by_trade_no[trade.trade_no] = trade
            return trade, "created"

    def _new_trade_no(self, now: float) -> str:
        """14 digits of China time and 6 random ones, like the gateways' own numbers."""
        stamp = datetime.fromtimestamp(now, CST).strftime("%Y%m%d%H%M%S")
        while True:
            trade_no = f"{stamp}{secrets.randbelow(10**6):06d}"
            if trade_no not in self._issued:
                self._issued.add(trade_no)
                return trade_no

    def pay(self, trade: Trade, *, money_cents: int | None = None) -> bool:
        """Mark the trade paid (optionally at another amount); False if it already was."""
        with self._lock:
            if trade.status == 1:
                return False
            if money_cents is not None:
                trade.money_cents = money_cents
            trade.status = 1
            trade.endtime = self.clock()
            trade.api_trade_no = f"SIM{trade.trade_no}"
            return True

    def mutate(self, trade: Trade, *, status: int | None, money_cents: int | None) -> None:
        """Change the record silently (reconciliation tests): no notify, no refund check."""
        with self._lock:
            if money_cents is not None:
                trade.money_cents = money_cents
            if status == 1 and trade.status != 1:
                trade.status = 1
                trade.endtime = self.clock()
                trade.api_trade_no = f"SIM{trade.trade_no}"
            elif status == 0:
                trade.status = 0
                trade.endtime = None
                trade.api_trade_no = ""

    def refund(self, trade: Trade, cents: int) -> str | None:
        """Refund `cents` of a paid trade; None on success, else the reason (zh / en)."""
        with self._lock:
            if trade.status != 1:
                return "订单未支付，无法退款 / the order is not paid"
            if cents <= 0:
                return "退款金额不正确 / invalid refund amount"
            if cents > trade.money_cents - trade.refunded_cents:
                left = format_money(max(trade.money_cents - trade.refunded_cents, 0))
                return f"退款金额超过可退金额 {left} / refund exceeds the refundable {left}"
            trade.refunded_cents += cents
            return None

    def set_fault(self, trade: Trade, mode: str | None) -> None:
        """This trade's own notify mode (overrides the global one); None keeps the global."""
        with self._lock:
            trade.notify_mode = mode

    def set_notify_state(self, trade: Trade, value: str) -> None:
        with self._lock:
            trade.notify_state = value

    def record_attempt(self, trade: Trade, attempt: NotifyAttempt) -> None:
        with self._lock:
            trade.attempts.append(attempt)
            if attempt.ok:
                trade.notify_state = "acked"

    def update_config(self, patch: Mapping[str, object]) -> NotifyConfig:
        """Apply a `/_sim/config` body; all-or-nothing (ValueError names the bad key)."""
        unknown = set(patch) - {"notify", "notify_delay_s", "duplicate_count", "notify_retry_s"}
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        with self._lock:
            new = self.config.copy()
            if "notify" in patch:
                new.mode = check_mode(patch["notify"])
            if "notify_delay_s" in patch:
                new.delay_s = check_seconds(patch["notify_delay_s"], "notify_delay_s")
            if "duplicate_count" in patch:
                count = patch["duplicate_count"]
                if isinstance(count, bool) or not isinstance(count, int):
                    raise ValueError("duplicate_count must be an integer")
                if not 0 <= count <= MAX_DUPLICATES:
                    raise ValueError(f"duplicate_count must be 0..{MAX_DUPLICATES}")
                new.duplicate_count = count
            if "notify_retry_s" in patch:
                new.retry_s = check_retry_schedule(patch["notify_retry_s"])
            self.config = new
            return new.copy()

    def reset(self) -> None:
        """Forget every trade (settings and the issued trade numbers stay)."""
        with self._lock:
            self.trades.clear()
            self._by_trade_no.clear()

    def snapshot(self) -> dict[str, Any]:
        """The `/_sim/state` body. Merchant keys are never part of it."""
        with self._lock:
            trades = sorted(self.trades.values(), key=lambda t: t.seq)
            return {
                "merchants": [
                    {"pid": m.pid, "currency": m.currency} for m in self.merchants.values()
                ],
                "config": self.config.view(),
                "trades": [t.view() for t in trades],
            }


def check_mode(value: object) -> str:
    if value not in NOTIFY_MODES:
        raise ValueError(f"notify must be one of {', '.join(NOTIFY_MODES)}")
    return str(value)

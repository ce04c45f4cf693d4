"""The supplier port (DESIGN §7): what the pipeline needs from any upstream, whatever protocol.

Every call is async (the worker runs many purchases at once) and never raises for an upstream
problem: a timeout, a reset, a 5xx or a garbled body is `unknown` — the purchase *may* have
happened, so the only safe next step is `query`, never a second purchase. Only a definite
answer (`rejected`, or `not_found` from a query) proves that nothing was bought.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Outcome(StrEnum):
    delivered = "delivered"  # all keys (or the top-up) delivered
    partial = "partial"  # some keys now, the rest owed
    accepted = "accepted"  # taken; the result comes by callback or poll
    rejected = "rejected"  # refused: nothing bought
    unknown = "unknown"  # no trustworthy answer: query before anything else
    not_found = "not_found"  # (query only) they never received this order number


FINAL = frozenset({Outcome.delivered, Outcome.rejected})


@dataclass(frozen=True, slots=True)
class SupplierKey:
    code: str
    secret: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    keys: tuple[SupplierKey, ...] = ()
    reason: str = ""
    trade_no: str = ""
    cost_cents: int | None = None
    detail: str = ""  # for logs and the timeline: what exactly went wrong (never a key)


@dataclass(frozen=True, slots=True)
class CatalogItem:
    sku: str
    name: str
    kind: str
    price_cents: int
    available: int | None
    open: bool


@dataclass(frozen=True, slots=True)
class Quote:
    sku: str
    unit_price_cents: int
    available: int | None
    open: bool


@dataclass(frozen=True, slots=True)
class CallbackEvent:
    """A verified callback. `result` None means "something changed, ask us" (a nudge)."""

    event_id: str
    out_trade_no: str
    result: Result | None = None
    sequence: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class CallbackRefused(Exception):
    """A callback that must not be applied; `code` is the stable reason returned to the sender."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class SupplierPort(Protocol):
    async def catalog(self) -> list[CatalogItem]: ...

    async def quote(self, *, sku: str, quantity: int) -> Quote | None: ...

    async def purchase(
        self,
        *,
        order_no: str,
        sku: str,
        quantity: int,
        fields: dict[str, str],
        callback_url: str | None,
    ) -> Result: ...

    async def query(self, *, order_no: str) -> Result: ...

    async def balance(self) -> int | None: ...

    def parse_callback(self, *, headers: dict[str, str], body: bytes, now: int) -> CallbackEvent:
        """Verify and decode a callback; raises CallbackRefused."""
        ...

    async def aclose(self) -> None: ...

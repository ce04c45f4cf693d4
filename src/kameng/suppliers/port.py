"""The supplier port (DESIGN §7): what the pipeline needs from any upstream, whatever protocol.

Every call is async (the worker runs many purchases at once) and never raises for an upstream
problem: a timeout, a reset, a 5xx or a garbled body is `unknown` — the purchase *may* have
happened, so the only safe next step is `query`, never a second purchase. Only a definite
answer (`rejected`, or `not_found` from a query) proves that nothing was bought.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


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
    # For a refusal: whether the supplier records it against our out-trade-no, so that a
    # later copy of the same request (one held in the network) gets the same refusal. A
    # refusal it does not remember (a bad request, a kameng site's 4xx) frees the line only
    # once no copy of the request can be accepted any more.
    binding: bool = True


@dataclass(frozen=True, slots=True)
class SupplierRecord:
    """One purchase as the supplier's own books have it (for reconciliation)."""

    out_trade_no: str
    status: str  # the supplier's word, for the report
    charged: bool  # the supplier kept our money for it (delivered, partly or wholly, or owed)
    cost_cents: int | None
    trade_no: str = ""


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


# -- pre-check of buyer information (an optional capability) ---------------------------------------

UNAVAILABLE = "unavailable"
ACCOUNT_NOT_FOUND = "account_not_found"
DENOMINATION_CLOSED = "denomination_closed"
INVALID_FIELDS = "invalid_fields"
# The refusals a supplier can give; an adapter maps anything else to `unavailable`, because a
# code we do not understand must never be the reason a buyer is turned away.
PRECHECK_REFUSALS = frozenset({ACCOUNT_NOT_FOUND, DENOMINATION_CLOSED, INVALID_FIELDS})

# What the buyer is told. Ours rather than the supplier's wording: their texts vary in language
# and quality, and may leak details of the upstream.
_PRECHECK_TEXT = {
    "": ("充值信息校验通过", "The recharge details were checked and look right."),
    ACCOUNT_NOT_FOUND: (
        "充值账号不存在，请核对后重新填写",
        "This recharge account does not exist; please check it and try again.",
    ),
    DENOMINATION_CLOSED: (
        "该面值暂时无法充值，请稍后再试或选择其他面值",
        "This denomination cannot be topped up right now; try later or pick another.",
    ),
    INVALID_FIELDS: (
        "充值信息有误，请核对后重新填写",
        "The recharge details are not valid; please check them and try again.",
    ),
    UNAVAILABLE: (
        "暂时无法预先校验充值信息，可以继续下单",
        "The recharge details could not be checked in advance; you can still order.",
    ),
}


@dataclass(frozen=True, slots=True)
class Precheck:
    """A supplier's answer to "would this buyer information be accepted now?", before payment.

    `reason` is "" for a yes, a code of PRECHECK_REFUSALS for a no, or `unavailable` when no
    answer could be had (no such capability, timeout, 5xx, garbled body). Only a yes or a no is
    `decisive`; `unavailable` is always `ok`, so a caller that only reads `ok` can never turn a
    buyer away because a check did not run. Build one with `passed`, `refused` or `unavailable`.
    """

    ok: bool
    reason: str = ""
    field: str = ""  # the buyer field that is wrong, "" when none (or unknown)
    message_zh: str = ""
    message_en: str = ""
    detail: str = ""  # for logs: what the supplier said, or why there is no answer

    def __post_init__(self) -> None:
        if self.ok and self.reason not in ("", UNAVAILABLE):
            raise ValueError(f"a passed pre-check cannot carry reason {self.reason!r}")
        if not self.ok and self.reason in ("", UNAVAILABLE):
            raise ValueError("a failed pre-check needs a refusal reason")

    @property
    def decisive(self) -> bool:
        """True only when the supplier positively said yes or no."""
        return self.reason != UNAVAILABLE

    @classmethod
    def passed(cls, *, detail: str = "") -> Precheck:
        zh, en = _PRECHECK_TEXT[""]
        return cls(ok=True, message_zh=zh, message_en=en, detail=detail)

    @classmethod
    def refused(cls, reason: str, *, field: str = "", detail: str = "") -> Precheck:
        zh, en = _PRECHECK_TEXT.get(reason, _PRECHECK_TEXT[INVALID_FIELDS])
        return cls(
            ok=False, reason=reason, field=field, message_zh=zh, message_en=en, detail=detail
        )

    @classmethod
    def unavailable(cls, detail: str = "") -> Precheck:
        zh, en = _PRECHECK_TEXT[UNAVAILABLE]
        return cls(ok=True, reason=UNAVAILABLE, message_zh=zh, message_en=en, detail=detail)


@runtime_checkable
class PrecheckPort(Protocol):
    """The optional capability of checking buyer information before payment (direct top-ups).

    A separate protocol rather than a member of SupplierPort, and no `supports_precheck` flag:
    a Protocol cannot declare an optional method, and adding a required one would break every
    existing implementation (test doubles included). A flag would be a second way of saying what
    `Precheck.unavailable` already says, and callers must handle `unavailable` anyway (the check
    can time out), so one path covers both "cannot" and "could not": an adapter either lacks
    the method or answers `unavailable`. `suppliers.precheck.precheck_order` treats both alike.

    Never raises for an upstream problem, and should answer within a few seconds: a buyer is
    waiting at the checkout.
    """

    async def precheck(self, *, sku: str, fields: dict[str, str]) -> Precheck: ...


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

    async def records(self, *, since: int, until: int) -> list[SupplierRecord] | None:
        """The supplier's record of our purchases created in [since, until) (Unix seconds),
        all pages; None when it could not be had (reconciliation then says "unchecked")."""
        ...

    def parse_callback(self, *, headers: dict[str, str], body: bytes, now: int) -> CallbackEvent:
        """Verify and decode a callback; raises CallbackRefused."""
        ...

    async def aclose(self) -> None: ...

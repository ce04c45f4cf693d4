"""The gateway port: what the platform needs from any payment gateway.

An adapter turns its protocol into these values and never raises for gateway trouble: a
timeout or a garbled answer is a `GatewayRecord` of `unreachable`, so callers decide what to
do (ask again later) in one place. Everything a gateway tells us is checked against our own
payment row by `payments.service`, never trusted on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class NotifyProblem(StrEnum):
    bad_signature = "bad_signature"
    wrong_merchant = "wrong_merchant"
    not_success = "not_success"  # signed, but the trade is not (yet) paid
    malformed = "malformed"  # signed, but a field we need is missing or unreadable


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A gateway's statement that a trade is paid (from a notify, a return or a query)."""

    payment_no: str
    gateway_trade_no: str
    amount_cents: int
    currency: str
    pay_type: str = ""


@dataclass(frozen=True, slots=True)
class NotifyCheck:
    """A notify's parameters after the signature and merchant check: a confirmation, or a
    problem. `payment_no` is kept (when readable) so even a refused notify can be traced."""

    confirmation: Confirmation | None
    problem: NotifyProblem | None
    payment_no: str = ""
    gateway_trade_no: str = ""
    money: str = ""


class RecordState(StrEnum):
    paid = "paid"
    unpaid = "unpaid"
    not_found = "not_found"
    unreachable = "unreachable"  # timeout, refused, 5xx, unreadable answer: ask again later


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    """What the gateway's own books say about one trade."""

    state: RecordState
    payment_no: str = ""
    gateway_trade_no: str = ""
    amount_cents: int | None = None
    currency: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Checkout:
    """Where to send the buyer's browser: a URL and the form fields to POST (or GET) there."""

    url: str
    fields: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


class GatewayPort(Protocol):
    currency: str

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
    ) -> Checkout: ...

    def check_notify(self, params: Mapping[str, str]) -> NotifyCheck: ...

    async def query(self, payment_no: str) -> GatewayRecord: ...

    async def recent(self, *, limit: int, offset: int = 0) -> list[GatewayRecord] | None:
        """The gateway's newest trades, or None when it cannot list them."""
        ...

    async def refund(self, payment_no: str, amount_cents: int) -> tuple[bool, str]:
        """Send money back to the payer through the gateway: (done, the gateway's message)."""
        ...

    async def aclose(self) -> None: ...

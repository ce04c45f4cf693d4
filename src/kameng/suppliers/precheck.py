"""Pre-check of an order's buyer information with its suppliers, before the buyer pays.

For a direct top-up a wrong account is only discovered when the supplier refuses the purchase,
after the money has moved; suppliers that can say "this account does not exist" or "this
denomination is closed" beforehand let the checkout catch it instead.

Orchestration only, over data the caller already holds (the SKU's offers and live adapters):
no database I/O here, so the caller reads the offers in one short transaction, closes it, and
only then waits on the network (no transaction is ever held across a supplier call).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from kameng.suppliers.port import DENOMINATION_CLOSED, Precheck, PrecheckPort, SupplierPort
from kameng.suppliers.service import Offer, route

log = logging.getLogger("kameng.suppliers")

# The whole budget across suppliers: a buyer is waiting, and no answer only means no check.
DEFAULT_TIMEOUT_S = 3.0
# Less time than this left is not worth a request (and a timer may fire a hair early).
MIN_ASK_S = 0.05


async def precheck_order(
    *,
    offers: Sequence[Offer],
    adapters: Mapping[int, SupplierPort],
    fields: Mapping[str, str],
    now: datetime,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Precheck:
    """Ask the SKU's suppliers, in the order the pipeline would buy from them, whether this
    buyer information would be accepted now.

    `offers` is `suppliers.offers_for(...)` for the SKU (routing is applied here, exactly as the
    pipeline does for a first purchase); `adapters` maps a supplier id to its live adapter
    (`Adapters.get(supplier_row)`); an offer without one is skipped as unable to answer.

    The first decisive answer about the buyer wins: a yes, or "the account does not exist" /
    "invalid fields" (an account exists or not whichever supplier is asked). A supplier that
    cannot answer (no capability, timeout, error) is passed over for the next one.
    `denomination_closed` speaks only for that supplier's supply, so it is returned only when
    every routable supplier said so; if any could not be asked, the answer is `unavailable`.

    Never raises for a supplier problem and never waits much beyond `timeout_s` in total; a
    non-decisive answer must never be the reason a buyer is turned away.
    """
    routable = route(list(offers), now=now, exclude=set())
    if not routable:
        return Precheck.unavailable("no supplier can take this SKU now")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    closed: Precheck | None = None
    unanswered = False
    for offer in routable:
        remaining = deadline - loop.time()
        if remaining < MIN_ASK_S:
            unanswered = True
            break
        answer = await _ask(adapters.get(offer.supplier_id), offer, dict(fields), remaining)
        if answer.reason == DENOMINATION_CLOSED:
            closed = closed or answer
        elif answer.decisive:
            return answer
        else:
            unanswered = True
    if closed is not None and not unanswered:
        return closed
    return Precheck.unavailable("no supplier could answer" if closed is None else "partly closed")


async def _ask(
    adapter: SupplierPort | None, offer: Offer, fields: dict[str, str], budget_s: float
) -> Precheck:
    if not isinstance(adapter, PrecheckPort):
        return Precheck.unavailable(f"{offer.supplier_code}: no pre-check")
    try:
        async with asyncio.timeout(budget_s):
            answer = await adapter.precheck(sku=offer.supplier_sku, fields=fields)
    except TimeoutError:
        return Precheck.unavailable(f"{offer.supplier_code}: timeout")
    except Exception:  # an advisory check must never be why an order cannot be placed
        log.exception("pre-check at %s failed", offer.supplier_code)
        return Precheck.unavailable(f"{offer.supplier_code}: adapter error")
    return replace(answer, detail=f"{offer.supplier_code}: {answer.detail}".removesuffix(": "))

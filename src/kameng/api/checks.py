"""The checks a money-moving Reseller API request passes before its effect, besides its
signature (`deps`): the idempotency lookup for POSTs whose key is optional, body validation,
and the supplier's pre-check of buyer information within a per-reseller limit.

Kept apart from the endpoints so every money-moving POST runs the same checks the same way:
signature, nonce, idempotency, validation, pre-check, effect — each only once the one before
passed, so a replay is answered before anything can have changed its answer and a request
that is not authentic never reaches a supplier.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Connection

from kameng.api.deps import SignedRequest
from kameng.catalog.models import DeliveryKind
from kameng.catalog.service import SkuInfo
from kameng.container import Container
from kameng.errors import KamengError
from kameng.idempotency import service as idem
from kameng.pipeline import buyer_info
from kameng.ratelimit import RateLimiter
from kameng.resellers.service import Caller
from kameng.suppliers.port import Precheck

log = logging.getLogger("kameng.api")
M = TypeVar("M", bound=BaseModel)

PRECHECKS = Counter(
    "kameng_api_prechecks_total",
    "Supplier pre-checks of buyer information for Reseller API orders and corrections, by "
    "outcome; rate_limited: skipped at the reseller's limit, so the order went on unchecked",
    ["outcome"],
)


def replayed_header(replayed: bool) -> dict[str, str] | None:
    return {"Idempotent-Replayed": "true"} if replayed else None


def parse_json(model: type[M], body: bytes) -> M:
    """The body as `model`, refused with the same 400 as a body FastAPI itself validated."""
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in exc.errors()]
        ) from None


def stored_answer(
    conn: Connection, caller: Caller, claim: idem.Claim, req: SignedRequest, header: str | None
) -> dict[str, Any] | None:
    """For POSTs where `Idempotency-Key` is optional: the answer stored under the key sent, if
    any (refusing a key in flight or reused with another body); None without a key."""
    key = idem.optional_key(header)
    if key is None:
        return None
    claim.take(caller.scope, key)
    idem.lock_across_processes(conn, scope=caller.scope, key=key)
    stored = idem.find(conn, scope=caller.scope, key=key, req_hash=request_hash(req))
    return None if stored is None else stored.response


def store_answer(
    conn: Connection,
    caller: Caller,
    req: SignedRequest,
    header: str | None,
    body: dict[str, Any],
    now: datetime,
) -> None:
    key = idem.optional_key(header)
    if key is not None:
        idem.store(
            conn,
            scope=caller.scope,
            key=key,
            req_hash=request_hash(req),
            status_code=200,
            response=body,
            now=now,
        )


def request_hash(req: SignedRequest) -> bytes:
    return idem.request_hash(req.method, req.path.split("?")[0], req.body)


def precheck_due(container: Container, conn: Connection, sku: SkuInfo) -> bool:
    """Whether placing (or correcting) this SKU's order asks a supplier first: only direct
    top-ups have buyer information a supplier can check, and only those procured upstream."""
    return sku.delivery_kind == DeliveryKind.direct_topup.value and container.has_offers(
        sku.id, conn=conn
    )


async def precheck(
    request: Request, container: Container, caller: Caller, sku: SkuInfo, fields: dict[str, str]
) -> Precheck | None:
    """The supplier's pre-check of these fields, within the reseller's share of it.

    Each check is a signed call on the supplier's rate limit, paid for by nobody. Past
    `prechecks_per_minute` for this reseller the check is skipped and the answer is
    `unavailable` — the answer a supplier that cannot check gives — rather than a 429:
    - the check is advice, never a condition of an order: an unchecked order with a wrong
      account is refused by the supplier after payment and waits in `needs_buyer_action` for
      the buyer to correct it or be refunded, so skipping costs an early warning, not money;
    - a 429 would refuse paid orders of a reseller in a legitimate burst (a promotion, a batch
      after an outage) because of a limit that protects someone else's resource, and invite
      retries that cost more than the order;
    - what the limit is for is kept either way: past it, the supplier is not asked, and
      learning whether an account exists costs a placed order, not a free request.
    Skips are counted in `kameng_api_prechecks_total{outcome="rate_limited"}`."""
    try:
        precheck_limiter(request, container).check(caller.scope)
    except KamengError:
        PRECHECKS.labels(outcome="rate_limited").inc()
        log.info("pre-check skipped: %s is past its pre-check limit", caller.scope)
        return Precheck.unavailable("the reseller's pre-check limit is reached")
    result = await buyer_info.precheck(
        run_read=lambda job: read(container, job),
        adapters=request.app.state.adapters,
        sku=sku,
        fields=fields,
        now=container.clock(),
    )
    if result is not None:
        outcome = "unavailable" if not result.decisive else "passed" if result.ok else "refused"
        PRECHECKS.labels(outcome=outcome).inc()
    return result


async def read(container: Container, job: Any) -> Any:
    def run() -> Any:
        with container.db.connect(write=False) as conn:
            return job(conn)

    return await asyncio.to_thread(run)


_LIMITER_LOCK = threading.Lock()


def precheck_limiter(request: Request, container: Container) -> RateLimiter:
    """The per-reseller limit on supplier pre-checks (`prechecks_per_minute`), one per app.

    Created on first use rather than with the app's other limiters so that any app serving the
    Reseller API has it; an app that sets `app.state.precheck_limiter` itself keeps its own."""
    state = request.app.state
    limiter: RateLimiter | None = getattr(state, "precheck_limiter", None)
    if limiter is None:
        with _LIMITER_LOCK:
            limiter = getattr(state, "precheck_limiter", None)
            if limiter is None:
                limiter = RateLimiter(limit=container.settings.prechecks_per_minute, window_s=60)
                state.precheck_limiter = limiter
    return limiter

"""create_app(): routers, error handling, health and metrics around one Container."""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kameng import __version__, housekeeping
from kameng.api import callbacks, reseller_v1
from kameng.api import payments as payment_edge
from kameng.api import staff as staff_api
from kameng.api.responses import JSON
from kameng.container import Container
from kameng.errors import ErrorCode, KamengError, normalize_language
from kameng.payments.registry import Gateways
from kameng.pipeline.metrics import HealthCache, PipelineCollector
from kameng.pipeline.registry import Adapters
from kameng.ratelimit import RateLimiter
from kameng.security.bodylimit import KIB, MIB, BodyLimit, BodyRule
from kameng.web import account, documents, refusals, shop

log = logging.getLogger("kameng")


def _language(request: Request) -> str:
    return normalize_language(request.headers.get("accept-language"))


def _error(exc: KamengError, request: Request) -> JSON:
    headers = None
    if exc.code is ErrorCode.rate_limited:
        headers = {"Retry-After": str(exc.params.get("retry_after", 60))}
    return JSON(exc.to_dict(_language(request)), status_code=exc.http_status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        problems.append(
            {
                "field": ".".join(loc) or "body",
                "code": err.get("type", "invalid"),
                "message": err.get("msg", ""),
            }
        )
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return summary, problems


class CrashGuard:
    """Turns an unexpected exception into a 500 with a request id, and logs it safely.

    The log gets the exception type and the stack (file, line, function) but never the
    exception's message: database driver errors quote bound parameters, which may be secrets.
    Handled here, the exception does not travel on to the server's own error logging.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            request_id = secrets.token_hex(6)
            stack = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unhandled %s [request %s]\n%s", type(exc).__name__, request_id, stack)
            if started:
                return
            request = Request(scope)
            err = KamengError(ErrorCode.internal_error, request_id=request_id)
            response = JSON(err.to_dict(_language(request)), status_code=500)
            await response(scope, receive, send)


def body_rules() -> tuple[BodyRule, ...]:
    """What each route may be sent, first match wins (enforced by `BodyLimit`, before routes).

    Gateways' notifies are a few signed fields; supplier callbacks carry delivered keys (up to
    an order's 1,000), so they keep the callback route's own cap; a staff rule set may hold
    500 rules. The document upload is the only route that takes a file. Everything else
    outside /api/ is the storefront: url-encoded forms with a handful of short fields.
    """
    return (
        BodyRule("/pay/notify/*", 16 * KIB),
        BodyRule("/api/v1/callbacks/*", callbacks.MAX_BODY),
        BodyRule("/api/staff/risk/rule-sets", 1 * MIB),
        BodyRule("/api/*", 64 * KIB),
        BodyRule(
            documents.PAGE,
            documents.MAX_UPLOAD_BODY,
            multipart=True,
            page=documents.refuse_unread,
        ),
        BodyRule(
            "*", 64 * KIB, form_fields=100, form_field_bytes=8 * KIB, page=refusals.error_page
        ),
    )


def create_app(container: Container | None = None, *, embedded_worker: bool = False) -> FastAPI:
    """The web app. With `embedded_worker` (what `kameng serve` does) one pipeline worker runs
    in the same process and event loop, so a single command is a complete installation."""
    container = container or Container.build()
    try:
        _ = container.accounts  # resolved now, never lazily inside a request's transaction
    except Exception as exc:
        raise RuntimeError(
            f"database not ready ({type(exc).__name__}); run `kameng migrate` first"
        ) from exc

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(housekeeping.run_forever(container))
        stop = asyncio.Event()
        worker_task = None
        if embedded_worker:
            from kameng.pipeline.worker import Worker

            worker_task = asyncio.create_task(Worker(container).run(stop))
        try:
            yield
        finally:
            task.cancel()
            stop.set()
            if worker_task is not None:
                await worker_task
            await app.state.adapters.aclose()
            await app.state.gateways.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="kameng Reseller API",
        version=__version__,
        description=(
            "Card keys and direct top-ups for resellers. Every request is signed: "
            "`X-Signature = hex(HMAC-SHA256(secret, METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\n"
            "sha256hex(body)))` with `X-Api-Key`, `X-Timestamp` (±300 s) and a fresh `X-Nonce`. "
            "Money-moving POSTs need an `Idempotency-Key`. Errors are "
            '`{"error": {"code", "message"}}` with stable codes; messages follow '
            "`Accept-Language` (zh-CN default, en)."
        ),
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        default_response_class=JSON,
    )
    app.state.container = container
    app.state.adapters = Adapters(container.vault)
    app.state.gateways = Gateways(container.vault)
    app.state.gateway_rows = {}  # gateway rows by code, cached briefly for notifies
    pipeline_registry = CollectorRegistry(auto_describe=True)
    pipeline_registry.register(PipelineCollector(container))
    health = HealthCache(container)
    settings = container.settings
    app.state.lookup_limiter = RateLimiter(limit=settings.lookup_rate_per_minute, window_s=60)
    app.state.login_limiter = RateLimiter(
        limit=settings.login_failures_per_window, window_s=settings.login_window_s
    )
    app.state.register_limiter = RateLimiter(limit=settings.registrations_per_hour, window_s=3600)
    app.state.checkout_limiter = RateLimiter(limit=settings.checkouts_per_minute, window_s=60)

    @app.exception_handler(KamengError)
    async def _kameng_error(request: Request, exc: KamengError) -> JSON:
        return _error(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSON:
        summary, problems = _validation_detail(exc)
        err = KamengError(ErrorCode.invalid_request, detail=summary, extra={"fields": problems})
        return JSON(err.to_dict(_language(request)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSON:
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(
            exc.status_code, ErrorCode.invalid_request
        )
        err = KamengError(code, detail=str(exc.detail))
        return JSON(err.to_dict(_language(request)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSON:
        request_id = secrets.token_hex(6)
        # Log the type and where, never the message: driver errors can quote bound values.
        log.error(
            "unhandled %s in %s %s [request %s]",
            type(exc).__name__,
            request.method,
            request.url.path,
            request_id,
            exc_info=False,
        )
        err = KamengError(ErrorCode.internal_error, request_id=request_id)
        return JSON(err.to_dict(_language(request)), status_code=500)

    # Added first, so it runs inside CrashGuard but before any route or dependency reads a
    # body: a body it cut off surfaces in the app as a client disconnect, which it answers.
    app.add_middleware(BodyLimit, rules=body_rules())
    app.add_middleware(CrashGuard)
    app.include_router(reseller_v1.router)
    app.include_router(staff_api.router)
    app.include_router(reseller_v1.public)
    app.include_router(callbacks.router)
    app.include_router(payment_edge.router)
    app.include_router(shop.router)
    app.include_router(account.router)
    app.include_router(documents.router)
    app.mount(
        "/static", StaticFiles(directory=Path(shop.__file__).parent / "static"), name="static"
    )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        with container.db.connect(write=False) as conn:
            conn.execute(text("SELECT 1"))
        return JSON({"status": "ok", "version": __version__, "pipeline": health.get()})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body = generate_latest() + generate_latest(pipeline_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app

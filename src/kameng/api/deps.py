"""HTTP-edge dependencies: the container, the caller's language, signed-request auth."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar
from urllib.parse import unquote

from fastapi import Depends, Request
from sqlalchemy.engine import Connection

from kameng.container import Container
from kameng.db import savepoint
from kameng.errors import ErrorCode, KamengError, normalize_language
from kameng.resellers import service as resellers
from kameng.resellers.service import Caller
from kameng.security.signing import body_sha256, sign_request, signature_matches, string_to_sign

T = TypeVar("T")
SIGNATURE_HEADERS = ("X-Api-Key", "X-Timestamp", "X-Nonce", "X-Signature")
MAX_NONCE_LENGTH = 128


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def get_language(request: Request) -> str:
    return normalize_language(request.headers.get("accept-language"))


ContainerDep = Annotated[Container, Depends(get_container)]
LanguageDep = Annotated[str, Depends(get_language)]


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a signed request carries, read on the event loop (no I/O but the body)."""

    api_key: str
    timestamp: str
    nonce: str
    signature: str
    method: str
    path: str
    body: bytes


def path_with_query(request: Request) -> str:
    """The path exactly as sent (still percent-encoded), as the client signed it."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    path = raw.decode("latin-1")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def signed_request(request: Request, container: ContainerDep) -> SignedRequest:
    """Header and clock checks that need no database; the rest happens in `authenticated`."""
    headers = request.headers
    missing = [h for h in SIGNATURE_HEADERS if not headers.get(h)]
    if missing:
        raise KamengError(ErrorCode.auth_missing, headers=", ".join(missing))
    timestamp, nonce = headers["x-timestamp"], headers["x-nonce"]
    window = container.settings.signature_window_s
    now = int(container.clock().timestamp())
    digits = timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12
    if not digits or abs(now - int(timestamp)) > window:
        raise KamengError(ErrorCode.auth_timestamp_out_of_window, window=window)
    if len(nonce) > MAX_NONCE_LENGTH or not nonce.isprintable():
        raise KamengError(ErrorCode.auth_missing, headers="X-Nonce (1-128 printable characters)")
    if "\x00" in unquote(request.url.path) or any(
        "\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()
    ):
        raise KamengError(ErrorCode.invalid_request, detail="NUL characters are not allowed")
    return SignedRequest(
        api_key=headers["x-api-key"],
        timestamp=timestamp,
        nonce=nonce,
        signature=headers["x-signature"],
        method=request.method,
        path=path_with_query(request),
        body=await request.body(),
    )


SignedDep = Annotated[SignedRequest, Depends(signed_request)]


def _authenticate(conn: Connection, container: Container, req: SignedRequest) -> Caller:
    """The verified caller; its nonce is recorded (and rolled back with any refusal)."""
    caller, fresh = container.authenticator.caller_and_nonce(
        conn,
        req.api_key,
        nonce=req.nonce,
        now=container.clock(),
        window_s=container.settings.signature_window_s,
    )
    expected = sign_request(caller.secret, req.method, req.path, req.timestamp, req.nonce, req.body)
    if not signature_matches(expected, req.signature):
        raise KamengError(
            ErrorCode.auth_bad_signature,
            extra={
                "string_to_sign": string_to_sign(
                    req.method, req.path, req.timestamp, req.nonce, body_sha256(req.body)
                )
            },
        )
    if not fresh:
        raise KamengError(ErrorCode.auth_nonce_reused)
    return caller


class _Refused:
    """A handler's refusal carried out of the transaction so the nonce still commits."""

    def __init__(self, error: KamengError) -> None:
        self.error = error


class _RolledBack(Exception):
    """A refusal that rolled the whole transaction back; the nonce is recorded afterwards."""

    def __init__(self, error: KamengError, credential_id: int) -> None:
        super().__init__(error.code)
        self.error = error
        self.credential_id = credential_id


def _remember(container: Container, conn: Connection, credential_id: int, nonce: str) -> bool:
    return resellers.remember_nonce(
        conn,
        credential_id=credential_id,
        nonce=nonce,
        now=container.clock(),
        window_s=container.settings.signature_window_s,
    )


def _signed_job(
    container: Container, req: SignedRequest, handler: Callable[[Connection, Caller], T]
) -> Callable[[Connection], T | _Refused]:
    grouped = container.writer.group_commit

    def job(conn: Connection) -> T | _Refused:
        caller = _authenticate(conn, container, req)
        if not grouped:
            # One transaction per request: a refusal rolls it all back and the nonce is then
            # recorded on its own, which is cheaper than a savepoint around every success.
            try:
                return handler(conn, caller)
            except KamengError as exc:
                raise _RolledBack(exc, caller.credential_id) from None
        try:
            with savepoint(conn):
                return handler(conn, caller)
        except KamengError as exc:
            return _Refused(exc)

    return job


def _burn_nonce(container: Container, req: SignedRequest, refused: _RolledBack) -> KamengError:
    with container.db.connect() as conn:
        _remember(container, conn, refused.credential_id, req.nonce)
    return refused.error


def _result(outcome: T | _Refused) -> T:
    if isinstance(outcome, _Refused):
        raise outcome.error
    return outcome


def run_signed(
    container: Container, req: SignedRequest, handler: Callable[[Connection, Caller], T]
) -> T:
    """Authenticate, record the nonce and run `handler` in one write transaction.

    The nonce commits with the handler's effect. If the handler refuses the request, its
    effects are rolled back but the nonce is still recorded, so a refused request cannot be
    replayed later (say, once the balance has been topped up).
    """
    try:
        outcome = container.writer.run(_signed_job(container, req, handler))
    except _RolledBack as refused:
        raise _burn_nonce(container, req, refused) from None
    return _result(outcome)


async def run_signed_async(
    container: Container, req: SignedRequest, handler: Callable[[Connection, Caller], T]
) -> T:
    """`run_signed` for async endpoints (the order hot path): no thread-pool hand-off."""
    try:
        outcome = await container.writer.run_async(_signed_job(container, req, handler))
    except _RolledBack as refused:
        raise await asyncio.to_thread(_burn_nonce, container, req, refused) from None
    return _result(outcome)


async def run_as_async(
    container: Container,
    req: SignedRequest,
    caller: Caller,
    handler: Callable[[Connection, Caller], T],
) -> T:
    """A later write transaction of a request `run_signed_async` already authenticated.

    A request that must wait on a supplier between its checks and its effect cannot keep its
    first transaction open; its nonce was recorded there, so authenticating again would refuse
    it as a replay. The credential is read again instead: a key revoked while the supplier was
    answering is refused here rather than honoured for one more order."""

    def job(conn: Connection) -> T:
        current = container.authenticator.caller(conn, req.api_key)
        if current.credential_id != caller.credential_id:
            raise KamengError(ErrorCode.auth_invalid_key)
        return handler(conn, current)

    return await container.writer.run_async(job)

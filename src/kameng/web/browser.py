"""Who is behind a browser request: member session, anonymous id, CSRF token, guest orders.

Cookies (all HttpOnly, SameSite=Lax so a gateway's redirect back to us still carries them):
- `kameng_sid`: a member's session token (the database keeps only its SHA-256).
- `kameng_anon`: a random id every browser gets; it binds a guest's CSRF token and keeps one
  guest's duplicate-order guard apart from another's.
- `kameng_guest`: the order numbers and lookup secrets of orders this browser placed as a
  guest, so the order page opens after the gateway sends the buyer back. Each pair is checked
  against the database (the secret's hash) on use, so a forged cookie opens nothing.

CSRF: every form carries `csrf_token = HMAC(app secret, "csrf|" + session or anonymous id)`;
a POST whose token does not match the cookie it came with is refused. The token changes when
the session does (login, logout).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kameng.container import Container
from kameng.errors import ErrorCode, KamengError, normalize_language
from kameng.members import service as members

SESSION_COOKIE = "kameng_sid"
ANON_COOKIE = "kameng_anon"
GUEST_COOKIE = "kameng_guest"
LANG_COOKIE = "kameng_lang"
MAX_GUEST_ORDERS = 20


@dataclass
class Browser:
    """The request's buyer context; cookies to set are collected and applied to the response."""

    language: str
    anon_id: str
    session_token: str = ""
    member: members.SessionInfo | None = None
    guest_orders: dict[str, str] = field(default_factory=dict)
    _set: dict[str, str | None] = field(default_factory=dict)
    secure: bool = False
    app_secret: bytes = b""

    @property
    def csrf_token(self) -> str:
        binding = self.session_token if self.member is not None else self.anon_id
        mac = hmac.new(self.app_secret, f"csrf|{binding}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def check_csrf(self, token: str | None) -> None:
        if not token or not hmac.compare_digest(token, self.csrf_token):
            raise KamengError(ErrorCode.csrf_failed)

    def log_in(self, token: str, info: members.SessionInfo) -> None:
        self.session_token, self.member = token, info
        self._set[SESSION_COOKIE] = token

    def log_out(self) -> None:
        self.session_token, self.member = "", None
        self._set[SESSION_COOKIE] = None
        # On a shared computer the next person must not find the guest orders either.
        self.guest_orders = {}
        self._set[GUEST_COOKIE] = None
        # A new anonymous id too: nothing issued before logout stays valid after it.
        self.anon_id = secrets.token_urlsafe(18)
        self._set[ANON_COOKIE] = self.anon_id

    def remember_guest_order(self, order_no: str, secret: str) -> None:
        self.guest_orders.pop(order_no, None)
        self.guest_orders[order_no] = secret
        while len(self.guest_orders) > MAX_GUEST_ORDERS:
            self.guest_orders.pop(next(iter(self.guest_orders)))
        raw = json.dumps(self.guest_orders, separators=(",", ":")).encode()
        self._set[GUEST_COOKIE] = base64.urlsafe_b64encode(raw).decode()

    def set_language(self, language: str) -> None:
        self.language = language
        self._set[LANG_COOKIE] = language

    def apply(self, response: Response) -> Response:
        for name, value in self._set.items():
            if value is None:
                response.delete_cookie(name, path="/")
                continue
            response.set_cookie(
                name,
                value,
                max_age=365 * 86400 if name == LANG_COOKIE else 14 * 86400,
                path="/",
                httponly=True,
                samesite="lax",
                secure=self.secure,
            )
        return response


def _guest_orders(raw: str | None) -> dict[str, str]:
    if not raw or len(raw) > 4096:
        return {}
    try:
        data = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (ValueError, TypeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k)[:40]: str(v)[:40]
        for k, v in list(data.items())[:MAX_GUEST_ORDERS]
        if isinstance(k, str) and isinstance(v, str)
    }


def language_of(request: Request) -> str:
    asked = request.query_params.get("lang") or request.cookies.get(LANG_COOKIE)
    if asked:
        return "en" if asked.lower().startswith("en") else "zh-CN"
    return normalize_language(request.headers.get("accept-language"))


def browser(request: Request, container: Container) -> Browser:
    """Resolve the request's cookies (one cheap read when a session cookie is present)."""
    anon = request.cookies.get(ANON_COOKIE, "")
    fresh_anon = not (16 <= len(anon) <= 64)
    if fresh_anon:
        anon = secrets.token_urlsafe(18)
    ctx = Browser(
        language=language_of(request),
        anon_id=anon,
        guest_orders=_guest_orders(request.cookies.get(GUEST_COOKIE)),
        secure=container.settings.cookie_secure,
        app_secret=container.settings.app_secret_bytes,
    )
    if fresh_anon:
        ctx._set[ANON_COOKIE] = anon
    if request.query_params.get("lang"):
        ctx._set[LANG_COOKIE] = ctx.language
    token = request.cookies.get(SESSION_COOKIE, "")
    if token:
        with container.db.connect(write=False) as conn:
            info = members.resolve_session(conn, token=token, now=container.clock())
        if info is None:
            ctx._set[SESSION_COOKIE] = None  # expired or revoked: drop it
        else:
            ctx.session_token, ctx.member = token, info
            if info.stale:
                # An active member stays logged in: slide the expiry (server and cookie).
                with container.db.connect() as conn:
                    members.touch_session(conn, token=token, now=container.clock())
                ctx._set[SESSION_COOKIE] = token
    return ctx


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def form_data(request: Request) -> dict[str, Any]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}

"""The storefront's Jinja2 environment and the one `render` every page goes through, so each
page gets the same language, texts, CSRF token, member and security headers."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from kameng.money import format_cents
from kameng.web.browser import Browser
from kameng.web.i18n import TEXT

_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["money"] = format_cents


def _local_time(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


_env.filters["when"] = _local_time

# Pages never load anything from elsewhere, never leak the URL (it may carry an order number)
# to the gateway, and cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; form-action 'self' http: https:; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def render(ctx: Browser, template: str, *, status_code: int = 200, **values: Any) -> HTMLResponse:
    html = _env.get_template(template).render(
        lang=ctx.language,
        t=TEXT[ctx.language],
        csrf=ctx.csrf_token,
        member=ctx.member,
        **values,
    )
    return ctx.apply(HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS))  # type: ignore[return-value]

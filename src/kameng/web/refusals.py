"""The storefront's page for a form the body limit refused before any page code ran.

The refusal happens in front of the routes, so there is no session read yet and none is needed:
the page only says what went wrong, in the browser's language, with a way back. Rendering it
reads no cookie but the language one and sets none, so it cannot disturb a login or a cart.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kameng.errors import KamengError
from kameng.web.browser import Browser, language_of
from kameng.web.templating import render


async def error_page(request: Request, exc: KamengError) -> Response:
    ctx = Browser(language=language_of(request), anon_id="")
    return render(
        ctx,
        "error.html",
        status_code=exc.http_status,
        code=exc.code.value,
        message=exc.message(ctx.language),
        back="/",
    )

"""Request body limits, enforced in front of the app while the body streams in.

A limit checked inside a route comes too late: FastAPI reads a JSON body, and the signature
check reads the raw body, before anything decides whether the caller deserves to be heard, and
Starlette spools a multipart file to disk while it parses it. So one anonymous request could
make the server hold, or write, whatever it was sent. This middleware sits before the routes:

- a body whose declared Content-Length is over the route's cap is refused before the app runs
  (413; nothing is read);
- a streamed (chunked) body is counted as it arrives; once past the cap it is not read any
  further: the app is told the client went away, whatever it then answers is replaced by the
  413, and the connection is closed so the server does not go on draining the rest;
- multipart bodies are refused (415) on routes that take no files, before a byte is parsed;
- on routes that take HTML forms, url-encoded fields are counted and measured as they pass;
- an answer given without reading the whole body (a refusal from the headers, say) closes the
  connection too, for the same reason;
- a body with a declared length within the cap (every API call) passes straight through,
  unmetered: the server itself holds it to that length, and leaves at most the cap to drain.

Starlette's `RequestBodyLimitMiddleware` (FastAPI's `max_body_size`) caps the size too, but only
once the app first reads the body, answers in plain text, and keeps the connection open, so the
server still reads and discards everything the client goes on sending; it knows nothing of
multipart or form fields either.

Which limits apply where is the caller's table of `BodyRule`s (the app factory keeps it), first
match wins. Refusals are `KamengError`s: JSON in the house format, or a page for browser routes.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kameng.errors import ErrorCode, KamengError, normalize_language

log = logging.getLogger("kameng.bodylimit")

KIB = 1024
MIB = 1024 * KIB

PageRefusal = Callable[[Request, KamengError], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class BodyRule:
    """What a request to a path matching `pattern` may send.

    `pattern` is fnmatch-style on the decoded path; `*` also spans `/`. `form_fields` and
    `form_field_bytes` bound url-encoded forms (sizes as sent, still percent-encoded). With
    `page`, refusals are answered by it (HTML for browsers) instead of JSON.
    """

    pattern: str
    max_bytes: int
    multipart: bool = False
    form_fields: int | None = None
    form_field_bytes: int | None = None
    page: PageRefusal | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(fnmatch.translate(self.pattern)))

    def matches(self, path: str) -> bool:
        return self._regex.match(path) is not None


DEFAULT_RULE = BodyRule("*", 64 * KIB)


def human_size(n: int) -> str:
    """'16 KiB', '5.1 MiB': what a refusal tells the caller the cap is."""
    if n >= MIB:
        return f"{n / MIB:.1f}".removesuffix(".0") + " MiB"
    if n >= KIB:
        return f"{n / KIB:.1f}".removesuffix(".0") + " KiB"
    return f"{n} B"


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def refusal_from_headers(rule: BodyRule, headers: Headers) -> KamengError | None:
    """What can be refused from the headers alone, so the body is never read."""
    media_type = _media_type(headers)
    if media_type.startswith("multipart/") and not rule.multipart:
        return KamengError(ErrorCode.unsupported_media_type, media_type=media_type[:64])
    declared = headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > rule.max_bytes:
        return KamengError(ErrorCode.payload_too_large, limit=human_size(rule.max_bytes))
    return None


class _FormMeter:
    """Counts url-encoded fields (`&`-separated, as the form parser splits them) across chunks
    without keeping any of them."""

    def __init__(self, max_fields: int | None, max_field_bytes: int | None) -> None:
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.fields = 0  # fields started so far
        self.current = 0  # bytes of the field being read

    def feed(self, chunk: bytes) -> KamengError | None:
        if not chunk:
            return None
        parts = chunk.split(b"&")
        if self.fields == 0:
            self.fields = 1
        self.fields += len(parts) - 1
        sizes = [self.current + len(parts[0]), *(len(p) for p in parts[1:])]
        self.current = sizes[-1]
        if self.max_fields is not None and self.fields > self.max_fields:
            return KamengError(ErrorCode.too_many_form_fields, limit=self.max_fields)
        if self.max_field_bytes is not None and max(sizes) > self.max_field_bytes:
            return KamengError(
                ErrorCode.form_field_too_large, limit=human_size(self.max_field_bytes)
            )
        return None


async def _client_gone() -> Message:
    return {"type": "http.disconnect"}


async def answer(
    rule: BodyRule, exc: KamengError, scope: Scope, send: Send, *, cut_off: bool
) -> None:
    """Send the refusal and close the connection: the body (or its rest) stays unread, and on a
    kept-alive connection the server would otherwise read and discard all of it."""
    path = str(scope.get("path", ""))[:200]
    log.info("request body refused on %r: %s%s", path, exc.code, " (cut off)" if cut_off else "")
    request = Request(scope, _client_gone)
    if rule.page is not None:
        response = await rule.page(request, exc)
    else:
        language = normalize_language(request.headers.get("accept-language"))
        response = JSONResponse(exc.to_dict(language), status_code=exc.http_status)
    response.headers["Connection"] = "close"
    await response(scope, _client_gone, send)


def _closing(start: Message) -> Message:
    """The app answered without reading all of the body (a refusal from the headers, say): on a
    kept-alive connection the server would go on reading and discarding whatever the client
    still sends, however much that is. Closing the connection ends it."""
    headers = list(start.get("headers", []))
    if any(name.lower() == b"connection" for name, _ in headers):
        return start
    return {**start, "headers": [*headers, (b"connection", b"close")]}


class _Metered:
    """One request's body as it passes: counted, and cut off at the first refusal."""

    def __init__(
        self,
        rule: BodyRule,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        form: bool,
        has_body: bool,
    ) -> None:
        self.rule = rule
        self._scope = scope
        self._receive = receive
        self._send = send
        self.unread = has_body  # until the app has taken the body's last chunk
        self.received = 0
        self.form = _FormMeter(rule.form_fields, rule.form_field_bytes) if form else None
        self.refusal: KamengError | None = None
        self.app_started = False
        self.answered = False

    async def receive(self) -> Message:
        if self.refusal is not None:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        self.unread = bool(message.get("more_body", False))
        if self.received > self.rule.max_bytes:
            self.refusal = KamengError(
                ErrorCode.payload_too_large, limit=human_size(self.rule.max_bytes)
            )
        elif self.form is not None:
            self.refusal = self.form.feed(chunk)
        if self.refusal is not None:
            # From here on the app sees a client that went away; it never gets this chunk.
            return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refusal is None or self.app_started:
            if message["type"] == "http.response.start":
                self.app_started = True
                if self.unread:
                    message = _closing(message)
            await self._send(message)
            return
        # The app is answering a body it was not given in full: the refusal answers instead.
        await self.answer_once()

    async def answer_once(self) -> None:
        if self.answered or self.refusal is None:
            return
        self.answered = True
        await answer(self.rule, self.refusal, self._scope, self._send, cut_off=True)

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self._scope, self.receive, self.send)
        except Exception:
            # Reading a body we cut off fails in the app (a "client disconnect"): that is the
            # refusal, not a crash. Anything else, or after the app's own answer began, is.
            if self.refusal is None or self.app_started:
                raise
        if not self.app_started:
            await self.answer_once()


class BodyLimit:
    """Pure ASGI middleware applying `rules` (first match wins, else `default`)."""

    def __init__(
        self, app: ASGIApp, *, rules: Sequence[BodyRule], default: BodyRule = DEFAULT_RULE
    ) -> None:
        self.app = app
        self.rules = tuple(rules)
        self.default = default

    def rule_for(self, path: str) -> BodyRule:
        return next((r for r in self.rules if r.matches(path)), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rule_for(scope["path"])
        headers = Headers(scope=scope)
        refused = refusal_from_headers(rule, headers)
        if refused is not None:
            await answer(rule, refused, scope, send, cut_off=False)
            return
        form = _media_type(headers) == "application/x-www-form-urlencoded" and (
            rule.form_fields is not None or rule.form_field_bytes is not None
        )
        chunked = "transfer-encoding" in headers
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and not chunked and not form:
            # The common case (every API call): a declared length within the cap, which the
            # server itself holds the body to, so there is nothing to count. Passed straight
            # through: metering each message cost ~4 % of the order endpoint's throughput.
            await self.app(scope, receive, send)
            return
        has_body = chunked or (declared or "0") != "0"
        metered = _Metered(rule, scope, receive, send, form=form, has_body=has_body)
        await metered.run(self.app)

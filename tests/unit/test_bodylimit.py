"""The body limit middleware against a stub ASGI app: no server, no database.

What the live tests (tests/api/test_body_limits.py) cannot see directly is checked here: which
chunks the app was given, that it never saw the one that crossed the cap, and that its own
answer is replaced by the refusal.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from kameng.app import body_rules
from kameng.errors import ErrorCode, KamengError
from kameng.security.bodylimit import KIB, BodyLimit, BodyRule, _FormMeter, human_size


def scope_for(path: str, headers: dict[str, str] | None = None) -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


class Recorder:
    """A stub app that reads the whole body (as a route would) and answers 200 with its size."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.called = False
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called = True
        try:
            body = await Request(scope, receive).body()
        except ClientDisconnect:
            self.disconnected = True
            raise
        await PlainTextResponse(str(len(body)))(scope, receive, send)

    async def record(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.chunks.append(message.get("body", b""))
            return message

        await self(scope, recording_receive, send)


def run(
    middleware: BodyLimit, scope: Scope, chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes, int]:
    """Drive one request; returns (status, headers, body, chunks the middleware pulled)."""
    sent: list[Message] = []
    pulled = 0

    async def receive() -> Message:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body, pulled


def limited(app: Any, **rule: Any) -> BodyLimit:
    return BodyLimit(app.record, rules=[BodyRule("/x*", **{"max_bytes": 100, **rule})])


def test_a_body_under_the_cap_reaches_the_app_whole() -> None:
    app = Recorder()
    status, _, body, _ = run(limited(app), scope_for("/x"), [b"a" * 60, b"b" * 40])
    assert (status, body) == (200, b"100")
    assert app.chunks == [b"a" * 60, b"b" * 40, b""]


def test_a_streamed_body_is_cut_at_the_cap_and_the_refusal_replaces_the_answer() -> None:
    app = Recorder()
    chunks = [b"a" * 60, b"b" * 60] + [b"c" * 60] * 1000
    status, headers, body, pulled = run(limited(app), scope_for("/x"), chunks)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert "100 B" in json.loads(body)["error"]["message"]
    # The app got the first chunk only, never the one that crossed the cap, and nothing after.
    assert app.chunks == [b"a" * 60] and app.disconnected
    assert pulled == 2


def test_a_declared_length_over_the_cap_is_refused_before_the_app_runs() -> None:
    app = Recorder()
    scope = scope_for("/x", {"content-length": "101", "accept-language": "en"})
    status, _, body, pulled = run(limited(app), scope, [b"a" * 101])
    assert status == 413 and not app.called and pulled == 0
    error = json.loads(body)["error"]
    assert error == {
        "code": "payload_too_large",
        "message": "Request body too large: this address accepts at most 100 B",
    }


@pytest.mark.parametrize("multipart", [False, True])
def test_multipart_only_where_the_rule_allows_it(multipart: bool) -> None:
    app = Recorder()
    scope = scope_for("/x", {"content-type": "multipart/form-data; boundary=zz"})
    status, _, body, pulled = run(limited(app, multipart=multipart), scope, [b"--zz--\r\n"])
    if multipart:
        assert status == 200 and app.called
    else:
        assert status == 415 and not app.called and pulled == 0
        assert json.loads(body)["error"]["code"] == "unsupported_media_type"


def test_form_fields_are_counted_across_chunks() -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    rule = {"max_bytes": 10_000, "form_fields": 3, "form_field_bytes": 10}
    ok = Recorder()
    assert run(limited(ok, **rule), scope_for("/x", form), [b"a=1&b=", b"2&c=3"])[0] == 200
    too_many = Recorder()
    chunks = [b"a=1&b=2&c", b"=3&d"]
    status, _, body, _ = run(limited(too_many, **rule), scope_for("/x", form), chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_many_form_fields"
    assert too_many.chunks == [b"a=1&b=2&c"]
    long_field = Recorder()
    status, _, body, _ = run(
        limited(long_field, **rule), scope_for("/x", form), [b"a=1&b=12345", b"67890"]
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "form_field_too_large"
    # The same body as JSON is not a form: only the size cap applies.
    json_body = Recorder()
    plain = scope_for("/x", {"content-type": "application/json"})
    assert run(limited(json_body, **rule), plain, [b"a=1&b=2&c=3&d=4"])[0] == 200


def test_form_meter_takes_chunks_split_anywhere() -> None:
    body = b"&".join(b"f%d=%s" % (i, b"v" * i) for i in range(8))  # the longest: 10 bytes
    for cut in range(len(body) + 1):
        meter = _FormMeter(8, 10)
        assert meter.feed(body[:cut]) is None and meter.feed(body[cut:]) is None
        assert meter.fields == 8
        too_long = _FormMeter(8, 9)
        assert too_long.feed(body[:cut]) or too_long.feed(body[cut:])
    assert _FormMeter(7, None).feed(body) is not None


def test_a_page_rule_answers_with_its_page() -> None:
    async def page(request: Request, exc: KamengError) -> Response:
        return HTMLResponse(f"<p>{exc.code}</p>", status_code=exc.http_status)

    app = Recorder()
    middleware = BodyLimit(app.record, rules=[BodyRule("*", 10, page=page)])
    status, headers, body, _ = run(middleware, scope_for("/login"), [b"x" * 11])
    assert (status, body) == (413, b"<p>payload_too_large</p>")
    assert headers["connection"] == "close"


def test_an_app_that_started_its_answer_keeps_it() -> None:
    async def early(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] == "http.request":
            pass
        await send({"type": "http.response.body", "body": b"done"})

    middleware = BodyLimit(early, rules=[BodyRule("*", 10)])
    status, _, body, _ = run(middleware, scope_for("/"), [b"x" * 11])
    assert (status, body) == (200, b"done")


def test_an_unrelated_crash_is_not_hidden() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        run(BodyLimit(broken, rules=[]), scope_for("/"), [b"x"])


def test_the_route_table() -> None:
    middleware = BodyLimit(Recorder(), rules=body_rules())
    caps = {
        "/pay/notify/epay": 16 * KIB,
        "/api/v1/callbacks/suppliers/sim1": 256 * KIB,
        "/api/staff/risk/rule-sets": 1024 * KIB,
        "/api/staff/risk/rule-sets/3/activate": 64 * KIB,
        "/api/v1/orders": 64 * KIB,
        "/account/documents": 5 * 1024 * KIB + 64 * KIB,
        "/login": 64 * KIB,
        "/buy/STEAM-50": 64 * KIB,
        "/healthz": 64 * KIB,
    }
    assert {path: middleware.rule_for(path).max_bytes for path in caps} == caps
    assert [p for p in caps if middleware.rule_for(p).multipart] == ["/account/documents"]
    pages = [p for p in caps if middleware.rule_for(p).page is not None]
    assert pages == ["/account/documents", "/login", "/buy/STEAM-50", "/healthz"]
    assert middleware.rule_for("/buy/X").form_fields == 100
    assert middleware.rule_for("/api/v1/orders").form_fields is None


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (100, "100 B"),
        (16 * KIB, "16 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024 * KIB + 64 * KIB, "5.1 MiB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_every_body_refusal_has_its_status() -> None:
    statuses = {
        code: KamengError(code).http_status
        for code in (
            ErrorCode.payload_too_large,
            ErrorCode.unsupported_media_type,
            ErrorCode.too_many_form_fields,
            ErrorCode.form_field_too_large,
        )
    }
    assert set(statuses.values()) == {413, 415}
    assert statuses[ErrorCode.unsupported_media_type] == 415


def test_an_answer_without_reading_the_body_closes_the_connection() -> None:
    async def ignores_body(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("no", status_code=401)(scope, receive, send)

    middleware = BodyLimit(ignores_body, rules=[])
    announced = scope_for("/", {"transfer-encoding": "chunked"})
    assert run(middleware, announced, [b"x"])[1]["connection"] == "close"
    assert "connection" not in run(middleware, scope_for("/"), [])[1]
    # An app that read its body whole leaves the connection to the server.
    read = BodyLimit(Recorder(), rules=[])
    assert "connection" not in run(read, scope_for("/", {"content-length": "1"}), [b"x"])[1]

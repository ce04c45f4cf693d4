"""Request bodies are capped per route before anything reads them, over real HTTP.

Each class of route (Reseller API, gateway notify, supplier callback, storefront form, document
upload) is sent a body over its cap, both declared (Content-Length) and streamed (chunked), by a
client that keeps sending until the server answers (tests/support/rawhttp.py). The server must
answer the refusal without reading the body: for a declared length before a single body byte is
sent, for a stream once the socket buffers between the two are full. Whatever the route does
after reading its body (authenticate, look up the gateway, apply the callback, check the form's
CSRF token) is watched and must never happen.
"""

from __future__ import annotations

import itertools
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import starlette.formparsers
from sqlalchemy import text

import kameng.api.payments
import kameng.pipeline.callbacks
from kameng.container import Container
from kameng.documents import service as documents
from kameng.members import service as members
from kameng.security.bodylimit import KIB, MIB
from kameng.web import documents as upload_page
from kameng.web.browser import Browser
from tests.api.helpers import error_of
from tests.support import rawhttp

HUGE = 256 * MIB
# What may go out before a server that stopped reading answers: the cap, uvicorn's 64 KiB
# read-ahead and the kernel's socket buffers on loopback (a few MiB).
SENT_BEFORE_ANSWER = 24 * MIB
PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
FILE_PART = (
    b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="licence.pdf"\r\n'
    b"Content-Type: application/pdf\r\n\r\n" + PDF
)


def signature_headers(api_key: str = "bogus-key") -> dict[str, str]:
    return {
        "X-Api-Key": api_key,
        "X-Timestamp": str(int(time.time())),
        "X-Nonce": secrets.token_hex(8),
        "X-Signature": "0" * 64,
        "Content-Type": "application/json",
    }


class Watch:
    """Counts calls to a function the app calls only once it has read a request's body."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.calls = 0
        real = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


ROUTES: dict[str, tuple[str, dict[str, str], int]] = {
    # class of route: (path, headers, cap)
    "reseller_api": ("/api/v1/orders", {}, 64 * KIB),
    "notify": (
        "/pay/notify/epay-main",
        {"Content-Type": "application/x-www-form-urlencoded"},
        16 * KIB,
    ),
    "supplier_callback": (
        "/api/v1/callbacks/suppliers/sim1",
        {"Content-Type": "application/json"},
        256 * KIB,
    ),
    "storefront_form": ("/login", {"Content-Type": "application/x-www-form-urlencoded"}, 64 * KIB),
    "document_upload": (
        upload_page.PAGE,
        {"Content-Type": "multipart/form-data; boundary=b0undary"},
        upload_page.MAX_UPLOAD_BODY,
    ),
}


@pytest.fixture
def after_body(monkeypatch: pytest.MonkeyPatch, any_db: Container) -> dict[str, Watch]:
    """For each class of route, what it does first once it has its body."""
    return {
        "reseller_api": Watch(monkeypatch, any_db.authenticator, "caller_and_nonce"),
        "notify": Watch(monkeypatch, kameng.api.payments, "_gateway"),
        "supplier_callback": Watch(monkeypatch, kameng.pipeline.callbacks, "receive"),
        "storefront_form": Watch(monkeypatch, Browser, "check_csrf"),
        "document_upload": Watch(monkeypatch, Browser, "check_csrf"),
    }


def headers_for(route: str) -> dict[str, str]:
    _, headers, _ = ROUTES[route]
    return {**(signature_headers() if route == "reseller_api" else {}), **headers}


def assert_refused(answer: rawhttp.Answer, route: str, status: int = 413) -> None:
    """The route's refusal: the house error JSON, or the page for browser routes."""
    assert answer.status == (422 if route == "document_upload" else status), answer
    assert answer.headers.get("connection") == "close"
    if route == "document_upload":  # said on the page as a file over the limit
        assert 'data-code="document_invalid"' in answer.text
        assert "5 MB" in answer.text
    elif route == "storefront_form":
        assert answer.headers["content-type"].startswith("text/html")
        assert 'data-code="payload_too_large"' in answer.text
    else:
        assert answer.json()["error"]["code"] == "payload_too_large"
        assert "请求内容过大" in answer.json()["error"]["message"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_sent(
    any_url: str, after_body: dict[str, Watch], route: str
) -> None:
    path, _, _ = ROUTES[route]
    # Only the headers go out: the answer must not wait for a body that never comes.
    answer = rawhttp.post(
        any_url, path, (), headers=headers_for(route), content_length=HUGE, timeout=15
    )
    assert answer.sent == 0
    assert_refused(answer, route)
    assert after_body[route].calls == 0


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_streamed_body_over_the_cap_is_cut_off(
    any_url: str, after_body: dict[str, Watch], route: str
) -> None:
    path, _, cap = ROUTES[route]
    chunks = rawhttp.repeated(b"x" * (64 * KIB), HUGE)
    if route == "document_upload":  # a well-formed start, or the parser refuses it at once
        chunks = itertools.chain([FILE_PART], rawhttp.repeated(b"\0" * (64 * KIB), HUGE))
    if route == "storefront_form":  # fields within the form limits: only the size trips
        chunks = rawhttp.repeated(b"f=" + b"x" * (8 * KIB - 3) + b"&", HUGE)
    answer = rawhttp.post(any_url, path, chunks, headers=headers_for(route))
    assert_refused(answer, route)
    assert cap < answer.sent < SENT_BEFORE_ANSWER, answer.sent
    assert after_body[route].calls == 0


def test_a_bogus_key_is_told_413_not_401_after_the_whole_body(
    any_url: str, after_body: dict[str, Watch]
) -> None:
    """The reported case: 256 MiB with a made-up API key, through an ordinary client."""
    pulled = 0

    def body() -> Iterator[bytes]:
        nonlocal pulled
        for chunk in rawhttp.repeated(b"{" * (64 * KIB), HUGE):
            pulled += len(chunk)
            yield chunk

    resp = httpx.post(
        any_url + "/api/v1/orders",
        content=body(),
        headers={**signature_headers(), "Accept-Language": "en"},
        timeout=30,
    )
    error = error_of(resp, 413, "payload_too_large")
    assert error["message"] == "Request body too large: this address accepts at most 64 KiB"
    assert pulled < SENT_BEFORE_ANSWER
    assert after_body["reseller_api"].calls == 0
    # Within the cap the same request goes on to the key check, as before.
    small = httpx.post(any_url + "/api/v1/orders", content=b"{}", headers=signature_headers())
    error_of(small, 401, "auth_invalid_key")
    assert after_body["reseller_api"].calls == 1


def test_small_bodies_still_reach_notify_and_callbacks(
    any_url: str, after_body: dict[str, Watch]
) -> None:
    notify = httpx.post(any_url + "/pay/notify/no-such-gateway", data={"trade_status": "x" * 8000})
    assert (notify.status_code, notify.text) == (200, "fail")
    assert after_body["notify"].calls == 1
    callback = httpx.post(
        any_url + "/api/v1/callbacks/suppliers/no-such-supplier", content=b"{" * (200 * KIB)
    )
    assert callback.status_code != 413 and after_body["supplier_callback"].calls == 1


class SpoolWatch:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made = 0
        watch = self

        class Counted(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                watch.made += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Counted)


def multipart(fields: dict[str, str], file: bytes, boundary: str = "b0undary") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(FILE_PART.replace(b"b0undary", boundary.encode()) + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("declared", [True, False])
def test_multipart_to_the_notify_url_is_refused_unparsed(
    any_url: str,
    any_db: Container,
    after_body: dict[str, Watch],
    monkeypatch: pytest.MonkeyPatch,
    declared: bool,
) -> None:
    spool = SpoolWatch(monkeypatch)
    body = multipart({"out_trade_no": "P1"}, b"\0" * (2 * MIB))
    answer = rawhttp.post(
        any_url,
        "/pay/notify/epay-main",
        [body],
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        content_length=len(body) if declared else None,
    )
    assert answer.status == 415 and answer.headers["connection"] == "close"
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert "multipart/form-data" in answer.json()["error"]["message"]
    assert spool.made == 0 and after_body["notify"].calls == 0
    with any_db.db.connect(write=False) as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_notifies")).scalar_one() == 0


# -- the storefront --------------------------------------------------------------------------


@pytest.fixture
def browser_client(any_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=any_url, follow_redirects=False, timeout=30) as client:
        yield client


def csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    return match.group(1)


def refused_page(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    assert f'data-code="{code}"' in resp.text
    return resp.text


def test_storefront_forms_are_bounded_in_fields(
    browser_client: httpx.Client, after_body: dict[str, Watch]
) -> None:
    token = csrf(browser_client.get("/login").text)
    many = {f"f{i}": "1" for i in range(100)} | {"csrf_token": token}
    page = refused_page(browser_client.post("/login", data=many), 413, "too_many_form_fields")
    assert "最多 100 个" in page
    long_field = {"csrf_token": token, "email": "a" * (8 * KIB)}
    page = refused_page(
        browser_client.post("/login?lang=en", data=long_field), 413, "form_field_too_large"
    )
    assert "at most 8 KiB each" in page
    files = {"file": ("x.txt", b"x", "text/plain")}
    refused_page(
        browser_client.post("/login", data={"csrf_token": token}, files=files),
        415,
        "unsupported_media_type",
    )
    assert after_body["storefront_form"].calls == 0
    # A real form at its limits still reaches the page.
    fine = {"csrf_token": token, "email": "nobody@example.com", "password": "p" * 20}
    fine |= {f"extra{i}": "v" * 100 for i in range(96)}
    refused_page(browser_client.post("/login", data=fine), 401, "login_failed")
    assert after_body["storefront_form"].calls == 1


def test_a_streamed_document_upload_works_under_its_limit_and_is_refused_over_it(
    any_url: str,
    any_db: Container,
    browser_client: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with any_db.db.connect() as conn:
        now = any_db.clock()
        member_id = members.register(
            conn,
            email=f"doc-{secrets.token_hex(4)}@example.com",
            password_hash="$argon2id$placeholder",
            language="zh-CN",
            now=now,
        )
        session = members.start_session(
            conn, member_id=member_id, previous_token=None, ip="127.0.0.1", now=now
        )
    browser_client.cookies.set("kameng_sid", session)
    token = csrf(browser_client.get(upload_page.PAGE).text)
    spool = SpoolWatch(monkeypatch)

    def listed() -> int:
        with any_db.db.connect(write=False) as conn:
            return len(documents.list_for_member(conn, member_id=member_id))

    def stream(body: bytes) -> Callable[[], Iterator[bytes]]:
        return lambda: (body[i : i + 64 * KIB] for i in range(0, len(body), 64 * KIB))

    fields = {"csrf_token": token, "kind": "business_license"}
    ok = multipart(fields, b"\0" * (2 * MIB))
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    done = browser_client.post(upload_page.PAGE, content=stream(ok)(), headers=headers)
    assert done.status_code == 303, done.text
    assert listed() == 1 and spool.made == 1  # the one route that may spool a file does

    over = multipart(fields, b"\0" * (documents.MAX_BYTES + 128 * KIB))
    cookie = f"kameng_sid={session}"
    answer = rawhttp.post(
        any_url, upload_page.PAGE, stream(over)(), headers={**headers, "Cookie": cookie}
    )
    assert answer.status == 422 and 'data-code="document_invalid"' in answer.text
    assert "文件超过 5 MB 上限" in answer.text
    assert 'id="document-' in answer.text  # the member's own page, with their list
    assert listed() == 1


def test_a_staff_rule_set_may_be_larger_than_other_api_bodies(any_url: str) -> None:
    rules = b'{"rules": [' + b",".join([b'{"code": "r", "when": {}}'] * 8000) + b"]}"
    assert 64 * KIB < len(rules) < MIB
    resp = httpx.post(
        any_url + "/api/staff/risk/rule-sets",
        content=rules,
        headers={"Content-Type": "application/json"},
    )
    error_of(resp, 401, "staff_auth_required")
    over = rawhttp.post(
        any_url,
        "/api/staff/risk/rule-sets",
        rawhttp.repeated(b" " * (64 * KIB), 4 * MIB),
        headers={"Content-Type": "application/json"},
    )
    assert over.status == 413 and over.json()["error"]["code"] == "payload_too_large"


def test_a_refusal_from_the_headers_does_not_drain_the_body(any_url: str) -> None:
    """Unsigned: refused before the body is read, and the connection is closed rather than
    left to read and discard the 256 MiB still coming."""
    answer = rawhttp.post(
        any_url,
        "/api/v1/orders",
        rawhttp.repeated(b"{" * (64 * KIB), HUGE),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status == 401 and answer.json()["error"]["code"] == "auth_missing"
    assert answer.headers["connection"] == "close"
    assert answer.sent < SENT_BEFORE_ANSWER

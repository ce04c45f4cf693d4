"""Small helpers shared by the HTTP API tests (real HTTP against the live server)."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any

import httpx

from kameng.apiclient import ResellerClient
from kameng.security.signing import signed_headers
from tests.support.factories import ResellerCreds


def error_of(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the exact status and stable error code; return the error object."""
    assert resp.status_code == status, f"{resp.status_code} {resp.text}"
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"], body
    return error


def signed_send(
    base_url: str,
    creds: ResellerCreds,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    sign_method: str | None = None,
    sign_path: str | None = None,
    sign_body: bytes | None = None,
    secret: str | None = None,
    api_key: str | None = None,
    timestamp: int | None = None,
    nonce: str | None = None,
    headers: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> httpx.Response:
    """Send a request whose signature covers (sign_method, sign_path, sign_body), which default
    to what is actually sent; lets a test sign one thing and send another."""
    all_headers = signed_headers(
        api_key=api_key or creds.api_key,
        secret=secret or creds.api_secret,
        method=sign_method or method,
        path_with_query=sign_path or path,
        body=body if sign_body is None else sign_body,
        timestamp=int(time.time()) if timestamp is None else timestamp,
        nonce=nonce or secrets.token_hex(12),
    )
    if body:
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    for name in drop:
        all_headers.pop(name, None)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        return http.request(method, path, content=body, headers=all_headers)


def order_json(sku: str, quantity: int = 1, **extra: Any) -> bytes:
    return json.dumps(
        {"sku": sku, "quantity": quantity, "fields": {}, **extra}, ensure_ascii=False
    ).encode()


def new_key() -> str:
    return str(uuid.uuid4())


def all_orders(client: ResellerClient, **params: Any) -> list[dict[str, Any]]:
    """Every order of the caller, following `next_cursor` to the end."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        resp = client.orders(limit=100, cursor=cursor, **params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        out.extend(page["orders"])
        cursor = page["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination never ended")


def balance(client: ResellerClient) -> tuple[str, str]:
    resp = client.balance()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["available"], body["held"]

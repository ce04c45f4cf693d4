"""A signed client for Reseller API v1 — for scripts, tests, benchmarks and docking sites.

Kept beside the signing code rather than in `api/` so that anything (including a future
supplier adapter that docks to another kameng site) can use it without importing the edge.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any

import httpx

from kameng.security.signing import signed_headers


class ResellerClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        language: str = "zh-CN",
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.language = language
        self.http = client or httpx.Client(base_url=base_url, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        timestamp: int | None = None,
        nonce: str | None = None,
        raw_body: bytes | None = None,
    ) -> httpx.Response:
        if raw_body is None:
            raw_body = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        url = httpx.URL(path, params={k: v for k, v in (params or {}).items() if v is not None})
        path_with_query = url.raw_path.decode()
        all_headers = signed_headers(
            api_key=self.api_key,
            secret=self.api_secret,
            method=method,
            path_with_query=path_with_query,
            body=raw_body,
            timestamp=int(time.time()) if timestamp is None else timestamp,
            nonce=nonce or secrets.token_hex(12),
        )
        all_headers["Accept-Language"] = self.language
        if raw_body:
            all_headers["Content-Type"] = "application/json"
        if idempotency_key:
            all_headers["Idempotency-Key"] = idempotency_key
        all_headers.update(headers or {})
        return self.http.request(method, path_with_query, content=raw_body, headers=all_headers)

    def products(self) -> httpx.Response:
        return self.request("GET", "/api/v1/products")

    def create_order(
        self,
        sku: str,
        quantity: int = 1,
        fields: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body = {"sku": sku, "quantity": quantity, "fields": fields or {}, **extra}
        return self.request(
            "POST",
            "/api/v1/orders",
            body=body,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
        )

    def order(self, order_no: str) -> httpx.Response:
        return self.request("GET", f"/api/v1/orders/{order_no}")

    def orders(self, **params: Any) -> httpx.Response:
        return self.request("GET", "/api/v1/orders", params=params)

    def cancel(self, order_no: str) -> httpx.Response:
        return self.request("POST", f"/api/v1/orders/{order_no}/cancel")

    def balance(self) -> httpx.Response:
        return self.request("GET", "/api/v1/balance")

    def close(self) -> None:
        self.http.close()

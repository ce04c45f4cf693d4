"""Signed outbound HTTP shared by the adapters that speak kameng's signing scheme.

Both the bundled simulator and another kameng site authenticate us with the Reseller API v1
signature (DESIGN §7), and both sign their callbacks with the webhook scheme, so the signing,
the timeouts and the mapping of transport failures live here once.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import httpx

from kameng.security.signing import signed_headers, verify_webhook
from kameng.suppliers.port import CallbackRefused


class TransportFailure(Exception):
    """The request may or may not have been processed (timeout, reset, refused connection)."""


class SignedHttp:
    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        secret: str,
        timeout_s: float,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_key = api_key
        self.secret = secret
        # One pooled client per supplier: connection reuse matters at hundreds of purchases/s.
        self.http = client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        raw = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        url = httpx.URL(path, params={k: v for k, v in (params or {}).items() if v is not None})
        signed = signed_headers(
            api_key=self.api_key,
            secret=self.secret,
            method=method,
            path_with_query=url.raw_path.decode(),
            body=raw,
            timestamp=int(time.time()),
            nonce=secrets.token_hex(12),
        )
        all_headers = {**signed, **(headers or {})}
        if raw:
            all_headers["Content-Type"] = "application/json"
        try:
            return await self.http.request(method, url, content=raw, headers=all_headers)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise TransportFailure(type(exc).__name__) from exc

    def verify_callback(self, *, headers: dict[str, str], body: bytes, now: int) -> Any:
        """Check the webhook signature and decode the JSON body, or refuse."""
        lowered = {k.lower(): v for k, v in headers.items()}
        header = lowered.get("x-kameng-signature", "")
        if not header or not verify_webhook([self.secret], header, body, now=now):
            raise CallbackRefused("bad_signature")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise CallbackRefused("malformed_body") from exc
        if not isinstance(payload, dict):
            raise CallbackRefused("malformed_body")
        return payload

    async def aclose(self) -> None:
        await self.http.aclose()


def json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None

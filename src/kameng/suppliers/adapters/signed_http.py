"""Signed outbound HTTP shared by the adapters that speak kameng's signing scheme.

Both the bundled simulator and another kameng site authenticate us with the Reseller API v1
signature (DESIGN §7), and both sign their callbacks with the webhook scheme, so the signing,
the timeouts and the mapping of transport failures live here once.

Supplier calls go through aiohttp rather than httpx (a departure from DESIGN §2, with a
measured reason): with tens of purchases in flight per worker, httpx's connection pool spent
7–15 ms of CPU per call assigning requests to connections (encode/httpx#3215) — more than the
whole rest of an order's processing — while aiohttp's stays well under a millisecond.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yarl

from kameng.security.signing import signed_headers, verify_webhook
from kameng.suppliers.port import CallbackRefused

MAX_CONNECTIONS = 100


class TransportFailure(Exception):
    """The request may or may not have been processed (timeout, reset, refused connection)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class SignedHttp:
    def __init__(self, *, base_url: str, api_key: str, secret: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0))
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Built lazily inside the running loop (aiohttp binds a session to its loop); one
        # pooled session per supplier, reused by every purchase of this worker.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(
                    limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS, keepalive_timeout=30
                ),
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "kameng"},
            )
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        raw = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        query = {k: v for k, v in (params or {}).items() if v is not None}
        path_with_query = f"{path}?{urlencode(query)}" if query else path
        signed = signed_headers(
            api_key=self.api_key,
            secret=self.secret,
            method=method,
            path_with_query=path_with_query,
            body=raw,
            timestamp=int(time.time()),
            nonce=secrets.token_hex(12),
        )
        all_headers = {**signed, **(headers or {})}
        if raw:
            all_headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method,
                # Sent exactly as signed: no re-quoting of the path or query on the way out.
                yarl.URL(self.base_url + path_with_query, encoded=True),
                data=raw or None,
                headers=all_headers,
                allow_redirects=False,
            ) as response:
                return Reply(response.status, await response.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
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
        if self._session is not None and not self._session.closed:
            await self._session.close()


def json_or_none(response: Reply) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None

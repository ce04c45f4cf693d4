"""Request and webhook signatures (DESIGN §7), reproduced by `reference/signing-vectors.json`.

Request: X-Signature = hex HMAC-SHA256(secret, METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\n
sha256hex(body)). Webhook: `X-Kameng-Signature: t=<unix>,v1=<hex HMAC(secret, t + "." + body)>`,
several v1 values allowed so a secret can be rotated without dropping deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()


def body_sha256(body: bytes) -> str:
    return EMPTY_BODY_SHA256 if not body else hashlib.sha256(body).hexdigest()


def string_to_sign(
    method: str, path_with_query: str, timestamp: str, nonce: str, body_hash: str
) -> str:
    return f"{method.upper()}\n{path_with_query}\n{timestamp}\n{nonce}\n{body_hash}"


def sign_request(
    secret: str, method: str, path_with_query: str, timestamp: str, nonce: str, body: bytes
) -> str:
    message = string_to_sign(method, path_with_query, timestamp, nonce, body_sha256(body))
    return hmac.digest(secret.encode(), message.encode(), "sha256").hex()


def signature_matches(expected_hex: str, given: str) -> bool:
    """Constant-time comparison that tolerates upper-case hex from callers."""
    return hmac.compare_digest(expected_hex, given.strip().lower())


def signed_headers(
    *,
    api_key: str,
    secret: str,
    method: str,
    path_with_query: str,
    body: bytes,
    timestamp: int,
    nonce: str,
) -> dict[str, str]:
    """Headers a client sends; used by our own CLI, tests, benchmarks and the kameng adapter."""
    ts = str(timestamp)
    return {
        "X-Api-Key": api_key,
        "X-Timestamp": ts,
        "X-Nonce": nonce,
        "X-Signature": sign_request(secret, method, path_with_query, ts, nonce, body),
    }


def webhook_signature(secret: str, timestamp: int | str, body: bytes) -> str:
    payload = str(timestamp).encode() + b"." + body
    return hmac.digest(secret.encode(), payload, "sha256").hex()


def webhook_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={webhook_signature(secret, timestamp, body)}"


def verify_webhook(
    secrets: Iterable[str], header: str, body: bytes, *, now: int, tolerance_s: int = 300
) -> bool:
    """True when some secret signs the body and the timestamp is within ±tolerance.

    Unlike most SDKs we also refuse timestamps from the future: a sender with a fast clock can
    otherwise mint signatures that stay valid long after the window should have closed.
    """
    timestamp: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            candidates.append(value.lower())
    if timestamp is None or not (timestamp.isascii() and timestamp.isdigit()) or not candidates:
        return False
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    for secret in secrets:
        expected = webhook_signature(secret, timestamp, body)
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return True
    return False
